"""Sparse-input GEMV: read only the weight rows of active input channels.

``wt`` is the weight stored input-channel-major, (in, out) contiguous (prepared once at convert
time). Input channel ``i`` of token ``b`` is active when ``|x[b, i] - centre[i]| > threshold``
(``threshold`` a scalar tensor or one value per channel). The output is
``(x - centre) * mask @ wt + bias``; SCAP's mode-centering folds ``W @ centre`` into ``bias``
beforehand, so that a threshold of -inf reproduces the dense layer.
"""

from __future__ import annotations

import torch

from ._build import extension

MAX_BATCH = 16  # batches up to this size run the sparse kernel; larger ones the masked reference


def reference(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, centre: torch.Tensor | None, threshold: torch.Tensor) -> torch.Tensor:
    """Pure-torch ground truth. x: (B, in) -> (B, out), float32 accumulation."""
    d = x.float() - (centre if centre is not None else 0.0)  # (B, in)
    d = torch.where(d.abs() > threshold, d, torch.zeros((), dtype=d.dtype))
    y = d @ wt.float()  # (B, out)
    return y + bias if bias is not None else y


def available() -> bool:
    return extension("sparse_gemv") is not None


_EMPTY = torch.empty(0)


def _kernel_error(code: int, x: torch.Tensor, w: torch.Tensor) -> str:
    """The message for a failed input check of the compiled kernels (sparse_gemv.cpp reports its
    number only: see LN_CHECK there)."""
    return {
        1: f"x must be (B, in) contiguous float32, got {tuple(x.shape)} {x.dtype}",
        2: f"batch must be in [1, {MAX_BATCH}], got {x.shape[0] if x.dim() else 0}",
        3: "wt must be (in, out) contiguous; call .contiguous() on it once",
        4: f"wt must be float32 or bfloat16, got {w.dtype}",
        5: f"x has {x.shape[-1]} features but wt has {w.shape[0]} rows",
        6: "bad bias: float32, contiguous, one entry per output",
        7: "bad centre: float32, contiguous, one entry per input",
        8: "bad threshold: float32, contiguous, one value or one per input",
        9: f"x must be (B, d) contiguous float32, got {tuple(x.shape)} {x.dtype}",
        10: "g must be (B, F) float32, contiguous, one row per row of x",
        11: f"batch must be <= {MAX_BATCH}",
        12: f"bad up_w: (F, d) contiguous float32 with d = {x.shape[-1]} and F = g's width, got {tuple(w.shape)} {w.dtype}",
        13: "bad down_wt: (F, out) contiguous float32",
    }.get(code, "bad input")


def sparse_gemv(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, centre: torch.Tensor | None, threshold: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fast path for (B <= MAX_BATCH, in) float32 inputs; returns (y float32, rows read).

    Falls back to :func:`reference` (rows read = all) when the extension is unavailable.
    """
    ext = extension("sparse_gemv")
    if ext is None or x.shape[0] > MAX_BATCH or not (x.is_cpu and wt.is_cpu):  # a CPU kernel: other devices take the reference
        return reference(x, wt, bias, centre, threshold), wt.shape[0]
    y, rows = ext.sparse_gemv(
        x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous(),
        wt,
        _EMPTY if bias is None else bias,
        _EMPTY if centre is None else centre,
        threshold,
    )
    if y is None:  # an input check failed in the kernel, which reports only its number
        raise ValueError(f"sparse_gemv: {_kernel_error(ext.last_error(), x, wt)}")
    return y, rows


def cats_reference(x: torch.Tensor, g: torch.Tensor, up_w: torch.Tensor, down_wt: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pure-torch CATS MLP: h = g * (x @ up_w.T) where |g| > threshold; y = h @ down_wt."""
    h = torch.where(g.abs() > threshold, g * (x @ up_w.t()), torch.zeros((), dtype=g.dtype))  # (B, F)
    return h @ down_wt


def cats_mlp(x: torch.Tensor, g: torch.Tensor, up_w: torch.Tensor, down_wt: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """Fast CATS MLP for (B <= MAX_BATCH) float32; returns (y, active neurons read)."""
    ext = extension("sparse_gemv")
    if ext is None or x.shape[0] > MAX_BATCH or not (x.is_cpu and up_w.is_cpu):
        return cats_reference(x, g, up_w, down_wt, threshold), up_w.shape[0]
    y, active = ext.cats_mlp(x.float().contiguous(), g.float().contiguous(), up_w, down_wt, float(threshold))
    if y is None:
        raise ValueError(f"cats_mlp: {_kernel_error(ext.last_error(), x, up_w)}")
    return y, active
