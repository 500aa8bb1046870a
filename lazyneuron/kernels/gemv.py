"""Dense and sparse-input GEMV for batch 1 to 16, one kernel family (``csrc/gemv.cpp``).

Weights are stored input-channel-major, ``wt`` of shape (in, out), contiguous, prepared once at
convert time (:func:`prepare_weight`), in one of three formats:

- ``fp32``;
- ``bf16``: rounded to nearest even, widened to fp32 as they are read;
- ``int8``: weight-only, symmetric, one fp32 scale per output channel, fp32 accumulation.

``y = bias + scale * (v @ wt)`` where ``v = x`` (dense) or ``v = (x - centre)`` masked to the input
channels with ``|x - centre| > threshold`` (activation sparsity: inactive rows are never read).
Sparsity 0 of activation sparsity *is* the dense kernel.
"""

from __future__ import annotations

import torch

from ._build import extension

MAX_BATCH = 16  # batches up to this size run the kernel; larger ones a torch matmul
DTYPES = ("fp32", "bf16", "int8")
_TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
_EMPTY = torch.empty(0)


def prepare_weight(w: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(wt (in, out) contiguous in ``dtype``, per-output scale for int8 else None) from an
    ``nn.Linear`` weight ``w`` of shape (out, in)."""
    if dtype not in DTYPES:
        raise ValueError(f"weight dtype {dtype!r} is not supported; use one of {list(DTYPES)}")
    w = w.detach().float()
    if dtype == "int8":
        scale = (w.abs().amax(1) / 127.0).clamp(min=1e-12)  # (out,)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (out, in)
        return q.t().contiguous(), scale.contiguous()
    return w.t().contiguous().to(_TORCH_DTYPE[dtype]), None


def dequantize(wt: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The fp32 (in, out) weight the kernel computes with (one pass)."""
    return wt * scale if scale is not None else wt.float()


def reference(x: torch.Tensor, wt: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              centre: torch.Tensor | None = None, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch ground truth. x: (B, in) -> (B, out) float32."""
    d = x.float() - centre if centre is not None else x.float()  # (B, in)
    if threshold is not None:
        d = d.masked_fill(d.abs() <= threshold, 0.0)
    w = wt.float() if wt.dtype != torch.float32 else wt
    y = d @ w  # (B, out)
    if scale is not None:
        y.mul_(scale)
    return y.add_(bias) if bias is not None else y


def available() -> bool:
    return extension("gemv") is not None


def kernel_error(code: int, x: torch.Tensor, w: torch.Tensor) -> str:
    """The message for a failed input check of the compiled kernel (gemv.cpp reports its number
    only: see LN_CHECK there)."""
    return {
        1: f"x must be (B, in) contiguous float32, got {tuple(x.shape)} {x.dtype}",
        2: f"batch must be in [1, {MAX_BATCH}], got {x.shape[0] if x.dim() else 0}",
        3: "wt must be (in, out) with contiguous rows (stride 1 along out); call .contiguous() on it once",
        4: f"wt must be float32, bfloat16 or int8, got {w.dtype}",
        5: f"x has {x.shape[-1]} features but wt has {w.shape[0]} rows",
        6: "bad bias: float32, contiguous, one entry per output",
        7: "bad centre: float32, contiguous, one entry per input",
        8: "bad threshold: float32, contiguous, one value or one per input",
        9: f"x must be (B, d) contiguous float32, got {tuple(x.shape)} {x.dtype}",
        10: "g must be (B, F) float32, contiguous, one row per row of x",
        11: f"batch must be <= {MAX_BATCH}",
        12: f"bad up_w: (F, d) contiguous float32 with d = {x.shape[-1]} and F = g's width, got {tuple(w.shape)} {w.dtype}",
        13: "bad down_wt: (F, out) contiguous float32",
        14: "int8 weights need one float32 scale per output channel (and other dtypes none); use prepare_weight",
        15: "bad scale: float32, contiguous, one entry per output",
        16: "the probe buffer must be contiguous float32",
        17: f"bad expert gate/up blocks: (E, d, C) contiguous with d = {x.shape[-1]} (C even for gated experts), got {tuple(w.shape)}",
        18: "bad expert down weight: (E * Fe, out) contiguous, in the dtype of the gate/up blocks",
        19: "bad expert coefficients: (B, E) float32 contiguous, one row per token",
        20: "unknown activation code (0 silu, 1 gelu, 2 gelu_tanh, 3 relu)",
        22: "attention: q, k, v must be (B, T, H, D) contiguous float32 of one shape, D even and at most 64",
        21: "bad router: kind 0 (learned: w1 (d, H), b1 (H), w2 (H, K), b2 (K)), 1 (analytic: w1 (d, P[*2]), b1, norm (P)) or 2 (native: w1 (d, E)), fp32 contiguous, 0 <= top_k",
    }.get(code, "bad input")


def gemv(x: torch.Tensor, wt: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
         centre: torch.Tensor | None = None, threshold: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(y (B, out) float32, weight rows read) for x (B, in); ``threshold`` None: dense.

    CPU tensors with B <= MAX_BATCH run the kernel; anything else (no compiler, another device,
    a larger batch) runs :func:`reference` and reports every row read."""
    ext = extension("gemv")
    if ext is None or x.shape[0] > MAX_BATCH or x.shape[0] == 0 or not (x.is_cpu and wt.is_cpu):
        return reference(x, wt, scale, bias, centre, threshold), wt.shape[0]
    y, rows = ext.gemv(
        x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous(),
        wt,
        _EMPTY if scale is None else scale,
        _EMPTY if bias is None else bias,
        _EMPTY if centre is None else centre,
        _EMPTY if threshold is None else threshold,
    )
    if y is None:  # an input check failed in the kernel, which reports only its number
        raise ValueError(f"gemv: {kernel_error(ext.last_error(), x, wt)}")
    return y, rows


def set_dense_below(fraction: float) -> float:
    """A sparse-input call at batch 1 that skips fewer than ``fraction`` of its rows reads every
    row as the dense stream instead (zero coefficients for the skipped ones; all rows reported
    read): scattered rows cost more per byte than the dense stream, so below a break-even (~10%
    skipped on fp32 rows, 15-30% on bf16 ones, measured on SmolLM2; the default is 0.15) the
    sparse pass is the slower one. 0 makes every sparse call skip its rows.
    Returns the previous value (0.0 without the extension, where nothing changes)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"set_dense_below({fraction!r}): a fraction of rows in [0, 1] is needed, e.g. 0.15")
    ext = extension("gemv")
    return 0.0 if ext is None else float(ext.set_dense_below(float(fraction)))


def bf16_dot() -> bool:
    """Whether :func:`gemm` over bf16 or int8 weights rounds its input to bf16 and multiplies with
    the CPU's bf16 dot-product instructions (AVX512_BF16: twice the fp32 rate; accumulation stays
    fp32; int8 values are exact in bf16, the per-output scale is applied after). True on CPUs that
    have them unless switched off with :func:`set_bf16_dot`; elsewhere the weights are widened to
    fp32 and multiplied with fp32 inputs, as the GEMV always does."""
    ext = extension("gemv")
    return bool(ext is not None and ext.bf16_dot and ext.bf16_dot_on())


def set_bf16_dot(enabled: bool) -> bool:
    """Switch the bf16 dot-product GEMM on or off (for every caller in this process); returns the
    previous setting. Off, bf16 weights multiply fp32 inputs exactly as the GEMV does."""
    ext = extension("gemv")
    return bool(ext.set_bf16_dot(bool(enabled))) if ext is not None else False


def gemm_reference(x: torch.Tensor, wt: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   dot: bool = True) -> torch.Tensor:
    """What :func:`gemm` computes, in pure torch: :func:`reference`, with the input rounded to bf16
    first where the bf16 dot-product path is on (and ``dot``) and the weights are bf16 or int8."""
    if dot and wt.dtype in (torch.bfloat16, torch.int8) and bf16_dot():
        x = x.to(torch.bfloat16).float()
    return reference(x, wt, scale, bias)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Non-causal, unmasked attention of a long input: q, k, v (B, T, H, D) float32, the layout a
    projection's output has (no transposes), -> (B, T, H, D) = softmax(scale q k^T) v per head.
    With the bf16 dot products (:func:`bf16_dot`) and D even and <= 64: the project's flash-style
    kernel, q * scale, k, the probabilities and v rounded to bf16, fp32 accumulation and softmax;
    otherwise torch's scaled_dot_product_attention in fp32."""
    ext = extension("gemv")
    d = q.shape[-1]
    if bf16_dot() and d % 2 == 0 and d <= 64 and q.dim() == 4 and q.is_cpu and q.dtype == torch.float32:
        out = ext.attn_bf16(q.contiguous(), k.contiguous(), v.contiguous(), float(scale))
        if out is None:
            raise ValueError(f"attention: {kernel_error(ext.last_error(), q, k)}")
        return out
    return attention_reference(q, k, v, scale)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Pure torch: softmax(scale q k^T) v per (batch, head) for (B, T, H, D) inputs, in fp32."""
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2).contiguous()


def gemm(x: torch.Tensor, wt: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
         dot: bool = True) -> torch.Tensor:
    """Dense ``x (N, in) @ wt`` for any number of tokens (prefill, encoder forwards), float32 out.

    bf16 / int8 weights are widened as they are read, panel by panel in L2, never into a full fp32
    copy; on CPUs with AVX512_BF16, bf16 and int8 weights multiply an input rounded to bf16 with
    bf16 dot products instead (:func:`bf16_dot`; ``dot=False``: not for this call). Falls back to :func:`reference` without the extension or
    off the CPU."""
    ext = extension("gemv")
    if ext is None or x.shape[0] == 0 or not (x.is_cpu and wt.is_cpu):
        return reference(x, wt, scale, bias)
    y = ext.gemm(x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous(), wt,
                 _EMPTY if scale is None else scale, _EMPTY if bias is None else bias, bool(dot))
    if y is None:
        raise ValueError(f"gemm: {kernel_error(ext.last_error(), x, wt)}")
    return y


def probe_buffer(mbytes: int) -> torch.Tensor:
    """An fp32 buffer of ``mbytes`` MB of ones for :func:`read_bandwidth`, on huge pages where the
    OS offers them (:mod:`lazyneuron.runtime.memory`), its pages faulted in."""
    from ..runtime.memory import arena, available

    n = mbytes * (1 << 20)
    if available():
        return arena(n).view(torch.float32).fill_(1.0)
    return torch.ones(n // 4)


def read_bandwidth(mbytes: int = 512, repeats: int = 5, buf: torch.Tensor | None = None) -> float:
    """Measured memory read bandwidth in GB/s: the best of ``repeats`` timed reads of a buffer of
    ``mbytes`` MB (far larger than any L3; or of ``buf``, an fp32 buffer kept for repeated probes)
    by all of torch's threads. Falls back to ``torch.sum`` when the extension did not build.
    The buffer sits on 2 MiB pages where the OS offers them (:func:`probe_buffer`), as the
    runtime's weights do: the probe is the best this host reads, not the 4 KiB-page figure."""
    import time

    fresh = buf is None
    buf = probe_buffer(mbytes) if buf is None else buf
    ext = extension("gemv")
    read = (lambda: ext.read_sum(buf)) if ext is not None else (lambda: float(buf.sum()))
    if fresh:  # first touch of new pages
        read()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9
