"""`lazyneuron` command line: subcommands map 1:1 onto the API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import LazyNeuronError

EPILOG = """examples:
  lazyneuron models
  lazyneuron inspect --model smollm2-135m
  lazyneuron calibrate --model smollm2-135m --method activation_sparsity --out cal.safetensors
  lazyneuron bench --model smollm2-135m --json
  lazyneuron bench --model smollm2-135m --method activation_sparsity:sparsity=0.5,rule=teal --calibration cal.safetensors
  lazyneuron fit exits --model smollm2-135m                     # exit heads + threshold, where bench / demo find them
  lazyneuron fit gates --model DIR --context domain=news,austen --target 0.25 --budget 5
  lazyneuron fit gates --model DIR --context domain=legal:contracts.txt,chat:chat.jsonl --target 0.25
  lazyneuron bench --model DIR --method module_gating --method early_exit   # the fitted checkpoints
  lazyneuron plan --model smollm2-135m --budget ppl:+5% --time 20   # fastest combination within +5% perplexity
  lazyneuron bench --model smollm2-135m --method "activation_sparsity:sparsity=0.3 + runtime:dtype=bf16"   # a combination
  lazyneuron demo                       # every method at its default setting vs dense, table + plot
  lazyneuron plot pareto lazyneuron-results/demo.jsonl --out pareto.png
  lazyneuron plot gates ~/.cache/lazyneuron/checkpoints/smollm2-135m.gates-frozen-25.safetensors --out gates.png
  lazyneuron plot gates ~/.cache/lazyneuron/checkpoints/speech/gated-dec9-lora8-full.safetensors --model whisper-base --out gates.png
  lazyneuron data fetch                 # corpora that are not pip dependencies (run once)
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lazyneuron", description="Make transformers compute only what each input needs, and measure it.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    sub.add_parser("models", help="list the built-in models and whether they are installed")

    s = sub.add_parser("inspect", help="which modules each role matches (dry run)", epilog="example: lazyneuron inspect --model smollm2-135m --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", default="smollm2-135m", help="built-in name, local HF directory or .gguf file")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("transcribe", help="transcribe WAV files with a Whisper model, dense or with module gates (speech)",
                       epilog="examples:\n  lazyneuron transcribe --model whisper-base --language de talk.wav\n"
                              "  lazyneuron transcribe --model whisper-base --language de --gates gates.safetensors talk.wav\n"
                              "  lazyneuron transcribe --model whisper-base --runtime bf16 talk.wav   (half the weight bytes; eager: torch's own modules)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("files", nargs="+", help="WAV files (16-bit PCM, any sample rate; resampled to 16 kHz)")
    s.add_argument("--model", default="whisper-base", help="whisper-base, whisper-tiny.en, or a CTranslate2 / Hugging Face Whisper directory")
    s.add_argument("--language", default=None, help="language code (en, de, es, ...); omitted: detected per file")
    s.add_argument("--task", default="transcribe", choices=["transcribe", "translate"])
    s.add_argument("--gates", default=None, help="a Whisper gate checkpoint (module_gating); the language and task are its context")
    s.add_argument("--runtime", default="fp32", choices=["fp32", "bf16", "int8", "eager"],
                   help="weight format of the fast runtime every linear runs on (default fp32, exact); eager: the model's own modules")
    s.add_argument("--json", action="store_true", help="one JSON object per file: text, seconds, modules skipped")

    s = sub.add_parser("calibrate", help="record activation statistics to a safetensors file",
                       epilog="example: lazyneuron calibrate --model smollm2-135m --method activation_sparsity --out cal.safetensors")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--method", action="append", required=True, help="method[:key=value,...]; repeat for several")
    s.add_argument("--corpus", default="news")
    s.add_argument("--texts", type=int, default=48, help="number of calibration documents")
    s.add_argument("--out", required=True)

    s = sub.add_parser("bench", help="time and score dense vs methods in one process (JSON-lines records)",
                       epilog="example: lazyneuron bench --model smollm2-135m --method activation_sparsity:sparsity=0.5 --json")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--method", action="append", default=[], help="method[:key=value,...]; repeat for several; none: dense only")
    s.add_argument("--calibration", help="calibration file (otherwise calibrated on the corpus's calibration split)")
    s.add_argument("--corpus", default="news")
    s.add_argument("--repeats", type=int)
    s.add_argument("--new-tokens", type=int)
    s.add_argument("--quick", action="store_true", help="fewer repeats and windows (for smoke runs)")
    s.add_argument("--json", action="store_true", help="print the records as a JSON list instead of a table")
    s.add_argument("--out", help="append the records to this JSON-lines file")
    _runtime_arg(s)

    s = sub.add_parser("plan", help="the fastest combination of methods within a quality budget, verified on the test split",
                       epilog="examples:\n  lazyneuron plan --model smollm2-135m --budget ppl:+5% --time 20\n"
                              "  lazyneuron plan --model minilm-l6 --task mr --budget acc:-0.5 --budget acc:-1\n"
                              "budgets: ppl:+X% (perplexity increase), agree:F (top-1 agreement with dense), acc:-X (accuracy points; --task)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--budget", action="append", required=True, help="quality budget; repeat to plan several in one search")
    s.add_argument("--time", type=float, default=20.0, help="minutes the search may take (default 20)")
    s.add_argument("--task", help="a labelled corpus (mr, rt, tweets): plan the model fine-tuned on it as a classifier (encoders)")
    s.add_argument("--corpus", default="news", help="text for perplexity / agreement and calibration (causal LMs)")
    s.add_argument("--methods", help="comma-separated methods to consider (default: every registered one)")
    s.add_argument("--exclude", default="", help="comma-separated methods to leave out")
    s.add_argument("--fit", action="store_true", help="fit the trained methods this model has no checkpoint for first (exit heads, gates; within the time)")
    s.add_argument("--quick", action="store_true", help="small sizes (smoke runs)")
    s.add_argument("--no-verify", action="store_true", help="skip the test-split verification")
    s.add_argument("--out", default="lazyneuron-plan", help="folder for plan.jsonl and plan.png")
    s.add_argument("--json", action="store_true", help="print the records as JSON")

    s = sub.add_parser("demo", help="every registered method at its default setting against dense: one table, records, plot")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--quick", action="store_true")
    s.add_argument("--out", default="lazyneuron-results", help="folder for demo.jsonl and pareto.png")
    s.add_argument("--no-fit", action="store_true", help="do not fit gates / exit heads / FFF trees on first use (rows only for what is already fitted)")
    _runtime_arg(s)

    _add_fit_parser(sub)

    s = sub.add_parser("plot", help="plots from records", epilog="example: lazyneuron plot pareto results.jsonl --out pareto.png")
    s.add_argument("kind", choices=["pareto", "layers", "gates"])
    s.add_argument("records", help="JSON-lines records file; for `gates`: a gate checkpoint (.safetensors) or a keep-probability JSON")
    s.add_argument("--model", default="smollm2-135m", help="gates from a checkpoint: the model it belongs to")
    s.add_argument("--out", required=True, help="PNG path")
    s.add_argument("--speed-metric", default="decode_speedup_b1")
    s.add_argument("--quality-metric", default="ppl_delta_pct")

    s = sub.add_parser("data", help="fetch corpora that are not pip dependencies (MR sentences, Jane Austen, Wikipedia)")
    s.add_argument("action", choices=["fetch", "list"])

    _add_kernel_parser(sub)
    return p


def _runtime_arg(s: Any) -> None:
    s.add_argument("--runtime", default="fp32", choices=["fp32", "bf16", "int8", "eager"],
                   help="weight format of the fast runtime the methods run on (default fp32, exact); eager: the model's own modules, "
                        "to compare against. Dense always runs eagerly too, as the baseline")


def _add_fit_parser(sub: Any) -> None:
    f = sub.add_parser("fit", help="fit gates, exit heads or FFF trees for a model (cached where bench and demo find them)",
                       epilog="examples:\n  lazyneuron fit exits --model smollm2-135m\n"
                              "  lazyneuron fit gates --model DIR --context domain=news,austen --target 0.25 --budget 5\n"
                              "  lazyneuron fit gates --model DIR --corpus docs.jsonl --context-field domain --target 0.25\n"
                              "  lazyneuron fit fff --model minilm-l6 --budget 10\n"
                              "text: a built-in corpus name (news, austen, wikipedia, hamlet, ...) or a local .txt / .jsonl file (field 'text');\n"
                              "every file is split 80/10/10 into train / calibration / test documents",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    fs = f.add_subparsers(dest="what", required=True, metavar="METHOD")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="smollm2-135m", help="built-in name, local HF directory or .gguf file")
    common.add_argument("--corpus", default="news", help="built-in corpus or a .txt / .jsonl file to fit on (default news)")
    common.add_argument("--budget", type=float, help="minutes; stop there and keep the best result so far")
    common.add_argument("--out", help="checkpoint path (default: the cache, where bench and demo look)")
    common.add_argument("--json", action="store_true", help="print what was fitted and measured as JSON")
    s = fs.add_parser("exits", parents=[common], help="early-exit heads (tuned lens + learned score) and their threshold (causal LMs)")
    s.add_argument("--agreement-loss", type=float, default=0.1, help="largest share of tokens allowed to decode differently from dense (default 0.1)")
    s.add_argument("--layers", help="exit after these layers, comma-separated (0-based; default: ~12 from a quarter of the way in)")
    s.add_argument("--windows", type=int, default=32, help="training windows of 256 tokens (default 32)")
    s = fs.add_parser("gates", parents=[common], help="context-aware module gates of a causal LM (searched masks; --train-steps adds Gumbel training)")
    s.add_argument("--context", action="append", default=[], help="key=value:SOURCE,value:SOURCE (or key=news,austen for built-in corpora)")
    s.add_argument("--context-field", help="with --corpus FILE.jsonl: one context value per distinct value of this field")
    s.add_argument("--target", type=float, default=0.25, help="fraction of modules (attention and FFN blocks) to skip (default 0.25)")
    s.add_argument("--rounds", type=int, default=4, help="swap-search rounds per context value (default 4)")
    s.add_argument("--train-steps", type=int, default=0, help="Gumbel-Softmax training steps after the search (default 0)")
    s = fs.add_parser("fff", parents=[common], help="fast-feedforward trees for plain two-layer FFNs (BERT, GPT-2)")
    s.add_argument("--depth", type=int, default=10, help="tree depth (default 10)")
    s.add_argument("--windows", type=int, default=160, help="training windows of 128 tokens (default 160)")
    s.add_argument("--distill-steps", type=int, default=300, help="layer-wise distillation steps per FFN (default 300)")
    s.add_argument("--epochs", type=int, default=2, help="end-to-end epochs (default 2)")


def _fit(args: argparse.Namespace) -> int:
    from . import fitting, models

    model, tok = models.load(args.model)
    common = {"budget": args.budget, "out": args.out, "corpus": args.corpus}
    if args.what == "exits":
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
        info = fitting.fit_exits(model, tok, args.model, layers=layers, agreement_loss=args.agreement_loss, train_windows=args.windows, **common)
        line = (f"exit heads after layers {info['layers']}: threshold {info['threshold']:.4g}, calibration agreement {info['calibration_agreement']:.3f}, "
                f"{info['mean_layers']:.2f} of {info['num_layers']} layers per token on calibration text")
    elif args.what == "gates":
        ctx = fitting.parse_contexts(args.context, corpus=args.corpus, field=args.context_field)
        info = fitting.fit_gates(model, tok, args.model, ctx, args.target, rounds=args.rounds, train_steps=args.train_steps, **common)
        line = f"gates skipping {info.get('skipped_modules', '')} of {info.get('modules', '')} modules" if "skipped_modules" in info else "gates trained"
        for v, r in info.get("heldout", {}).items():
            line += (f"\n  {v}: held-out next-token loss dense {r['dense_loss']:.4f}, static mask {r['static_loss']:.4f}, "
                     f"fitted {r['fitted_loss']:.4f}")
    else:
        info = fitting.fit_fff(model, tok, args.model, depth=args.depth, windows=args.windows, distill_steps=args.distill_steps, epochs=args.epochs, **common)
        line = f"FFF trees of depth {info['depth']} for {info['modules']} FFNs, end-to-end loss {info['end_to_end_loss']:.4f}"
    if args.json:
        _print_json(info)
    else:
        sys.stdout.write(f"{line}\nwrote {info['checkpoint']} ({info['seconds']:.0f} s); "
                         f"`lazyneuron bench --model {args.model} --method {info['method']}` uses it\n")
    return 0


def _add_kernel_parser(sub: Any) -> None:
    s = sub.add_parser("bench-kernels", help="time the fast kernels against torch (JSON list with --json)",
                       epilog="example: lazyneuron bench-kernels --quick --json")
    s.add_argument("--kernel", default="sparse_gemv", choices=["sparse_gemv", "cmm", "dense", "gemm"],
                   help="sparse_gemv: activation sparsity; cmm: the FFF tree walk; dense: the runtime's GEMV (fp32 / bf16 / int8); "
                        "gemm: its GEMM for long inputs (prefill, encoders), GFLOP/s against torch")
    s.add_argument("--quick", action="store_true", help="a subset that runs in under a minute")
    s.add_argument("--device", default="cpu", help="cpu (default), or cuda / cuda:N for the CMM walk on a GPU (needs Triton)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--out", help="append records to this JSON-lines file")


def _transcribe(args: argparse.Namespace) -> int:
    import time

    from . import models
    from .api import apply_
    from .data.speech import SAMPLE_RATE, read_wav, resample
    from .speech import DecodeTimings, transcribe

    model, proc = models.load(args.model)
    if getattr(model.config, "model_type", "") != "whisper":
        raise LazyNeuronError(f"{args.model!r} is not a Whisper model; `lazyneuron transcribe` needs whisper-base, whisper-tiny.en or a Whisper directory")
    gates = None
    configs: list[Any] = []
    if args.gates:
        from .methods.gating import ModuleGatingConfig

        ctx = "|".join(f"{k}={v}" for k, v in (("language", args.language), ("task", args.task)) if v)
        configs.append(ModuleGatingConfig(checkpoint=args.gates, context=ctx))
    if args.runtime != "eager":
        from .runtime import RuntimeConfig

        configs.append(RuntimeConfig(dtype=args.runtime))
    if configs:
        apply_(model, configs)
    if args.gates:
        from .methods import gating_speech as gs

        gates = gs.speech_gates(model)
        gates.track = True
    for f in args.files:
        audio, sr = read_wav(f)
        if sr != SAMPLE_RATE:
            audio = resample(audio, sr, SAMPLE_RATE)
        t = DecodeTimings()
        t0 = time.perf_counter()
        text = transcribe(model, proc, [audio], language=args.language, task=args.task, timings=t)[0]
        out: dict[str, Any] = {"file": f, "text": text.strip(), "seconds": round(time.perf_counter() - t0, 3),
                               "encoder_s": round(t.encoder_s, 3), "decode_s": round(t.decode_s, 3), "runtime": args.runtime}
        if gates is not None:
            g = gates.gates[0]
            out["encoder_modules_skipped"] = int((g[: gates.n_enc] < 0.5).sum())
            out["decoder_modules_skipped"] = int((g[gates.n_enc:] < 0.5).sum())
            out["modules"] = {"encoder": gates.n_enc, "decoder": len(gates.slots) - gates.n_enc}
        if args.json:
            _print_json(out)
        else:
            skip = (f"  [skipped {out['encoder_modules_skipped']}/{gates.n_enc} encoder, "
                    f"{out['decoder_modules_skipped']}/{len(gates.slots) - gates.n_enc} decoder modules]") if gates is not None else ""
            sys.stdout.write(f"{f}: {out['text']}  ({out['seconds']:.2f} s){skip}\n")
    return 0


def _inspect_text(rep: dict[str, Any]) -> str:
    """Roles with their module type and shape, then one line per layer listing its modules by role."""
    lp = rep["layers_path"] + "."
    out = ["", "roles (per layer):"]
    per_layer: dict[int, dict[str, list[str]]] = {}
    for role, entries in rep["roles"].items():
        if role == "layer":
            continue
        shapes = sorted({f"{e['type']} {e['in']}->{e['out']}" if "in" in e else e["type"] for e in entries})
        out.append(f"  {role:<10} {len(entries):>3} module(s): {', '.join(shapes)}")
        for e in entries:
            if e["path"].startswith(lp):
                idx, _, rel = e["path"][len(lp):].partition(".")
                per_layer.setdefault(int(idx), {}).setdefault(role, []).append(rel)
            else:
                out.append(f"             {e['path']}")
    out.append("")
    for i in sorted(per_layer):
        roles = per_layer[i]
        out.append(f"layer {i:>2}: " + "  ".join(f"{r}={','.join(v)}" for r, v in roles.items() if r not in ("attn", "mlp")))
    return "\n".join(out) + "\n"


def _configs(specs: Sequence[str], model_name: str | None = None) -> list[Any]:
    """Parse ``--method`` specs; a method that needs a fitted checkpoint and names none gets this
    model's (from ``lazyneuron fit``), or an error saying how to fit one (FFF without one converts
    the dense FFN untrained)."""
    from .config import MethodConfig
    from .errors import ConfigError

    from .plan import split_spec

    out: list[Any] = []
    for text in specs:  # a combination is written a:k=v + b:k=v (one variant running both)
        parts = [_configs_one(x, model_name) for x in split_spec(text)]
        out.append(parts[0] if len(parts) == 1 else parts)
    return out


def _configs_one(x: str, model_name: str | None) -> Any:
    from .config import MethodConfig
    from .errors import ConfigError

    if True:
        name, _, rest = x.partition(":")
        if model_name is not None and name.strip() in ("module_gating", "early_exit", "fast_feedforward") and "checkpoint=" not in rest:
            from . import fitting

            found = fitting.fitted_checkpoint(name.strip(), model_name)
            if found is None and name.strip() == "fast_feedforward":  # FFF also converts without training (trees from the dense weights)
                return MethodConfig.parse(x)
            if found is None:
                raise ConfigError(f"{name.strip()} needs a fitted checkpoint and {model_name} has none; run `{fitting.fit_command(name.strip(), model_name)}` "
                                  f"first, or pass {name.strip()}:checkpoint=PATH")
            given = {k.strip(): v.strip() for k, _, v in (kv.partition("=") for kv in rest.split(",") if kv.strip())}
            if name.strip() == "early_exit" and given.get("criterion", "learned") != "learned":
                found.pop("threshold", None)  # the calibrated threshold is the learned score's; another criterion takes its own
            extra = ",".join(f"{k}={v}" for k, v in found.items() if k not in given)
            x = f"{name}:{rest + ',' if rest.strip() else ''}{extra}"
        return MethodConfig.parse(x)


def _plan(args: argparse.Namespace) -> int:
    from . import models, plan
    from .bench import plots, write

    budgets = [plan.Budget.parse(b) for b in args.budget]  # bad budgets stop here, before any loading
    s = plan.quick_settings(corpus=args.corpus, task=args.task) if args.quick else plan.Settings(corpus=args.corpus, task=args.task)
    if args.task:
        from . import tasks

        model, tok = tasks.finetuned_classifier(args.model, args.task, quick=args.quick)
    else:
        model, tok = models.load(args.model)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    exclude = [m.strip() for m in args.exclude.split(",") if m.strip()]
    minutes = args.time
    name = f"{args.model}-{args.task}" if args.task else args.model  # where a classifier's fitted exit heads live
    if args.fit:  # the demo's fits (exit heads, gates, FFF trees; a few minutes each, cached), then the search in the time left
        import time

        from .fitting import demo_fits, fit_classifier_exits

        t0 = time.monotonic()
        if args.task:
            from .methods.early_exit import default_lm_exits_path

            if not default_lm_exits_path(name).exists():
                sys.stderr.write(f"note: fitted exit heads for {name}: {fit_classifier_exits(model, tok, name, args.task, epochs=5 if args.quick else 40)}\n")
        else:
            for line in demo_fits(args.model, model, tok, quick=args.quick):
                sys.stderr.write(f"note: {line}\n")
        minutes = max(1.0, args.time - (time.monotonic() - t0) / 60)
    res = plan.plan(model, tok, budgets, model_name=name, minutes=minutes, settings=s, methods=methods, exclude=exclude, strict=False)
    recs = plan.candidate_records(name, res)
    if not args.no_verify and any(c.candidate is not None for c in res.choices):
        recs += plan.verify(name, model, tok, res, repeats=3 if args.quick else 5, windows=s.windows[-1])
    out = Path(args.out)
    path = write(recs, out / "plan.jsonl", append=False)
    png = plots.plan_front([r.to_dict() for r in recs], out / "plan.png", title=f"{args.model}: every setting the planner measured")
    if args.json:
        _print_json([r.to_dict() for r in recs])
    else:
        sys.stdout.write(plan.table(res, recs) + f"\nrecords: {path}\nplot:    {png}\n")
    missing = [c for c in res.choices if c.candidate is None]
    for c in missing:
        sys.stderr.write(f"error: {c.budget.text}: {c.reason}; loosen the budget, or fit more methods (`lazyneuron fit`) and plan again\n")
    return 3 if missing else 0


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _quick_kw(name: str, quick: bool) -> dict[str, bool]:
    """``demo --quick``: the fitted methods also take the checkpoints a quick demo fitted."""
    from .fitting import FITTED

    return {"quick": True} if quick and name in FITTED else {}


def _demo_configs(model_name: str, model: Any, quick: bool = False) -> tuple[list[Any], list[str]]:
    """Every registered method's demo settings for this model, less those that do not apply to it
    (each of those becomes a note saying why). ``quick``: ``demo --quick`` (see :func:`_quick_kw`)."""
    from .adapters import get_adapter
    from .config import method_for, registry
    from .errors import ConfigError

    adapter = get_adapter(model)
    cfgs, skipped = [], []
    for name, meth in registry().items():
        for c in meth.demo_configs(model_name, **_quick_kw(name, quick)):
            try:
                if not method_for(c).resolve(model, adapter, c):
                    raise ConfigError(f"its targets {list(c.targets)} match no module of this {adapter.model_type} model")
            except ConfigError as e:
                d = c.to_dict()
                params = ",".join(f"{k}={d[k]}" for k in ("rule", "sparsity", "criterion") if k in d)
                skipped.append(f"{c.name}{' ' + params if params else ''}: not run on {model_name}: {e}")
                continue
            cfgs.append(c)
    return cfgs, skipped


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:  # the CLI shows its own progress bars; the 0.3 s weight-loading bar is noise here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except LazyNeuronError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2


def _run(args: argparse.Namespace) -> int:
    from . import models

    if args.cmd == "models":
        for m in models.available():
            state = "installed" if m["installed"] else f"not installed: {m['install']}"
            sys.stdout.write(f"{m['name']:<14} {m['what']}  [{state}]\n")
        sys.stdout.write("Any local Hugging Face model directory or .gguf file also works as --model.\n")
        return 0
    if args.cmd == "data":
        from . import data

        if args.action == "fetch":
            for k, v in data.fetch().items():
                sys.stdout.write(f"{k}: {v}\n")
        for c in data.CORPORA:
            try:
                n = [len(data.texts(c, s)) for s in data.SPLITS]
                sys.stdout.write(f"{c:<10} documents train/calibration/test: {n[0]}/{n[1]}/{n[2]}\n")
            except LazyNeuronError as e:
                sys.stdout.write(f"{c:<10} unavailable: {e}\n")
        return 0
    if args.cmd == "plot":
        from .bench import plots, read

        if args.kind == "gates":
            from .methods.gating import keep_by_context

            if args.records.endswith(".json"):
                keep = json.loads(Path(args.records).read_text(encoding="utf-8"))
            else:
                from .models import load

                model, tok = load(args.model)
                if getattr(model.config, "model_type", "") == "whisper":  # speech: encoder and decoder slots, one column per language
                    from .methods.gating_speech import keep_by_language, speech_slots

                    keep = keep_by_language(model, tok, args.records)
                    out = plots.speech_gates(keep, speech_slots(model), args.out, title=os.path.basename(args.records))
                    sys.stdout.write(f"wrote {out}\n")
                    return 0
                keep = keep_by_context(model, tok, args.records)
            sys.stdout.write(f"wrote {plots.gates(keep, args.out, title=os.path.basename(args.records))}\n")
            return 0
        recs = read(args.records)
        if args.kind == "pareto":
            out = plots.pareto(recs, args.out, args.speed_metric, args.quality_metric)
        else:
            out = plots.per_layer(recs, args.out)
        sys.stdout.write(f"wrote {out}\n")
        return 0
    if args.cmd == "fit":
        return _fit(args)
    if args.cmd == "plan":
        return _plan(args)
    if args.cmd == "bench-kernels":
        from .kernels import bench as kbench

        recs = kbench.run(args.kernel, quick=args.quick, progress=not args.json, device=args.device)
        if args.out:
            from .bench import write

            write(recs, args.out)
        if args.json:
            _print_json(recs)
        else:
            sys.stdout.write(kbench.table(recs) + "\n")
        return 0

    from .api import calibrate, inspect

    if args.cmd == "inspect":
        model, _ = models.load(args.model)
        rep = inspect(model)
        if args.json:
            _print_json(rep)
            return 0
        sys.stdout.write(f"{args.model}: family {rep['family']} (model_type {rep['model_type']}), {rep['num_layers']} layers at {rep['layers_path']}"
                         f"{' (discovered)' if rep['discovered'] else ''}\n")
        sys.stdout.write(_inspect_text(rep))
        return 0
    if args.cmd == "transcribe":
        return _transcribe(args)
    if args.cmd == "calibrate":
        from . import data

        model, tok = models.load(args.model)
        cal = calibrate(model, data.texts(args.corpus, "calibration")[: args.texts], _configs(args.method), tok, progress=True)
        cal.meta["corpus"] = args.corpus
        cal.save(args.out)
        sys.stdout.write(f"wrote {args.out} ({cal.meta['num_tokens']} tokens, {sum(len(v) for v in cal.stats.values())} modules)\n")
        return 0
    if args.cmd in ("bench", "demo"):
        from .bench import BenchSettings, runner, write

        s = runner.quick() if args.quick else BenchSettings()
        s.runtime = args.runtime
        if args.cmd == "bench":
            s.corpus = args.corpus
            if args.repeats:
                s.repeats = args.repeats
            if args.new_tokens:
                s.new_tokens = args.new_tokens
            cfgs = _configs(args.method, args.model)
        model, tok = models.load(args.model)
        skipped: list[str] = []
        fitted: list[str] = []
        if args.cmd == "demo":
            if not args.no_fit:
                from .fitting import demo_fits

                fitted = demo_fits(args.model, model, tok, quick=args.quick)
            cfgs, skipped = _demo_configs(args.model, model, quick=args.quick)
        cal = None
        if args.cmd == "bench" and args.calibration:
            from .calibration import Calibration

            cal = Calibration.load(args.calibration)
        recs = runner.run(args.model, model, tok, cfgs, s, progress=not getattr(args, "json", False), calibration=cal)
        if args.cmd == "demo":
            from .bench import plots

            out = Path(args.out)
            path = write(recs, out / "demo.jsonl", append=False)
            from .adapters import get_adapter
            from .config import registry

            causal = get_adapter(model).causal_lm
            metrics = {} if causal else {"speed_metric": "encode_speedup_b1", "quality_metric": "state_rel_error"}
            png = plots.pareto([r.to_dict() for r in recs], out / "pareto.png", title=f"{args.model}: speed against quality, methods on the "
                               f"{s.runtime} runtime (lower right is better)" if causal else f"{args.model}: speed against output error", **metrics)
            if causal:
                how = "eager dense baseline; methods on the runtime (" + s.runtime + ")" if s.runtime != "eager" else "lean loop, eager modules"
                sys.stdout.write(f"\n{args.model}, batch 1 decode ({s.new_tokens} new tokens, {how}), perplexity on {s.corpus} test windows\n")
            else:
                sys.stdout.write(f"\n{args.model} (encoder), tokens/s of forwards at batch 1 ({s.prompt_tokens} tokens) and on one {s.prefill_tokens}-token "
                                 f"sequence, output states against dense on {s.corpus} test windows\n")
            sys.stdout.write(runner.table(recs, corpus=s.corpus) + "\n")
            notes = fitted + skipped + [n for name, meth in registry().items() for n in meth.demo_notes(args.model, **_quick_kw(name, args.quick))]
            for n in notes:
                sys.stdout.write(f"note: {n}\n")
            sys.stdout.write(f"\nrecords: {path}\nplot:    {png}\n")
            return 0
        if args.out:
            write(recs, args.out)
        if args.json:
            _print_json([r.to_dict() for r in recs])
        else:
            sys.stdout.write(runner.table(recs, corpus=s.corpus) + "\n")
        return 0
    raise AssertionError(args.cmd)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
