"""The runtime against torch and llama.cpp on SmolLM2-135M, one interleaved run, same machine.

    .venv/bin/python benchmarks/runtime.py            # ~12 min on 2 cores
    .venv/bin/python benchmarks/runtime.py --quick    # smoke run
    .venv/bin/python benchmarks/runtime.py --plots-only

Writes benchmarks/results/runtime.jsonl (one JSON object per measurement: run, engine, model,
method, dtype, metric, value, ...) and benchmarks/results/runtime_decode.png.

Engines:
- ``torch``: the eager Hugging Face model (fp32), decoded with the lean loop;
- ``lazyneuron``: the runtime (fp32, bf16, int8 weights; the lean decode step), dense and with
  activation sparsity (TEAL rule) at 50% and at 25% (the level whose news perplexity stays within
  5% of dense in benchmarks/results/activation_sparsity.jsonl);
- ``llama.cpp`` (when ``llama-cpp-python`` is installed: ``bash scripts/setup.sh --with-peers``):
  the Q4_1 GGUF that lazyneuron's SmolLM2 is dequantized from, requantized to F32 / F16 / Q8_0.

Every repeat runs every variant once, in turn (decode at batch 1 on the same 64-token news prompt
and the same number of new tokens for every engine, with torch's threads, 2 here; for the dense
variants and fp32 sparsity also decode at batch 8 and prefill of 64 and 256 tokens); values are
medians over repeats, and ``ratio_vs_*`` records are medians of per-repeat ratios: against the
eager model, and against llama.cpp at the same precision (f32, f16, q8_0), which is decoded right
beside each lazyneuron variant (before it in odd repeats, after it in even ones), so that each
ratio comes from two decodes a second apart; host drift moves far less than absolute tokens/s. ``pct_of_bandwidth`` = weight bytes read per token x tokens/s / the in-run probe
(a vectorised read of 512 MB, measured before each repeat; the median is recorded).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

import lazyneuron as ln
from lazyneuron import data, runtime
from lazyneuron.bench import Record, read, write
from lazyneuron.bench import peers
from lazyneuron.bench.accounting import linear_weight_elements, skipped_fraction, tracking
from lazyneuron.bench.decode import lean_generate
from lazyneuron.bench.quality import perplexity
from lazyneuron.kernels.gemv import read_bandwidth
from lazyneuron.methods import ActivationSparsityConfig as AS
from lazyneuron.runtime import RuntimeConfig

OUT = Path(__file__).parent / "results"
MODEL = "smollm2-135m"
BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0 + 4 / 576, "f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_1": 20 / 32}
SPARSE = {"50%": 0.5, "25%": 0.25}
PEER = {"fp32": "f32", "bf16": "f16", "int8": "q8_0"}  # llama.cpp's format at each lazyneuron precision


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(OUT / "runtime.jsonl"))
    ap.add_argument("--plots-only", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the markdown tables of the records in --out (README, docs/runtime.md)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.table:
        print(table(read(args.out)))
        return
    if args.plots_only:
        draw(read(args.out), OUT / "runtime_decode.png")
        return
    recs = measure(args.quick, args.new_tokens, 2 if args.quick else args.repeats)
    write(recs, args.out, append=False)
    draw(recs, OUT / "runtime_decode.png")


def measure(quick: bool, new_tokens: int, repeats: int) -> list[dict[str, Any]]:
    run = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    threads = torch.get_num_threads()
    model, tok = ln.models.load(MODEL)
    prompt = torch.tensor([data.token_stream(tok, "news", "test", 64)[:64]], dtype=torch.long)  # (1, 64)
    prompts8 = torch.tensor(data.token_stream(tok, "news", "test", 8 * 64)[: 8 * 64], dtype=torch.long).view(8, 64)
    windows = data.windows(tok, "news", "test", 256, 2 if quick else 8, spread=True)
    cal = ln.calibrate(model, data.texts("news", "calibration")[: 8 if quick else 32], AS(rule="teal"), tok, progress=True)
    n_weights = linear_weight_elements(model)

    variants: list[tuple[str, str, str, list[Any], Callable[..., Any]]] = [("torch", "dense", "fp32", [], lean_generate)]
    for dt in ("fp32", "bf16", "int8"):
        variants.append(("lazyneuron", "dense", dt, [RuntimeConfig(dtype=dt)], runtime.generate))
    for dt in ("fp32", "bf16"):
        for label, s in SPARSE.items():
            cfg = AS(rule="teal", sparsity=s)
            variants.append(("lazyneuron", f"activation_sparsity:rule=teal,sparsity={s}", dt, [cfg, RuntimeConfig(dtype=dt)], runtime.generate))
    lcpp: dict[str, peers.LlamaCppDecoder] = {}
    if peers.available():
        from lazyneuron.models import BUILTIN
        from lazyneuron.paths import package_dir

        info = BUILTIN[MODEL]
        src = package_dir(info["module"], info["package"], MODEL, info["install"]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        for fmt in ("f32", "f16", "q8_0", "q4_1"):
            lcpp[fmt] = peers.LlamaCppDecoder(peers.llama_cpp_gguf(src, fmt), threads, n_ctx=512)
    else:
        logging.warning("llama.cpp is not installed, so it is left out of this run; %s", peers.INSTALL)

    recs: list[dict[str, Any]] = []

    def rec(engine: str, method: str, dtype: str, metric: str, value: float, unit: str, spread: float | None = None, n: int | None = None, **params: Any) -> None:
        r = Record(MODEL, method, {"threads": threads, "new_tokens": new_tokens, **params}, metric, float(value), unit, dtype=dtype, spread=spread, repeats=n).to_dict()
        recs.append({"run": run, "engine": engine, **r})

    # quality and the share of weights each variant reads, once per variant
    bytes_per_token: dict[tuple[str, str, str], float] = {}
    for engine, method, dt, cfgs, _ in variants:
        with ln.applied(model, cfgs or None, cal):
            rec(engine, method, dt, "ppl_news", perplexity(model, windows), "ppl", windows=int(windows.shape[0]), length=256)
            skipped = 0.0
            if "sparsity" in method:
                with tracking(model):
                    runtime.generate(model, prompt, 16)
                skipped = skipped_fraction(model)
                rec(engine, method, dt, "skipped_weight_fraction", skipped, "fraction")
            bytes_per_token[(engine, method, dt)] = n_weights * BYTES[dt] * (1 - skipped)
    for fmt, dec in lcpp.items():
        bytes_per_token[("llama.cpp", "dense", fmt)] = n_weights * BYTES[fmt]
        try:
            rec("llama.cpp", "dense", fmt, "ppl_news", dec.perplexity(windows), "ppl", windows=int(windows.shape[0]), length=256)
        except Exception as e:  # an older llama-cpp-python without per-position logits: speed only
            logging.warning("llama.cpp perplexity skipped (%s)", e)

    # every repeat runs every variant once, in turn: decode at batch 1 (and llama.cpp), then for the
    # dense variants and fp32 sparsity decode at batch 8 and prefill; ratios are taken per repeat
    samples: dict[tuple[str, str, str, str], list[float]] = {}
    n8 = 16 if quick else 32
    pre = {n: torch.tensor([data.token_stream(tok, "news", "test", n)[:n]], dtype=torch.long) for n in (64, 256)}

    def add(key: tuple[str, str, str, str], value: float, r: int) -> None:
        if r:  # repeat 0 warms up
            samples.setdefault(key, []).append(value)

    for r in range(repeats + 1):
        add(("probe", "read", "fp32", "bandwidth_gbps"), read_bandwidth(), r)
        for engine, method, dt, cfgs, gen in variants:
            with ln.applied(model, cfgs or None, cal):
                dec = lcpp.get(PEER.get(dt, "")) if engine == "lazyneuron" else None
                if dec is not None and r % 2:  # the peer at this precision right beside it, in alternating order
                    tp = dec.generate(prompt, new_tokens)[1][1]
                _, (_, td) = gen(model, prompt, new_tokens, return_timing=True)
                if dec is not None and not r % 2:
                    tp = dec.generate(prompt, new_tokens)[1][1]
                add((engine, method, dt, "decode_tps_b1"), (new_tokens - 1) / td, r)
                if dec is not None:
                    add(("pair", engine, method, dt), tp / td, r)
                if "sparsity" in method and dt != "fp32":
                    continue
                _, (_, td) = gen(model, prompts8, n8, return_timing=True)
                add((engine, method, dt, "decode_tps_b8"), 8 * (n8 - 1) / td, r)
                for n, ids in pre.items():
                    with torch.inference_mode():
                        t0 = time.perf_counter()
                        model(input_ids=ids, use_cache=False, logits_to_keep=1)
                        add((engine, method, dt, f"prefill_tps_{n}"), n / (time.perf_counter() - t0), r)
        for fmt, dec in lcpp.items():
            _, (_, td) = dec.generate(prompt, new_tokens)
            add(("llama.cpp", "dense", fmt, "decode_tps_b1"), (new_tokens - 1) / td, r)
        logging.info("repeat %d/%d done", r, repeats)

    for engine, method, dt, cfgs, _ in variants:  # how a step's time splits between the GEMV kernels and the rest
        if engine == "lazyneuron" and method == "dense":
            with ln.applied(model, cfgs, cal):  # the median of three profiles: one moves with the host's drift
                profs = sorted((runtime.step_profile(model, prompt) for _ in range(3)), key=lambda p: p["non_gemv_share"])
            prof = profs[1]
            rec(engine, method, dt, "non_gemv_share", prof["non_gemv_share"], "fraction of a decode step", profs[2]["non_gemv_share"] - profs[0]["non_gemv_share"], 3,
                step_ms=1e3 * prof["step_s"], gemv_ms=1e3 * prof["gemv_s"], kernel_calls=prof["kernel_calls"])

    pairs = {k[1:]: samples.pop(k) for k in [k for k in samples if k[0] == "pair"]}
    probe = samples.pop(("probe", "read", "fp32", "bandwidth_gbps"))
    bw = statistics.median(probe)
    rec("probe", "read", "fp32", "bandwidth_gbps", bw, "GB/s", max(probe) - min(probe), len(probe))
    for (engine, method, dt, metric), xs in samples.items():
        med = statistics.median(xs)
        extra = {"prompt_tokens": int(metric.rpartition("_")[2])} if metric.startswith("prefill") else {}
        rec(engine, method, dt, metric.rpartition("_")[0] if extra else metric, med, "tok/s", max(xs) - min(xs), len(xs), **extra)
        base = samples.get(("torch", "dense", "fp32", metric))
        if engine == "lazyneuron" and base:  # against the eager model, per repeat
            ratios = [a / b for a, b in zip(xs, base)]
            rec(engine, method, dt, "ratio_vs_torch_" + metric, statistics.median(ratios), "x", max(ratios) - min(ratios), len(ratios), **extra)
        if metric == "decode_tps_b1":
            key = (engine, method, dt)
            rec(engine, method, dt, "pct_of_bandwidth", 100 * bytes_per_token[key] * med / (bw * 1e9), "%", bytes_per_token=bytes_per_token[key], probe_gbps=bw)
            ratios = pairs.get((engine, method, dt))
            if ratios:  # against llama.cpp at the same precision, each ratio from two decodes run back to back
                rec(engine, method, dt, "ratio_vs_llama_cpp_decode_tps_b1", statistics.median(ratios), "x", max(ratios) - min(ratios), len(ratios),
                    peer_dtype=PEER[dt])
    return recs


def table(recs: list[dict[str, Any]]) -> str:
    """Markdown: decode at batch 1 per engine / weights / method, then the runtime's other ratios."""
    val: dict[tuple[str, str, str, str], float] = {}
    for r in recs:
        m = r["metric"] + (f"_{r['params']['prompt_tokens']}" if r["metric"] == "prefill_tps" else "")
        val[(r["engine"], r["method"], r["dtype"], m)] = r["value"]
    keys = sorted({k[:3] for k in val if k[3] == "decode_tps_b1"}, key=lambda k: (["torch", "llama.cpp", "lazyneuron"].index(k[0]), list(BYTES).index(k[2]), k[1] != "dense", k[1]))

    def g(k: tuple[str, str, str], m: str, fmt: str) -> str:
        v = val.get((*k, m))
        return "" if v is None else fmt.format(v)

    def name(method: str) -> str:
        return "dense" if method == "dense" else "TEAL " + method.rpartition("=")[2].replace("0.", "").ljust(2, "0") + "%"

    bw = val.get(("probe", "read", "fp32", "bandwidth_gbps"))
    out = [f"decode, batch 1, 64-token news prompt, 64 new tokens, 2 threads; memory read bandwidth measured in the run: {bw:.1f} GB/s", "",
           "| engine | weights | method | decode tok/s | x llama.cpp (same precision) | x torch eager | % of bandwidth | news perplexity |",
           "|---|---|---|---|---|---|---|---|"]
    for k in keys:
        out.append(f"| {k[0]} | {k[2]} | {name(k[1])} | {g(k, 'decode_tps_b1', '{:.1f}')} | {g(k, 'ratio_vs_llama_cpp_decode_tps_b1', '{:.2f}x')} | "
                   f"{g(k, 'ratio_vs_torch_decode_tps_b1', '{:.2f}x')} | {g(k, 'pct_of_bandwidth', '{:.0f}%')} | {g(k, 'ppl_news', '{:.2f}')} |")
    out += ["", "lazyneuron against the eager model in the same run (medians of per-repeat ratios):", "",
            "| weights | method | decode b8 | prefill 64 tokens | prefill 256 tokens | non-GEMV share of a decode step |", "|---|---|---|---|---|---|"]
    for k in keys:
        if k[0] == "lazyneuron" and (k[1] == "dense" or k[2] == "fp32"):
            out.append(f"| {k[2]} | {name(k[1])} | {g(k, 'ratio_vs_torch_decode_tps_b8', '{:.2f}x')} | {g(k, 'ratio_vs_torch_prefill_tps_64', '{:.2f}x')} | "
                       f"{g(k, 'ratio_vs_torch_prefill_tps_256', '{:.2f}x')} | {g(k, 'non_gemv_share', '{:.0%}')} |")
    return "\n".join(out)


def draw(recs: list[dict[str, Any]], out: Path) -> None:
    """Decode tokens/s, batch 1, by engine and weight format, dense and with sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in recs if r["metric"] == "decode_tps_b1"]
    if not rows:
        return
    order = {"torch": 0, "llama.cpp": 1, "lazyneuron": 2}
    rows.sort(key=lambda r: (order.get(r["engine"], 3), list(BYTES).index(r["dtype"]) if r["dtype"] in BYTES else 9, r["method"] != "dense", r["method"]))
    ppl = {(r["engine"], r["method"], r["dtype"]): r["value"] for r in recs if r["metric"] == "ppl_news"}
    dense_ppl = ppl.get(("torch", "dense", "fp32"))
    colours = {"torch": "#888888", "llama.cpp": "#d62728", "lazyneuron": "#1f77b4"}

    def label(r: dict[str, Any]) -> str:
        if r["method"] == "dense":
            return f"{r['engine']} {r['dtype']} dense"
        p = ppl.get((r["engine"], r["method"], r["dtype"]))
        delta = f", ppl {100 * (p / dense_ppl - 1):+.0f}%" if p and dense_ppl else ""
        return f"{r['engine']} {r['dtype']} TEAL {float(r['method'].rpartition('=')[2]):.0%}{delta}"

    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) + 1.2))
    y = range(len(rows))
    bars = ax.barh(list(y), [r["value"] for r in rows], color=[colours.get(r["engine"], "#444") for r in rows])
    for b, r in zip(bars, rows):
        if r["method"] != "dense":
            b.set_hatch("//")
        ax.text(b.get_width() + 0.5, b.get_y() + b.get_height() / 2, f"{r['value']:.1f}", va="center", fontsize=8)
    ax.set_yticks(list(y), [label(r) for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s, batch 1 (median of repeats; higher is better)")
    ax.set_title("SmolLM2-135M decode on this CPU, one interleaved run (hatched: activation sparsity)", fontsize=9)
    ax.set_xlim(0, max(r["value"] for r in rows) * 1.15)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
