"""Fused small ops of a decode step (``csrc/decode.cpp``) and their pure-torch references.

``rmsnorm`` / ``add_rmsnorm`` are Llama's RMSNorm (fp32), the second with the residual add fused
in; ``attn_decode`` applies the rotary embedding (rotate-half form, the model's own cos / sin),
writes the new key / value into a static cache and attends over positions ``0..pos`` (``k`` and
``v`` may be empty: then each row of ``q`` holds q, k and v side by side, one fused projection's
output); ``silu_mul`` is a gated MLP's ``silu(gate) * up`` from one fused gate|up output.
"""

from __future__ import annotations

import torch

from ._build import extension


def available() -> bool:
    return extension("decode") is not None


def rmsnorm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


def attn_decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          kc: torch.Tensor, vc: torch.Tensor, pos: int, scale: float) -> torch.Tensor:
    """q: (B, H*D); k, v: (B, KV*D); cos, sin: (D,); kc, vc: (B, KV, L, D), fp32 or bf16, written at ``pos``.
    k and v empty: q is (B, H*D + 2*KV*D), each row q | k | v."""
    B, KV, L, D = kc.shape
    if k.numel() == 0 and v.numel() == 0:
        q, k, v = q.split([q.shape[1] - 2 * KV * D, KV * D, KV * D], 1)
    H = q.shape[1] // D
    qh = q.view(B, H, D)
    kh = k.view(B, KV, D)
    qh = qh * cos + _rotate_half(qh) * sin
    kc[:, :, pos] = kh * cos + _rotate_half(kh) * sin
    vc[:, :, pos] = v.view(B, KV, D)
    keys = kc[:, :, : pos + 1].float().repeat_interleave(H // KV, 1)  # (B, H, T, D); a bf16 cache widened
    vals = vc[:, :, : pos + 1].float().repeat_interleave(H // KV, 1)
    p = torch.softmax((keys @ qh.unsqueeze(-1)).squeeze(-1) * scale, -1)  # (B, H, T)
    return (p.unsqueeze(-2) @ vals).reshape(B, H * D)


_MESSAGES = {
    21: "x / h must be (B, d) contiguous float32",
    22: "the norm weight must be (d,) contiguous float32",
    23: "delta must be contiguous float32 with as many elements as h",
    31: "the key / value caches must be equal (B, KV, L, D) contiguous float32 (or both bfloat16) tensors",
    32: "pos is outside the cache; allocate a longer cache",
    33: "q must be (B, H*D) contiguous float32 with H a multiple of the key / value heads",
    34: "k and v must be (B, KV*D) contiguous float32",
    35: "cos / sin must be (D,) contiguous float32",
    36: "the head dimension must be even",
    37: "gu must be (B, 2F) contiguous float32 (gate columns, then up columns)",
}


def _check(y: torch.Tensor | None, ext, what: str) -> torch.Tensor:
    if y is None:
        raise ValueError(f"{what}: {_MESSAGES.get(ext.last_error(), 'bad input')}")
    return y


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    ext = extension("decode")
    if ext is None or not x.is_cpu:
        return rmsnorm_reference(x, w, eps)
    return _check(ext.rmsnorm(x, w, eps), ext, "rmsnorm")


def add_rmsnorm(h: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``h += delta`` in place; returns ``rmsnorm(h)``."""
    ext = extension("decode")
    if ext is None or not h.is_cpu:
        h += delta.view_as(h)
        return rmsnorm_reference(h, w, eps)
    return _check(ext.add_rmsnorm(h, delta, w, eps), ext, "add_rmsnorm")


def attn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kc: torch.Tensor, vc: torch.Tensor, pos: int, scale: float) -> torch.Tensor:
    ext = extension("decode")
    if ext is None or not q.is_cpu:
        return attn_decode_reference(q, k, v, cos, sin, kc, vc, pos, scale)
    return _check(ext.attn_decode(q, k, v, cos, sin, kc, vc, pos, scale), ext, "attn_decode")


def silu_mul_reference(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.split(gu.shape[1] // 2, 1)
    return torch.nn.functional.silu(g) * u


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """(B, F) = silu(gate) * up for gu (B, 2F) = gate | up."""
    ext = extension("decode")
    if ext is None or not gu.is_cpu:
        return silu_mul_reference(gu)
    return _check(ext.silu_mul(gu), ext, "silu_mul")
