"""Weights on 2 MiB pages: the runtime's stored weights moved into one huge-page arena.

A decode step streams every weight once per token. On 4 KiB pages each 4 KiB of a stream is a
new TLB entry and the hardware prefetchers stop at every page boundary; a layer weight of 1-4 MB
is a few hundred such pages per kernel call. Moved onto transparent huge pages (Linux, THP in
``madvise`` or ``always`` mode), the same kernels read the SmolLM2 layer shapes 5-18% faster,
the more so the higher the host's bandwidth (``benchmarks/results/hugepages.jsonl``).

:func:`to_hugepages` moves the tensors that the method modules (:class:`~lazyneuron.surgery.LazyModule`)
hold themselves (the runtime's converted weights, fused sibling buffers, activation sparsity's
rows, expert blocks), never a tensor of the model's own modules, except a converted linear's
``base.weight`` that already shares storage with the converted weight (``restore_base`` copies it
out again on ``revert_``). Each tensor keeps its identity: its storage is swapped in place
(``Tensor.set_``), so every reference to it, cached argument tuples included, sees the move.
Values are copied byte for byte; outputs do not change. Once every method module is reverted, the
arena is freed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from typing import Any, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

MIN_BYTES = 64 << 10  # smaller tensors (biases, norms, scales) stay where they are
ALIGN = 4096  # each storage starts on its own 4 KiB line in the arena


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether this process can get transparent huge pages by asking for them: Linux with THP in
    ``madvise`` or ``always`` mode, and the runtime's C++ extension (which allocates the arena)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        return False
    if "[never]" in mode:
        return False
    from ..kernels._build import extension

    return extension("gemv") is not None


def arena(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` in 2 MiB-aligned memory marked for huge pages (its pages
    are faulted in, as huge pages where the OS has them, as it is copied into); a plain tensor
    where huge pages are not :func:`available`."""
    if not available():
        return torch.empty(nbytes, dtype=torch.uint8)
    from ..kernels._build import extension

    huge = 2 << 20
    whole = max(huge, -(-nbytes // huge) * huge)  # whole huge pages (smaller requests get a plain copy)
    return extension("gemv").hugepage_copy(torch.empty(whole, dtype=torch.uint8))[:nbytes]


def _tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors in ``value``: itself, or inside tuples, lists, dict values and dataclass fields
    (three levels deep; the runtime keeps argument tuples and fused groups that way)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3:
        if isinstance(value, (tuple, list)):
            items = value
        elif isinstance(value, dict):
            items = list(value.values())
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            items = [getattr(value, f.name) for f in dataclasses.fields(value)]
        else:
            return
        for v in items:
            yield from _tensors(v, depth + 1)


def _own_tensors(m: nn.Module) -> Iterator[torch.Tensor]:
    """The tensors a method module holds itself: its parameters, buffers and attributes, not its
    submodules' (``base`` is the model's own module)."""
    yield from (p for p in m._parameters.values() if p is not None)
    yield from (b for b in m._buffers.values() if b is not None)
    for k, v in vars(m).items():
        if k not in ("_parameters", "_buffers", "_modules"):
            yield from _tensors(v)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def to_hugepages(model: nn.Module) -> dict[str, int]:
    """Move the method modules' stored weights into one huge-page arena (see the module's
    docstring). Returns {"tensors": moved, "bytes": arena size}; nothing is moved where huge pages
    are not available."""
    if not available():
        return {"tensors": 0, "bytes": 0}
    from ..surgery import LazyModule

    lazy = [m for m in model.modules() if isinstance(m, LazyModule)]
    if not lazy:
        return {"tensors": 0, "bytes": 0}
    # a converted linear's base.weight that shares storage with its converted weight moves with it
    # (restore_base copies it out on revert); every other tensor of the model's own modules pins
    # its storage where it is
    shared_bases: dict[int, nn.Parameter] = {}
    for m in lazy:
        base = m._modules.get("base")
        w = getattr(base, "weight", None) if base is not None else None
        wt = getattr(m, "wt", None)
        if isinstance(w, nn.Parameter) and isinstance(wt, torch.Tensor) and type(m).__name__ in ("FastLinear", "SparseLinear") \
                and w.device.type == "cpu" and wt.device.type == "cpu" and _key(w) == _key(wt):
            shared_bases[id(w)] = w
    lazy_ids = {id(m) for m in lazy}
    pinned: set[int] = set()
    for mod in model.modules():
        if id(mod) in lazy_ids:
            continue
        for t in [*mod._parameters.values(), *mod._buffers.values()]:
            if t is not None and id(t) not in shared_bases and t.device.type == "cpu":
                pinned.add(_key(t))
    groups: dict[int, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for m in lazy:
        for t in _own_tensors(m):
            if id(t) in seen or t.device.type != "cpu" or t.is_sparse or t.is_quantized:
                continue
            seen.add(id(t))
            s = t.untyped_storage()
            if s.nbytes() >= MIN_BYTES and _key(t) not in pinned:
                groups.setdefault(_key(t), []).append(t)
    if not groups:
        return {"tensors": 0, "bytes": 0}
    for w in shared_bases.values():
        if _key(w) in groups and id(w) not in seen:
            groups[_key(w)].append(w)
    offsets, total = {}, 0
    for k, ts in groups.items():
        offsets[k] = total
        total += -(-ts[0].untyped_storage().nbytes() // ALIGN) * ALIGN
    buf = arena(total)
    if buf.untyped_storage().data_ptr() % (2 << 20):  # hugepage_copy fell back to a plain copy
        return {"tensors": 0, "bytes": 0}
    dst = buf.untyped_storage()
    moved = 0
    with torch.no_grad():
        for k, ts in groups.items():
            src = ts[0].untyped_storage()
            off = offsets[k]
            buf[off : off + src.nbytes()].copy_(torch.empty(0, dtype=torch.uint8).set_(src))
            for t in ts:
                es = t.element_size()
                t.set_(dst, off // es + t.storage_offset(), t.size(), t.stride())
                moved += 1
    log.debug("moved %d tensors (%.1f MB) onto huge pages", moved, total / 1e6)
    return {"tensors": moved, "bytes": total}
