"""Decode after long prompts: the runtime against llama.cpp as the KV cache grows, SmolLM2-135M.

    .venv/bin/python benchmarks/long_context.py            # ~4 min on 2 cores
    .venv/bin/python benchmarks/long_context.py --quick    # smoke run

Writes benchmarks/results/long_context.jsonl: per prompt length (128, 512, 1,024 news tokens) and
weight format (lazyneuron fp32 / bf16 / int8 beside llama.cpp f32 / f16 / q8_0; bf16 and int8 also
with the runtime's bf16 key / value cache, ``kv_cache`` in the records' params), batch-1 decode
tokens/s of 64 new tokens (medians over repeats) and ``ratio_vs_llama_cpp_decode_tps_b1``, the
median of per-repeat ratios, each from the two engines decoding the same prompt back to back (in
alternating order). Every step attends over the whole cache, so the share of a step spent in
attention grows with the prompt. llama.cpp keeps its cache in f16 (its default); lazyneuron in fp32
unless ``kv_cache=bf16``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import torch

import lazyneuron as ln
from lazyneuron import data, runtime
from lazyneuron.bench import Record, peers, write
from lazyneuron.runtime import RuntimeConfig

OUT = Path(__file__).parent / "results"
MODEL = "smollm2-135m"
PEER = {"fp32": "f32", "bf16": "f16", "int8": "q8_0"}
VARIANTS = [("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"), ("int8", "fp32"), ("int8", "bf16")]  # (weights, cache)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(OUT / "long_context.jsonl"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    if not peers.available():
        raise SystemExit(f"llama.cpp is not installed; {peers.INSTALL}")
    recs = measure(args.quick, args.new_tokens, 2 if args.quick else args.repeats)
    write(recs, args.out, append=False)
    for r in recs:
        if r["metric"] == "ratio_vs_llama_cpp_decode_tps_b1":
            print(f"{r['dtype']:>5} cache {r['params']['kv_cache']:>4} prompt {r['params']['prompt_tokens']:>5}: {r['value']:.2f}x llama.cpp {r['params']['peer_dtype']}")


def measure(quick: bool, new_tokens: int, repeats: int) -> list[dict[str, Any]]:
    run = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    threads = torch.get_num_threads()
    model, tok = ln.models.load(MODEL)
    lengths = (128, 512) if quick else (128, 512, 1024)
    stream = data.token_stream(tok, "news", "test", max(lengths))
    prompts = {n: torch.tensor([stream[:n]], dtype=torch.long) for n in lengths}
    from lazyneuron.models import BUILTIN
    from lazyneuron.paths import package_dir

    info = BUILTIN[MODEL]
    src = package_dir(info["module"], info["package"], MODEL, info["install"]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ctx = max(lengths) + new_tokens + 8
    samples: dict[tuple[str, str, str, int], list[float]] = {}
    recs: list[dict[str, Any]] = []
    decs: dict[str, Any] = {}
    for dt, kv in VARIANTS:
        fmt = PEER[dt]
        dec = decs.get(fmt) or decs.setdefault(fmt, peers.LlamaCppDecoder(peers.llama_cpp_gguf(src, fmt), threads, n_ctx=ctx))
        with ln.applied(model, [RuntimeConfig(dtype=dt, kv_cache=kv)]):
            for r in range(repeats + 1):  # repeat 0 warms up
                for n, ids in prompts.items():
                    first = r % 2  # alternate which engine goes first
                    for turn in range(2):
                        if turn == first:
                            _, (_, td) = runtime.generate(model, ids, new_tokens, return_timing=True)
                            own = (new_tokens - 1) / td
                        else:
                            _, (_, tp) = dec.generate(ids, new_tokens)
                            peer = (new_tokens - 1) / tp
                    if r:
                        samples.setdefault(("lazyneuron", dt, kv, n), []).append(own)
                        samples.setdefault(("llama.cpp", fmt, "f16", n), []).append(peer)
                        samples.setdefault(("pair", dt, kv, n), []).append(own / peer)
                logging.info("%s (cache %s) repeat %d/%d done", dt, kv, r, repeats)

    def rec(engine: str, dtype: str, metric: str, value: float, unit: str, xs: list[float], **params: Any) -> None:
        r = Record(MODEL, "dense", {"threads": threads, "new_tokens": new_tokens, **params}, metric, float(value), unit, dtype=dtype,
                   spread=max(xs) - min(xs), repeats=len(xs)).to_dict()
        recs.append({"run": run, "engine": engine, **r})

    for (engine, dt, kv, n), xs in samples.items():
        if engine == "pair":
            rec("lazyneuron", dt, "ratio_vs_llama_cpp_decode_tps_b1", statistics.median(xs), "x", xs, prompt_tokens=n, peer_dtype=PEER[dt], kv_cache=kv)
        else:
            rec(engine, dt, "decode_tps_b1", statistics.median(xs), "tok/s", xs, prompt_tokens=n, kv_cache=kv)
    return recs


if __name__ == "__main__":
    main()
