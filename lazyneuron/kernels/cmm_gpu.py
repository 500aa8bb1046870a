"""The CMM walk on CUDA GPUs (Triton): one program per token, the D+1 levels in a loop.

At each level the program loads its node's output row (its address is known before the dot) and,
for up to a few hundred tokens, both children's input rows, so they are in flight while the dot
reduces; it then adds ``act(a) * w_out[n]`` into the token's output held in registers and moves to
the child, whose input row is already loaded. A token reads its path's rows (and, speculating,
the siblings' input rows) and nothing else. Imported lazily: Triton and a GPU are optional;
:func:`lazyneuron.kernels.cmm.cmm` falls back to the pure-torch reference on the tensors' device
where this is unavailable.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

MAX_WIDTH = 16384  # a row is held in registers; wider layers take the reference


@functools.lru_cache(maxsize=None)
def _triton() -> Any | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401

        return triton
    except Exception:  # not installed, or no usable backend
        return None


@functools.lru_cache(maxsize=None)
def available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and _triton() is not None


@functools.lru_cache(maxsize=None)
def _blocks(d_in: int, d_out: int) -> tuple[int, int, int]:
    """Register blocks for the rows (powers of two) and how much wider than 1024 the widest is."""
    bi, bo = 1 << max(0, d_in - 1).bit_length(), 1 << max(0, d_out - 1).bit_length()
    return bi, bo, max(1, max(bi, bo) // 1024)


@functools.lru_cache(maxsize=None)
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def act_fn(a, ACT: tl.constexpr):
        # 0 gelu (erf), 1 gelu (tanh), 2 relu, 3 silu, 4 identity: as the CPU kernel
        if ACT == 0:
            h = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
        elif ACT == 1:
            u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
            h = 0.5 * a * (2.0 * tl.sigmoid(2.0 * u))
        elif ACT == 2:
            h = tl.maximum(a, 0.0)
        elif ACT == 3:
            h = a * tl.sigmoid(a)
        else:
            h = a
        return h

    @triton.jit
    def walk(x_ptr, wi_ptr, bi_ptr, wo_ptr, bo_ptr, y_ptr, nodes_ptr, d_in, d_out, s_wi, s_wo,
             DEPTH: tl.constexpr, ACT: tl.constexpr, HAS_BI: tl.constexpr, HAS_BO: tl.constexpr, NODES: tl.constexpr, SPEC: tl.constexpr,
             BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        ci = tl.arange(0, BLOCK_I)
        mi = ci < d_in
        co = tl.arange(0, BLOCK_O)
        mo = co < d_out
        x = tl.load(x_ptr + t * d_in + ci, mask=mi, other=0.0).to(tl.float32)
        if HAS_BO:
            y = tl.load(bo_ptr + co, mask=mo, other=0.0).to(tl.float32)
        else:
            y = tl.zeros([BLOCK_O], dtype=tl.float32)
        n = t * 0
        w = tl.load(wi_ptr + ci, mask=mi, other=0.0).to(tl.float32)
        if HAS_BI:
            b = tl.load(bi_ptr).to(tl.float32)
        for lvl in tl.static_range(DEPTH + 1):
            wo = tl.load(wo_ptr + n * s_wo + co, mask=mo, other=0.0)
            if SPEC and lvl < DEPTH:  # both children's input rows (and biases), in flight while this dot reduces
                w_l = tl.load(wi_ptr + (2 * n + 1) * s_wi + ci, mask=mi, other=0.0)
                w_r = tl.load(wi_ptr + (2 * n + 2) * s_wi + ci, mask=mi, other=0.0)
                if HAS_BI:
                    b_l = tl.load(bi_ptr + 2 * n + 1)
                    b_r = tl.load(bi_ptr + 2 * n + 2)
            a = tl.sum(x * w, axis=0)
            if HAS_BI:
                a += b
            if NODES:
                tl.store(nodes_ptr + t * (DEPTH + 1) + lvl, n)
            y += act_fn(a, ACT) * wo.to(tl.float32)
            n = 2 * n + 1 + (a > 0).to(tl.int64)
            if lvl < DEPTH:
                if SPEC:
                    w = tl.where(a > 0, w_r, w_l).to(tl.float32)
                    if HAS_BI:
                        b = tl.where(a > 0, b_r, b_l).to(tl.float32)
                else:
                    w = tl.load(wi_ptr + n * s_wi + ci, mask=mi, other=0.0).to(tl.float32)
                    if HAS_BI:
                        b = tl.load(bi_ptr + n).to(tl.float32)
        tl.store(y_ptr + t * d_out + co, y, mask=mo)

    return walk


def cmm(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None,
        depth: int, act: int, return_nodes: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (T, d_in) float32 contiguous, w_in (N, d_in) and w_out (N, d_out) with contiguous rows (fp32
    or bf16), biases float32 or None, all on one CUDA device -> (y (T, d_out) float32, nodes)."""
    T, d_in = x.shape
    d_out = w_out.shape[1]
    y = torch.empty(T, d_out, device=x.device, dtype=torch.float32)
    nodes = torch.empty(T, depth + 1, device=x.device, dtype=torch.int64) if return_nodes else None
    if T == 0:
        return y, nodes
    bi, bo, scale = _blocks(d_in, d_out)
    # up to a few hundred tokens the GPU is mostly idle and each walk is a chain of dependent row
    # reads: load both children's input rows while a node's dot reduces (twice the input-row
    # traffic, one memory latency less per level) and spread a row over 4 warps. Many tokens: the
    # GPU is full and bandwidth counts: read only the chosen row, one warp per token. Measured on an
    # H100 at BERT-base dims (CUDA graphs, cold): 5.6 against 7.0 us at 1 token, 9.9 against 12.7 at
    # 128; at 1024 tokens 14.9 us for the plain walk on one warp against 23.6 speculative on four
    spec = T <= 256
    warps = min(16, (4 if spec else 1) * scale)
    with torch.cuda.device(x.device):
        _kernel()[(T,)](x, w_in, b_in if b_in is not None else x, w_out, b_out if b_out is not None else x, y,
                        nodes if nodes is not None else y, d_in, d_out, w_in.stride(0), w_out.stride(0),
                        DEPTH=depth, ACT=act, HAS_BI=b_in is not None, HAS_BO=b_out is not None, NODES=return_nodes, SPEC=spec,
                        BLOCK_I=bi, BLOCK_O=bo, num_warps=warps)
    return y, nodes
