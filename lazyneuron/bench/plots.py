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


def pareto(records: list[dict[str, Any]], out: str | os.PathLike, speed_metric: str = "decode_speedup_b1", quality_metric: str = "ppl_delta_pct",
           series_params: tuple[str, ...] = ("rule", "allocation", "depth", "criterion"), logy: bool | None = None) -> Path:
    """Speed (x) against quality loss (y): one line per method and series (the values of
    ``series_params`` a record has, e.g. the rule), through its settings. ``logy``: log scale
    (default: when the quality values span more than two decades)."""
    plt = _plt()
    pts: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    series_of: dict[tuple[str, str], str] = {}
    for r in records:
        if r["metric"] in (speed_metric, quality_metric):
            key = (r["model"], _label(r))
            pts[key][r["metric"]] = r["value"]
            p = r.get("params", {})
            series_of[key] = " ".join([r["method"]] + [str(p[k]) for k in series_params if k in p])
    by_series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key, d in pts.items():
        if speed_metric in d and quality_metric in d:
            by_series[series_of[key]].append((d[speed_metric], d[quality_metric]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ys = [y for xs in by_series.values() for _, y in xs]
    for i, (name, xs) in enumerate(sorted(by_series.items())):
        xs.sort()
        ax.plot([x for x, _ in xs], [y for _, y in xs], marker=_MARKERS[i % len(_MARKERS)], label=name)
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    if logy is None:
        pos = [y for y in ys if y > 0]
        logy = bool(pos) and min(ys) > 0 and max(pos) / min(pos) > 100
    if logy:
        ax.set_yscale("log")
    else:
        ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"{speed_metric} (x dense, same run)")
    ax.set_ylabel(quality_metric)
    ax.set_title("speed against quality")
    return _save(fig, ax, out, bool(by_series))


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


def xy(records: list[dict[str, Any]], out: str | os.PathLike, x_param: str, y_metric: str, group_param: str, title: str = "", logy: bool = False,
       logx: bool = False) -> Path:
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
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(title)
    return _save(fig, ax, out, bool(series))


def gates(keep: dict[str, Any], out: str | os.PathLike, title: str = "", modules: tuple[str, ...] = ("attn", "mlp")) -> Path:
    """Heatmap of keep probability per (layer, module), one panel per context.
    ``keep``: context -> (layers x modules) nested lists or tensors in [0, 1]."""
    plt = _plt()
    names = list(keep)
    if not names:
        raise ValueError("no contexts to draw; pass {context: [[keep per module] per layer]}")
    fig, axes = plt.subplots(1, len(names), figsize=(1.6 + 1.5 * len(names), 6), sharey=True, squeeze=False)
    im = None
    for ax, name in zip(axes[0], names):
        grid = [[float(v) for v in row] for row in keep[name]]
        im = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(modules)), modules)
        ax.set_title(str(name).replace("=", "=\n"), fontsize=8)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="keep probability")
    if title:
        fig.suptitle(title, fontsize=10)
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
