"""Sparse-input GEMV: read only the weight rows of active input channels.

``wt`` is the weight stored input-channel-major, (in, out) contiguous (prepared once at convert
time). Input channel ``i`` of token ``b`` is active when ``|x[b, i] - centre[i]| > threshold``
(``threshold`` a scalar tensor or one value per channel). The output is
``(x - centre) * mask @ wt + bias``; SCAP's mode-centering folds ``W @ centre`` into ``bias``
beforehand, so that a threshold of -inf reproduces the dense layer.
"""

from __future__ import annotations

import torch

from . import gemv as G
from ._build import extension

_EMPTY = torch.empty(0)
MAX_BATCH = G.MAX_BATCH  # batches up to this size run the sparse kernel; larger ones the masked reference


def reference(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, centre: torch.Tensor | None, threshold: torch.Tensor,
              scale: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch ground truth. x: (B, in) -> (B, out), float32 accumulation."""
    return G.reference(x, wt, scale, bias, centre, threshold)


def available() -> bool:
    return G.available()


def sparse_gemv(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, centre: torch.Tensor | None, threshold: torch.Tensor,
                scale: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Fast path for (B <= MAX_BATCH, in) inputs over fp32 / bf16 / int8 rows (int8 with its
    per-output ``scale``); returns (y float32, rows read). The same kernel as the dense GEMV
    (:mod:`lazyneuron.kernels.gemv`); falls back to the reference (rows read = all)."""
    return G.gemv(x, wt, scale, bias, centre, threshold)


def masked_matmul(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, centre: torch.Tensor | None, threshold: torch.Tensor,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`reference`'s result for a long input (prefill, encoder forwards), where nothing can
    be skipped across tokens: the input sparsified in one fused pass, then the blocked GEMM on the
    (in, out) weight in its stored format, so that the cost is a dense layer's."""
    ext = extension("gemv")
    if ext is None or not (x.is_cpu and wt.is_cpu) or x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
        return reference(x, wt, bias, centre, threshold, scale)  # (a backward pass to come: autograd follows the reference)
    d = ext.sparsify(x.contiguous(), _EMPTY if centre is None else centre, threshold)
    if d is None:
        raise ValueError(f"sparsify: {G.kernel_error(ext.last_error(), x, wt)}")
    # fp32 compute: rounding the sparsified input to bf16 for the dot products cost TEAL 25% on the
    # bf16 runtime +1.7% news perplexity on SmolLM2-135M (33.66 against 33.09; dense bf16: +0.03%)
    return G.gemm(d, wt, scale, bias, dot=False)


def cats_reference(x: torch.Tensor, g: torch.Tensor, up_w: torch.Tensor, down_wt: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pure-torch CATS MLP: h = g * (x @ up_w.T) where |g| > threshold; y = h @ down_wt."""
    h = torch.where(g.abs() > threshold, g * (x @ up_w.t()), torch.zeros((), dtype=g.dtype))  # (B, F)
    return h @ down_wt


def cats_mlp(x: torch.Tensor, g: torch.Tensor, up_w: torch.Tensor, down_wt: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """Fast CATS MLP for (B <= MAX_BATCH) float32; returns (y, active neurons read)."""
    ext = extension("gemv")
    if ext is None or x.shape[0] > MAX_BATCH or not (x.is_cpu and up_w.is_cpu):
        return cats_reference(x, g, up_w, down_wt, threshold), up_w.shape[0]
    y, active = ext.cats_mlp(x.float().contiguous(), g.float().contiguous(), up_w, down_wt, float(threshold))
    if y is None:
        raise ValueError(f"cats_mlp: {G.kernel_error(ext.last_error(), x, up_w)}")
    return y, active
