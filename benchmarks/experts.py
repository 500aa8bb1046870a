"""Expert routing (MoEfication) on SmolLM2-135M against dense, CATS and TEAL-on-the-MLP, in one run.

    .venv/bin/python benchmarks/experts.py             # ~20 min on 2 cores
    .venv/bin/python benchmarks/experts.py --quick     # smoke run
    .venv/bin/python benchmarks/experts.py --runtime bf16   # the same on the bf16 runtime: experts_bf16.jsonl, experts_pareto_bf16.png
    .venv/bin/python benchmarks/experts.py --plots-only
    .venv/bin/python benchmarks/experts.py --encoder   # MiniLM-L6 on MR (~6 min), replaces its records
    .venv/bin/python benchmarks/experts.py --recovery  # low-rank recovery at 50% / 75% of FFN neurons (~25 min), replaces its records

Writes benchmarks/results/experts.jsonl and experts_pareto.png. Every method runs on the fp32
runtime; decode speed is paired with the dense model on the same runtime (``decode_vs_runtime_b*``,
medians of per-repeat ratios, interleaved), batch 1 and 8. Quality: perplexity on the news and
Austen test windows. ``mlp_bytes_read``: the fraction of the FFN weight bytes (and the router's)
a token reads, measured on held-out text; ``step_bytes_skipped``: the fraction of all linear
weight reads of a decode step skipped (``compute_skipped``), set against the decode time saved.
The main run has no recovery fine-tune (the experts are the dense FFN split as it is); ``--recovery``
trains rank-r updates of the split FFNs by distillation on news and Austen train windows
(``experts_recovery.recover``) and measures perplexity and decode speed before and after.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch

import lazyneuron as ln
from lazyneuron import data
from lazyneuron.adapters import get_adapter
from lazyneuron.bench import BenchSettings, Record, plots, read, runner, write
from lazyneuron.bench.accounting import tracking
from lazyneuron.bench.quality import perplexity
from lazyneuron.methods import ActivationSparsityConfig as A
from lazyneuron.methods.experts import ExpertMLP, ExpertRoutingConfig as C

OUT = Path(__file__).parent / "results"
MODEL = "smollm2-135m"
RUN = time.strftime("experts-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]  # one id for everything this invocation measures


def from_recovery(r: dict) -> bool:
    """A record of ``--recovery`` (its params say recovery true or false; a config's own ``recovery``
    parameter is a path, empty without one)."""
    return r["model"] == MODEL and isinstance(r["params"].get("recovery"), bool)


def stamped(recs: list) -> list[dict]:
    """Records as dicts carrying this run's id."""
    return [{"run": RUN, **(r.to_dict() if isinstance(r, Record) else r)} for r in recs]


def configs(quick: bool) -> list:
    if quick:
        return [C(experts=16, shared=2, top_k=6, router="learned"), A(rule="cats", sparsity=0.75)]
    out = []
    for E, sh, ks in ((16, 2, (2, 6, 10)), (8, 1, (1, 3, 5)), (32, 4, (4, 12, 20))):
        out += [C(experts=E, shared=sh, top_k=k, router="learned") for k in ks]
    out += [C(experts=16, shared=2, top_k=k, router="analytic") for k in (2, 6, 10)]
    out += [C(experts=16, shared=0, top_k=8, router="learned"), C(experts=16, shared=2, top_k=14, share=0.6, router="learned")]
    # the same fractions of MLP weight bytes skipped by activation sparsity: CATS reads the whole
    # gate, so its sparsity s skips 2s/3 of the MLP; TEAL on the MLP's three linears skips s
    out += [A(rule="cats", sparsity=s) for s in (0.375, 0.75)]
    out += [A(rule="teal", sparsity=s, targets=("mlp_in", "mlp_out"), allocation="uniform") for s in (0.25, 0.5, 0.75)]
    return out


def mlp_bytes_read(model: torch.nn.Module) -> float:
    """Fraction of the FFN weight elements a token read in the last tracked run (routers count)."""
    ad = get_adapter(model)
    total = skipped = 0.0
    for p in ad.paths("mlp"):
        mod = model.get_submodule(p)
        base = getattr(mod, "base", mod)
        total += sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
        for m in mod.modules():
            if isinstance(m, ln.LazyModule) and getattr(m, "tokens_seen", 0):
                skipped += m.weights_skipped / m.tokens_seen
    return 1.0 - skipped / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="records (default: experts.jsonl; experts_RUNTIME.jsonl for --runtime bf16 / int8)")
    ap.add_argument("--runtime", default="fp32", choices=("fp32", "bf16", "int8"), help="the main run's weight format (every method and the dense baseline on it)")
    ap.add_argument("--plots-only", action="store_true")
    ap.add_argument("--encoder", action="store_true", help="MiniLM-L6 on MR: accuracy and sentences/s against dense")
    ap.add_argument("--kernel", action="store_true", help="the experts kernel alone on 30 SmolLM2-shaped FFNs against the dense GEMV (~1 min)")
    ap.add_argument("--recovery", action="store_true", help="low-rank recovery fine-tune at 50%% and 75%% of FFN neurons: perplexity and decode speed before / after")
    ap.add_argument("--train-windows", type=int, default=48, help="--recovery: 256-token training windows (half news, half Austen)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--active", default="50,75", help="--recovery: the FFN neuron percentages to run (of 50, 75)")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(OUT / ("experts.jsonl" if args.runtime == "fp32" else f"experts_{args.runtime}.jsonl"))
    logging.basicConfig(level=logging.INFO)
    if args.recovery:
        recovery(args)
        return
    if args.encoder:
        encoder(args)
        return
    if args.kernel:
        kernel(args)
        return
    if args.plots_only:
        draw(list(read(args.out)), args.runtime)
        return
    s = runner.quick() if args.quick else BenchSettings(new_tokens=24, repeats=3, ppl_windows=4, ppl_length=256, calib_texts=32, batches=(1, 8), hf_generate=False)
    s.runtime = args.runtime
    model, tok = ln.models.load(MODEL)
    cfgs = configs(args.quick)
    cal = ln.calibrate(model, data.texts("news", "calibration")[: s.calib_texts], [C(), A(rule="cats"), A(rule="teal", targets=("mlp_in", "mlp_out"))], tok, max_length=512, progress=True)
    # build every split / router once (progress bars), so timing below only converts
    for c in cfgs:
        with ln.applied(model, c, cal):
            pass
    recs = runner.run(MODEL, model, tok, cfgs, s, progress=True, calibration=cal)
    # the --encoder, --kernel and --recovery records stay
    others = [r for r in read(args.out) if r["model"] != MODEL or from_recovery(r)] if Path(args.out).exists() and not args.quick else []
    write(others + stamped(recs), args.out, append=False)
    wins = data.windows(tok, "austen", "test", s.ppl_length, s.ppl_windows)
    news = data.windows(tok, "news", "test", s.ppl_length, 2)
    news_ppl = data.windows(tok, "news", "test", s.ppl_length, s.ppl_windows)  # the runner's perplexity windows
    dense_ppl = perplexity(model, wins)
    recs.append(Record(MODEL, "dense", {}, "ppl_austen", dense_ppl, "perplexity"))
    with torch.inference_mode():
        ref = model(news[:1]).logits
        for E, sh in ((16, 2), (8, 0)):  # every expert run: the dense FFN (fp32 kernel and prefill path)
            c = C(experts=E, shared=sh, top_k=E - sh, router="learned")
            with ln.applied(model, c, cal):
                diff = float((model(news[:1]).logits - ref).abs().max())
                step = float((model(news[:1, :1]).logits - ref[:, :1]).abs().max())
            params = {**{k: v for k, v in c.to_dict().items() if k != "method"}, "runtime": s.runtime}
            recs.append(Record(MODEL, c.name, params, "max_abs_logit_diff_vs_dense", max(diff, step), "logit"))
    for c in cfgs:  # the records of the runner carry the runtime's format among the params
        params = {**{k: v for k, v in c.to_dict().items() if k != "method"}, "runtime": s.runtime}
        with ln.applied(model, c, cal):
            with tracking(model):
                p = perplexity(model, wins)
            read_frac = mlp_bytes_read(model)
        recs.append(Record(MODEL, c.name, params, "ppl_austen", p, "perplexity"))
        recs.append(Record(MODEL, c.name, params, "ppl_austen_delta_pct", 100 * (p / dense_ppl - 1), "%"))
        recs.append(Record(MODEL, c.name, params, "mlp_bytes_read", read_frac, "fraction of FFN weight reads (Austen test)"))
        if c.name == "expert_routing" and c.experts == 16 and c.shared == 2 and c.share == 1.0 and c.router == "learned":
            with ln.applied(model, c, cal):  # the best any router could do with this split: routed by true output mass
                for m in model.modules():
                    if isinstance(m, ExpertMLP):
                        m.oracle = True
                recs.append(Record(MODEL, c.name, params, "ppl_news_oracle_router", perplexity(model, news_ppl), "perplexity"))
    # decode time saved against the step's weight bytes skipped (same run)
    by = {}
    for r in recs:
        if r.method != "dense":
            by.setdefault((r.method, str(sorted(r.params.items()))), {})[r.metric] = r
    for d in by.values():
        if "decode_vs_runtime_b1" in d and "compute_skipped" in d:
            r0 = d["compute_skipped"]
            saved = 1 - 1 / d["decode_vs_runtime_b1"].value
            recs.append(Record(MODEL, r0.method, r0.params, "decode_time_saved_b1", saved, "fraction of the dense runtime's step"))
            if r0.value > 0:
                recs.append(Record(MODEL, r0.method, r0.params, "time_saved_per_byte_skipped", saved / r0.value, "ratio"))
    write(others + stamped(recs), args.out, append=False)
    draw(others + stamped(recs), args.runtime)
    sys.stdout.write(runner.table(recs) + "\n")


def kernel(args: argparse.Namespace) -> None:
    """30 SmolLM2-shaped FFNs (d 576, F 1536, 16 experts, fp32; ~320 MB, beyond any L3): the
    experts kernel with n experts hit against the runtime's dense GEMV, median ms per pass; and
    for long inputs (64, 256 tokens) the grouped GEMM against the dense FFN on the runtime's GEMM."""
    import time

    from lazyneuron.kernels import experts as X
    from lazyneuron.kernels import gemv as G

    d, F, E, L = 576, 1536, 16, 30
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(F, d, generator=g), torch.randn(F, d, generator=g), torch.randn(d, F, generator=g)
    blks = [X.prepare_experts(gate.clone(), up.clone(), down.clone(), E) for _ in range(L)]
    dense = [(G.prepare_weight(torch.cat([gate, up]), "fp32")[0], G.prepare_weight(down, "fp32")[0]) for _ in range(L)]

    def ms(fn, n: int = 20) -> float:
        fn()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return 1e3 * sorted(ts)[n // 2]

    recs = []
    for B in (1, 8):
        x = torch.randn(B, d, generator=g)

        def run_dense() -> None:
            for gu, dw in dense:
                a = G.gemv(x, gu)[0]
                G.gemv(torch.nn.functional.silu(a[:, :F]) * a[:, F:], dw)

        recs.append(Record("kernel", "dense", {"batch": B, "experts": E}, "ffn30_ms", ms(run_dense), "ms"))
        choices = {f"first {k}": (torch.arange(E) < k).float().expand(B, E).contiguous() for k in (16, 8, 4, 2)}
        choices["4 random per token"] = (torch.rand(B, E, generator=g).argsort(1) < 4).float()
        for name, coef in choices.items():
            def run_experts(coef: torch.Tensor = coef) -> None:
                for bl in blks:
                    X.expert_mlp(x, bl, None, coef, "silu", True)

            p = {"batch": B, "experts": E, "chosen": name, "hit": int((coef.sum(0) > 0).sum())}
            recs.append(Record("kernel", "expert_mlp", p, "ffn30_ms", ms(run_experts), "ms"))
    # long inputs (prefill, encoder batches): the grouped GEMM against the dense FFN on the
    # runtime's GEMM, 2 shared experts and k of the 14 routed ones per token, chosen at random;
    # 4 FFNs per pass, the two interleaved, medians
    from lazyneuron.kernels import decode_ops as D

    for n in (64, 256):
        x = torch.randn(n, d, generator=g)
        dense_ms: list[float] = []
        grouped_ms: dict[int, list[float]] = {k: [] for k in (2, 6, 10)}
        coefs = {}
        for k in grouped_ms:
            c = torch.zeros(n, E)
            c[:, :2] = 1
            c[:, 2:] = (torch.rand(n, E - 2, generator=g).argsort(1) < k).float()
            coefs[k] = c
        for _ in range(9):
            dense_ms.append(ms(lambda: [G.gemm(D.silu_mul(G.gemm(x, gu)), dw) for gu, dw in dense[:4]], 3))
            for k, c in coefs.items():
                grouped_ms[k].append(ms(lambda c=c: [X.grouped_gemm(x, b["gu"], b["gu_scale"], b["gu_bias"], b["down"], b["down_scale"], None, c, "silu", True)
                                                     for b in blks[:4]], 3))
        recs.append(Record("kernel", "dense_gemm", {"tokens": n, "experts": E}, "ffn4_ms", statistics.median(dense_ms), "ms"))
        for k, v in grouped_ms.items():
            p = {"tokens": n, "experts": E, "shared": 2, "top_k": k, "active": (2 + k) / E}
            recs.append(Record("kernel", "expert_gemm", p, "ffn4_ms", statistics.median(v), "ms"))
            recs.append(Record("kernel", "expert_gemm", p, "speedup_vs_dense_gemm", statistics.median(dense_ms) / statistics.median(v), "x"))
    recs.append(Record("kernel", "probe", {}, "read_bandwidth", G.read_bandwidth(), "GB/s"))
    kept = [r for r in read(args.out) if r["model"] != "kernel"] if Path(args.out).exists() else []
    write(kept, args.out, append=False)
    write(stamped(recs), args.out, append=True)
    for r in recs:
        sys.stdout.write(f"{r.method:11s} {r.params} {r.value:.2f} {r.unit}\n")


def recovery(args: argparse.Namespace) -> None:
    """Low-rank recovery of the split FFNs (SmolLM2-135M): perplexity on the news and Austen test
    windows without and with recovery, and decode tok/s against the dense fp32 runtime (paired)."""
    import time

    from lazyneuron.methods import experts_recovery as R
    from lazyneuron.paths import cache_dir
    from lazyneuron.runtime import RuntimeConfig, generate

    model, tok = ln.models.load(MODEL)
    n_test = 2 if args.quick else 4
    tests = {c: data.windows(tok, c, "test", 256, n_test) for c in ("news", "austen")}
    half = max(1, args.train_windows // 2)
    train = [w.unsqueeze(0) for c in ("news", "austen") for w in data.windows(tok, c, "train", 256, half)]
    settings = {"50": C(experts=16, shared=2, top_k=6, router="learned"), "75": C(experts=16, shared=2, top_k=10, router="learned")}
    cfgs = [settings[a] for a in args.active.split(",")][: 1 if args.quick else 2]
    cal = ln.calibrate(model, data.texts("news", "calibration")[:32], C(), tok, max_length=512, progress=True)
    recs: list[Record] = []
    dense = {c: perplexity(model, w) for c, w in tests.items()}
    for c, v in dense.items():
        recs.append(Record(MODEL, "dense", {"recovery": False}, f"ppl_{c}", v, "perplexity"))
    prompt = data.windows(tok, "news", "test", 64, 1)[:1]
    for cfg in cfgs:
        params = {k: v for k, v in cfg.to_dict().items() if k != "method"}
        params["active_neurons"] = cfg.active_fraction()
        path = str(cache_dir("checkpoints", "experts") / f"recovery-{MODEL}-e{cfg.experts}s{cfg.shared}k{cfg.top_k}-r{args.rank}x{len(train)}x{args.epochs}.safetensors")
        with ln.applied(model, cfg, cal):
            for c, w in tests.items():
                p = perplexity(model, w)
                recs.append(Record(MODEL, cfg.name, {**params, "recovery": False}, f"ppl_{c}", p, "perplexity"))
                recs.append(Record(MODEL, cfg.name, {**params, "recovery": False}, f"ppl_{c}_delta_pct", 100 * (p / dense[c] - 1), "%"))
            t0 = time.perf_counter()
            if not Path(path).exists():
                res = R.recover(model, train, rank=args.rank, epochs=args.epochs, lr=1e-3, checkpoint=path + ".fit")
                R.save_recovery(model, path)
                logging.info("recovery: %d steps, last loss %.4f, %.0f s", res.steps, res.last_loss, time.perf_counter() - t0)
        rcfg = C(experts=cfg.experts, shared=cfg.shared, top_k=cfg.top_k, router=cfg.router, recovery=path)
        rparams = {**params, "recovery": True, "rank": args.rank, "train_windows": len(train), "epochs": args.epochs}
        with ln.applied(model, rcfg, cal):
            for c, w in tests.items():
                p = perplexity(model, w)
                recs.append(Record(MODEL, cfg.name, rparams, f"ppl_{c}", p, "perplexity"))
                recs.append(Record(MODEL, cfg.name, rparams, f"ppl_{c}_delta_pct", 100 * (p / dense[c] - 1), "%"))
        # decode: dense runtime, split, split + recovery, interleaved, paired ratios
        variants = {"dense": [RuntimeConfig()], "split": [cfg, RuntimeConfig()], "recovered": [rcfg, RuntimeConfig()]}
        tps: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(1 if args.quick else 5):
            for k, cs in variants.items():
                with ln.applied(model, cs, cal):
                    _, (_, td) = generate(model, prompt, 33, return_timing=True)
                    tps[k].append(32 / td)
        for k, p in (("split", {**params, "recovery": False}), ("recovered", rparams)):
            ratios = [a / b for a, b in zip(tps[k], tps["dense"])]
            recs.append(Record(MODEL, cfg.name, p, "decode_vs_runtime_b1", statistics.median(ratios), "x", spread=max(ratios) - min(ratios), repeats=len(ratios)))
    def same(r: dict) -> bool:  # a record this run measures again (dense, or a setting and training it repeats)
        p = r.get("params", {})
        if not from_recovery(r):
            return False
        if r["method"] == "dense":
            return True
        mine = any(p.get("top_k") == c.top_k for c in cfgs)
        return mine and (not p["recovery"] or (p.get("train_windows") == len(train) and p.get("epochs") == args.epochs and p.get("rank") == args.rank))

    keep = [r for r in read(args.out) if not same(r)] if Path(args.out).exists() and not args.quick else []
    write(keep + stamped(recs), args.out, append=False)
    for r in recs:
        sys.stdout.write(f"{r.method:16s} {str({k: r.params[k] for k in ('top_k', 'recovery') if k in r.params}):40s} {r.metric:24s} {r.value:.3f}\n")


ENCODER = "minilm-l6"


def encoder(args: argparse.Namespace) -> None:
    """MiniLM-L6 fine-tuned on MR: its FFNs as experts (BERT's intermediate / output pair)."""
    from lazyneuron import tasks
    from lazyneuron.bench.timing import summary

    clf, tok = tasks.finetuned_classifier(ENCODER, "mr", quick=args.quick)
    cal_rows, test_rows = data.labeled("mr", "calibration"), data.labeled("mr", "test")
    if args.quick:
        test_rows = test_rows[::8]
    test = tasks.make_batches(tok, test_rows, 64, sort=True)
    texts = [t for t, _ in cal_rows[:400]]
    cal = ln.calibrate(clf, texts, C(), tok, max_length=64, progress=True)
    cfgs = {"dense": None, **{f"k{k}": C(experts=16, shared=2, top_k=k, router="learned") for k in (2, 6, 10, 14)}}
    recs = []
    dense_acc = tasks.accuracy(clf, test)
    recs.append(Record(ENCODER, "dense", {"task": "mr"}, "accuracy_mr", dense_acc, "fraction"))
    for name, c in cfgs.items():
        if c is None:
            continue
        with ln.applied(clf, c, cal):
            acc = tasks.accuracy(clf, test)
        p = {"task": "mr", **{k: v for k, v in c.to_dict().items() if k != "method"}}
        recs += [Record(ENCODER, c.name, p, "accuracy_mr", acc, "fraction"),
                 Record(ENCODER, c.name, p, "accuracy_drop_points", 100 * (dense_acc - acc), "points"),
                 Record(ENCODER, c.name, p, "active_neurons", c.active_fraction(), "fraction of FFN neurons")]
    sizes = {1: tasks.make_batches(tok, test_rows[::16], 1), 32: tasks.make_batches(tok, test_rows[::2], 32, seed=0)}
    times: dict = {}
    with torch.inference_mode():
        for bs, bl in sizes.items():
            for _ in range(2 if args.quick else 5):
                for name, c in cfgs.items():
                    with ln.applied(clf, c, cal):
                        times.setdefault((name, bs), []).append(tasks.sentences_per_s(clf, bl, warmup=2))
    for (name, bs), xs in times.items():
        c = cfgs[name]
        p = {"task": "mr", "batch": bs, **({} if c is None else {k: v for k, v in c.to_dict().items() if k != "method"})}
        med, iqr = summary(xs)
        meth = "dense" if c is None else c.name
        recs.append(Record(ENCODER, meth, p, "encoder_sentences_per_s", med, "sentences/s", spread=iqr, repeats=len(xs)))
        if c is not None:
            ratio = summary([a / b for a, b in zip(xs, times[("dense", bs)])])[0]
            recs.append(Record(ENCODER, meth, p, "encoder_speedup", ratio, "x dense (paired)"))
    kept = [r for r in read(args.out) if r["model"] != ENCODER] if Path(args.out).exists() else []
    write(kept, args.out, append=False)
    write(stamped(recs), args.out, append=True)
    for r in recs:
        sys.stdout.write(f"{r.method:15s} {r.params} {r.metric} {r.value:.4g}\n")


def draw(rd: list[dict], runtime: str = "fp32") -> None:
    rd = [r for r in rd if r["model"] == MODEL and not from_recovery(r)]  # the main run's records
    png = OUT / ("experts_pareto.png" if runtime == "fp32" else f"experts_pareto_{runtime}.png")
    plots.pareto(rd, png, speed_metric="decode_vs_runtime_b1", series_params=("rule", "router", "experts", "shared", "share"),
                 title=f"SmolLM2-135M FFN: expert routing vs CATS / TEAL on the MLP, {runtime} runtime (no recovery);\n"
                 "labels: share of FFN neurons run (experts) or sparsity")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
