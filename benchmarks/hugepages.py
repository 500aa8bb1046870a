"""The runtime's weights on 2 MiB pages against the same weights on 4 KiB pages, one interleaved run.

    .venv/bin/python benchmarks/hugepages.py            # ~6 min on 2 cores
    .venv/bin/python benchmarks/hugepages.py --quick    # smoke run

Writes benchmarks/results/hugepages.jsonl (one JSON object per measurement: run, model, method,
dtype, hugepages, metric, value, ...):

- ``kernel``: the dense GEMV at batch 1 on the SmolLM2 layer shapes and the LM head, each weight
  copy placed in an arena on huge pages or in plain memory (copies cycled through 256 MB, beyond
  the caches), timed in turn; ``gbps`` per placement and ``ratio_hugepages`` (median of per-sample
  ratios of the time on 4 KiB pages to the time on huge pages);
- SmolLM2-135M decode at batch 1 (64-token news prompt, 64 new tokens, the lean step):
  ``RuntimeConfig(hugepages=True)`` against ``hugepages=False`` for fp32 / bf16 / int8 dense and
  TEAL 25% on fp32 / bf16, every variant applied and timed once per repeat, both placements back
  to back (their order alternating), ``ratio_hugepages`` the median of per-repeat ratios.

Each repeat starts with the bandwidth probe (``probe_gbps``): huge pages pay most when the host's
bandwidth is high, where 4 KiB pages' TLB misses and prefetch stops at page boundaries cost a
larger share of a call.
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
from lazyneuron.bench import Record, write
from lazyneuron.kernels import gemv as G
from lazyneuron.kernels.bench import _median_time, _on_hugepages, probe_now
from lazyneuron.methods import ActivationSparsityConfig as AS
from lazyneuron.runtime import RuntimeConfig
from lazyneuron.runtime.memory import available

OUT = Path(__file__).parent / "results"
MODEL = "smollm2-135m"
SHAPES = [(576, 1536), (1536, 576), (576, 576), (576, 49152)]
COLD = 256 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(OUT / "hugepages.jsonl"))
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    if not available():
        raise SystemExit("transparent huge pages are not available here (Linux with THP in madvise or always mode); nothing to compare")
    run = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    repeats = 2 if args.quick else args.repeats
    recs = kernels(run, repeats) + decode(run, repeats, args.quick)
    write(recs, args.out, append=False)
    for r in recs:
        if r["metric"] == "ratio_hugepages":
            print(f"{r['method']:>44} {r['dtype']:>5} {r['params'].get('shape', ''):>10}  x{r['value']:.3f}")


def _rec(run: str, method: str, dtype: str, metric: str, value: float, unit: str, hugepages: bool | None = None, spread: float | None = None,
         **params: Any) -> dict[str, Any]:
    r = Record(MODEL, method, {"threads": torch.get_num_threads(), **params}, metric, float(value), unit, dtype=dtype, spread=spread).to_dict()
    return {"run": run, "engine": "lazyneuron", **({} if hugepages is None else {"hugepages": hugepages}), **r}


def _copies(in_f: int, out_f: int, dtype: str, huge: bool) -> list[torch.Tensor]:
    """Random (in, out) weights in ``dtype`` filling COLD bytes, side by side in one huge-page
    arena (``huge``) or each in ordinary memory."""
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    n = max(2, -(-COLD // (in_f * out_f * (4 if dtype == "fp32" else 2))))
    ws = [torch.randn(in_f, out_f).to(tdt) for _ in range(n)]
    return _on_hugepages(ws) if huge else ws


@torch.inference_mode()
def kernels(run: str, repeats: int) -> list[dict[str, Any]]:
    recs = []
    torch.manual_seed(0)
    for in_f, out_f in SHAPES:
        for dt in ("fp32", "bf16"):
            ws = {False: _copies(in_f, out_f, dt, False), True: _copies(in_f, out_f, dt, True)}
            x = torch.randn(1, in_f)
            n = len(ws[False])
            for huge in ws:
                for k in range(n):
                    G.gemv(x, ws[huge][k])
            s: dict[bool, list[float]] = {False: [], True: []}
            probes = []
            for r in range(repeats):
                probes.append(probe_now())
                for huge in ((False, True) if r % 2 == 0 else (True, False)):
                    s[huge].append(_median_time(lambda k: G.gemv(x, ws[huge][k % n]), max(n, 3)))
            nbytes = in_f * out_f * (4 if dt == "fp32" else 2)
            shape = f"{in_f}x{out_f}"
            for huge in (False, True):
                recs.append(_rec(run, "kernel:dense", dt, "gbps", nbytes / statistics.median(s[huge]) / 1e9, "GB/s", huge, shape=shape, batch=1))
            ratios = [a / b for a, b in zip(s[False], s[True])]
            recs.append(_rec(run, "kernel:dense", dt, "ratio_hugepages", statistics.median(ratios), "x", None, shape=shape, batch=1,
                             spread=max(ratios) - min(ratios), probe_gbps=statistics.median(probes)))
            del ws
    return recs


@torch.inference_mode(False)
def decode(run: str, repeats: int, quick: bool) -> list[dict[str, Any]]:
    model, tok = ln.models.load(MODEL)
    prompt = torch.tensor([data.token_stream(tok, "news", "test", 64)[:64]], dtype=torch.long)
    cal = ln.calibrate(model, data.texts("news", "calibration")[: 8 if quick else 32], AS(rule="teal"), tok, progress=True)
    variants: list[tuple[str, str, list[Any]]] = [("dense", dt, []) for dt in ("fp32", "bf16", "int8")]
    variants += [("activation_sparsity:rule=teal,sparsity=0.25", dt, [AS(rule="teal", sparsity=0.25)]) for dt in ("fp32", "bf16")]
    samples: dict[tuple[str, str, bool], list[float]] = {}
    probes = []
    for r in range(repeats + 1):  # repeat 0 warms up
        p = probe_now()
        for method, dt, cfgs in variants:
            for huge in ((False, True) if r % 2 == 0 else (True, False)):
                with ln.applied(model, [*cfgs, RuntimeConfig(dtype=dt, hugepages=huge)], cal):
                    _, (_, td) = runtime.generate(model, prompt, 64, return_timing=True)
                if r:
                    samples.setdefault((method, dt, huge), []).append(63 / td)
        if r:
            probes.append(p)
        logging.info("repeat %d/%d done", r, repeats)
    recs = [_rec(run, "probe", "fp32", "bandwidth_gbps", statistics.median(probes), "GB/s", None, spread=max(probes) - min(probes))]
    for method, dt, _ in variants:
        plain, huge = samples[(method, dt, False)], samples[(method, dt, True)]
        for h, xs in ((False, plain), (True, huge)):
            recs.append(_rec(run, method, dt, "decode_tps_b1", statistics.median(xs), "tok/s", h, new_tokens=64))
        ratios = [b / a for a, b in zip(plain, huge)]
        recs.append(_rec(run, method, dt, "ratio_hugepages", statistics.median(ratios), "x", None, new_tokens=64, spread=max(ratios) - min(ratios)))
    return recs


if __name__ == "__main__":
    main()
