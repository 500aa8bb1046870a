"""Early exit on MiniLM-L6 / MR (exits after every layer, four criteria, batch 1 and 32) and
per-token exit on SmolLM2-135M decoding, each against the dense model in the same run.

    .venv/bin/python benchmarks/early_exit.py              # ~20 min on 2 cores (plus the dense fine-tune if not cached)
    .venv/bin/python benchmarks/early_exit.py --quick      # smoke run

Encoder: the dense fine-tuned MiniLM-L6 (shared with benchmarks/fff.py, cached) gets exit heads
after layers 1-5 trained with the backbone frozen: on the labels (DeeBERT) and by
self-distillation from the last layer (FastBERT). For each criterion a threshold is chosen on
the MR calibration split for at most ``--max-loss`` accuracy points lost (``thresholds_for``),
then test accuracy and encoder throughput (sentences/s, batch 1 and 32 with compaction) are
measured next to dense. Decoder: SmolLM2-135M score heads after layers 10, 13, ..., 28 trained on
news calibration text; thresholds for several agreement budgets chosen in the real exit loop
(CALM propagation included) on calibration text, with the teacher-forced choice recorded next to
them; lean-loop decode tok/s vs dense and token-by-token perplexity / top-1 agreement on news
test windows.

Writes benchmarks/results/early_exit.jsonl and plots ee_accuracy_vs_speed.png,
ee_decoder_agreement_vs_speed.png; saves the SmolLM2 exit heads where `lazyneuron demo` finds them.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

import lazyneuron as ln
from lazyneuron import data, tasks
from lazyneuron.bench import BenchSettings, Record, plots, read, runner, write
from lazyneuron.bench.timing import summary
from lazyneuron.methods.early_exit import (
    EarlyExitConfig,
    calibrate_lm_threshold,
    classifier_stats,
    collect_classifier_states,
    collect_lm_states,
    default_lm_exits_path,
    lm_stats,
    simulate,
    thresholds_for,
    train_classifier_exits,
    train_lm_exits,
)
from lazyneuron.paths import cache_dir

OUT = Path(__file__).parent / "results"


@torch.inference_mode()
def throughput(clf, configs: dict, batches_by_size: dict, repeats: int) -> dict:  # type: ignore[no-untyped-def]
    """Sentences/s per (variant, batch size), variants interleaved (apply / revert around each)."""
    out: dict = {}
    for bs, bl in batches_by_size.items():
        for _ in range(repeats):
            for name, cfg in configs.items():
                with ln.applied(clf, cfg):
                    out.setdefault((name, bs), []).append(tasks.sentences_per_s(clf, bl, warmup=2))
    return out


def encoder(args: argparse.Namespace, recs: list[Record]) -> None:
    model = "minilm-l6"
    clf, tok = tasks.finetuned_classifier(model, "mr", quick=args.quick)
    cal_rows, test_rows = data.labeled("mr", "calibration"), data.labeled("mr", "test")
    train_rows = data.labeled("mr", "train")
    if args.quick:
        cal_rows, test_rows, train_rows = cal_rows[::4], test_rows[::4], train_rows[::13]
    train = tasks.make_batches(tok, train_rows, 64, seed=0)
    cal = tasks.make_batches(tok, cal_rows, 64, sort=True)
    test = tasks.make_batches(tok, test_rows, 64, sort=True)
    states = collect_classifier_states(clf, train)
    ck = cache_dir("checkpoints")
    heads = {}
    for mode in ("labels", "distill"):
        h = train_classifier_exits(clf, train, mode=mode, states=states, epochs=10 if args.quick else 40)
        path = ck / f"{model}-mr-exits-{mode}{'-quick' if args.quick else ''}.safetensors"
        h.save(path, {"mode": mode, "task": "mr"})
        heads[mode] = (h, str(path))
    dense_acc = tasks.accuracy(clf, test)
    recs.append(Record(model, "dense", {"task": "mr"}, "accuracy_mr", dense_acc, "fraction"))
    cal_states = collect_classifier_states(clf, cal)
    test_states = collect_classifier_states(clf, test)
    settings = [("labels", c) for c in ("entropy", "max_prob", "patience", "learned")] + [("distill", "entropy")]
    configs: dict = {"dense": None}
    for mode, crit in settings:
        h, path = heads[mode]
        cs, ts = classifier_stats(h, *cal_states), classifier_stats(h, *test_states)
        pick = thresholds_for(cs, crit, args.max_loss)
        cfg = EarlyExitConfig(criterion=crit, threshold=pick["threshold"], checkpoint=path)
        name = f"{crit}/{mode}"
        configs[name] = cfg
        with ln.applied(clf, cfg):
            enc = clf.bert.encoder
            enc.track = True
            acc = tasks.accuracy(clf, test)
            layers = sum(enc.layers_run) / max(len(enc.layers_run), 1)
        sim_pred, _ = simulate(ts, crit, pick["threshold"])
        p = {"task": "mr", "criterion": crit, "heads": mode, "threshold": pick["threshold"], "max_loss": args.max_loss}
        recs += [
            Record(model, "early_exit", p, "accuracy_mr", acc, "fraction"),
            Record(model, "early_exit", p, "accuracy_drop_points", 100 * (dense_acc - acc), "points"),
            Record(model, "early_exit", p, "calibration_drop_points", 100 * (pick["dense_quality"] - pick["quality"]), "points"),
            Record(model, "early_exit", p, "mean_layers", layers, f"of {pick['n_layers']:.0f}"),
            Record(model, "early_exit", p, "simulated_test_accuracy", float((sim_pred == ts.labels).float().mean()), "fraction"),
        ]
        print(f"{name:18s} t={pick['threshold']:.4g} cal drop {100 * (pick['dense_quality'] - pick['quality']):.2f} pts, test acc {acc:.4f} "
              f"(dense {dense_acc:.4f}), mean layers {layers:.2f}", flush=True)
    sizes = {1: tasks.make_batches(tok, test_rows[:: (8 if not args.quick else 4)], 1), 32: tasks.make_batches(tok, test_rows, 32, seed=0)}
    tp = throughput(clf, configs, sizes, 3 if args.quick else 5)
    for (name, bs), xs in tp.items():
        med, iqr = summary(xs)
        if name == "dense":
            recs.append(Record(model, "dense", {"task": "mr", "batch": bs}, "encoder_sentences_per_s", med, "sentences/s", spread=iqr, repeats=len(xs)))
            continue
        crit, mode = name.split("/")
        p = {"task": "mr", "criterion": crit, "heads": mode, "threshold": configs[name].threshold, "max_loss": args.max_loss, "batch": bs}
        ratios = [a / b for a, b in zip(xs, tp[("dense", bs)])]
        rmed, riqr = summary(ratios)
        recs.append(Record(model, "early_exit", p, "encoder_sentences_per_s", med, "sentences/s", spread=iqr, repeats=len(xs)))
        recs.append(Record(model, "early_exit", p, "encoder_speedup", rmed, "x dense", spread=riqr, repeats=len(ratios)))
        print(f"{name:18s} batch {bs:2d}: {med:7.1f} sentences/s = {rmed:.2f}x dense", flush=True)


def decoder(args: argparse.Namespace, recs: list[Record]) -> None:
    name = "smollm2-135m"
    model, tok = ln.models.load(name)
    layers = [9, 12, 15, 18, 21, 24, 27]
    n_win = 4 if args.quick else 24
    cal_w = data.windows(tok, "news", "calibration", 256, n_win)
    states = collect_lm_states(model, cal_w, layers)
    heads = train_lm_exits(model, cal_w, layers, states=states, epochs=5 if args.quick else 30)
    path = default_lm_exits_path(name)
    heads.save(path, {"trained_on": f"news calibration, {n_win} x 256 tokens"})
    stats = lm_stats(heads, model, *states)
    budgets = [0.1, 0.3] if args.quick else [0.05, 0.1, 0.2, 0.3]
    thr_w = data.windows(tok, "news", "calibration", 128, 1 if args.quick else 2)
    cfgs, picks = [], {}
    for b in budgets:
        tf = thresholds_for(stats, "learned", b)  # teacher-forced estimate, for comparison
        pick = calibrate_lm_threshold(model, str(path), thr_w, b, steps=4 if args.quick else 7)
        picks[b] = (pick, tf)
        cfgs.append(EarlyExitConfig(criterion="learned", threshold=pick["threshold"], checkpoint=str(path)))
        print(f"agreement budget {b:.2f}: loop-calibrated threshold {pick['threshold']:.4g} (agreement {pick['quality']:.3f}, "
              f"{pick['mean_layers']:.1f} layers); teacher-forced would pick {tf['threshold']:.4g} ({tf['quality']:.3f}, {tf['mean_layers']:.1f} layers)", flush=True)
    path.with_suffix(".thresholds.json").write_text(json.dumps({"learned": picks[0.1 if 0.1 in picks else budgets[0]][0]["threshold"]}))
    s = runner.quick() if args.quick else BenchSettings(new_tokens=24, repeats=3, ppl_windows=2, ppl_length=128, batches=(1,), hf_generate=False)
    s.batches = (1,)
    out = runner.run(name, model, tok, cfgs, s, progress=True)
    for r in out:
        if r.method == "early_exit":
            b = next(k for k, c in zip(budgets, cfgs) if c.threshold == r.params["threshold"])
            r.params["agreement_budget"] = b
    recs += out
    for b, (pick, tf) in picks.items():
        p = {"criterion": "learned", "threshold": pick["threshold"], "agreement_budget": b}
        recs.append(Record(name, "early_exit", p, "calibration_agreement", pick["quality"], "fraction"))
        recs.append(Record(name, "early_exit", p, "calibration_mean_layers", pick["mean_layers"], f"of {pick['n_layers']:.0f}"))
        recs.append(Record(name, "early_exit", {**p, "teacher_forced_threshold": tf["threshold"]}, "teacher_forced_agreement", tf["quality"], "fraction"))
        recs.append(Record(name, "early_exit", {**p, "teacher_forced_threshold": tf["threshold"]}, "teacher_forced_mean_layers", tf["mean_layers"], f"of {tf['n_layers']:.0f}"))
    sys_table = runner.table(out)
    print(sys_table, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-loss", type=float, default=0.01, help="encoder: accuracy budget on the calibration split (fraction)")
    ap.add_argument("--part", choices=["all", "encoder", "decoder"], default="all")
    ap.add_argument("--out", default=str(OUT / "early_exit.jsonl"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    recs: list[Record] = []
    if args.part in ("all", "encoder"):
        encoder(args, recs)
        write(recs, args.out, append=False)
    if args.part in ("all", "decoder"):
        decoder(args, recs)
        if args.part == "decoder" and Path(args.out).exists():  # keep the encoder records, replace the decoder's
            keep = [r for r in read(args.out) if r["model"] != "smollm2-135m"]
            write(keep + [r.to_dict() for r in recs], args.out, append=False)
        else:
            write(recs, args.out, append=False)
    rd = read(args.out)
    # one point per (criterion, heads, batch): its speedup and the accuracy points it lost
    drop = {(r["params"].get("criterion"), r["params"].get("heads")): r["value"] for r in rd if r["metric"] == "accuracy_drop_points"}
    pts = []
    for r in rd:
        if r["metric"] == "encoder_speedup":
            k = (r["params"]["criterion"], r["params"]["heads"])
            pts += [r, {**r, "metric": "accuracy_drop_points", "value": drop[k]}]
    plots.pareto(pts, OUT / "ee_accuracy_vs_speed.png", speed_metric="encoder_speedup", quality_metric="accuracy_drop_points", series_params=("heads", "batch"))
    plots.pareto(rd, OUT / "ee_decoder_agreement_vs_speed.png", speed_metric="decode_speedup_b1", quality_metric="top1_agreement", series_params=("criterion",))


if __name__ == "__main__":
    main()
