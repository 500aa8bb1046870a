"""Early exit on MiniLM-L6 / MR (exits after every layer, four criteria, batch 1 and 32) and
per-token exit on SmolLM2-135M decoding, each against the dense model in the same run.

    .venv/bin/python benchmarks/early_exit.py              # ~20 min on 2 cores (plus the dense fine-tune if not cached)
    .venv/bin/python benchmarks/early_exit.py --quick      # smoke run
    .venv/bin/python benchmarks/early_exit.py --part decoder --retime  # time the last run's decoder thresholds again (~15 min)

Encoder: the dense fine-tuned MiniLM-L6 (shared with benchmarks/fff.py, cached) gets exit heads
after layers 1-5 trained with the backbone frozen: on the labels (DeeBERT) and by
self-distillation from the last layer (FastBERT). For each criterion a threshold is chosen on
the MR calibration split for at most ``--max-loss`` accuracy points lost (``thresholds_for``),
then test accuracy and encoder throughput (sentences/s, batch 1 and 32 with compaction) are
measured next to dense. Decoder: SmolLM2-135M exits after layers 8, 10, ..., 28 (score heads, with
and without a tuned lens before the LM head) trained on news train text; for each top-1
agreement budget the threshold is chosen on news calibration text with exits and CALM
propagation (the exact teacher-forced form of the decode loop), the budget held with confidence
1 - ``--delta``; lean-loop decode tok/s vs dense and perplexity / top-1 agreement / layers run on
news test windows, decoded as the loop would.

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


def calibrate(args: argparse.Namespace, model, tok, name: str, n_train: int, n_cal: int) -> tuple[list, dict]:  # type: ignore[no-untyped-def]
    """Train exit heads (with and without a tuned lens) on news train text and pick a threshold per
    agreement budget on news calibration text."""
    layers = list(range(8, 29, 2))
    train_w = data.windows(tok, "news", "train", 256, n_train)
    cal_w = data.windows(tok, "news", "calibration", 256, n_cal)
    states = collect_lm_states(model, train_w, layers)
    budgets = [0.1, 0.3] if args.quick else [0.05, 0.1, 0.2, 0.3]
    cfgs: list[EarlyExitConfig] = []
    picked: dict[tuple[str, float], tuple[str, float, dict]] = {}
    for lens in (True, False):
        variant = "tuned lens" if lens else "logit lens"
        heads = train_lm_exits(model, train_w, layers, states=states, lens=lens, epochs=5 if args.quick else 30)
        path = default_lm_exits_path(name) if lens else cache_dir("checkpoints") / f"{name}.exits-logit-lens.safetensors"
        heads.save(path, {"trained_on": f"news train, {n_train} x 256 tokens", "lens": lens})
        picks = calibrate_lm_threshold(model, str(path), cal_w, budgets, steps=6 if args.quick else 9, delta=args.delta)
        for b, pick in zip(budgets, picks):
            if pick["threshold"] > 1:
                print(f"{variant}, agreement budget {b:.2f}: no threshold keeps it on calibration text (every exit setting tried lost more)", flush=True)
                continue
            cfg = EarlyExitConfig(criterion="learned", threshold=pick["threshold"], checkpoint=str(path))
            if (cfg.checkpoint, cfg.threshold) in picked:  # two budgets, one threshold: measure it once
                continue
            cfgs.append(cfg)
            picked[(cfg.checkpoint, cfg.threshold)] = (variant, b, pick)
            print(f"{variant}, agreement budget {b:.2f}: threshold {pick['threshold']:.4g}, calibration agreement {pick['quality']:.4f} "
                  f"(loss bound {pick['loss_upper']:.4f}), {pick['mean_layers']:.2f} layers", flush=True)
        if lens:  # the demo's setting
            t = next(p["threshold"] for b, p in zip(budgets, picks) if b == (0.1 if 0.1 in budgets else budgets[0]))
            path.with_suffix(".thresholds.json").write_text(json.dumps({"learned": min(t, 2.0)}))
    return cfgs, picked


def previous_picks(path: str, n_layers: float) -> tuple[list, dict]:
    """The thresholds of the last full decoder run (its records), to measure them again."""
    rd = [r for r in read(path) if r["model"] == "smollm2-135m" and r["method"] == "early_exit"]
    cal = {(r["params"]["checkpoint"], r["params"]["threshold"]): r for r in rd if r["metric"] == "calibration_agreement"}
    if not cal:
        raise SystemExit(f"--retime needs the records of a full decoder run in {path}; run without --retime first")
    cfgs, picked = [], {}
    for (ckpt, t), r in cal.items():
        get = lambda m: next(x["value"] for x in rd if x["metric"] == m and x["params"]["threshold"] == t and x["params"]["checkpoint"] == ckpt)  # noqa: E731
        pick = {"threshold": t, "quality": r["value"], "loss_upper": get("calibration_loss_bound"), "mean_layers": get("calibration_mean_layers"),
                "n_layers": n_layers}
        cfgs.append(EarlyExitConfig(criterion="learned", threshold=t, checkpoint=ckpt))
        picked[(ckpt, t)] = (r["params"]["exit"], r["params"]["agreement_budget"], pick)
    return cfgs, picked


def decoder(args: argparse.Namespace, recs: list[Record]) -> None:
    name = "smollm2-135m"
    model, tok = ln.models.load(name)
    n_train, n_cal, n_test = (8, 4, 4) if args.quick else (64, 32, 32)
    cfgs: list[EarlyExitConfig] = []
    picked: dict[tuple[str, float], tuple[str, float, dict]] = {}
    if args.retime:
        cfgs, picked = previous_picks(args.out, float(model.config.num_hidden_layers))
    else:
        cfgs, picked = calibrate(args, model, tok, name, n_train, n_cal)
    s = runner.quick() if args.quick else BenchSettings(new_tokens=64, repeats=5, batches=(1,), hf_generate=False)
    s.batches, s.ppl_windows, s.ppl_length = (1,), n_test, 256
    out = runner.run(name, model, tok, cfgs, s, progress=True)
    test_w = data.windows(tok, "news", "test", 256, n_test)
    agree = {}
    for r in out:
        if r.method == "early_exit":
            variant, b, pick = picked[(r.params["checkpoint"], r.params["threshold"])]
            r.params.update({"agreement_budget": b, "exit": variant, "delta": args.delta})
            if r.metric == "top1_agreement":
                agree[(variant, b)] = r.value
    recs += out
    for cfg in cfgs:
        variant, b, pick = picked[(cfg.checkpoint, cfg.threshold)]
        with ln.applied(model, cfg), torch.inference_mode():
            dec = model.model
            dec.track, dec.layers_run = True, []
            for w in test_w:
                dec.window_logits(w.unsqueeze(0))
            test_layers = sum(dec.layers_run) / len(dec.layers_run)
        p = {"criterion": "learned", "threshold": cfg.threshold, "checkpoint": cfg.checkpoint, "agreement_budget": b, "exit": variant, "delta": args.delta}
        over = 100 * ((1 - agree[(variant, b)]) - b)
        recs += [
            Record(name, "early_exit", p, "calibration_agreement", pick["quality"], "fraction"),
            Record(name, "early_exit", p, "calibration_loss_bound", pick["loss_upper"], "fraction"),
            Record(name, "early_exit", p, "calibration_mean_layers", pick["mean_layers"], f"of {pick['n_layers']:.0f}"),
            Record(name, "early_exit", p, "test_mean_layers", test_layers, f"of {pick['n_layers']:.0f}"),
            Record(name, "early_exit", p, "test_loss_over_budget_points", over, "points"),
        ]
        print(f"{variant:10s} budget {b:.2f}: test agreement {agree[(variant, b)]:.4f} ({over:+.2f} pts vs budget), "
              f"cal {pick['quality']:.4f}, test layers {test_layers:.2f}", flush=True)
    print(runner.table(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-loss", type=float, default=0.01, help="encoder: accuracy budget on the calibration split (fraction)")
    ap.add_argument("--part", choices=["all", "encoder", "decoder"], default="all")
    ap.add_argument("--retime", action="store_true", help="decoder: measure the thresholds of the last full run again (no training / calibration)")
    ap.add_argument("--delta", type=float, default=0.1, help="decoder: thresholds hold their agreement budget with confidence 1 - delta on calibration text")
    ap.add_argument("--out", default=str(OUT / "early_exit.jsonl"))
    ap.add_argument("--plots-only", action="store_true", help="redraw the plots from the records in --out")
    args = ap.parse_args()
    if args.plots_only:
        draw(args.out)
        return
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
    draw(args.out)


def draw(path: str) -> None:
    rd = read(path)
    # one point per (criterion, heads, batch): its speedup and the accuracy points it lost
    drop = {(r["params"].get("criterion"), r["params"].get("heads")): r["value"] for r in rd if r["metric"] == "accuracy_drop_points"}
    pts = []
    for r in rd:
        if r["metric"] == "encoder_speedup":
            k = (r["params"]["criterion"], r["params"]["heads"])
            pts += [r, {**r, "metric": "accuracy_drop_points", "value": drop[k]}]
    plots.pareto(pts, OUT / "ee_accuracy_vs_speed.png", speed_metric="encoder_speedup", quality_metric="accuracy_drop_points", series_params=("heads", "batch"),
                 lines=False, point_param="criterion",
                 title="MiniLM-L6 on MR: exits, throughput vs accuracy lost (test split)")
    plots.pareto(rd, OUT / "ee_decoder_agreement_vs_speed.png", speed_metric="decode_speedup_b1", quality_metric="top1_agreement", series_params=("exit",),
                 title="SmolLM2-135M per-token exits: decode speed vs agreement with dense (test)")


if __name__ == "__main__":
    main()
