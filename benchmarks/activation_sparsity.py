"""SmolLM2-135M with activation sparsity (SCAP / TEAL / CATS) against dense, in one process.

    .venv/bin/python benchmarks/activation_sparsity.py            # ~25 min on 2 cores
    .venv/bin/python benchmarks/activation_sparsity.py --quick    # smoke run
    .venv/bin/python benchmarks/activation_sparsity.py --decode-50  # decode speed at 50%, 7 x 48 tokens (~6 min)

Writes benchmarks/results/activation_sparsity.jsonl (records), and the plots
benchmarks/results/as_ppl_vs_sparsity.png, as_speedup_vs_sparsity.png, as_pareto.png.
Decode: batch 1 (and 8), lean loop, interleaved with dense, median of repeats; speedups are
medians of per-repeat ratios. Perplexity on the news and Austen test splits (fixed windows).
Rules: scap and teal with TEAL's greedy per-block allocation (the default), teal with uniform
allocation (every layer at the target), cats. Achieved sparsity is measured on held-out text.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

import lazyneuron as ln
from lazyneuron import data
from lazyneuron.bench import BenchSettings, Record, plots, read, runner, write
from lazyneuron.bench.accounting import achieved_sparsity, tracking
from lazyneuron.bench.quality import perplexity
from lazyneuron.methods import ActivationSparsityConfig as C

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(OUT / "activation_sparsity.jsonl"))
    ap.add_argument("--plots-only", action="store_true", help="redraw the plots from the records in --out")
    ap.add_argument("--decode-50", action="store_true",
                    help="only the decode speed at 50%% (dense, s=0 kernel path, each rule), 7 repeats x 48 tokens -> activation_sparsity_decode50.jsonl")
    ap.add_argument("--sparsities", default="0.25,0.4,0.5,0.6,0.7", help="comma-separated target sparsities")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.plots_only:
        draw([r for r in read(args.out)])
        return
    if args.decode_50:
        decode_50()
        return
    ap_s = args.sparsities
    sparsities = [0.25, 0.5] if args.quick else [float(x) for x in ap_s.split(",")]
    rules = [dict(rule="scap"), dict(rule="teal"), dict(rule="teal", allocation="uniform"), dict(rule="cats")]
    s = runner.quick() if args.quick else BenchSettings(new_tokens=24, repeats=3, ppl_windows=4, ppl_length=256, calib_texts=32, batches=(1,))
    s.hf_generate = not args.quick
    model, tok = ln.models.load("smollm2-135m")
    cal = ln.calibrate(model, data.texts("news", "calibration")[: s.calib_texts], [C(rule="scap"), C(rule="cats")], tok, progress=True)
    cfgs = [C(rule="teal", sparsity=0.0)] + [C(sparsity=x, **r) for x in sparsities for r in rules]
    recs = runner.run("smollm2-135m", model, tok, cfgs, s, progress=True, calibration=cal)
    write(recs, args.out, append=False)  # keep what is measured even if a later step fails
    # sparsity 0 reproduces the dense logits, for every rule
    ids = data.windows(tok, "news", "test", s.ppl_length, 1)[0].view(1, -1)
    with torch.inference_mode():
        ref = model(ids).logits
        for r in rules:
            with ln.applied(model, C(sparsity=0.0, **r), cal):
                diff = float((model(ids).logits - ref).abs().max())
            recs.append(Record("smollm2-135m", "activation_sparsity", {"sparsity": 0.0, **r}, "max_abs_logit_diff_vs_dense", diff, "logit"))
    # perplexity on the second text (Jane Austen), same windows for every setting
    wins = data.windows(tok, "austen", "test", s.ppl_length, s.ppl_windows)
    dense_ppl = perplexity(model, wins)
    recs.append(Record("smollm2-135m", "dense", {}, "ppl_austen", dense_ppl, "perplexity"))
    for c in cfgs:
        with ln.applied(model, c, cal):
            with tracking(model):
                p = perplexity(model, wins)
            achieved = achieved_sparsity(model)
        params = {k: v for k, v in c.to_dict().items() if k != "method"}
        recs.append(Record("smollm2-135m", c.name, params, "ppl_austen", p, "perplexity"))
        recs.append(Record("smollm2-135m", c.name, params, "ppl_austen_delta_pct", 100 * (p / dense_ppl - 1), "%"))
        recs.append(Record("smollm2-135m", c.name, params, "achieved_sparsity_austen", achieved, "fraction of the converted layers' weight reads"))
    write(recs, args.out, append=False)
    draw([r.to_dict() for r in recs])
    sys.stdout.write(runner.table(recs) + "\n")


def decode_50() -> None:
    """A longer, focused decode measurement at 50% next to dense and the s=0 kernel path."""
    model, tok = ln.models.load("smollm2-135m")
    cal = ln.calibrate(model, data.texts("news", "calibration")[:32], [C(rule="scap"), C(rule="cats")], tok, progress=True)
    cfgs = [C(rule="teal", sparsity=0.0), C(rule="scap", sparsity=0.5), C(rule="teal", sparsity=0.5),
            C(rule="teal", sparsity=0.5, allocation="uniform"), C(rule="cats", sparsity=0.5)]
    s = BenchSettings(new_tokens=48, repeats=7, ppl_windows=1, ppl_length=128, batches=(1,), hf_generate=False)
    recs = runner.run("smollm2-135m", model, tok, cfgs, s, progress=True, calibration=cal)
    write(recs, OUT / "activation_sparsity_decode50.jsonl", append=False)
    sys.stdout.write(runner.table(recs) + "\n")


def draw(rd: list[dict]) -> None:
    plots.xy(rd, OUT / "as_ppl_vs_sparsity.png", "sparsity", "ppl_news", "rule,allocation", "SmolLM2-135M: perplexity (news test) vs sparsity", logy=True)
    plots.xy(rd, OUT / "as_speedup_vs_sparsity.png", "sparsity", "decode_speedup_b1", "rule,allocation", "SmolLM2-135M: batch-1 decode speedup vs dense (same run)")
    plots.pareto(rd, OUT / "as_pareto.png", title="SmolLM2-135M activation sparsity (eager modules): decode speed vs perplexity")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
