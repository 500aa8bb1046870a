"""Weights on 2 MiB pages: the runtime's stored weights moved into one huge-page arena.

A decode step streams every weight once per token. On 4 KiB pages each 4 KiB of a stream is a
new TLB entry and the hardware prefetchers stop at every page boundary; a layer weight of 1-4 MB
is a few hundred such pages per kernel call. Moved onto transparent huge pages (Linux, THP in
``madvise`` or ``always`` mode), the same kernels read the SmolLM2 layer shapes and LM head 2-27%
faster (``benchmarks/hugepages.py``, ``benchmarks/results/hugepages.jsonl``).

:func:`to_hugepages` moves the weight buffers the runtime made: each runtime linear's and sparse
linear's ``wt`` and the side-by-side buffers of fused siblings, with every view of them that the
method modules (:class:`~lazyneuron.surgery.LazyModule`) hold, and a converted ``nn.Linear``'s
``base.weight`` where it shares the converted storage (fp32; ``restore_base`` copies it out again
on ``revert_``). No other tensor of the model's own modules moves, and a buffer one of them also
uses stays where it is. Each tensor keeps its identity: its storage is swapped in place
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

MIN_BYTES = 64 << 10  # smaller weights stay where they are
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
    """An uninitialised uint8 CPU tensor of ``nbytes`` in 2 MiB-aligned memory marked for huge
    pages, none of it touched yet (its pages fault in, as huge pages where the OS has them, as it is
    written); a plain tensor where huge pages are not :func:`available`."""
    if not available():
        return torch.empty(nbytes, dtype=torch.uint8)
    from ..kernels._build import extension

    return extension("gemv").hugepage_empty(max(1, nbytes))[:nbytes]


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


def _stored_weights(m: nn.Module) -> list[torch.Tensor]:
    """The weight buffers the runtime made for ``m`` (a runtime or sparse linear): its ``wt``, and
    the side-by-side buffer it is a column block of. Only these move: a method module may also hold
    tensors that live on in caches outside the model (a calibration's derived tensors), which a move
    would drag, with the whole arena, past ``revert_``."""
    if type(m).__name__ not in ("FastLinear", "SparseLinear"):
        return []
    out = [m.wt] if isinstance(getattr(m, "wt", None), torch.Tensor) else []
    fused = getattr(m, "_ln_fused", None)
    if fused is not None and isinstance(getattr(fused[0], "wt", None), torch.Tensor):
        out.append(fused[0].wt)
    return out


def to_hugepages(model: nn.Module) -> dict[str, int]:
    """Move the runtime's stored weights into one huge-page arena (see the module's docstring).
    Returns {"tensors": moved, "bytes": arena size}; nothing is moved where huge pages are not
    available."""
    none = {"tensors": 0, "bytes": 0}
    if not available():
        return none
    from ..surgery import LazyModule

    lazy = [m for m in model.modules() if isinstance(m, LazyModule)]
    # the storages to move: the runtime's weight buffers (CPU, not empty, at least MIN_BYTES)
    keys: dict[int, int] = {}  # storage -> bytes
    for m in lazy:
        for t in _stored_weights(m):
            st = t.untyped_storage()
            if t.device.type == "cpu" and not (t.is_sparse or t.is_quantized) and st.nbytes() >= max(1, MIN_BYTES):
                keys[_key(t)] = st.nbytes()
    if not keys:
        return none
    # every tensor object on those storages that the method modules hold (views of a fused buffer,
    # argument tuples); a converted nn.Linear's base.weight sharing the storage moves with it
    # (restore_base copies it out on revert); any other tensor of the model's own modules on them
    # keeps the storage where it is
    groups: dict[int, list[torch.Tensor]] = {k: [] for k in keys}
    seen: set[int] = set()
    for m in lazy:
        for t in _own_tensors(m):
            if id(t) not in seen and t.device.type == "cpu" and _key(t) in groups:
                seen.add(id(t))
                groups[_key(t)].append(t)
    lazy_ids = {id(m) for m in lazy}
    bases: set[int] = set()
    for m in lazy:
        base = m._modules.get("base")
        w = getattr(base, "weight", None)
        if type(m).__name__ in ("FastLinear", "SparseLinear") and type(base) is nn.Linear and isinstance(w, torch.Tensor) \
                and w.device.type == "cpu" and _key(w) in groups and id(w) not in seen:
            seen.add(id(w))
            bases.add(id(w))
            groups[_key(w)].append(w)
    for mod in model.modules():
        if id(mod) in lazy_ids:
            continue
        for t in [*mod._parameters.values(), *mod._buffers.values()]:
            if t is not None and id(t) not in bases and t.device.type == "cpu":
                groups.pop(_key(t), None)
    inference = torch.is_inference_mode_enabled()  # an inference tensor can only be changed inside inference mode
    groups = {k: ts for k, ts in groups.items() if ts and (inference or not any(t.is_inference() for t in ts))}
    if not groups:
        return none
    offsets, total = {}, 0
    for k in groups:
        offsets[k] = total
        total += -(-keys[k] // ALIGN) * ALIGN
    buf = arena(total)
    if buf.untyped_storage().data_ptr() % (2 << 20):  # no 2 MiB-aligned memory to be had
        return none
    dst = buf.untyped_storage()
    moved = 0
    with torch.no_grad():
        for k, ts in groups.items():  # pages fault in group by group, and each old buffer is freed once moved
            src = ts[0].untyped_storage()
            off = offsets[k]
            buf[off : off + keys[k]].copy_(torch.empty(0, dtype=torch.uint8).set_(src))
            for t in ts:
                t.set_(dst, off // t.element_size() + t.storage_offset(), t.size(), t.stride())
                moved += 1
            del src
    log.debug("moved %d tensors (%.1f MB) onto huge pages", moved, total / 1e6)
    return {"tensors": moved, "bytes": total}
