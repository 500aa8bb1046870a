"""The planner on SmolLM2-135M (perplexity budgets) and on MiniLM-L6 fine-tuned on MR (accuracy
budgets): one search per model for all its budgets, then each choice, the best single method and
the dense model measured on the test split in one run (llama.cpp beside them where installed).

    .venv/bin/python benchmarks/plan.py                # ~30 min on 2 cores (search 20 + 8 min, verification)
    .venv/bin/python benchmarks/plan.py --only smollm2 # or: --only minilm
    .venv/bin/python benchmarks/plan.py --quick        # smoke run
    .venv/bin/python benchmarks/plan.py --plots-only

Writes benchmarks/results/plan.jsonl (records of each model replace that model's earlier ones) and
plan_smollm2.png / plan_minilm_mr.png. The exit heads and gates of SmolLM2 are included when they
are fitted (``lazyneuron fit exits`` / ``lazyneuron fit gates``, or ``lazyneuron demo``), as the
planner always does; the records name every configuration in full.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lazyneuron import models, plan, tasks
from lazyneuron.bench import plots, read, write

OUT = Path(__file__).parent / "results"
LM, ENC, TASK = "smollm2-135m", "minilm-l6", "mr"
LM_BUDGETS = ("ppl:+2%", "ppl:+5%", "ppl:+10%", "ppl:+25%")
ENC_BUDGETS = ("acc:-0.5", "acc:-1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["smollm2", "minilm"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--time", type=float, default=20.0, help="SmolLM2 search minutes")
    ap.add_argument("--encoder-time", type=float, default=8.0, help="MiniLM search minutes")
    ap.add_argument("--plots-only", action="store_true")
    ap.add_argument("--out", default=str(OUT / "plan.jsonl"))
    args = ap.parse_args()
    if args.plots_only:
        draw(read(args.out))
        return
    old = read(args.out) if Path(args.out).exists() else []
    done: list[dict] = []
    if args.only in (None, "smollm2"):
        model, tok = models.load(LM)
        s = plan.quick_settings() if args.quick else plan.Settings()
        t0 = time.monotonic()
        res = plan.plan(model, tok, LM_BUDGETS, model_name=LM, minutes=2 if args.quick else args.time, settings=s, strict=False)
        recs = plan.candidate_records(LM, res) + plan.verify(LM, model, tok, res, repeats=3 if args.quick else 7, windows=s.windows[-1])
        sys.stdout.write(plan.table(res, recs) + f"\n(search and verification: {(time.monotonic() - t0) / 60:.1f} min)\n\n")
        done += [r.to_dict() for r in recs]
        old = [r for r in old if r["model"] != LM]
        del model
    if args.only in (None, "minilm"):
        clf, tok = tasks.finetuned_classifier(ENC, TASK, quick=args.quick)
        from lazyneuron.fitting import fit_classifier_exits
        from lazyneuron.methods.early_exit import default_lm_exits_path

        if not default_lm_exits_path(f"{ENC}-{TASK}").exists():  # the classifier's exit heads (backbone frozen, ~2 min), as `plan --fit` makes them
            fit_classifier_exits(clf, tok, f"{ENC}-{TASK}", TASK, epochs=5 if args.quick else 40)
        s = plan.quick_settings(task=TASK) if args.quick else plan.Settings(task=TASK)
        t0 = time.monotonic()
        res = plan.plan(clf, tok, ENC_BUDGETS, model_name=f"{ENC}-{TASK}", minutes=2 if args.quick else args.encoder_time, settings=s, strict=False)
        recs = plan.candidate_records(f"{ENC}-{TASK}", res) + plan.verify(f"{ENC}-{TASK}", clf, tok, res, repeats=3 if args.quick else 7)
        sys.stdout.write(plan.table(res, recs) + f"\n(search and verification: {(time.monotonic() - t0) / 60:.1f} min)\n")
        done += [r.to_dict() for r in recs]
        old = [r for r in old if r["model"] != f"{ENC}-{TASK}"]
    write(old + done, args.out, append=False)
    draw(old + done)


def draw(recs: list[dict]) -> None:
    for model, name, what in ((LM, "plan_smollm2.png", "perplexity budgets, batch-1 decode on 2 cores"),
                              (f"{ENC}-{TASK}", "plan_minilm_mr.png", "accuracy budgets on MR, classification throughput")):
        mine = [r for r in recs if r["model"] == model]
        if mine:
            plots.plan_front(mine, OUT / name, title=f"{model}: every setting the planner measured ({what})")


if __name__ == "__main__":
    main()
