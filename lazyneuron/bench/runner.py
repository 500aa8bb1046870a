"""The end-to-end comparison behind ``lazyneuron bench`` and ``lazyneuron demo``."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch
from torch import nn

from .. import data
from ..adapters import get_adapter
from ..api import applied, calibrate
from ..calibration import Calibration
from ..config import MethodConfig, method_for
from ..errors import ConfigError
from ..runtime import RuntimeConfig
from .accounting import skipped_fraction, tracking
from .quality import agreement, perplexity, reference_logprobs, reference_states, state_fidelity
from .records import Record
from .timing import Variant, decode_tps, encode_tps, hf_generate_tps, interleave, prefill_tps, summary

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
    runtime: str = "fp32"  # the weight format methods run on (lazyneuron.runtime), or "eager": the model's own modules


RUNTIMES = ("eager", "fp32", "bf16", "int8")


def quick() -> BenchSettings:
    return BenchSettings(new_tokens=16, prefill_tokens=128, batches=(1,), repeats=3, ppl_windows=4, ppl_length=128, calib_texts=16, hf_generate=False)


def build_variants(model: nn.Module, tok: Any, configs: Sequence[MethodConfig | Sequence[MethodConfig]], s: BenchSettings, progress: bool, calibration: Calibration | None = None) -> list[Variant]:
    variants = [Variant("dense")]
    ad = get_adapter(model)
    flat = [x for c in configs for x in _as_list(c)]
    need = [c for c in flat if method_for(c).wants_calibration(model, method_for(c).resolve(model, ad, c))]
    cal = calibration
    if need and cal is None:
        texts = data.texts(s.corpus, "calibration")[: s.calib_texts]
        # one pass over the texts observes what every setting needs (settings of one method may
        # target different modules, or need other statistics: SCAP's histograms, CATS's gates)
        cal = calibrate(model, texts, need, tok, max_length=512, progress=progress)
    if s.runtime not in RUNTIMES:
        raise ConfigError(f"runtime {s.runtime!r} is not one of {list(RUNTIMES)}")
    on_runtime = s.runtime != "eager"
    if on_runtime and RuntimeConfig(dtype=s.runtime) not in configs:  # the dense model on the runtime: the runtime's own share
        rt = RuntimeConfig(dtype=s.runtime)
        variants.append(Variant("runtime", rt, None, {"dtype": s.runtime}))
    for c in configs:
        if isinstance(c, (list, tuple)):  # a combination: one variant running every config in it
            variants.append(_combination(list(c), cal, s.runtime if on_runtime else None))
            continue
        params = {k: v for k, v in c.to_dict().items() if k not in ("method",)}
        if on_runtime and c.name != "runtime":
            both = [c, RuntimeConfig(dtype=s.runtime)]
            try:  # the method on the runtime, unless the two cannot share this model
                with applied(model, both, cal):
                    pass
                variants.append(Variant(c.name, both, cal, {**params, "runtime": s.runtime}))
                continue
            except ConfigError as e:
                log.info("%s runs on the model's own modules: %s", c.name, e)
        variants.append(Variant(c.name, c, cal, params))
    counts = {n: sum(v.name == n for v in variants) for n in {v.name for v in variants}}
    for i, v in enumerate(variants):  # unique names when one method appears at several settings
        if counts[v.name] > 1:
            v.name = f"{v.name}#{i}"
    return variants


def _as_list(c: MethodConfig | Sequence[MethodConfig]) -> list[MethodConfig]:
    return list(c) if isinstance(c, (list, tuple)) else [c]


def _combination(cfgs: list[MethodConfig], cal: Calibration | None, runtime: str | None) -> Variant:
    """A variant applying several configs together (``lazyneuron bench --method 'a:... + b:...'``);
    on the runtime unless the combination names its own format."""
    from ..plan import spec

    rt = next((c for c in cfgs if c.name == "runtime"), None)
    if rt is None and runtime is not None:
        cfgs = cfgs + [RuntimeConfig(dtype=runtime)]
    params: dict[str, Any] = {"configs": spec([c for c in cfgs if c.name != "runtime"])}
    rt = next((c for c in cfgs if c.name == "runtime"), None)
    if rt is not None:
        params["runtime"] = rt.dtype  # type: ignore[attr-defined]
    return Variant("+".join(c.name for c in cfgs if c.name != "runtime") or "runtime", cfgs, cal, params)


def run(model_name: str, model: nn.Module, tok: Any, configs: Sequence[MethodConfig | Sequence[MethodConfig]], s: BenchSettings | None = None, *, progress: bool = True,
        calibration: Calibration | None = None) -> list[Record]:
    """Time and score the dense model and every config on the same model, in this process. A
    causal LM: decode and prefill tokens/s, perplexity and agreement with the dense model's
    next-token predictions. An encoder: tokens/s of whole forwards and how close its output states
    stay to the dense model's (:func:`run_encoder`)."""
    s = s or BenchSettings()
    torch.manual_seed(0)
    variants = build_variants(model, tok, configs, s, progress, calibration)
    if not get_adapter(model).causal_lm:
        return run_encoder(model_name, model, tok, variants, s, progress=progress)
    seqs = data.windows(tok, s.corpus, "test", s.prompt_tokens, max(s.batches))  # prompts start with BOS where the tokenizer adds one
    prompts = {b: seqs[:b] for b in s.batches}
    pre = data.windows(tok, s.corpus, "test", s.prefill_tokens, 1)
    measures = {f"decode_tps_b{b}": (lambda m, b=b: decode_tps(m, prompts[b], s.new_tokens)) for b in s.batches}
    measures["prefill_tps"] = lambda m: prefill_tps(m, pre)
    if s.hf_generate:
        measures["hf_generate_tps_b1"] = lambda m: hf_generate_tps(m, prompts[s.batches[0]][:1], s.new_tokens)
    times = interleave(model, variants, measures, repeats=s.repeats, progress=progress)

    wins = data.windows(tok, s.corpus, "test", s.ppl_length, s.ppl_windows)
    ref = reference_logprobs(model, wins)
    recs: list[Record] = []
    dense: dict[str, float] = {}
    base = next((x.name for x in variants if _method_name(x) == "runtime" and x.params.get("dtype") == s.runtime), None)
    for v in variants:
        meth = _method_name(v)
        with applied(model, v.configs, v.calibration):
            with tracking(model):
                ppl = perplexity(model, wins)
            skipped = skipped_fraction(model)
            agr = agreement(model, wins, ref) if v.configs is not None else {"top1_agreement": 1.0, "kl": 0.0}
        def rec(metric: str, value: float, unit: str, **kw: Any) -> None:
            recs.append(Record(model_name, meth, dict(v.params), metric, float(value), unit, **kw))

        _paired(recs, rec, times, v, dense, base)
        rec(f"ppl_{s.corpus}", ppl, "perplexity")
        if v.configs is None:
            dense["ppl"] = ppl
        else:
            rec("ppl_delta_pct", 100 * (ppl / dense["ppl"] - 1), "%")
        rec("top1_agreement", agr["top1_agreement"], "fraction")
        rec("kl_vs_dense", agr["kl"], "nats/token")
        rec("compute_skipped", skipped, "fraction of linear weight reads")
    return recs


def _method_name(v: Variant) -> str:
    """dense, the method's name, or (a method on the runtime) the method's name alone: its records
    carry the runtime's weight format as the ``runtime`` parameter."""
    if v.configs is None:
        return "dense"
    if isinstance(v.configs, MethodConfig):
        return v.configs.name
    return "+".join(c.name for c in v.configs if c.name != "runtime") or "runtime"


def _paired(recs: list[Record], rec: Any, times: dict[str, dict[str, list[float]]], v: Variant, dense: dict[str, float], base: str | None = None) -> None:
    """tokens/s records of one variant, and for a method its speed-up over dense from paired
    samples; for a method on the runtime also over the dense model on the same runtime (``base``,
    ``*_vs_runtime``): what the method itself buys."""
    for k, xs in times[v.name].items():
        if k.startswith("hf_generate") and v.configs is not None:
            continue
        med, iqr = summary(xs)
        rec(k, med, "tokens/s", spread=iqr, repeats=len(xs))
        if v.configs is None:
            dense[k] = med
        elif k in dense:
            ratios = [a / b for a, b in zip(xs, times["dense"][k])]  # ratio per repeat, then the median
            rmed, riqr = summary(ratios)
            rec(k.replace("_tps", "_speedup"), rmed, "x dense", spread=riqr, repeats=len(ratios))
            if base is not None and v.name != base and "runtime" in v.params and k in times[base]:
                ratios = [a / b for a, b in zip(xs, times[base][k])]
                rmed, riqr = summary(ratios)
                rec(k.replace("_tps", "_vs_runtime"), rmed, "x dense on the runtime", spread=riqr, repeats=len(ratios))


def run_encoder(model_name: str, model: nn.Module, tok: Any, variants: list[Variant], s: BenchSettings, *, progress: bool = True) -> list[Record]:
    """:func:`run` for an encoder (BERT, MiniLM): tokens/s of one forward over ``batches`` x
    ``prompt_tokens`` and over one sequence of ``prefill_tokens`` (``encode_tps_b{n}``,
    ``encode_tps_long``), and on ``ppl_windows`` windows of the corpus the cosine similarity of the
    mean-pooled embeddings to the dense model's and the relative error of the per-token states."""
    limit = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 1 << 30)
    long_len, win_len = min(s.prefill_tokens, limit), min(s.ppl_length, limit)
    plen = min(s.prompt_tokens, limit)
    stream = data.token_stream(tok, s.corpus, "test", max(plen * max(s.batches), long_len))
    seqs = {b: torch.tensor(stream[: plen * b]).view(b, plen) for b in s.batches}
    long = torch.tensor(stream[:long_len]).view(1, -1)
    measures = {f"encode_tps_b{b}": (lambda m, b=b: encode_tps(m, seqs[b])) for b in s.batches}
    measures["encode_tps_long"] = lambda m: encode_tps(m, long)
    times = interleave(model, variants, measures, repeats=s.repeats, progress=progress)

    wins = data.windows(tok, s.corpus, "test", win_len, s.ppl_windows)
    ref = reference_states(model, wins)
    recs: list[Record] = []
    dense: dict[str, float] = {}
    base = next((x.name for x in variants if _method_name(x) == "runtime" and x.params.get("dtype") == s.runtime), None)
    for v in variants:
        meth = _method_name(v)
        with applied(model, v.configs, v.calibration):
            with tracking(model):
                fid = state_fidelity(model, wins, ref)
            skipped = skipped_fraction(model)

        def rec(metric: str, value: float, unit: str, **kw: Any) -> None:
            recs.append(Record(model_name, meth, dict(v.params), metric, float(value), unit, **kw))

        _paired(recs, rec, times, v, dense, base)
        rec("embedding_cosine", fid["embedding_cosine"], "cosine to dense")
        rec("state_rel_error", fid["state_rel_error"], "relative L2 error")
        rec("compute_skipped", skipped, "fraction of linear weight reads")
    return recs


_KEY_PARAMS = ("rule", "sparsity", "criterion", "threshold", "depth", "dtype", "runtime")  # shown even at their defaults


def _label(method: str, params: dict[str, Any]) -> str:
    """A table row's name: the method and the settings that tell its rows apart (those that differ
    from the method's defaults, the key ones first; a checkpoint by its file name)."""
    from pathlib import Path

    from ..config import registry

    cls = getattr(registry().get(method), "config_cls", None)
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING} if cls else {}
    p = {}
    for k, v in params.items():
        if k in ("targets", "include", "exclude", "overrides", "layer", "batch") or v in ((), [], None, "") or v != v:  # v != v: NaN
            continue
        if k in defaults and v == defaults[k] and k not in _KEY_PARAMS:
            continue
        p[k] = Path(v).name.removesuffix(".safetensors") if k == "checkpoint" else v
    if "checkpoint" in p:
        p.pop("depth", None)  # a checkpoint brings its own
    keys = [k for k in _KEY_PARAMS if k in p] + sorted(k for k in p if k not in _KEY_PARAMS)
    fmt = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in p.items()}
    return method + (" " + ",".join(f"{k}={fmt[k]}" for k in keys) if keys else "")


def table(records: list[dict[str, Any]] | list[Record], batch: int = 1, corpus: str = "news") -> str:
    """The demo table: one row per method setting."""
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        d = r.to_dict() if isinstance(r, Record) else r
        rows.setdefault(_label(d["method"], d["params"]), {})[d["metric"]] = d["value"]
    if any("encode_tps_long" in d for d in rows.values()):  # an encoder's records
        cols = [_col(f"tok/s b{batch}", 10, f"encode_tps_b{batch}", "{:.0f}"), _col("speedup", 8, f"encode_speedup_b{batch}", "{:.2f}x", 1.0),
                _col("long tok/s", 10, "encode_tps_long", "{:.0f}"), _col("speedup", 8, "encode_speedup_long", "{:.2f}x", 1.0),
                _col("emb. cosine", 11, "embedding_cosine", "{:.4f}"), _col("state err", 9, "state_rel_error", "{:.3f}")]
    else:
        vs_rt = any(f"decode_vs_runtime_b{batch}" in d for d in rows.values())
        cols = [_col("decode tok/s", 12, f"decode_tps_b{batch}", "{:.1f}"), _col("x dense", 8, f"decode_speedup_b{batch}", "{:.2f}x", 1.0)]
        if vs_rt:
            cols.append(_col("x runtime", 9, f"decode_vs_runtime_b{batch}", "{:.2f}x", None))
        cols += [
                 _col("prefill tok/s", 13, "prefill_tps", "{:.0f}"), _col("perplexity", 10, f"ppl_{corpus}", "{:.2f}"),
                 _col("Δ ppl", 8, "ppl_delta_pct", "{:+.1f}%", 0.0)]
    return _render(rows, cols)


def _col(name: str, width: int, metric: str, fmt: str, default: float | None = float("nan")) -> tuple[str, int, Any]:
    """A table column: ``metric`` of each row through ``fmt`` (``default`` where the row has none;
    None: left blank)."""
    return (name, width, lambda k, d: "" if metric not in d and default is None else fmt.format(d.get(metric, default)))


def _render(rows: dict[str, dict[str, Any]], cols: list[tuple[str, int, Any]]) -> str:
    """Rows named in full in the first column, then ``cols``, then the compute skipped."""
    skipped = ("skipped", 8, lambda k, d: f"{100 * d.get('compute_skipped', 0.0):.0f}%")
    cols = [("method", max([len(k) for k in rows] + [44]), lambda k, d: k)] + cols + [skipped]
    lines = ["  ".join(n.ljust(w) if i == 0 else n.rjust(w) for i, (n, w, _) in enumerate(cols))]
    lines.append("  ".join("-" * w for _, w, _ in cols))
    for k, d in rows.items():
        lines.append("  ".join(f(k, d)[:w].ljust(w) if i == 0 else f(k, d).rjust(w) for i, (_, w, f) in enumerate(cols)))
    return "\n".join(lines)
