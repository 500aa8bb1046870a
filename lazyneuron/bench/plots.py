"""Plots that only read records (matplotlib, PNG)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

_MARKERS = "osD^v<>phX*"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, ax: Any, out: str | os.PathLike, legend: bool) -> Path:
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    _plt().close(fig)
    return p


def _label(r: dict[str, Any]) -> str:
    p = {k: v for k, v in r.get("params", {}).items() if k not in ("targets", "include", "exclude", "overrides")}
    return r["method"] + (" " + ",".join(f"{k}={v}" for k, v in sorted(p.items())) if p else "")


def pareto(records: list[dict[str, Any]], out: str | os.PathLike, speed_metric: str = "decode_speedup_b1", quality_metric: str = "ppl_delta_pct") -> Path:
    """Speed (x) against quality loss (y), one marker per method, a line per method through its settings."""
    plt = _plt()
    pts: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for r in records:
        if r["metric"] in (speed_metric, quality_metric):
            pts[(r["model"], _label(r))][r["metric"]] = r["value"]
            pts[(r["model"], _label(r))]["_method"] = r["method"]  # type: ignore[assignment]
    by_method: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for (model, label), d in pts.items():
        if speed_metric in d and quality_metric in d:
            by_method[str(d["_method"])].append((d[speed_metric], d[quality_metric], label))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (meth, xs) in enumerate(sorted(by_method.items())):
        xs.sort()
        ax.plot([x for x, _, _ in xs], [y for _, y, _ in xs], marker=_MARKERS[i % len(_MARKERS)], label=meth)
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"{speed_metric} (x dense, same run)")
    ax.set_ylabel(quality_metric)
    ax.set_title("speed against quality")
    return _save(fig, ax, out, bool(by_method))


def per_layer(records: list[dict[str, Any]], out: str | os.PathLike, metric: str = "layer_skipped") -> Path:
    """Bars of a per-layer metric (records carrying params.layer), one group per method setting."""
    plt = _plt()
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for r in records:
        if r["metric"] == metric and "layer" in r.get("params", {}):
            p = dict(r["params"])
            layer = int(p.pop("layer"))
            series[_label({**r, "params": p})][layer] = r["value"]
    fig, ax = plt.subplots(figsize=(9, 4))
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (label, d) in enumerate(sorted(series.items())):
        xs = sorted(d)
        ax.bar([x + i * width for x in xs], [d[x] for x in xs], width=width, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel(metric)
    return _save(fig, ax, out, bool(series))


def xy(records: list[dict[str, Any]], out: str | os.PathLike, x_param: str, y_metric: str, group_param: str, title: str = "") -> Path:
    """One line per ``group_param`` value (comma-separated names: per combination): ``y_metric``
    against ``params[x_param]``."""
    plt = _plt()
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        p = r.get("params", {})
        if r["metric"] == y_metric and x_param in p:
            group = " ".join(str(p.get(g, "")) for g in group_param.split(","))
            series[f"{r['method']} {group}".strip()].append((float(p[x_param]), r["value"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, pts) in enumerate(sorted(series.items())):
        pts.sort()
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker=_MARKERS[i % len(_MARKERS)], label=label)
    ax.set_xlabel(x_param)
    ax.set_ylabel(y_metric)
    ax.set_title(title)
    return _save(fig, ax, out, bool(series))
