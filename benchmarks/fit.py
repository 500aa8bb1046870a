"""`lazyneuron fit` on SmolLM2-135M, the sequence a user runs on their own model, measured:

    lazyneuron fit gates --model smollm2-135m --context domain=news,austen,wikipedia,hamlet --target 0.25 --budget 5
    lazyneuron fit exits --model smollm2-135m --budget 5
    lazyneuron bench --model smollm2-135m --method module_gating:context=domain=news --method early_exit

    .venv/bin/python benchmarks/fit.py              # the three steps (~15 min on 2 cores)
    .venv/bin/python benchmarks/fit.py --reuse      # reuse checkpoints already fitted with those commands: records + bench only (~4 min)

Writes benchmarks/results/fit_smollm2.jsonl: what each fit measured (held-out next-token loss of
dense, the static mask and the fitted masks per domain; the exit threshold's calibration agreement
and mean layers; wall seconds), then the bench's records (decode tok/s against eager dense and the
dense runtime in the same run, perplexity, skipped compute).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lazyneuron import fitting
from lazyneuron.bench import Record, write
from lazyneuron.cli import main as cli

OUT = Path(__file__).parent / "results"
MODEL = "smollm2-135m"
DOMAINS = ("news", "austen", "wikipedia", "hamlet")


def fit_records() -> list[Record]:
    g = fitting.fitted_checkpoint("module_gating", MODEL)
    e = fitting.fitted_checkpoint("early_exit", MODEL)
    if g is None or e is None:
        raise SystemExit("no fitted gates / exit heads for smollm2-135m: run without --reuse")
    gi = json.loads(Path(g["checkpoint"]).with_suffix(".json").read_text())["result"]
    ei = json.loads(Path(e["checkpoint"]).with_suffix(".thresholds.json").read_text())
    recs = []
    p = {"target": gi["target"], "contexts": "domain=" + ",".join(gi["contexts"]), "budget_min": 5}
    recs.append(Record(MODEL, "fit_gates", p, "fit_seconds", gi["seconds"], "s"))
    for d, r in gi["heldout"].items():
        for k in ("dense_loss", "static_loss", "fitted_loss"):
            recs.append(Record(MODEL, "fit_gates", {**p, "domain": d, "searched": d in gi["searched"]}, f"heldout_{k}", r[k], "nats/token"))
    q = {"agreement_loss": ei["agreement_loss"], "layers": ei["layers"], "lens": ei["lens"], "budget_min": 5}
    recs.append(Record(MODEL, "fit_exits", q, "fit_seconds", ei["seconds"], "s"))
    recs.append(Record(MODEL, "fit_exits", q, "threshold", ei["learned"], "score"))
    recs.append(Record(MODEL, "fit_exits", q, "calibration_agreement", ei["calibration_agreement"], "fraction"))
    recs.append(Record(MODEL, "fit_exits", q, "calibration_mean_layers", ei["mean_layers"], f"of {ei['num_layers']}"))
    return recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", action="store_true", help="reuse the fitted checkpoints; records + bench only")
    args = ap.parse_args()
    if not args.reuse:
        assert cli(["fit", "gates", "--model", MODEL, "--context", "domain=" + ",".join(DOMAINS), "--target", "0.25", "--budget", "5"]) == 0
        assert cli(["fit", "exits", "--model", MODEL, "--budget", "5"]) == 0
    out = OUT / "fit_smollm2.jsonl"
    write(fit_records(), out, append=False)
    assert cli(["bench", "--model", MODEL, "--method", "module_gating:context=domain=news", "--method", "early_exit", "--out", str(out)]) == 0
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
