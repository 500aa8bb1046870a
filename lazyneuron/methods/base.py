"""`Method`: what to record during calibration, how to build a replacement, what it skips."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from ..adapters import ModelAdapter, is_linear
from ..config import MethodConfig
from ..errors import ConfigError
from ..surgery import filter_paths

DEMO_MODEL = "smollm2-135m"  # the model `lazyneuron demo` runs when none is named


class Observer(Protocol):
    def update(self, x: torch.Tensor) -> None: ...  # x: the module's input (..., features)

    def state(self) -> dict[str, torch.Tensor]: ...


class Method:
    """Base class; subclasses are registered with :func:`lazyneuron.config.register`.

    ``observer`` says what to record for one module during calibration (``None``: nothing);
    ``convert`` is a pure factory returning the replacement; ``summarize`` reports the compute
    the converted model skips. Tree walking and ``setattr`` live in :mod:`lazyneuron.surgery`.
    """

    config_cls: type[MethodConfig] = MethodConfig
    needs_calibration: bool = False
    linear_only: bool = False  # targets must be nn.Linear / Conv1D
    # where the method sits when several are applied (``apply_`` orders configs by it, stably):
    # 0 converts modules inside the layers, 1 runs the whole layer stack (early exit, module
    # gating: the modules the stage-0 methods converted run inside it), 2 is the runtime, which
    # takes the linears left over and gives the converted modules its weight format
    stage: int = 0

    def resolve(self, model: nn.Module, adapter: ModelAdapter, cfg: MethodConfig) -> list[str]:
        paths: list[str] = []
        for role in cfg.targets:
            paths += adapter.paths(role)
        paths = filter_paths(paths, cfg.include, cfg.exclude)
        if self.linear_only:
            bad = [p for p in paths if not is_linear(model.get_submodule(p))]
            if bad:
                raise ConfigError(f"{cfg.name} works on linear layers, but {bad[0]!r} is a {type(model.get_submodule(bad[0])).__name__}; drop its role from targets")
        return paths

    def wants_calibration(self, model: nn.Module, paths: list[str]) -> bool:
        """Whether ``apply_`` needs a calibration for these targets (a method may need none on some
        models, e.g. expert routing on a native MoE)."""
        return self.needs_calibration

    def group_key(self, path: str, adapter: ModelAdapter) -> str:
        """Calibration key: modules that read the same input tensor may share one observer."""
        return path

    def observer(self, path: str, module: nn.Module, cfg: MethodConfig) -> Observer | None:
        return None

    def plan(self, model: nn.Module, cfg: MethodConfig, paths: list[str], stats: dict[str, dict[str, torch.Tensor]] | None) -> MethodConfig:
        """Called once per ``apply_`` before any ``convert``: a method that decides settings across
        modules (for example per-layer sparsity allocation) returns the config to convert with."""
        return cfg

    def convert(self, path: str, module: nn.Module, cfg: MethodConfig, stats: dict[str, torch.Tensor] | None) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def demo_configs(cls, model_name: str = DEMO_MODEL) -> list[MethodConfig]:
        """The settings ``lazyneuron demo`` runs on the built-in model ``model_name`` (empty when
        the method needs a trained checkpoint of that model and there is none)."""
        return [cls.config_cls()]

    @classmethod
    def plan_axes(cls, model: nn.Module, model_name: str | None = None) -> list[list[MethodConfig]]:
        """The settings :func:`lazyneuron.plan` may try, as axes: each list one knob's values from
        weakest to strongest (the planner expects quality to fall along an axis and stops walking
        it once past every budget). By default each demo setting is an axis of one point, so a
        newly registered method joins the planner as it is."""
        try:
            cfgs = cls.demo_configs(model_name or DEMO_MODEL)
        except Exception:  # a demo setting tied to another model's checkpoint
            return []
        if model_name is None:  # an unnamed model: settings tied to the built-in model's checkpoints do not fit it
            cfgs = [c for c in cfgs if not getattr(c, "checkpoint", "")]
        return [[c] for c in cfgs]

    @classmethod
    def demo_notes(cls, model_name: str = DEMO_MODEL) -> list[str]:
        """Lines the demo prints under its table (for example how to make a missing checkpoint)."""
        return []

    def finish(self, model: nn.Module, cfg: MethodConfig, paths: list[str]) -> None:
        """After every target of ``cfg`` is converted (``paths``): work across the new modules
        (the runtime stores sibling projections side by side). Default: nothing."""

    def summarize(self, model: nn.Module, cfg: MethodConfig, paths: list[str]) -> dict[str, Any]:
        return {}


def stack_path(model: nn.Module, adapter: ModelAdapter, method: str) -> str:
    """Path of the module that holds the layer list (``bert.encoder`` of a
    :class:`lazyneuron.tasks.TextClassifier`, ``model`` of a Llama-family causal LM), for methods
    that run the whole layer stack themselves (early exit, module gating)."""
    parent = adapter.layers_path.rpartition(".")[0]
    if adapter.family == "bert":
        from ..tasks import TextClassifier

        if not isinstance(model, TextClassifier):
            raise ConfigError(f"{method} on encoders works on lazyneuron.tasks.TextClassifier (its head reads the encoder's output); got {type(model).__name__}")
        return parent
    if adapter.family == "llama" and adapter.causal_lm:
        return parent
    raise ConfigError(f"{method} supports TextClassifier encoders (bert family) and Llama-family causal LMs; this is a {adapter.model_type} ({adapter.family}) model")
