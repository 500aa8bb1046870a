"""Fast feedforward on MiniLM-L6 / MR sentiment, and the CMM kernel against dense FFNs.

    .venv/bin/python benchmarks/fff.py                 # full run (~45 min on 2 cores; resumes from cached checkpoints)
    .venv/bin/python benchmarks/fff.py --quick         # smoke run (tiny training, kernel quick grid)
    .venv/bin/python benchmarks/fff.py --kernels-only  # the layer-level CMM grid alone (a few minutes)
    .venv/bin/python benchmarks/fff.py --encoder       # trees for the bare MiniLM-L6 encoder (no task; the
                                                       # checkpoint `lazyneuron demo --model minilm-l6` uses)
    python benchmarks/fff.py --kernels-only --device cuda  # the same grid on a GPU (Triton walk vs cuBLAS)

Steps (checkpoints cached under $LAZYNEURON_CACHE/checkpoints, so a rerun skips finished work):
1. dense baseline: MiniLM-L6 + mean-pool head fine-tuned on the MR train split;
2. per FFF depth: every FFN replaced by an FFF initialised from its neurons, layer-wise distilled
   to the dense FFN outputs (MR train sentences), then fine-tuned end to end with cross-entropy +
   distillation from the dense fine-tuned model, on the inference (hard) path;
3. MR test accuracy of each, and of the deepest with its trees stored in bf16; encoder throughput
   (sentences/s) dense vs FFF at batch 1 and 32, interleaved in one process, medians of repeats;
4. layer-level CMM vs dense FFN (``lazyneuron bench-kernels --kernel cmm``, full grid).

Writes benchmarks/results/fff.jsonl, benchmarks/results/kernels_cmm.jsonl and the plots
fff_accuracy_vs_depth.png, fff_kernel_speedup.png (on a GPU: kernels_cmm_cuda.jsonl and
fff_kernel_speedup_cuda.png).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

import torch

import lazyneuron as ln
from lazyneuron import data, tasks
from lazyneuron.bench import Record, plots, write
from lazyneuron.bench.records import read
from lazyneuron.bench.timing import summary
from lazyneuron.kernels import bench as kbench
from lazyneuron.methods.fff import FastFeedForwardConfig, distill_layers, fff_layers, save_fff
from lazyneuron.paths import cache_dir
from lazyneuron.train import fit

OUT = Path(__file__).parent / "results"
MODEL = "minilm-l6"


def fff_classifier(dense: tasks.TextClassifier, tok, train, depth: int, quick: bool, args) -> tuple[tasks.TextClassifier, dict[str, float]]:  # type: ignore[no-untyped-def]
    tag = f"minilm-l6-mr-fff-d{depth}{'-quick' if quick else ''}"
    ck_fff, ck_clf = cache_dir("checkpoints") / f"{tag}.fff.safetensors", cache_dir("checkpoints") / f"{tag}.clf.safetensors"
    clf = copy.deepcopy(dense)
    if ck_fff.exists() and ck_clf.exists():
        ln.apply_(clf, FastFeedForwardConfig(depth=depth, checkpoint=str(ck_fff)))
        rest = tasks.TextClassifier.load(ck_clf, copy.deepcopy(dense.bert))
        _copy_non_fff(rest, clf)
        return clf.eval(), {}
    inputs = [b.input_ids[i : i + 1, : int(b.attention_mask[i].sum())] for b in train[: (40 if quick else 400)] for i in range(len(b.labels))]
    errs = distill_layers(clf, FastFeedForwardConfig(depth=depth), inputs, steps=60 if quick else args.distill_steps, batch_tokens=512,
                          max_tokens=40_000)
    for f in fff_layers(clf).values():
        f.routing = "hard"  # fine-tune on the inference path
    teacher = {id(b): l for b, l in zip(train, torch.split(tasks.predict(dense, train), [len(b.labels) for b in train]))}
    fit(clf, tasks.classification_loss(teacher, alpha=0.5), train, epochs=1 if quick else args.fff_epochs, lr=args.fff_lr,
        desc=f"FFF d={depth} fine-tune", checkpoint=str(ck_clf) + ".run")
    save_fff(clf, ck_fff)
    plain = copy.deepcopy(dense)
    _copy_non_fff(clf, plain)
    plain.save(ck_clf, {"task": "mr", "fff_depth": depth})
    return clf.eval(), errs


def _copy_non_fff(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy every parameter that is not part of an FFF (attention, norms, embeddings, head)."""
    s = {k.replace(".base.", "."): v for k, v in src.state_dict().items() if ".fff." not in k}
    d = dst.state_dict()
    with torch.no_grad():
        for k, v in d.items():
            k2 = k.replace(".base.", ".")
            if ".fff." not in k and k2 in s and s[k2].shape == v.shape:
                v.copy_(s[k2])


@torch.inference_mode()
def throughput(models: dict[str, torch.nn.Module], batches_by_size: dict[int, list[tasks.Batch]], repeats: int) -> dict[tuple[str, int], list[float]]:
    """Sentences/s per (model, batch size), models interleaved so drift hits them alike."""
    out: dict[tuple[str, int], list[float]] = {}
    for m in models.values():
        m.eval()
    for bs, bl in batches_by_size.items():
        for m in models.values():  # warm-up
            tasks.sentences_per_s(m, bl[:2])
        for _ in range(repeats):
            for name, m in models.items():  # interleaved: drift hits both alike
                out.setdefault((name, bs), []).append(tasks.sentences_per_s(m, bl))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--depths", default="6,8,10", help="FFF depths (MiniLM's FFN has 1536 neurons; depth 10 = 2047 nodes, 11 per token)")
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--fff-epochs", type=int, default=1)
    ap.add_argument("--fff-lr", type=float, default=1e-4)
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--kernels-only", action="store_true", help="only the layer-level CMM grid (kernels_cmm.jsonl and its plot)")
    ap.add_argument("--device", default="cpu", help="the kernel grid's device: cpu, or cuda (the Triton walk; writes kernels_cmm_cuda.jsonl)")
    ap.add_argument("--encoder", action="store_true", help="distil trees for the bare MiniLM-L6 encoder (no task) and bench them (fff_encoder.jsonl)")
    ap.add_argument("--encoder-depth", type=int, default=10)
    ap.add_argument("--encoder-epochs", type=int, default=3)
    ap.add_argument("--encoder-lr", type=float, default=5e-4)
    ap.add_argument("--plots-only", action="store_true", help="redraw the plots from the records")
    args = ap.parse_args()
    if args.plots_only:
        draw_accuracy([r for r in read(OUT / "fff.jsonl")])
        kernel_plot(read(OUT / "kernels_cmm.jsonl"))
        return
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    if args.kernels_only:
        kernels(args)
        return
    if args.encoder:
        encoder(args)
        return
    depths = [4] if args.quick else [int(x) for x in args.depths.split(",")]
    _, tok = ln.models.load(MODEL)
    rows = data.labeled("mr", "train")
    test_rows = data.labeled("mr", "test")
    if args.quick:  # the MR file is sorted by score: subsample across it
        rows, test_rows = rows[::13], test_rows[::4]
    train = tasks.make_batches(tok, rows, 32, max_length=64, seed=0)
    test = tasks.make_batches(tok, test_rows, 64, max_length=64, sort=True)
    recs: list[Record | dict] = []
    # a depth whose trees come from the cache is not distilled again: its distillation records are
    # carried over from the previous run instead of dropped
    previous = read(OUT / "fff.jsonl") if (OUT / "fff.jsonl").exists() else []
    dense, _ = tasks.finetuned_classifier(MODEL, "mr", quick=args.quick)
    dense_acc = tasks.accuracy(dense, test)
    recs.append(Record(MODEL, "dense", {"task": "mr"}, "accuracy_mr", dense_acc, "fraction"))
    print(f"dense fine-tuned MiniLM-L6 on MR: test accuracy {dense_acc:.4f}", flush=True)
    converted = {}
    for depth in depths:
        clf, errs = fff_classifier(dense, tok, train, depth, args.quick, args)
        acc = tasks.accuracy(clf, test)
        converted[depth] = clf
        p = {"task": "mr", "depth": depth, "nodes": (2 << depth) - 1, "evaluated_per_token": depth + 1}
        recs.append(Record(MODEL, "fast_feedforward", p, "accuracy_mr", acc, "fraction"))
        recs.append(Record(MODEL, "fast_feedforward", p, "accuracy_retention", acc / dense_acc, "fraction of dense"))
        for path, e in errs.items():
            recs.append(Record(MODEL, "fast_feedforward", {**p, "layer": path}, "distill_rel_error", e, "relative MSE"))
        if not errs:
            recs.extend(r for r in previous if r.get("metric") == "distill_rel_error" and r.get("params", {}).get("depth") == depth)
        print(f"FFF depth {depth}: test accuracy {acc:.4f} ({100 * acc / dense_acc:.1f}% of dense)", flush=True)
        write(recs, OUT / "fff.jsonl", append=False)
    # the deepest trees stored in bf16 (tree_dtype="bfloat16"): the same trained trees, rounded
    d16 = max(converted)
    clf16 = copy.deepcopy(converted[d16])
    for f in fff_layers(clf16).values():
        f.set_tree_dtype(torch.bfloat16)
    acc16 = tasks.accuracy(clf16, test)
    p16 = {"task": "mr", "depth": d16, "nodes": (2 << d16) - 1, "evaluated_per_token": d16 + 1, "tree_dtype": "bfloat16"}
    recs.append(Record(MODEL, "fast_feedforward", p16, "accuracy_mr", acc16, "fraction"))
    recs.append(Record(MODEL, "fast_feedforward", p16, "accuracy_retention", acc16 / dense_acc, "fraction of dense"))
    print(f"FFF depth {d16}, bf16 trees: test accuracy {acc16:.4f} ({100 * acc16 / dense_acc:.1f}% of dense)", flush=True)
    # encoder throughput, dense vs each FFF, interleaved
    sizes = {1: tasks.make_batches(tok, test_rows[::8], 1), 32: tasks.make_batches(tok, test_rows[::2], 32, seed=0)}
    models = {"dense": dense, **{f"fff_d{d}": m for d, m in converted.items()}, f"fff_d{d16}_bf16": clf16}
    tp = throughput(models, sizes, 3 if args.quick else 5)
    for (name, bs), xs in tp.items():
        med, iqr = summary(xs)
        if name == "dense":
            meth, p = "dense", {"task": "mr"}
        else:
            meth, p = "fast_feedforward", {"task": "mr", "depth": int(name[5:].split("_")[0])}
            if name.endswith("_bf16"):
                p["tree_dtype"] = "bfloat16"
        recs.append(Record(MODEL, meth, {**p, "batch": bs}, "encoder_sentences_per_s", med, "sentences/s", spread=iqr, repeats=len(xs)))
        if name != "dense":
            ratios = [a / b for a, b in zip(xs, tp[("dense", bs)])]
            rmed, riqr = summary(ratios)
            recs.append(Record(MODEL, meth, {**p, "batch": bs}, "encoder_speedup", rmed, "x dense", spread=riqr, repeats=len(ratios)))
            print(f"{name} batch {bs}: {med:.1f} sentences/s, {rmed:.2f}x dense", flush=True)
    write(recs, OUT / "fff.jsonl", append=False)
    draw_accuracy([r if isinstance(r, dict) else r.to_dict() for r in recs])
    if not args.skip_kernels:
        kernels(args)


def encoder(args: argparse.Namespace) -> None:
    """FFF trees for the bare MiniLM-L6 encoder, as a sentence-embedding model is used: each FFN
    replaced and distilled layer by layer to the dense FFN's outputs on news training text, then
    all trees trained together to hold the encoder's output states and mean-pooled embeddings to
    the dense encoder's (no task), saved where ``lazyneuron demo --model minilm-l6`` looks for them;
    then dense against the trees (fp32 and bf16) in the bench harness: forward tokens/s, and the
    cosine of the mean-pooled embeddings and the per-token state error against dense on news test
    windows."""
    from lazyneuron.bench import BenchSettings, runner
    from lazyneuron.fitting import fit_fff
    from lazyneuron.methods.fff import default_fff_path

    model, tok = ln.models.load(MODEL)
    path = default_fff_path(MODEL)
    if args.quick:  # a smoke run leaves the demo's checkpoint alone
        path = path.with_name(path.stem + "-quick.safetensors")
    steps = 30 if args.quick else args.distill_steps
    # the same fit as `lazyneuron fit fff`: layer-wise distillation, then all trees end to end
    info = fit_fff(model, tok, MODEL, depth=args.encoder_depth, windows=80 if args.quick else 640, length=128, distill_steps=steps,
                   epochs=1 if args.quick else args.encoder_epochs, lr=args.encoder_lr, max_tokens=80_000, out=path)
    errs = info["distill_rel_error"]
    print(f"wrote {path}", flush=True)
    cfgs = [FastFeedForwardConfig(checkpoint=str(path)), FastFeedForwardConfig(checkpoint=str(path), tree_dtype="bfloat16")]
    s = BenchSettings(corpus="news", batches=(1, 8), repeats=3 if args.quick else 7, ppl_windows=8, ppl_length=256)
    recs: list[Record | dict] = list(runner.run(MODEL, model, tok, cfgs, s, progress=True))
    p = {"task": "none", "depth": args.encoder_depth, "distill_steps": steps}
    for layer, e in errs.items():
        recs.append(Record(MODEL, "fast_feedforward", {**p, "layer": layer}, "distill_rel_error", e, "relative MSE"))
    write(recs, OUT / ("fff_encoder_quick.jsonl" if args.quick else "fff_encoder.jsonl"), append=False)
    sys.stdout.write(runner.table([r for r in recs if isinstance(r, Record) and "layer" not in r.params]) + "\n")


def draw_accuracy(rd: list[dict]) -> Path:
    rd = [r for r in rd if "tree_dtype" not in r.get("params", {})]  # the plot: fp32 trees by depth
    return plots.xy(rd, OUT / "fff_accuracy_vs_depth.png", "depth", "accuracy_mr", "task", "MiniLM-L6 on MR: test accuracy of the FFF model vs tree depth")


def kernel_plot(krecs: list[dict]) -> Path:
    """The layer-level speed-ups against batch (log scale), one line per dims and dtype; GPU records
    (``kernels_cmm_cuda.jsonl``) get their own file."""
    gpu = krecs[0]["device"].startswith("cuda")
    kr = [{"model": "cmm-layer", "method": f"d_model={r['d_model']} depth={r['depth']} {r['dtype']}", "params": {"batch": r["batch"], "dtype": r["dtype"]},
           "metric": "speedup_vs_torch", "value": r["speedup_vs_torch"]} for r in krecs]
    if gpu:
        return plots.xy(kr, OUT / "fff_kernel_speedup_cuda.png", "batch", "speedup_vs_torch", "",
                        f"CMM walk (Triton) vs dense FFN (cuBLAS), {krecs[0]['device']}, CUDA graphs", logx=True)
    return plots.xy(kr, OUT / "fff_kernel_speedup.png", "batch", "speedup_vs_torch", "", "CMM tree walk vs dense F.linear FFN (same run, cold)", logx=True)


def kernels(args: argparse.Namespace) -> None:
    gpu = args.device != "cpu"
    krecs = kbench.run("cmm", quick=args.quick, progress=True, device=args.device)
    write(krecs, OUT / ("kernels_cmm_cuda.jsonl" if gpu else "kernels_cmm.jsonl"), append=False)
    kernel_plot(krecs)
    sys.stdout.write(kbench.table(krecs) + "\n")


if __name__ == "__main__":
    main()
