"""lazyneuron: make a transformer compute only what each input needs, and measure it.

    import lazyneuron as ln
    model, tok = ln.models.load("smollm2-135m")
    cfg = ln.MethodConfig.parse("activation_sparsity:sparsity=0.5")
    cal = ln.calibrate(model, ln.data.texts("news", "calibration")[:32], cfg, tok)
    ln.apply_(model, cfg, cal)
    ...
    ln.revert_(model)
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import data, models  # noqa: E402
from .api import ApplyReport, applied, apply_, calibrate, inspect, revert_  # noqa: E402
from .calibration import Calibration  # noqa: E402
from .config import MethodConfig, registry  # noqa: E402
from .errors import (  # noqa: E402
    CalibrationError,
    ConfigError,
    LazyNeuronError,
    MissingPackageError,
    NoMatchError,
    UnsupportedModelError,
)
from .surgery import LazyModule  # noqa: E402
from . import plan  # noqa: E402  (the planner: ln.plan.plan(model, tok, "ppl:+5%"))

__all__ = [
    "ApplyReport", "Calibration", "CalibrationError", "ConfigError", "LazyModule", "LazyNeuronError", "MethodConfig",
    "MissingPackageError", "NoMatchError", "UnsupportedModelError", "applied", "apply_", "calibrate", "data", "inspect",
    "models", "plan", "registry", "revert_", "__version__",
]
