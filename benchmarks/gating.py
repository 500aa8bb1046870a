"""Context-aware module gating on SmolLM2-135M with text-domain contexts, against the dense model
and a static greedy baseline measured in the same run.

    .venv/bin/python benchmarks/gating.py                   # all parts (~4 h on 2 cores from nothing; cached orders, searches and gates are reused)
    .venv/bin/python benchmarks/gating.py --part orders     # greedy removal orders (global + per domain, ~25 min, cached)
    .venv/bin/python benchmarks/gating.py --part search     # per-domain swap searches from the static masks (~40 + ~55 min, cached)
    .venv/bin/python benchmarks/gating.py --part quality    # train gates (~25 min; cached checkpoints reused) + perplexity on the test set (~30 min)
    .venv/bin/python benchmarks/gating.py --part timing     # decode / prefill tok/s vs dense, paired runs, 5 rounds (~40 min for 12 variants; needs the checkpoints)
    .venv/bin/python benchmarks/gating.py --part timing --inits search,vsearch --levels 0.1 --repeats 12 --new-tokens 64   # the 10% rows (~30 min)
    .venv/bin/python benchmarks/gating.py --part overhead   # gate decision time vs a dense forward (~1 min)
    .venv/bin/python benchmarks/gating.py --part encoder    # MiniLM-L6 multi-task (mr, rt, tweets), task contexts (~20 min)
    .venv/bin/python benchmarks/gating.py --part encoder --encoder-init search   # per-task searched masks + full fine-tuning (~12 min)
    .venv/bin/python benchmarks/gating.py --plots-only      # redraw plots from the records
    .venv/bin/python benchmarks/gating.py --tables          # print the README tables from the records

Domains (contexts): news, austen, wikipedia, hamlet; gates are trained on the train split of each,
calibrated on it, and measured on the test split (64 windows of 128 tokens per domain evenly spaced
over the split, or as many as it holds: 33 for Hamlet). Every sequence's mask is decided from its
first 32 tokens (the prompt) and perplexity is scored on the 96 tokens after them, for every
variant. Each variant is also compared with static window by window on the same windows: the mean
difference of per-window next-token loss and its standard error (records ``loss_delta_vs_static``,
``loss_delta_vs_static_se``).

- static: the first k of the greedy removal order (``static_greedy_order``: the module whose
  removal raises the mean next-token loss on 4 x 96 calibration tokens, one window per domain,
  least, one at a time); the same k modules removed for every input, no training.
- gates-frozen-domain-init: the gate predictor started from per-domain greedy masks (its context
  table: each domain's own greedy order on 128 calibration tokens of that domain, shortlist 40;
  the no-context row: the global order, logit margin 3), then trained with the base frozen (KL to
  the dense model + the sparsity loss, binary-Concrete gates, temperature 0.5 -> 0.1, lr 1e-3),
  its threshold calibrated to the target on the train windows; kept only if it lowers the
  next-token loss on held-out calibration windows (2 x 128 per domain, not seen by the orders),
  otherwise its start is kept (recorded as ``selected``).
- gates-frozen-global-init: every context row starts from the global static mask (margin 2) and
  the training (lr 2e-2) has to find per-domain differences itself; same selection rule.
- gates-lowrank-*: the same starts, trained jointly with rank-8 adapters on every linear of the
  blocks (merged into weight copies at inference).
- gates-frozen-search: each context row is the static mask improved on that domain's own text by
  ``swap_search`` (same number of modules skipped; 6 x 128 train tokens spread over the split, up
  to 4 swaps; of the start and each accepted swap, the mask with the lowest loss on 8 x 128
  held-out calibration tokens is kept); no-context row = the static mask. The base stays frozen.
- gates-frozen-vsearch-init: the same search, but each candidate swap is accepted by its loss on
  16 x 128 train tokens of the domain (spread; the 6 windows only rank the single changes), and
  the mask is chosen among the accepted ones on 16 x 128 held-out calibration tokens. Frozen only.
- gates-lowrank-search: those masks, trained jointly with rank-8 adapters on every block linear
  with the next-token loss on the domains' train text (``--lm-steps`` batches of 4 domains x 128
  tokens spread over the splits; no teacher); dense-lowrank: the same adapters trained with
  nothing skipped (how much of the fine-tuned numbers is adaptation to the text).
Training batches: 60 (domain init) / 45 (global init) batches of 4 domains x 96 train tokens.

Writes benchmarks/results/gating.jsonl, gating_ppl_vs_skipped.png, gating_speed_vs_skipped.png and
gating_gates_<level>.png (keep probability per layer / module for each domain); saves the gate
checkpoints where ``lazyneuron demo`` finds them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lazyneuron as ln
from lazyneuron import data
from lazyneuron.bench import Record, plots, read, write
from lazyneuron.bench.decode import lean_generate
from lazyneuron.bench.timing import summary
from lazyneuron.methods.gating import (
    MODULES,
    GatePredictor,
    GateTraining,
    ModuleGatingConfig,
    calibrate_threshold,
    default_gates_path,
    lm_loss,
    module_costs,
    set_context,
    static_greedy_order,
    static_predictor,
    search_context_mask,
    total_token_cost,
    train_gates,
)
from lazyneuron.paths import cache_dir

OUT = Path(__file__).parent / "results"
DOMAINS = ("news", "austen", "wikipedia", "hamlet")
LEVELS = (0.1, 0.25, 0.5)
MODEL = "smollm2-135m"
PROMPT = 32
INIT_TAG = {"domain": "", "global": "-g", "search": "-s", "vsearch": "-vs"}  # checkpoint name suffix per gate start


def _load():  # type: ignore[no-untyped-def]
    model, tok = ln.models.load(MODEL)
    return model, tok


def static_order(model, tok, count: int, quick: bool) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    path = cache_dir("checkpoints") / f"{MODEL}.static-order.json"  # the same calibration windows in quick and full runs
    if path.exists():
        order = [tuple(x) for x in json.loads(path.read_text())]
        if len(order) >= count:
            return order[:count]
    cal = torch.cat([data.windows(tok, d, "calibration", 96, 1) for d in DOMAINS])
    order = static_greedy_order(model, cal, count, score_from=PROMPT)
    path.write_text(json.dumps(order))
    return order


def domain_orders(model, tok, count: int) -> dict[str, list[tuple[int, str]]]:  # type: ignore[no-untyped-def]
    """Greedy removal order per domain (1 x 128 calibration tokens of that domain each; after the
    first step only the 40 cheapest single removals are candidates)."""
    out = {}
    for d in DOMAINS:
        path = cache_dir("checkpoints") / f"{MODEL}.static-order-{d}.json"
        if path.exists() and len(json.loads(path.read_text())) >= count:
            out[d] = [tuple(x) for x in json.loads(path.read_text())][:count]
            continue
        order = static_greedy_order(model, data.windows(tok, d, "calibration", 128, 1), count, score_from=PROMPT, shortlist=40)
        path.write_text(json.dumps(order))
        out[d] = order
    return out


def searched_masks(model, tok, level: float, order, args, verify: int = 0, held: int = 8) -> tuple[dict, dict]:  # type: ignore[no-untyped-def]
    """Per-domain keep masks at ``level``: the static mask improved by ``swap_search`` on the
    domain's own train text (``--search-windows`` x 128 tokens spread over the split), kept only
    where it also lowers the loss on held-out text (``held`` x 128 calibration tokens of that
    domain, spread over the split): of the start and the mask after each accepted swap, the one
    with the lowest held-out loss is kept. ``verify > 0``: swaps are accepted by their loss on
    ``verify`` x 128 train tokens of the domain (spread) instead of the search windows."""
    n = len(model.model.layers)
    k = round(level * n * len(MODULES))
    start = _keep(order, k, n)
    extra = f"-v{verify}-h{held}" if verify or held != 8 else ""
    path = cache_dir("checkpoints") / f"{MODEL}.search-{round(level * 100):02d}-{args.search_windows}x{args.search_rounds}-spread{extra}.json"
    info = json.loads(path.read_text()) if path.exists() and not args.retrain else {}
    masks = {}
    for d in DOMAINS:
        if d not in info:
            w = data.windows(tok, d, "train", 128, args.search_windows, spread=True)
            t0 = time.perf_counter()
            v = data.windows(tok, d, "train", 128, verify, spread=True) if verify else None
            mask, r = search_context_mask(model, w, start, data.windows(tok, d, "calibration", 128, held, spread=True), verify=v,
                                          score_from=PROMPT, rounds=args.search_rounds, desc=f"swap search {d} {level:.0%}")
            hl, best = r["heldout_loss"], r["chosen_step"]  # held-out losses of the start and each accepted swap
            info[d] = {"keep": mask.int().tolist(), **r, "accepted": best > 0, "seconds": time.perf_counter() - t0}
            path.write_text(json.dumps(info))
            print(f"search {level:.2f} {d:9s}: train loss {r['search_loss'][0]:.4f} -> {r['search_loss'][-1]:.4f} ({len(hl) - 1} swaps), held-out "
                  + " ".join(f"{x:.4f}" for x in hl) + f" -> step {best} ({time.perf_counter() - t0:.0f} s)", flush=True)
        masks[d] = torch.tensor(info[d]["keep"]).bool()  # the start itself when no searched mask did better held out
    return masks, info


def train_batches(tok, n_per_domain: int, length: int, spread: bool = False) -> list:  # type: ignore[no-untyped-def]
    ws = {d: data.windows(tok, d, "train", length, n_per_domain, spread=spread) for d in DOMAINS}
    out = []
    for i in range(n_per_domain):  # one window of every domain per batch
        out.append((torch.stack([ws[d][i] for d in DOMAINS]), {"domain": list(DOMAINS)}))
    return out


def _keep(order, k: int, n: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    skip = set(map(tuple, order[:k]))
    return torch.tensor([[(j, m) not in skip for m in MODULES] for j in range(n)])


@torch.no_grad()
def selection_loss(model, sel: dict) -> float:  # type: ignore[no-untyped-def]
    """Mean next-token loss after the prompt on the selection windows (hard masks, per domain)."""
    losses = []
    for d, w in sel.items():
        set_context(model, domain=d)
        logits = model(input_ids=w, use_cache=False).logits[:, PROMPT:-1].float()
        losses.append(float(F.cross_entropy(logits.flatten(0, 1), w[:, PROMPT + 1:].flatten())))
    return statistics.mean(losses)


def gates_for(model, tok, level: float, tag: str, order, orders, args, init: str = "domain") -> tuple[str, dict]:  # type: ignore[no-untyped-def]
    """Train (or reuse) the gates of one level; returns the checkpoint and what was selected.
    ``init``: domain (each context row starts from its domain's greedy mask, margin 3, lr 1e-3) or
    global (every row starts from the global static mask, margin 2, lr 2e-2: training must find
    the per-domain differences itself)."""
    path = default_gates_path(MODEL, level, tag + INIT_TAG[init] + ("-quick" if args.quick else ""))
    info_path = Path(str(path) + ".json")
    if path.exists() and info_path.exists() and not args.retrain:
        return str(path), json.loads(info_path.read_text())
    n = len(model.model.layers)
    k = round(level * n * len(MODULES))
    pred = GatePredictor(model.config.hidden_size, n, {"domain": list(DOMAINS)}, gate_tokens=PROMPT, model_type="llama")
    if init in ("search", "vsearch"):
        masks, sinfo = searched_masks(model, tok, level, order, args, *((args.verify_windows, 16) if init == "vsearch" else ()))
        pred.init_masks({"domain": {None: _keep(order, k, n), **masks}})
        if tag == "frozen":  # the searched masks are the gates: nothing more to train
            how = f"swap search on {args.search_windows} x 128 train tokens per domain" + (f", swaps accepted on {args.verify_windows} x 128" if init == "vsearch" else "")
            pred.meta.update({"target_sparsity": level, "trained_on": how})
            pred.save(path)
            info = {"selected": "searched", "accepted": {d: sinfo[d]["accepted"] for d in DOMAINS}}
            info_path.write_text(json.dumps(info))
            return str(path), info
    elif init == "domain":
        pred.init_masks({"domain": {None: _keep(order, k, n), **{d: _keep(orders[d], k, n) for d in DOMAINS}}})
    else:
        pred.init_masks({"domain": {v: _keep(order, k, n) for v in (None, *DOMAINS)}}, margin=2.0)
    pred.meta.update({"target_sparsity": level})
    init_path = Path(str(path) + ".init.safetensors")
    pred.save(init_path)
    sel = {d: data.windows(tok, d, "calibration", 128, 3)[1:] for d in DOMAINS}  # not the windows the per-domain greedy orders saw
    with ln.applied(model, ModuleGatingConfig(checkpoint=str(init_path))):
        init_loss = selection_loss(model, sel)
    if init == "search":  # adapters trained on the domains' own text (next-token loss), masks held near their start
        batches = train_batches(tok, 4 if args.quick else args.lm_steps, 128, spread=True)
        cfg = GateTraining(target=level, lora_rank=args.lora_rank, lr=1e-3, lora_lr=args.lora_lr, tau=(0.5, 0.1), estimator=args.estimator,
                           task_loss=lm_loss, teacher=False, context_dropout=0.0)
    else:
        batches = train_batches(tok, 4 if args.quick else args.steps, 96)
        cfg = GateTraining(target=level, lora_rank=8 if tag == "lowrank" else 0, lr=1e-3 if init == "domain" else 2e-2, tau=(0.5, 0.1), estimator=args.estimator)
    train_gates(model, batches, {"domain": list(DOMAINS)}, cfg, gate_tokens=PROMPT, init=pred, checkpoint=str(path) + ".train", progress=True)
    calibrate_threshold(model, [(b[0][:, :PROMPT], b[1]) for b in batches], level)
    trained_loss = selection_loss(model, sel)
    st = model.model
    st.predictor.meta.update({"target_sparsity": level, "estimator": args.estimator,
                              "trained_on": f"{len(batches)} x 4 x 96 tokens, train split of {list(DOMAINS)}"})
    info = {"selection_loss_init": init_loss, "selection_loss_trained": trained_loss, "steps": len(batches), "estimator": args.estimator, "init": init}
    if trained_loss <= init_loss or tag == "lowrank":  # adapters need the training; the gates alone are kept only if they help
        st.predictor.save(path, st.lora_state() if st.lora_paths else None)
        info["selected"] = "trained"
    else:
        import shutil

        shutil.copy(init_path, path)
        info["selected"] = "init (training did not lower the selection loss)"
    ln.revert_(model)
    Path(str(path) + ".train").unlink(missing_ok=True)
    info_path.write_text(json.dumps(info))
    print(f"gates {tag} {init}-init {level}: selection loss init {init_loss:.4f} trained {trained_loss:.4f} -> {info['selected']}", flush=True)
    return str(path), info


@torch.inference_mode()
def evaluate(model, tests: dict, gated: bool, chunk: int = 16) -> dict:  # type: ignore[no-untyped-def]
    """Per domain: perplexity on the tokens after the prompt, the masks (B, layers, 2) and each
    window's mean next-token loss (B,), for paired comparisons between variants."""
    out = {}
    for d, w in tests.items():
        if gated:
            set_context(model, domain=d)
        nll, masks = [], []
        for i in range(0, len(w), chunk):
            x = w[i:i + chunk]
            logits = model(input_ids=x, use_cache=False).logits[:, PROMPT:-1].float()
            nll.append(F.cross_entropy(logits.transpose(1, 2), x[:, PROMPT + 1:], reduction="none").mean(1))
            if gated:
                masks.append(model.model.last_gates.clone())
        per = torch.cat(nll)
        out[d] = (math.exp(float(per.mean())), torch.cat(masks) if gated else None, per)
    return out


def test_windows(tok, count: int) -> dict:  # type: ignore[no-untyped-def]
    """``count`` windows of 128 tokens per domain, evenly spaced over its test split, or as many
    as the split holds (Hamlet's test split holds 33)."""
    return {d: data.windows(tok, d, "test", 128, min(count, len(data.token_stream(tok, d, "test", 1 << 62)) // 128), spread=True)
            for d in DOMAINS}


def quality(args: argparse.Namespace, recs: list[Record]) -> None:
    model, tok = _load()
    n = len(model.model.layers)
    total = n * len(MODULES)
    order = static_order(model, tok, round(max(LEVELS) * total), args.quick)
    orders = domain_orders(model, tok, round(max(LEVELS) * total))
    costs = module_costs(model)
    token_cost = total_token_cost(model)
    count = 4 if args.quick else args.test_windows
    tests = test_windows(tok, count)  # many documents, not one opening
    test = f"up to {count} x 128 spread over the test split"
    dense = evaluate(model, tests, False)
    for d in DOMAINS:
        recs.append(Record(MODEL, "dense", {"domain": d, "test": test, "windows": len(tests[d])}, "perplexity", dense[d][0], "ppl"))
    variants: list[tuple[str, float, str, dict]] = []
    for level in LEVELS:
        k = round(level * total)
        sp = static_predictor(model, order[:k])
        sp.meta["target_sparsity"] = level
        path = cache_dir("checkpoints") / f"{MODEL}.static-{round(level * 100):02d}{'-quick' if args.quick else ''}.safetensors"
        sp.save(path)
        variants.append(("static", level, str(path), {}))
        for init in args.inits:
            for tag in ("frozen", "lowrank"):
                if tag in args.kinds and not (init == "vsearch" and tag == "lowrank"):  # adapters: trained on the search masks
                    variants.append((f"gates-{tag}-{init}-init", level, *gates_for(model, tok, level, tag, order, orders, args, init)))
    if "search" in args.inits and "lowrank" in args.kinds:  # reference: the same adapters trained with nothing skipped
        variants.append(("dense-lowrank", 0.0, *gates_for(model, tok, 0.0, "lowrank", order, orders, args, "search")))
    heat: dict = {}
    static_nll: dict = {}
    for kind, level, path, info in variants:
        with ln.applied(model, ModuleGatingConfig(checkpoint=path)):
            res = evaluate(model, tests, True)
        for d in DOMAINS:
            ppl, masks, per = res[d]
            keep = masks.float()
            p = {"domain": d, "target_sparsity": level, "variant": kind, "context": f"domain={d}", "test": test, "windows": len(per),
                 **({"selected": info["selected"]} if info else {})}
            if kind == "static":
                static_nll[(level, d)] = per
            elif (level, d) in static_nll:  # paired over the same windows: mean loss difference and its standard error
                diff = per - static_nll[(level, d)]
                recs += [Record(MODEL, "module_gating", p, "loss_delta_vs_static", float(diff.mean()), "nats / token"),
                         Record(MODEL, "module_gating", p, "loss_delta_vs_static_se", float(diff.std() / math.sqrt(len(diff))), "nats / token")]
            skipped = 1 - float(keep.mean())
            flops = float(((1 - keep) * costs).sum((1, 2)).mean() / token_cost)
            recs += [
                Record(MODEL, "module_gating", p, "perplexity", ppl, "ppl"),
                Record(MODEL, "module_gating", p, "ppl_delta_pct", 100 * (ppl / dense[d][0] - 1), "% vs dense"),
                Record(MODEL, "module_gating", p, "modules_skipped", skipped, "fraction"),
                Record(MODEL, "module_gating", p, "decode_flops_skipped", flops, "fraction"),
            ]
            heat.setdefault((kind, level), {})[d] = keep.mean(0)
            print(f"{kind:14s} {level:.2f} {d:9s} ppl {ppl:8.2f} (dense {dense[d][0]:6.2f}, {100 * (ppl / dense[d][0] - 1):+6.1f}%)  "
                  f"skipped {skipped:.3f}  flops {flops:.3f}"
                  + (f"  vs static {float((per - static_nll[(level, d)]).mean()):+.4f} nats" if kind != "static" and (level, d) in static_nll else ""),
                  flush=True)
        if kind not in ("static", "dense-lowrank"):  # how much the domains' masks differ
            hm = heat[(kind, level)]
            maj = {d: (hm[d] > 0.5) for d in DOMAINS}
            diffs = [float((maj[a] != maj[b]).float().mean()) for i, a in enumerate(DOMAINS) for b in DOMAINS[i + 1:]]
            recs.append(Record(MODEL, "module_gating", {"target_sparsity": level, "variant": kind}, "mask_difference_between_domains",
                               statistics.mean(diffs), "fraction of decisions"))
            (OUT / f"gating_keep_{kind}_{round(level * 100):02d}.json").write_text(json.dumps({d: hm[d].tolist() for d in DOMAINS}))


@torch.inference_mode()
def timing(args: argparse.Namespace, recs: list[Record]) -> None:
    model, tok = _load()
    n = len(model.model.layers)
    total = n * len(MODULES)
    costs, token_cost = module_costs(model), total_token_cost(model)
    variants: dict[str, ModuleGatingConfig | None] = {"dense": None}
    q = "-quick" if args.quick else ""
    for level in args.levels:
        paths = {"static": cache_dir("checkpoints") / f"{MODEL}.static-{round(level * 100):02d}{q}.safetensors"}
        for init in args.inits:
            for t in args.kinds:
                paths[f"gates-{t}-{init}-init"] = default_gates_path(MODEL, level, t + INIT_TAG[init] + q)
        for kind, path in paths.items():
            if Path(path).exists():
                variants[f"{kind}@{level}"] = ModuleGatingConfig(checkpoint=str(path))
    prompts = {d: data.windows(tok, d, "test", 128, 1) for d in DOMAINS}
    new = 8 if args.quick else args.new_tokens

    def measure(cfg, d):  # type: ignore[no-untyped-def]
        with ln.applied(model, cfg):
            if cfg is not None:
                set_context(model, domain=d)
                model.model.track = True
            _, (_, td) = lean_generate(model, prompts[d][:, :PROMPT], new, return_timing=True)
            t0 = time.perf_counter()
            model(input_ids=prompts[d], use_cache=False, logits_to_keep=1)
            tp = time.perf_counter() - t0
            skipped = flops = 0.0
            if cfg is not None:
                keep = model.model.history[0].float()
                skipped, flops = 1 - float(keep.mean()), float(((1 - keep) * costs).sum() / token_cost)
        return (new - 1) / td, prompts[d].numel() / tp, skipped, flops

    # paired: every variant's measurement right after a dense one on the same prompt, so the ratio
    # compares two runs seconds apart (this host's speed drifts by tens of percent over minutes)
    samples: dict = {}
    pairs: dict = {}
    for r in range(1 + args.repeats):
        for d in DOMAINS:
            for name, cfg in variants.items():
                if cfg is None:
                    continue
                base, res = measure(None, d), measure(cfg, d)
                if r:
                    samples.setdefault((name, d), []).append(res)
                    samples.setdefault(("dense", d), []).append(base)
                    pairs.setdefault((name, d), []).append(base)
        print(f"timing repeat {r}/{args.repeats} done", flush=True)
    for (name, d), xs in samples.items():
        dec, pre = [x[0] for x in xs], [x[1] for x in xs]
        base = pairs.get((name, d), xs)
        rd = [a / b[0] for a, b in zip(dec, base)]
        rp = [a / b[1] for a, b in zip(pre, base)]
        if name == "dense":
            recs.append(Record(MODEL, "dense", {"domain": d, "batch": 1}, "decode_tok_per_s", summary(dec)[0], "tok/s", spread=summary(dec)[1], repeats=len(dec)))
            recs.append(Record(MODEL, "dense", {"domain": d, "batch": 1}, "prefill_tok_per_s", summary(pre)[0], "tok/s", spread=summary(pre)[1], repeats=len(pre)))
            continue
        kind, level = name.split("@")
        p = {"domain": d, "target_sparsity": float(level), "variant": kind, "context": f"domain={d}", "batch": 1,
             "timing": f"paired with a dense run, {new} new tokens"}
        time_saved = 1 - 1 / summary(rd)[0]
        recs += [
            Record(MODEL, "module_gating", p, "decode_tok_per_s", summary(dec)[0], "tok/s", spread=summary(dec)[1], repeats=len(dec)),
            Record(MODEL, "module_gating", p, "decode_speedup", summary(rd)[0], "x dense", spread=summary(rd)[1], repeats=len(rd)),
            Record(MODEL, "module_gating", p, "prefill_speedup", summary(rp)[0], "x dense", spread=summary(rp)[1], repeats=len(rp)),
            Record(MODEL, "module_gating", p, "decode_time_saved", time_saved, "fraction"),
            Record(MODEL, "module_gating", p, "timed_modules_skipped", xs[0][2], "fraction"),
            Record(MODEL, "module_gating", p, "timed_decode_flops_skipped", xs[0][3], "fraction"),
        ]
        print(f"{name:20s} {d:9s} decode {summary(rd)[0]:.2f}x  prefill {summary(rp)[0]:.2f}x  time saved {time_saved:.3f} "
              f"(flops skipped {xs[0][3]:.3f}, modules {xs[0][2]:.3f})", flush=True)


@torch.inference_mode()
def overhead(args: argparse.Namespace, recs: list[Record]) -> None:
    """Time of the gate decision (embedding lookup, pooling, predictor) against one dense forward
    of the same 32-token prompt and one dense decode step, same process, medians of 30."""
    from transformers import DynamicCache

    model, tok = _load()
    prompt = data.windows(tok, "news", "test", PROMPT, 1)
    path = default_gates_path(MODEL, 0.25, "frozen")
    dense_prompt, dense_step, gate = [], [], []
    for _ in range(33):
        t0 = time.perf_counter()
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        model(input_ids=prompt[:, -1:], past_key_values=cache, use_cache=True, position_ids=torch.tensor([[PROMPT]]), logits_to_keep=1)
        t2 = time.perf_counter()
        dense_prompt.append(t1 - t0)
        dense_step.append(t2 - t1)
    with ln.applied(model, ModuleGatingConfig(checkpoint=str(path))):
        st = model.model
        set_context(model, domain="news")
        for _ in range(33):
            t0 = time.perf_counter()
            st.gates(st.embed(prompt))
            gate.append(time.perf_counter() - t0)
    g, dp, ds = (statistics.median(x[3:]) for x in (gate, dense_prompt, dense_step))
    p = {"target_sparsity": 0.25, "variant": "gates-frozen-domain-init", "context": "domain=news", "prompt_tokens": PROMPT}
    recs += [Record(MODEL, "module_gating", p, "gate_decision_us", g * 1e6, "us", repeats=30),
             Record(MODEL, "module_gating", p, "gate_overhead_vs_dense_prompt_forward", g / dp, "fraction", repeats=30),
             Record(MODEL, "module_gating", p, "gate_overhead_vs_dense_decode_step", g / ds, "fraction", repeats=30)]
    print(f"gate decision {g * 1e6:.0f} us = {100 * g / dp:.2f}% of a dense 32-token prompt forward, {100 * g / ds:.2f}% of one dense decode step", flush=True)


TASKS = ("mr", "rt", "tweets")
ENC = "minilm-l6"


@torch.no_grad()
def encoder_task_masks(clf, tok, k: int) -> GatePredictor:  # type: ignore[no-untyped-def]
    """Per task, the greedy removal of ``k`` modules by the task head's cross-entropy on 256
    calibration rows of that task (not train, not test); the no-task row skips the ``k`` modules
    most tasks skip. Returns a predictor holding these masks (margin 3)."""
    from lazyneuron import tasks

    n = len(clf.bert.encoder.layer)
    tmp = cache_dir("checkpoints") / f"{ENC}.all-keep.safetensors"
    static_predictor(clf, []).save(tmp)
    masks = {}
    with ln.applied(clf, ModuleGatingConfig(checkpoint=str(tmp))):
        st = clf.bert.encoder
        for t in TASKS:
            bl = tasks.make_batches(tok, tasks.subsample(data.labeled(t, "calibration"), 256), 64, sort=True)
            clf.for_task(t)

            def score(keep: torch.Tensor) -> float:
                st.force = keep
                return statistics.mean(float(F.cross_entropy(clf(b.input_ids, b.attention_mask), b.labels)) for b in bl)

            keep = torch.ones(n, len(MODULES), dtype=torch.bool)
            for _ in range(k):
                cands = [tuple(c) for c in keep.nonzero().tolist()]
                trial = {}
                for c in cands:
                    kp = keep.clone()
                    kp[c] = False
                    trial[c] = score(kp)
                best = min(trial, key=trial.get)
                keep[best] = False
            masks[t] = keep
            print(f"encoder search {t}: skip {[(j, MODULES[m]) for j, m in (~keep).nonzero().tolist()]} (calibration CE {score(keep):.4f}, "
                  f"dense {score(torch.ones_like(keep)):.4f})", flush=True)
        st.force = None
    votes = sum((~m).float() for m in masks.values()) + 1e-3 * torch.arange(n * len(MODULES)).view(n, -1).flip(0)  # ties: later layers
    none = torch.ones(n, len(MODULES), dtype=torch.bool)
    none.view(-1)[votes.flatten().topk(k).indices] = False
    pred = GatePredictor(clf.config.hidden_size, n, {"task": list(TASKS)}, gate_tokens=64, model_type=clf.config.model_type)
    pred.init_masks({"task": {None: none, **masks}})
    return pred


def encoder(args: argparse.Namespace, recs: list[Record]) -> None:
    """MiniLM-L6 shared by three classification tasks, contexts = task, 30% of modules skipped."""
    from lazyneuron import tasks

    cap = 300 if args.quick else args.encoder_rows
    test_rows = {t: tasks.subsample(data.labeled(t, "test"), 200 if args.quick else 2000) for t in TASKS}
    # single-task dense baselines on the same train rows as the multi-task model
    single = {t: tasks.finetuned_classifier(ENC, t, quick=args.quick, max_rows=cap, epochs=args.encoder_epochs)[0] for t in TASKS}
    clf, tok = tasks.finetuned_multitask(ENC, TASKS, max_rows=cap, epochs=args.encoder_epochs)
    tests = {t: tasks.make_batches(tok, test_rows[t], 32, sort=True) for t in TASKS}
    dense_acc = {t: tasks.accuracy(single[t], tests[t]) for t in TASKS}
    multi_acc = {t: tasks.accuracy(clf.for_task(t), tests[t]) for t in TASKS}
    for t in TASKS:
        recs.append(Record(ENC, "dense", {"task": t, "model": "single-task"}, "accuracy", dense_acc[t], "fraction"))
        recs.append(Record(ENC, "dense", {"task": t, "model": "multi-task"}, "accuracy", multi_acc[t], "fraction"))
    level = args.encoder_target
    searched = args.encoder_init == "search"
    path = cache_dir("checkpoints") / f"{ENC}-multitask-gates-{round(level * 100):02d}-{cap}x{args.encoder_epochs}{'-searched' if searched else ''}"
    variant = "gates-full-searched" if searched else "gates-full"
    if not Path(str(path) + ".safetensors").exists() or args.retrain:
        import random

        train = tasks.task_batches(tok, {t: tasks.subsample(data.labeled(t, "train"), cap) for t in TASKS}, 32, seed=1)
        random.Random(1).shuffle(train)
        batches = [((t, b), {"task": [t] * len(b.labels)}) for t, b in train]

        def fwd(m, x):  # type: ignore[no-untyped-def]
            getattr(m, "module", m).task = x[0]
            return m(x[1].input_ids, x[1].attention_mask)

        def loss(logits, batch, teacher, T=2.0):  # type: ignore[no-untyped-def]
            b = batch[0][1]
            kd = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(teacher / T, -1), log_target=True, reduction="batchmean") * T * T
            return 0.5 * F.cross_entropy(logits, b.labels) + 0.5 * kd

        n = len(clf.bert.encoder.layer)
        if searched:  # per-task greedy masks on held-out rows, then every weight fine-tuned with the masks held
            k = round(level * n * len(MODULES))
            pred = encoder_task_masks(clf, tok, k)
            level = k / (n * len(MODULES))
            cfg = GateTraining(target=level, full_finetune=True, base_lr=3e-5, lr=1e-4, tau=(0.5, 0.1), task_loss=loss, epochs=1,
                               estimator="relaxed", context_dropout=0.0)
        else:
            pred = GatePredictor(clf.config.hidden_size, n, {"task": list(TASKS)}, gate_tokens=64, model_type=clf.config.model_type, init_keep=0.9)
            cfg = GateTraining(target=level, full_finetune=True, base_lr=3e-5, lr=3e-3, tau=(1.0, 0.2), task_loss=loss, epochs=1)
        train_gates(clf, batches, {"task": list(TASKS)}, cfg, gate_tokens=64, forward=fwd, init=pred)
        calibrate_threshold(clf, [(b, ctx) for (t, b), ctx in batches[:120]], level,
                            embed=lambda b: (clf.bert.embeddings(input_ids=b.input_ids), b.attention_mask.bool()))
        st = clf.bert.encoder
        st.predictor.meta.update({"target_sparsity": level, "tasks": list(TASKS)})
        st.predictor.save(str(path) + ".safetensors")
        ln.revert_(clf)
        clf.save(str(path) + ".classifier.safetensors", {"note": "fine-tuned jointly with the gates of the same name"})
    gclf = tasks.MultiTaskClassifier.load(str(path) + ".classifier.safetensors", ln.models.load(ENC)[0]).eval()
    cfg = ModuleGatingConfig(checkpoint=str(path) + ".safetensors")
    costs = module_costs(gclf)
    with ln.applied(gclf, cfg):
        st = gclf.bert.encoder
        masks = {}
        for t in TASKS:
            set_context(gclf, task=t)
            st.track, st.history = True, []
            acc = tasks.accuracy(gclf.for_task(t), tests[t])
            keep = torch.cat(st.history).float()
            st.track = False
            masks[t] = keep.mean(0)
            skipped = 1 - float(keep.mean())
            flops = float(((1 - keep) * costs).sum((1, 2)).mean() / costs.sum())
            p = {"task": t, "target_sparsity": level, "variant": variant, "context": f"task={t}"}
            recs += [Record(ENC, "module_gating", p, "accuracy", acc, "fraction"),
                     Record(ENC, "module_gating", p, "accuracy_drop_points", 100 * (dense_acc[t] - acc), "points vs single-task dense"),
                     Record(ENC, "module_gating", p, "modules_skipped", skipped, "fraction"),
                     Record(ENC, "module_gating", p, "flops_skipped", flops, "fraction of block weights")]
            print(f"encoder {t:7s} acc {acc:.4f} (single-task dense {dense_acc[t]:.4f}, multi-task dense {multi_acc[t]:.4f}) "
                  f"skipped {skipped:.3f} weights {flops:.3f}", flush=True)
        diffs = [float(((masks[a] > 0.5) != (masks[b] > 0.5)).float().mean()) for i, a in enumerate(TASKS) for b in TASKS[i + 1:]]
        recs.append(Record(ENC, "module_gating", {"target_sparsity": level, "variant": variant}, "mask_difference_between_tasks",
                           statistics.mean(diffs), "fraction of decisions"))
        (OUT / f"gating_keep_encoder_{round(level * 100):02d}{'_searched' if searched else ''}.json").write_text(json.dumps({t: masks[t].tolist() for t in TASKS}))
    # throughput: the gated multi-task model vs the dense single-task model of each task, interleaved
    sizes = {1: 64 if args.quick else 150, 32: 10_000}
    for bs, limit in sizes.items():
        samples: dict = {}
        for r in range(1 + args.repeats):
            for t in TASKS:
                bl = tasks.make_batches(tok, test_rows[t][:limit], bs, seed=0)
                samples.setdefault(("dense", t), []).append(tasks.sentences_per_s(single[t], bl, warmup=2)) if r else None
                with ln.applied(gclf, cfg):
                    set_context(gclf, task=t)
                    gclf.for_task(t)
                    x = tasks.sentences_per_s(gclf, bl, warmup=2)
                if r:
                    samples.setdefault(("gated", t), []).append(x)
        for t in TASKS:
            d, g = samples[("dense", t)], samples[("gated", t)]
            ratio = summary([a / b for a, b in zip(g, d)])
            p = {"task": t, "target_sparsity": level, "variant": variant, "context": f"task={t}", "batch": bs}
            recs += [Record(ENC, "dense", {"task": t, "batch": bs}, "encoder_sentences_per_s", summary(d)[0], "sentences/s", spread=summary(d)[1], repeats=len(d)),
                     Record(ENC, "module_gating", p, "encoder_sentences_per_s", summary(g)[0], "sentences/s", spread=summary(g)[1], repeats=len(g)),
                     Record(ENC, "module_gating", p, "encoder_speedup", ratio[0], "x dense", spread=ratio[1], repeats=len(g))]
            print(f"encoder {t:7s} batch {bs:2d}: {summary(g)[0]:7.1f} sentences/s = {ratio[0]:.2f}x dense", flush=True)


def draw(path: Path) -> None:
    """One line per variant (its settings, the share of modules skipped, as points): perplexity as
    the geometric mean over the four domains of the ratio to dense (log scale), and decode speed-up
    as the mean over domains."""
    import math

    recs = [r for r in read(path) if r["method"] == "module_gating"]

    def mean_over_domains(metric: str, geo: bool) -> list[dict]:
        groups: dict[tuple[str, float], list[float]] = {}
        for r in recs:
            if r["metric"] == metric and "target_sparsity" in r["params"]:
                groups.setdefault((r["params"]["variant"], r["params"]["target_sparsity"]), []).append(r["value"])
        out = []
        for (v, t), vals in groups.items():
            val = 100 * (math.exp(sum(math.log(1 + x / 100) for x in vals) / len(vals)) - 1) if geo else sum(vals) / len(vals)
            out.append({"model": MODEL, "method": LABELS.get(v, v), "params": {"target_sparsity": t}, "metric": metric, "value": val})
        return out

    plots.xy(mean_over_domains("ppl_delta_pct", True), OUT / "gating_ppl_vs_skipped.png", "target_sparsity", "ppl_delta_pct", "",
             title="SmolLM2-135M module gating: perplexity vs modules skipped (geometric mean of 4 domains, test split)")
    if any(r["metric"] == "decode_speedup" for r in recs):
        plots.xy(mean_over_domains("decode_speedup", False), OUT / "gating_speed_vs_skipped.png", "target_sparsity", "decode_speedup", "",
                 title="SmolLM2-135M module gating: decode speed-up vs modules skipped (batch 1, mean of 4 domains)")
    for f in sorted(OUT.glob("gating_keep_*.json")):
        plots.gates(json.loads(f.read_text()), OUT / (f.stem.replace("gating_keep_", "gating_gates_") + ".png"), title=f.stem.replace("gating_keep_", ""))


LABELS = {  # README row names
    "static": "static", "gates-frozen-domain-init": "frozen, domain-init", "gates-frozen-global-init": "frozen, global-init",
    "gates-lowrank-domain-init": "lowrank, domain-init", "gates-lowrank-global-init": "lowrank, global-init",
    "gates-frozen-search-init": "frozen, searched", "gates-frozen-vsearch-init": "frozen, searched + verified",
    "gates-lowrank-search-init": "lowrank (LM), searched", "dense-lowrank": "dense + adapters (LM)",
}

PAIRED = ("gates-frozen-search-init", "gates-frozen-vsearch-init", "gates-lowrank-search-init")  # rows of the paired table against static


def _num(x: float) -> str:
    return f"{x:.1f}" if x < 1000 else f"{x:.1e}".replace("e+0", "e").replace("e+", "e")


def tables(path: Path) -> str:
    """The README's quality and timing tables (markdown), from the records."""
    recs = read(path)
    get = {(r["method"], r["params"].get("variant"), r["params"].get("target_sparsity"), r["params"].get("domain"), r["metric"]): r["value"]
           for r in recs if r["params"].get("part") in ("quality", "timing")}
    dense = {d: get[("dense", None, None, d, "perplexity")] for d in DOMAINS}
    rows = sorted({(lv, v) for (m, v, lv, d, metric) in get if m == "module_gating" and metric == "perplexity"},
                  key=lambda x: (x[0] == 0, x[0], list(LABELS).index(x[1]) if x[1] in LABELS else 99))
    out = ["| skipped | variant | " + " | ".join(f"{d} ({'dense ' if i == 0 else ''}{dense[d]:.1f})" for i, d in enumerate(DOMAINS))
           + " | achieved skipped |", "|---|---|" + "---|" * (len(DOMAINS) + 1)]
    for lv, v in rows:
        ppl = [get[("module_gating", v, lv, d, "perplexity")] for d in DOMAINS]
        best = [min(get.get(("module_gating", w, lv, d, "perplexity"), math.inf) for (l2, w) in rows if l2 == lv) for d in DOMAINS]
        cells = [f"**{_num(x)}**" if x == b and lv > 0 else _num(x) for x, b in zip(ppl, best)]
        sk = statistics.mean(get[("module_gating", v, lv, d, "modules_skipped")] for d in DOMAINS)
        out.append(f"| {lv:.0%} | {LABELS.get(v, v)} | " + " | ".join(cells) + f" | {sk:.3f} |")
    paired = [(lv, v) for lv, v in rows if v in PAIRED and ("module_gating", v, lv, DOMAINS[0], "loss_delta_vs_static") in get]
    if paired:  # per-window loss differences against static on the same windows: mean ± standard error, nats per token
        out += ["", "| skipped | variant | " + " | ".join(DOMAINS) + " | better than static |", "|---|---|" + "---|" * (len(DOMAINS) + 1)]
        for lv, v in paired:
            dl = [(get[("module_gating", v, lv, d, "loss_delta_vs_static")], get[("module_gating", v, lv, d, "loss_delta_vs_static_se")]) for d in DOMAINS]
            out.append(f"| {lv:.0%} | {LABELS.get(v, v)} | " + " | ".join(f"{m:+.3f} ± {se:.3f}".replace("-", "−") for m, se in dl)
                       + f" | {sum(m < 0 for m, _ in dl)} of {len(dl)} ({sum(m < -2 * se for m, se in dl)} by > 2 s.e.) |")
    trows = sorted({(lv, v) for (m, v, lv, d, metric) in get if metric == "decode_speedup"}, key=lambda x: (x[0], list(LABELS).index(x[1])))
    proto = {(r["params"].get("variant"), r["params"].get("target_sparsity")): (r["params"].get("timing", ""), r.get("repeats"))
             for r in recs if r["params"].get("part") == "timing" and r["metric"] == "decode_speedup"}
    if trows:
        out += ["", "| skipped | variant | decode × dense (" + " / ".join(DOMAINS) + ") | prefill × | decode time saved (min–max) | decode weight reads skipped"
                " | saved / skipped (min) | new tokens × rounds |", "|---|---|---|---|---|---|---|---|"]
        for lv, v in trows:
            sp = [get[("module_gating", v, lv, d, "decode_speedup")] for d in DOMAINS]
            pf = statistics.mean(get[("module_gating", v, lv, d, "prefill_speedup")] for d in DOMAINS)
            ts = [get[("module_gating", v, lv, d, "decode_time_saved")] for d in DOMAINS]
            fl = statistics.mean(get[("module_gating", v, lv, d, "timed_decode_flops_skipped")] for d in DOMAINS)
            ratio = min(t / get[("module_gating", v, lv, d, "timed_decode_flops_skipped")] for t, d in zip(ts, DOMAINS))
            how, reps = proto[(v, lv)]
            ntok = how.split(", ")[-1].split(" ")[0] if how else "?"
            out.append(f"| {lv:.0%} | {LABELS.get(v, v)} | " + " / ".join(f"{x:.2f}" for x in sp) + f" | {pf:.2f} | "
                       f"{100 * statistics.mean(ts):.1f}% ({100 * min(ts):.1f}–{100 * max(ts):.1f}%) | {100 * fl:.1f}% | {ratio:.2f} | {ntok} × {reps} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "orders", "search", "quality", "timing", "overhead", "encoder"], default="all")
    ap.add_argument("--encoder-target", type=float, default=0.3)
    ap.add_argument("--encoder-rows", type=int, default=2000, help="train rows per task (MiniLM fine-tuning costs ~1.5 s per batch of 32 here)")
    ap.add_argument("--encoder-epochs", type=int, default=1)
    ap.add_argument("--encoder-init", choices=["train", "search"], default="train",
                    help="train: gates trained from scratch jointly with every weight; search: per-task greedy masks, then every weight fine-tuned with them")
    ap.add_argument("--kinds", default="frozen,lowrank", help="gate kinds to train and measure: frozen, lowrank")
    ap.add_argument("--steps", type=int, default=60, help="training batches (4 domains x 96 tokens each) per gate checkpoint")
    ap.add_argument("--estimator", choices=["relaxed", "straight_through"], default="relaxed")
    ap.add_argument("--inits", default="domain,global,search,vsearch",
                    help="gate starts: domain (per-domain greedy masks), global (the static mask), search (static mask improved per domain by swap "
                         "search), vsearch (the same search with swaps accepted on --verify-windows and chosen on 16 held-out windows; frozen only)")
    ap.add_argument("--search-windows", type=int, default=6, help="train windows (x 128 tokens) per domain for the swap search")
    ap.add_argument("--search-rounds", type=int, default=4)
    ap.add_argument("--verify-windows", type=int, default=16, help="train windows (x 128 tokens) per domain that accept each swap (vsearch)")
    ap.add_argument("--lm-steps", type=int, default=120, help="batches (4 domains x 128 tokens) for the adapters of the search variant")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--test-windows", type=int, default=64, help="test windows (x 128 tokens) per domain, evenly spaced over the test split (at most what it holds)")
    ap.add_argument("--repeats", type=int, default=5, help="timing rounds (in each, every variant right after a dense run on the same prompt)")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode length of each timed generation")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)),
                    help="target sparsities to time (--part timing); the records of the other levels are kept")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--plots-only", action="store_true")
    ap.add_argument("--tables", action="store_true", help="print the README tables (markdown) from the records")
    args = ap.parse_args()
    args.kinds = tuple(k for k in args.kinds.split(",") if k)
    args.inits = tuple(k for k in args.inits.split(",") if k)
    args.levels = tuple(float(x) for x in args.levels.split(",") if x)
    logging.basicConfig(level=logging.WARNING)
    path = OUT / ("gating_quick.jsonl" if args.quick else "gating.jsonl")
    if args.plots_only:
        draw(path)
        return
    if args.tables:
        print(tables(path))
        return
    torch.set_num_threads(2)
    if args.part == "orders":
        model, tok = _load()
        total = len(model.model.layers) * len(MODULES)
        static_order(model, tok, round(max(LEVELS) * total), args.quick)
        domain_orders(model, tok, round(max(LEVELS) * total))
        return
    if args.part == "search":
        model, tok = _load()
        total = len(model.model.layers) * len(MODULES)
        order = static_order(model, tok, round(max(LEVELS) * total), args.quick)
        for level in LEVELS:
            if "search" in args.inits:
                searched_masks(model, tok, level, order, args)
            if "vsearch" in args.inits:
                searched_masks(model, tok, level, order, args, args.verify_windows, 16)
        return
    for part in (("quality", "timing", "overhead", "encoder") if args.part == "all" else (args.part,)):
        recs: list[Record] = []
        {"quality": quality, "timing": timing, "overhead": overhead, "encoder": encoder}[part](args, recs)
        enc_variant = "gates-full-searched" if args.encoder_init == "search" else "gates-full"

        def replaced(r: dict) -> bool:  # the encoder part replaces only its own variant (and the dense rows it remeasures),
            # the timing part only the levels it timed (and the dense rows)
            if r["params"].get("part") != part:
                return False
            if part == "timing":
                return r["params"].get("target_sparsity") in (None, *args.levels)
            return part != "encoder" or r["params"].get("variant") in (None, enc_variant)

        old = [r for r in read(path) if not replaced(r)] if path.exists() else []
        for r in recs:
            r.params["part"] = part
        write(old, path, append=False)
        write(recs, path)
    if not args.quick:  # the plots are the full run's
        draw(path)


if __name__ == "__main__":
    main()
