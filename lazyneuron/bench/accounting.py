"""Compute accounting: the fraction of linear-weight reads a converted model actually skipped.

Lazy modules that skip work count it while tracking is on (``with tracking(model):``): each
keeps ``tokens_seen`` and ``weights_skipped`` (weight elements not read, summed over tokens).
Tracking costs a little per call, so timing runs leave it off.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from ..adapters import is_linear
from ..surgery import LazyModule, lazy_modules


@contextlib.contextmanager
def tracking(model: nn.Module) -> Iterator[None]:
    mods = [m for _, m in lazy_modules(model)]
    for m in mods:
        m.track = True
        m.tokens_seen = 0
        m.weights_skipped = 0
    try:
        yield
    finally:
        for m in mods:
            m.track = False


def linear_weight_elements(model: nn.Module) -> int:
    """Weight elements one token reads through every linear layer (each shared weight once)."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if is_linear(m) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.numel()
    return total


def skipped_fraction(model: nn.Module) -> float:
    """Per-token skipped weight reads over all linear weight reads, from the last tracked run.

    Each lazy module counts what it skipped on the tokens that reached it; methods that combine
    nest (sparse linears inside a gated or early-exited layer stack), and a module inside a
    skipped one sees no token, so every weight byte is counted once when the sum is divided by
    the tokens the model ran: the most any lazy module saw (an outer one, or one in the first
    layer, sees them all)."""
    total = linear_weight_elements(model)
    mods = [m for _, m in lazy_modules(model) if getattr(m, "tokens_seen", 0)]
    if not mods or not total:
        return 0.0
    tokens = max(m.tokens_seen for m in mods)
    return sum(m.weights_skipped for m in mods) / tokens / total


def per_module(model: nn.Module) -> dict[str, float]:
    """Per lazy module: fraction of its own weight reads skipped (from the last tracked run)."""
    out = {}
    for name, m in lazy_modules(model):
        n = getattr(m, "tokens_seen", 0)
        total = m.weight_elements()
        if n and total:
            out[name] = m.weights_skipped / n / total
    return out


def achieved_sparsity(model: nn.Module) -> float:
    """Skipped fraction of the converted modules' own weight reads (weighted by their sizes),
    from the last tracked run: comparable with a method's target sparsity."""
    mods = [m for _, m in lazy_modules(model) if getattr(m, "tokens_seen", 0) and m.weight_elements()]
    total = sum(m.weight_elements() for m in mods)
    return sum(m.weights_skipped / m.tokens_seen for m in mods) / total if total else 0.0


__all__ = ["LazyModule", "achieved_sparsity", "linear_weight_elements", "per_module", "skipped_fraction", "tracking"]
