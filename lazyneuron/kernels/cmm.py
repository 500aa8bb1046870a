"""Conditional matrix multiplication (CMM): the inference walk of a fast feedforward layer.

A depth-``D`` tree holds ``N = 2**(D+1) - 1`` neurons; node ``n`` has children ``2n+1`` (taken
when its pre-activation is <= 0) and ``2n+2`` (> 0). Token ``t`` visits one node per level::

    a = w_in[n] @ x[t] + b_in[n];  y[t] += act(a) * w_out[n];  n = 2n + 1 + (a > 0)

``w_in`` is (N, d_in) and ``w_out`` (N, d_out), each row contiguous (a row stride is allowed, so
both may be views of one packed (N, d_in + d_out) buffer): a visited node costs two rows. :func:`reference` is the pure-torch ground truth, :func:`masked_dense` the same
result from the dense product over all nodes (for tests), :func:`cmm` the compiled walk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cmm_gpu
from ._build import extension

ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3, "identity": 4}


def act_fn(name: str):  # type: ignore[no-untyped-def]
    return {
        "gelu": F.gelu,
        "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
        "identity": lambda a: a,
    }[name]


def depth_of(n_nodes: int) -> int:
    d = (n_nodes + 1).bit_length() - 2
    if n_nodes < 1 or (2 << d) - 1 != n_nodes:
        raise ValueError(f"{n_nodes} nodes is not a full binary tree (1, 3, 7, 15, ... nodes)")
    return d


def reference(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None,
              activation: str = "gelu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch walk, level by level. x (T, d_in) -> (y (T, d_out) float32, nodes (T, D+1))."""
    depth = depth_of(w_in.shape[0])
    xf = x.float()
    node = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    y = torch.zeros(x.shape[0], w_out.shape[1], device=x.device) if b_out is None else b_out.float().expand(x.shape[0], -1).clone()
    visited = []
    f = act_fn(activation)
    for _ in range(depth + 1):
        visited.append(node)
        a = (xf * w_in[node].float()).sum(-1) + (b_in[node].float() if b_in is not None else 0.0)  # (T,)
        y += f(a)[:, None] * w_out[node].float()
        node = 2 * node + 1 + (a > 0).long()
    return y, torch.stack(visited, 1)


def path_mask(a: torch.Tensor) -> torch.Tensor:
    """(T, N) pre-activations of all nodes -> (T, N) 0/1 mask of the nodes on each token's path."""
    depth = depth_of(a.shape[1])
    mask = torch.zeros_like(a)
    node = torch.zeros(a.shape[0], dtype=torch.long, device=a.device)
    rows = torch.arange(a.shape[0], device=a.device)
    for _ in range(depth + 1):
        mask[rows, node] = 1.0
        node = 2 * node + 1 + (a[rows, node] > 0).long()
    return mask


def masked_dense(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None,
                 activation: str = "gelu") -> torch.Tensor:
    """The same output through the dense product over all nodes, masked to each path (tests only)."""
    a = x.float() @ w_in.float().t() + (b_in.float() if b_in is not None else 0.0)  # (T, N)
    y = (act_fn(activation)(a) * path_mask(a)) @ w_out.float()
    return y + b_out.float() if b_out is not None else y


def available() -> bool:
    return extension("cmm") is not None


_EMPTY = torch.empty(0)


def hugepage_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` in 2 MiB-aligned memory marked for transparent huge pages (they
    back it on Linux with THP in ``madvise`` or ``always`` mode); a plain contiguous copy for
    tensors under 2 MiB or outside Unix; ``t`` itself when the C++ extension is not built. A CMM walk reads rows scattered over the whole tree, so with 4 KiB pages
    nearly every row it reads is a TLB miss; :class:`~lazyneuron.methods.fff.FFFLayer` moves its
    trees here for inference."""
    ext = extension("cmm")
    if ext is None or t.device.type != "cpu":
        return t
    return ext.hugepage_copy(t)


# the compiled walk's input checks, by number (cmm.cpp reports no text: see LN_CHECK there)
_KERNEL_ERRORS = {
    1: "x must be contiguous float32 (tokens, d)",
    2: "weights must be 2-d with contiguous rows (stride 1 along features); call .contiguous() on them once",
    3: "w_in and w_out must share a dtype; convert both with .to(dtype)",
    4: "w_in's width differs from x's features",
    5: "w_out and w_in have different numbers of rows",
    6: "the tree's node count does not match its depth",
    7: "b_in must be float32 with one entry per node",
    8: "b_out must be float32 with one entry per output",
    9: "weights must be float32 or bfloat16",
}


def _check_shapes(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None) -> int:
    """The checks the compiled CPU walk makes, for the other paths; returns the depth."""
    if x.dim() != 2 or w_in.dim() != 2 or w_out.dim() != 2:
        raise ValueError(f"cmm: x must be (tokens, d) and the weights 2-d, got x {tuple(x.shape)}, w_in {tuple(w_in.shape)}, w_out {tuple(w_out.shape)}")
    if w_in.shape[1] != x.shape[1]:
        raise ValueError(f"cmm: w_in is {tuple(w_in.shape)} but x has {x.shape[1]} features")
    if w_out.shape[0] != w_in.shape[0]:
        raise ValueError(f"cmm: w_out has {w_out.shape[0]} rows, w_in {w_in.shape[0]}")
    if w_in.stride(1) != 1 or w_out.stride(1) != 1:
        raise ValueError("cmm: weights must be 2-d with contiguous rows (stride 1 along features); call .contiguous() on them once")
    if (b_in is not None and not b_in.is_contiguous()) or (b_out is not None and not b_out.is_contiguous()):
        raise ValueError("cmm: biases must be contiguous; call .contiguous() on them once")
    if b_in is not None and b_in.numel() != w_in.shape[0]:
        raise ValueError(f"cmm: b_in has {b_in.numel()} entries for {w_in.shape[0]} nodes")
    if b_out is not None and b_out.numel() != w_out.shape[1]:
        raise ValueError(f"cmm: b_out has {b_out.numel()} entries for {w_out.shape[1]} outputs")
    return depth_of(w_in.shape[0])


def cmm(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None,
        activation: str = "gelu", return_nodes: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fast walk for any number of tokens; fp32 or bf16 weights, float32 output.

    Returns (y, nodes visited (T, D+1) when ``return_nodes`` else None). CPU tensors take the
    compiled walk, CUDA tensors the Triton walk (:mod:`.cmm_gpu`); either falls back to
    :func:`reference` on the tensors' device when its kernel is unavailable."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    if not (x.is_cpu and w_in.is_cpu and w_out.is_cpu and (b_in is None or b_in.is_cpu) and (b_out is None or b_out.is_cpu)):
        return _cmm_device(x, w_in, b_in, w_out, b_out, activation, return_nodes)
    ext = extension("cmm")
    if ext is None:
        y, nodes = reference(x, w_in, b_in, w_out, b_out, activation)
        return y, nodes if return_nodes else None
    depth = depth_of(w_in.shape[0])
    xc = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    bi = _EMPTY if b_in is None else b_in if b_in.dtype == torch.float32 else b_in.float()
    bo = _EMPTY if b_out is None else b_out if b_out.dtype == torch.float32 else b_out.float()
    res = ext.cmm(xc, w_in, bi, w_out, bo, depth, ACTIVATIONS[activation], return_nodes)
    if not res:  # an input check failed in the kernel, which reports only its number
        _check_shapes(xc, w_in, b_in, w_out, b_out)  # raises with the shapes named, if that is what it was
        raise ValueError(f"cmm: {_KERNEL_ERRORS.get(ext.last_error(), 'bad input')}")
    y, nodes = res
    return y, nodes if return_nodes else None


def _cmm_device(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None,
                activation: str, return_nodes: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`cmm` for tensors not all on the CPU: one device, then the Triton walk or the reference there."""
    dev = x.device
    if w_in.device != dev or w_out.device != dev or (b_in is not None and b_in.device != dev) or (b_out is not None and b_out.device != dev):
        tensors = {"x": x, "w_in": w_in, "b_in": b_in, "w_out": w_out, "b_out": b_out}
        raise ValueError(f"cmm: the input and the tree must be on one device, got {', '.join(f'{k} on {t.device}' for k, t in tensors.items() if t is not None)}; "
                         "move the layer to the input's device (module.to(x.device))")
    depth = _check_shapes(x, w_in, b_in, w_out, b_out)  # each call: a few microseconds of the launch overhead
    if cmm_gpu.available(dev) and max(x.shape[1], w_out.shape[1]) <= cmm_gpu.MAX_WIDTH:
        return cmm_gpu.cmm(x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous(), w_in,
                           b_in if b_in is None or b_in.dtype == torch.float32 else b_in.float(), w_out,
                           b_out if b_out is None or b_out.dtype == torch.float32 else b_out.float(), depth, ACTIVATIONS[activation], return_nodes)
    y, nodes = reference(x, w_in, b_in, w_out, b_out, activation)
    return y, nodes if return_nodes else None
