"""The fast execution path every method runs on.

- :class:`RuntimeConfig` / :class:`FastLinear`: every remaining dense linear on the project's GEMV
  kernels (fp32, bf16 or int8 weights), applied like any method and reverted bit for bit;
- :func:`prepare`: ``apply_(model, [*configs, RuntimeConfig(dtype)])`` in one call;
- :func:`generate`: greedy decoding with a static KV cache and a lean step of fused ops, produced
  from the Hugging Face model's own modules (which it calls), for Llama-family decoders.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .linear import FastLinear, Runtime, RuntimeConfig
from .step import DecodeStep, generate, step_profile, supports_step

__all__ = ["DecodeStep", "FastLinear", "Runtime", "RuntimeConfig", "generate", "prepare", "step_profile", "supports_step"]


def prepare(model: nn.Module, dtype: str = "fp32", configs: Sequence = (), calibration=None):
    """Apply ``configs`` (if any), then move every remaining linear onto the runtime in ``dtype``.
    Returns the apply reports; ``lazyneuron.revert_(model)`` undoes all of it."""
    from ..api import apply_

    return apply_(model, [*configs, RuntimeConfig(dtype=dtype)], calibration)
