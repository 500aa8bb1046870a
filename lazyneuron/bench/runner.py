"""The end-to-end comparison behind ``lazyneuron bench`` and ``lazyneuron demo``."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch
from torch import nn

from .. import data
from ..api import applied, calibrate
from ..calibration import Calibration
from ..config import MethodConfig, method_for
from .accounting import skipped_fraction, tracking
from .quality import agreement, perplexity, reference_logprobs
from .records import Record
from .timing import Variant, decode_tps, hf_generate_tps, interleave, prefill_tps, summary

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BenchSettings:
    corpus: str = "news"
    new_tokens: int = 32
    prompt_tokens: int = 64
    prefill_tokens: int = 256
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 5
    ppl_windows: int = 8
    ppl_length: int = 256
    calib_texts: int = 24
    hf_generate: bool = True


def quick() -> BenchSettings:
    return BenchSettings(new_tokens=16, prefill_tokens=128, batches=(1,), repeats=3, ppl_windows=4, ppl_length=128, calib_texts=16, hf_generate=False)


def build_variants(model: nn.Module, tok: Any, configs: Sequence[MethodConfig], s: BenchSettings, progress: bool, calibration: Calibration | None = None) -> list[Variant]:
    variants = [Variant("dense")]
    need = [c for c in configs if method_for(c).needs_calibration]
    cal = calibration
    if need and cal is None:
        texts = data.texts(s.corpus, "calibration")[: s.calib_texts]
        # one calibration per method kind serves all of its settings
        uniq = list({c.name: c for c in need}.values())
        cal = calibrate(model, texts, uniq, tok, max_length=512, progress=progress)
    for c in configs:
        variants.append(Variant(c.name, c, cal, {k: v for k, v in c.to_dict().items() if k not in ("method",)}))
    for i, v in enumerate(variants):  # unique names when one method appears at several settings
        if sum(w.name == v.name for w in variants) > 1:
            v.name = f"{v.name}#{i}"
    return variants


def run(model_name: str, model: nn.Module, tok: Any, configs: Sequence[MethodConfig], s: BenchSettings | None = None, *, progress: bool = True,
        calibration: Calibration | None = None) -> list[Record]:
    """Time and score the dense model and every config on the same model, in this process."""
    s = s or BenchSettings()
    torch.manual_seed(0)
    variants = build_variants(model, tok, configs, s, progress, calibration)
    stream = data.token_stream(tok, s.corpus, "test", max(s.prompt_tokens * max(s.batches), s.prefill_tokens))
    prompts = {b: torch.tensor(stream[: s.prompt_tokens * b]).view(b, s.prompt_tokens) for b in s.batches}
    pre = torch.tensor(stream[: s.prefill_tokens]).view(1, -1)
    measures = {f"decode_tps_b{b}": (lambda m, b=b: decode_tps(m, prompts[b], s.new_tokens)) for b in s.batches}
    measures["prefill_tps"] = lambda m: prefill_tps(m, pre)
    if s.hf_generate:
        measures["hf_generate_tps_b1"] = lambda m: hf_generate_tps(m, prompts[s.batches[0]][:1], s.new_tokens)
    times = interleave(model, variants, measures, repeats=s.repeats, progress=progress)

    wins = data.windows(tok, s.corpus, "test", s.ppl_length, s.ppl_windows)
    ref = reference_logprobs(model, wins)
    recs: list[Record] = []
    dense: dict[str, float] = {}
    for v in variants:
        meth = "dense" if v.configs is None else v.configs.name if isinstance(v.configs, MethodConfig) else "+".join(c.name for c in v.configs)
        with applied(model, v.configs, v.calibration):
            with tracking(model):
                ppl = perplexity(model, wins)
            skipped = skipped_fraction(model)
            agr = agreement(model, wins, ref) if v.configs is not None else {"top1_agreement": 1.0, "kl": 0.0}
        def rec(metric: str, value: float, unit: str, **kw: Any) -> None:
            recs.append(Record(model_name, meth, dict(v.params), metric, float(value), unit, **kw))

        for k, xs in times[v.name].items():
            if k.startswith("hf_generate") and v.configs is not None:
                continue
            med, iqr = summary(xs)
            rec(k, med, "tokens/s", spread=iqr, repeats=len(xs))
            if v.configs is None:
                dense[k] = med
            elif k in dense:
                # speedup from paired samples: ratio per repeat, then the median
                ratios = [a / b for a, b in zip(xs, times["dense"][k])]
                rmed, riqr = summary(ratios)
                rec(k.replace("_tps", "_speedup"), rmed, "x dense", spread=riqr, repeats=len(ratios))
        rec(f"ppl_{s.corpus}", ppl, "perplexity")
        if v.configs is None:
            dense["ppl"] = ppl
        else:
            rec("ppl_delta_pct", 100 * (ppl / dense["ppl"] - 1), "%")
        rec("top1_agreement", agr["top1_agreement"], "fraction")
        rec("kl_vs_dense", agr["kl"], "nats/token")
        rec("compute_skipped", skipped, "fraction of linear weight reads")
    return recs


def table(records: list[dict[str, Any]] | list[Record], batch: int = 1, corpus: str = "news") -> str:
    """The demo table: one row per method setting."""
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        d = r.to_dict() if isinstance(r, Record) else r
        p = {k: v for k, v in d["params"].items() if k not in ("targets", "include", "exclude", "overrides") and v not in ((), [], None)}
        key = d["method"] + (" " + ",".join(f"{k}={v}" for k, v in sorted(p.items())) if p else "")
        rows.setdefault(key, {})[d["metric"]] = d["value"]
    cols = [
        ("method", 44, lambda k, d: k),
        ("decode tok/s", 12, lambda k, d: f"{d.get(f'decode_tps_b{batch}', float('nan')):.1f}"),
        ("speedup", 8, lambda k, d: f"{d.get(f'decode_speedup_b{batch}', 1.0):.2f}x"),
        ("prefill tok/s", 13, lambda k, d: f"{d.get('prefill_tps', float('nan')):.0f}"),
        ("perplexity", 10, lambda k, d: f"{d.get(f'ppl_{corpus}', float('nan')):.2f}"),
        ("Δ ppl", 8, lambda k, d: f"{d.get('ppl_delta_pct', 0.0):+.1f}%"),
        ("skipped", 8, lambda k, d: f"{100 * d.get('compute_skipped', 0.0):.0f}%"),
    ]
    lines = ["  ".join(n.ljust(w) if i == 0 else n.rjust(w) for i, (n, w, _) in enumerate(cols))]
    lines.append("  ".join("-" * w for _, w, _ in cols))
    for k, d in rows.items():
        lines.append("  ".join(f(k, d)[:w].ljust(w) if i == 0 else f(k, d).rjust(w) for i, (_, w, f) in enumerate(cols)))
    return "\n".join(lines)
