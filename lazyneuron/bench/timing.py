"""Interleaved timing of the dense and converted model in one process: warm-up, median, spread."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..api import applied
from ..calibration import Calibration
from ..config import MethodConfig
from .decode import hf_generate, lean_generate


@dataclasses.dataclass
class Variant:
    """One way to run the model: ``configs=None`` is the dense model."""

    name: str
    configs: MethodConfig | Sequence[MethodConfig] | None = None
    calibration: Calibration | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


def summary(xs: list[float]) -> tuple[float, float]:
    """(median, interquartile range)."""
    if len(xs) == 1:
        return xs[0], 0.0
    q = statistics.quantiles(xs, n=4)
    return statistics.median(xs), q[2] - q[0]


def on_runtime(model: nn.Module) -> bool:
    from ..runtime import FastLinear

    return any(isinstance(m, FastLinear) for m in model.modules())


def decode_tps(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Decode tokens/s: a model on the runtime decodes with its lean step (``runtime.generate``),
    any other with the lean loop over the model's own forward."""
    from .. import runtime

    gen = runtime.generate if on_runtime(model) else lean_generate
    _, (_, td) = gen(model, prompt, new_tokens, return_timing=True)
    return prompt.shape[0] * (new_tokens - 1) / td


@torch.inference_mode()
def prefill_tps(model: nn.Module, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1) if _accepts_logits_to_keep(model) else model(input_ids=ids)
    return ids.numel() / (time.perf_counter() - t0)


@torch.inference_mode()
def encode_tps(model: nn.Module, ids: torch.Tensor) -> float:
    """Tokens/s of one encoder forward over ``ids`` (batch, length)."""
    t0 = time.perf_counter()
    model(input_ids=ids)
    return ids.numel() / (time.perf_counter() - t0)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def hf_generate_tps(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    _, t = hf_generate(model, prompt, new_tokens)
    return prompt.shape[0] * new_tokens / t


def interleave(
    model: nn.Module,
    variants: Sequence[Variant],
    measures: dict[str, Callable[[nn.Module], float]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    progress: bool = False,
) -> dict[str, dict[str, list[float]]]:
    """Run every measure for every variant, variant after variant inside each repeat, so that
    drift in machine load hits all variants alike. Returns variant -> measure -> samples."""
    out: dict[str, dict[str, list[float]]] = {v.name: {k: [] for k in measures} for v in variants}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=(repeats + warmup) * len(variants), desc="timing", unit="run")
    for r in range(warmup + repeats):
        for v in variants:
            with applied(model, v.configs, v.calibration):
                for k, fn in measures.items():
                    x = fn(model)
                    if r >= warmup:
                        out[v.name][k].append(x)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return out
