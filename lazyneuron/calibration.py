"""Calibration: forward hooks that feed observers, and `Calibration` files (safetensors + JSON).

A calibration file holds statistics, not a policy: one file serves every sparsity level.
Files are read with :func:`safetensors.torch.load_file` only (no pickle anywhere).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import torch

from .errors import CalibrationError

FORMAT = "lazyneuron.calibration/1"
_SEP = "::"


class ChannelHistogram:
    """Per-channel histograms of a layer's input on fixed ``asinh`` bins.

    Bin edges are ``scale * sinh(linspace(-umax, umax, bins + 1))``: fine near zero, relative
    width ~``2 * umax / bins`` far from it, so one set of bins fits every layer (values beyond
    the outermost edges land in the outermost bins). Counts are exact integers; streaming adds.
    """

    def __init__(self, channels: int, bins: int = 192, scale: float = 1e-3, umax: float = 15.0) -> None:
        if bins % 2:
            raise ValueError("bins must be even (zero is a bin edge)")
        self.channels, self.bins, self.scale, self.umax = channels, bins, scale, umax
        self.counts = torch.zeros(channels * bins, dtype=torch.int64)
        self.total = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.channels).float()  # (tokens, C)
        if not torch.isfinite(x).all():
            raise CalibrationError("non-finite activations (NaN or inf) seen during calibration; check the model's dtype and weights")
        u = torch.asinh(x / self.scale)
        idx = ((u + self.umax) * (self.bins / (2 * self.umax))).floor_().clamp_(0, self.bins - 1).long()  # (tokens, C)
        idx += torch.arange(self.channels) * self.bins
        self.counts += torch.bincount(idx.reshape(-1), minlength=self.channels * self.bins)
        self.total += x.shape[0]

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "hist": self.counts.view(self.channels, self.bins).to(torch.int32),
            "edges": edges(self.bins, self.scale, self.umax),
        }


def edges(bins: int, scale: float, umax: float) -> torch.Tensor:
    """Bin edges in x-space, float64, (bins + 1,)."""
    return scale * torch.sinh(torch.linspace(-umax, umax, bins + 1, dtype=torch.float64))


@dataclasses.dataclass
class Calibration:
    """Statistics per method and module path, with metadata describing how they were made."""

    stats: dict[str, dict[str, dict[str, torch.Tensor]]]  # method -> module path -> name -> tensor
    meta: dict[str, Any]

    def for_method(self, method: str) -> dict[str, dict[str, torch.Tensor]]:
        """Module path -> its statistics (modules that read one input share one entry)."""
        if method not in self.stats:
            raise CalibrationError(f"this calibration holds statistics for {sorted(self.stats)}, not for {method!r}; run calibrate() with a {method} config")
        groups = self.meta.get("groups", {}).get(method, {})
        st = self.stats[method]
        out = {p: st[k] for p, k in groups.items() if k in st}
        out.update({k: v for k, v in st.items() if k not in out})
        return out

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        flat = {f"{m}{_SEP}{p}{_SEP}{n}": t.contiguous() for m, d in self.stats.items() for p, s in d.items() for n, t in s.items()}
        meta = {"format": FORMAT, "meta": json.dumps(self.meta, sort_keys=True)}
        save_file(flat, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        from .checkpoints import read

        path = os.fspath(path)
        header, tensors = read(path, FORMAT, "calibration", f"create one with `lazyneuron calibrate --out {path}`", CalibrationError)
        try:
            meta = json.loads(header["meta"])
        except (KeyError, json.JSONDecodeError) as e:
            raise CalibrationError(f"{path!r} has damaged metadata ({e}); recreate it with `lazyneuron calibrate`") from None
        stats: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for k, t in tensors.items():
            parts = k.split(_SEP)
            if len(parts) != 3:
                raise CalibrationError(f"{path!r} holds an unexpected tensor name {k!r}; recreate it with `lazyneuron calibrate`")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CalibrationError(f"{path!r}: tensor {k!r} holds NaN or inf; recreate the file")
            m, p, n = parts
            stats.setdefault(m, {}).setdefault(p, {})[n] = t
        return cls(stats, meta)


def new_meta(model: torch.nn.Module, configs: list[Any], num_tokens: int, num_sequences: int) -> dict[str, Any]:
    from . import __version__
    from .adapters import model_type_of

    return {
        "model_type": model_type_of(model),
        "num_tokens": num_tokens,
        "num_sequences": num_sequences,
        "configs": [c.to_dict() for c in configs],
        "lazyneuron": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
