"""Plots that only read records (matplotlib, PNG)."""

from __future__ import annotations

import math
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


LABELS = {
    "decode_speedup_b1": "decode speed, × dense (batch 1, same run)",
    "decode_speedup": "decode speed, × dense (same run)",
    "decode_vs_runtime_b1": "decode speed, × dense on the same runtime (batch 1, same run)",
    "prefill_speedup": "prefill speed, × dense (same run)",
    "encode_speedup_b1": "forward speed, × dense (batch 1, same run)",
    "encoder_speedup": "throughput, × dense (same run)",
    "ppl_delta_pct": "perplexity vs dense",
    "ppl_news": "perplexity, news test windows",
    "state_rel_error": "output-state error vs dense (relative)",
    "accuracy_drop_points": "accuracy lost vs dense (points)",
    "accuracy_mr": "MR test accuracy",
    "top1_agreement": "top-1 agreement with dense",
    "speedup_vs_torch": "speed-up vs torch (same run)",
    "sparsity": "target sparsity",
    "target_sparsity": "share of modules skipped",
    "depth": "tree depth",
    "batch": "batch size",
}
DENSE_QUALITY = {"ppl_delta_pct": 0.0, "state_rel_error": 0.0, "accuracy_drop_points": 0.0, "top1_agreement": 1.0}


def label(metric: str) -> str:
    """A person's words for a metric or parameter name."""
    return LABELS.get(metric, metric.replace("_", " "))


PPL_CLIP = 20.0  # perplexity ratios above this (+1900%) are drawn off the top edge, and the axis says so


def _ppl_axis(ax: Any, ys: list[float]) -> str:
    """Log-scale perplexity-ratio axis with ticks written as changes (+10%, +100%, ...), fine
    ticks when the data spans less than ~4x, clipped at ``PPL_CLIP``; returns the y label."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    ys = [y for y in ys if y > 0] + [1.0]
    lo, hi = min(ys), max(ys)
    top = min(hi, PPL_CLIP)
    ax.set_yscale("log")
    fine = math.log10(top / lo) <= 0.6
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.1, 1.25, 1.5, 2.0, 3.0) if fine else (1.0, 1.25, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{(y - 1) * 100:+.0f}%" if abs(y - 1) > 1e-9 else "dense"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(lo / 1.1, top * 1.12)
    if hi > PPL_CLIP:
        ax.text(0.01, 0.99, f"clipped at {(PPL_CLIP - 1) * 100:+.0f}%: higher points lie off the top", transform=ax.transAxes, va="top", fontsize=7,
                color="0.3")
    return "perplexity vs dense (log scale)"


def _save(fig: Any, ax: Any, out: str | os.PathLike, legend: bool) -> Path:
    ax.grid(alpha=0.3)
    if legend:  # outside the axes, never over the data
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    fig.tight_layout()
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return p


def _label(r: dict[str, Any]) -> str:
    p = {k: v for k, v in r.get("params", {}).items() if k not in ("targets", "include", "exclude", "overrides")}
    return r["method"] + (" " + ",".join(f"{k}={v}" for k, v in sorted(p.items())) if p else "")


def _point_label(p: dict[str, Any]) -> str:
    """The setting that tells the points of one line apart (sparsity, weight format, depth, threshold)."""
    if "sparsity" in p:
        return f"{float(p['sparsity']):.0%}"
    if "top_k" in p and "experts" in p:  # expert routing: the share of neurons a token runs
        act = (int(p.get("shared", 0)) + int(p["top_k"])) / int(p["experts"])
        return f"≤{act:.0%} adaptive" if float(p.get("share", 1.0)) < 1 else f"{act:.0%}"
    for k in ("dtype", "tree_dtype"):
        if k in p and p[k] not in ("", None):
            return str(p[k]).replace("float", "fp").replace("bfloat16", "bf16")
    if "depth" in p:
        return f"d{p['depth']}"
    if "threshold" in p and math.isfinite(float(p["threshold"])):
        return f"t={float(p['threshold']):.2g}"
    if p.get("context"):
        return str(p["context"])
    if "budget" in p:
        return str(p["budget"])
    return ""


def pareto(records: list[dict[str, Any]], out: str | os.PathLike, speed_metric: str = "decode_speedup_b1", quality_metric: str = "ppl_delta_pct",
           series_params: tuple[str, ...] = ("rule", "allocation", "criterion", "heads", "exit"), logy: bool | None = None,
           title: str = "", lines: bool = True, point_param: str | None = None) -> Path:
    """Speed (x, × dense) against quality (y): one line per method and series (the values of
    ``series_params`` a record has, e.g. the rule), its settings as labelled points along it; the
    dense model as a star, peer engines (records whose method names one, e.g. ``llama.cpp``) as
    crosses. Perplexity change is drawn as the ratio to dense on a log scale (ticks read +10%,
    +100%, ...); other quality metrics on a linear scale (``logy`` forces a log scale).
    ``lines=False``: markers only (the points of a series are not settings of one knob);
    ``point_param``: the parameter whose value labels each point (default: the setting that tells
    a method's points apart)."""
    plt = _plt()
    pts: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
    series_of: dict[tuple[str, str], str] = {}
    for r in records:
        if r["metric"] in (speed_metric, quality_metric):
            key = (r["model"], _label(r))
            pts[key][r["metric"]] = r["value"]
            pts[key]["_params"] = r.get("params", {})
            p = r.get("params", {})
            series_of[key] = " ".join([r["method"]] + [f"{k}={p[k]}" if isinstance(p[k], (int, float)) else str(p[k]) for k in series_params if k in p])
    ppl = quality_metric == "ppl_delta_pct"
    conv = (lambda v: 1.0 + v / 100.0) if ppl else (lambda v: v)
    by_series: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for key, d in pts.items():
        if speed_metric in d and quality_metric in d:
            pl = str(d["_params"].get(point_param, "")) if point_param else _point_label(d["_params"])
            by_series[series_of[key]].append((d[speed_metric], conv(d[quality_metric]), pl))
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for i, (name, xs) in enumerate(sorted(by_series.items())):
        xs.sort()
        peer = name.split(" ")[0].lower() in ("llama.cpp", "llamacpp", "faster-whisper", "peer")
        ax.plot([x for x, _, _ in xs], [y for _, y, _ in xs], marker="X" if peer else _MARKERS[i % len(_MARKERS)],
                ls="none" if not lines else ":" if peer else "-",
                ms=8 if peer else 6, label=name)
        for x, y, t in xs:
            if t:
                ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="0.25")
    if quality_metric in DENSE_QUALITY:
        ax.plot([1.0], [conv(DENSE_QUALITY[quality_metric])], marker="*", ms=13, color="black", ls="none", label="dense", zorder=5)
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ys = [y for xs in by_series.values() for _, y, _ in xs]
    if ppl:
        ax.set_ylabel(_ppl_axis(ax, ys))
    else:
        if logy is None:
            pos = [y for y in ys if y > 0]
            logy = bool(pos) and min(ys) > 0 and max(pos) / min(pos) > 100
        if logy:
            ax.set_yscale("log")
        ax.set_ylabel(label(quality_metric) + (" (log scale)" if logy else ""))
    ax.set_xlabel(label(speed_metric))
    ax.set_title(title or "speed against quality (lower right is better)" if quality_metric != "top1_agreement" else title or "speed against quality (upper right is better)")
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
    for i, (name, d) in enumerate(sorted(series.items())):
        xs = sorted(d)
        ax.bar([x + i * width for x in xs], [d[x] for x in xs], width=width, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel(label(metric))
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
    ppl = y_metric == "ppl_delta_pct"
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    ys = []
    for i, (name, pts) in enumerate(sorted(series.items())):
        pts.sort()
        yv = [1 + b / 100 if ppl else b for _, b in pts]
        ys += yv
        ax.plot([a for a, _ in pts], yv, marker=_MARKERS[i % len(_MARKERS)], label=name)
    ax.set_xlabel(label(x_param))
    ax.set_ylabel(label(y_metric) + (" (log scale)" if logy else ""))
    if ppl:
        ax.set_ylabel(_ppl_axis(ax, ys))
    elif logy:
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


def plan_front(records: list[dict[str, Any]], out: str | os.PathLike, title: str = "") -> Path:
    """What ``lazyneuron plan`` measured: every candidate's speed (× dense, the search's timing)
    against its quality loss on the calibration split, single methods and combinations apart, the
    Pareto front, each budget as a line and each budget's choice as a star. One panel per budget
    metric (perplexity, agreement, accuracy); the loss axis up to
    past the loosest budget runs linear; losses beyond it sit on the top edge as triangles."""
    plt = _plt()
    cands: dict[tuple[str, str], dict[str, Any]] = {}  # (configs, metric) -> point
    budgets: dict[str, dict[str, float]] = defaultdict(dict)  # metric -> budget text -> limit
    chosen: dict[str, dict[str, str]] = defaultdict(dict)  # metric -> budget text -> configs
    speed: dict[str, float] = {}
    base = "dense"
    for r in records:
        p = r.get("params", {})
        if r["method"] == "candidate" and r["metric"] == "cal_speedup":
            speed[p["configs"]] = r["value"]
            base = p.get("base", "dense")
        if r["method"] == "candidate" and r["metric"] == "cal_loss":
            m = str(p["budget"]).partition(":")[0]
            cands[(p["configs"], m)] = {"loss": r["value"], "single": len(set(p.get("methods", []))) <= 1, "methods": p.get("methods", [])}
        if r["method"] == "plan" and r["metric"] == "budget_limit":
            budgets[str(p["budget"]).partition(":")[0]][p["budget"]] = r["value"]
            chosen[str(p["budget"]).partition(":")[0]][p["budget"]] = p["configs"]
    metrics = sorted({m for _, m in cands})
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(8.5 * max(1, len(metrics)) ** 0.8, 5.0), squeeze=False)
    ylabels = {"ppl": "perplexity increase on calibration text, %", "agree": "tokens whose top-1 differs from dense, %",
               "acc": "accuracy lost on calibration rows, points"}
    for ax, m in zip(axes[0], metrics):
        pts = [(speed[c], d["loss"], d) for (c, mm), d in cands.items() if mm == m and c in speed]
        limits = sorted(budgets.get(m, {}).values())
        top = 2.2 * max(limits, default=max([y for _, y, _ in pts] + [1.0]))  # linear scale up to past the loosest budget
        low = min([y for _, y, _ in pts] + [0.0])
        low = low - 0.05 * (top - low)
        for single, marker, name in ((True, "o", "one method (any runtime format)"), (False, "D", "combination of methods")):
            xs = [(x, y) for x, y, d in pts if d["single"] == single]
            inside = [(x, y) for x, y in xs if y <= top]
            above = [x for x, y in xs if y > top]
            color = "C0" if single else "C1"
            if inside:
                ax.plot([x for x, _ in inside], [y for _, y in inside], marker=marker, ls="none", ms=5, alpha=0.6, color=color,
                        label=f"{name} ({len(xs)})")
            if above:  # far past every budget: on the top edge
                ax.plot(above, [top] * len(above), marker="^", ls="none", ms=6, alpha=0.6, color=color, clip_on=False,
                        label=f"{name}, loss above the axis ({len(above)})")
        front = sorted((x, y) for x, y, _ in pts if not any(x2 >= x and y2 <= y and (x2 > x or y2 < y) for x2, y2, _ in pts))
        front = [(x, min(y, top)) for x, y in front]
        if front:
            ax.plot([x for x, _ in front], [y for _, y in front], color="black", lw=1, ls="-", label="Pareto front")
        served: dict[str, list[str]] = defaultdict(list)
        for i, (b, lim) in enumerate(sorted(budgets.get(m, {}).items(), key=lambda kv: kv[1])):
            ax.axhline(lim, color=f"C{(i + 2) % 10}", lw=1, ls="--", label=f"budget {b}")
            c = chosen[m].get(b)
            if c in speed and (c, m) in cands:
                served[c].append(b)
        for k, (c, bs) in enumerate(served.items()):
            x, y = speed[c], min(cands[(c, m)]["loss"], top)
            ax.plot([x], [y], marker="*", ms=16, color="gold", mec="black", ls="none", zorder=5, label="choice" if k == 0 else None)
            ax.annotate("choice for " + ", ".join(bs), (x, y), textcoords="offset points", xytext=(-8, 10), ha="right", fontsize=8)
        ax.set_ylim(low, top)
        ax.axvline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"speed, × {base} (search timing: " + ("batch-1 decode)" if "runtime" in base else "classification throughput)"))
        ax.set_ylabel(ylabels.get(m, m))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    fig.suptitle(title or "planner: speed against quality loss (lower right is better)", fontsize=10)
    fig.tight_layout()
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return p


def speech_gates(keep: dict[str, Any], slots: list[tuple[str, int, str]], out: str | os.PathLike, title: str = "") -> Path:
    """Keep probability per (layer, module) of an encoder-decoder speech model, one column per
    context (e.g. language), encoder on top and decoder below. ``keep``: context -> one value per
    slot in ``slots`` order (``(stack, layer, module)``)."""
    plt = _plt()
    names = list(keep)
    if not names:
        raise ValueError("no contexts to draw; pass {context: [keep per slot]}")
    stacks = [s for s in ("encoder", "decoder") if any(x[0] == s for x in slots)]
    fig, axes = plt.subplots(len(stacks), len(names), figsize=(1.8 + 1.7 * len(names), 2.2 + 1.9 * len(stacks)), squeeze=False)
    im = None
    for r, stack in enumerate(stacks):
        mods = list(dict.fromkeys(x[2] for x in slots if x[0] == stack))
        layers = sorted({x[1] for x in slots if x[0] == stack})
        for c, name in enumerate(names):
            vals = [float(v) for v in keep[name]]
            grid = [[vals[slots.index((stack, j, m))] for m in mods] for j in layers]
            ax = axes[r][c]
            im = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
            ax.set_xticks(range(len(mods)), mods, fontsize=8)
            ax.set_yticks(range(len(layers)), [str(j) for j in layers], fontsize=7)
            if r == 0:
                ax.set_title(str(name), fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{stack} layer")
    fig.colorbar(im, ax=[a for row in axes for a in row], shrink=0.8, label="keep probability")
    if title:
        fig.suptitle(title, fontsize=10)
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
