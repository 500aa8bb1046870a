"""Kernel benchmarks: sparse-input GEMV against torch ``F.linear`` and the project's own dense
kernel; the CMM tree walk (fast feedforward) against a dense ``F.linear`` feed-forward block.

Weights are cycled through enough copies to exceed the last-level cache, so every call reads from
memory as a decode step does. Times are medians over repeats, all variants interleaved in one run.
"""

from __future__ import annotations

import functools
import itertools
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import cmm as cm
from . import cmm_gpu
from . import sparse_gemv as sg

SHAPES = [(576, 1536), (1536, 576), (2048, 5632), (5632, 2048), (4096, 11008), (11008, 4096)]
SPARSITIES = [0.0, 0.5, 0.7, 0.9]
QUICK = dict(shapes=[(2048, 5632), (4096, 11008)], batches=[1, 8], sparsities=[0.0, 0.5, 0.9], dtypes=["float32"], repeats=15)
FULL = dict(shapes=SHAPES, batches=[1, 8], sparsities=SPARSITIES, dtypes=["float32", "bfloat16"], repeats=41)
COLD_BYTES = 96 << 20  # > 32 MB L3 on the reference machine


def _median_time(fn: Callable[[int], Any], calls: int) -> float:
    ts = []
    for k in range(calls):
        t0 = time.perf_counter()
        fn(k)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _threshold_for(x: torch.Tensor, s: float) -> torch.Tensor:
    """Per-token-calibrated scalar threshold giving sparsity ``s`` on ``x`` (-inf for s = 0)."""
    if s <= 0:
        return torch.tensor([float("-inf")])
    return torch.quantile(x.abs().flatten().float(), s).reshape(1)


@torch.inference_mode()
def measure(in_f: int, out_f: int, batch: int, sparsity: float, dtype: str, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    wdt = getattr(torch, dtype)
    n_copies = max(1, -(-COLD_BYTES // (in_f * out_f * (2 if dtype == "bfloat16" else 4))))
    ws = [torch.randn(out_f, in_f).to(wdt) for _ in range(n_copies)]  # (out, in): torch's layout
    wts = [w.t().contiguous() for w in ws]  # (in, out): input-channel-major
    x = torch.randn(batch, in_f)
    xt = x.to(wdt)
    thr = _threshold_for(x, sparsity)
    dense_thr = torch.tensor([float("-inf")])
    fns = {
        "torch": lambda k: F.linear(xt, ws[k % n_copies]),
        "own_dense": lambda k: sg.sparse_gemv(x, wts[k % n_copies], None, None, dense_thr),
        "sparse": lambda k: sg.sparse_gemv(x, wts[k % n_copies], None, None, thr),
    }
    for f in fns.values():  # warm-up
        for k in range(n_copies):
            f(k)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(5):  # interleave blocks so drift hits every variant alike
        for name, f in fns.items():
            samples[name].append(_median_time(f, max(3, repeats // 5)))
    t = {k: statistics.median(v) for k, v in samples.items()}
    _, rows = sg.sparse_gemv(x, wts[0], None, None, thr)
    achieved = 1 - rows / in_f  # rows skipped (union over the batch)
    ideal = t["own_dense"] * (1 - achieved)
    return {
        "kernel": "sparse_gemv", "shape": f"{in_f}x{out_f}", "batch": batch, "sparsity": sparsity, "dtype": dtype,
        "rows_skipped": round(achieved, 4), "time_torch_us": t["torch"] * 1e6, "time_own_dense_us": t["own_dense"] * 1e6,
        "time_sparse_us": t["sparse"] * 1e6, "speedup_vs_torch": t["torch"] / t["sparse"], "speedup_vs_own_dense": t["own_dense"] / t["sparse"],
        "pct_of_ideal": 100 * ideal / t["sparse"] if achieved > 0 else 100 * t["own_dense"] / t["sparse"],
        "own_dense_vs_torch": t["torch"] / t["own_dense"], "threads": torch.get_num_threads(), "fast_path": sg.available(),
    }


# -- dense GEMV (the runtime) ----------------------------------------------------------------
DENSE_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]  # every SmolLM2 linear, the LM head included
DENSE_QUICK = dict(shapes=DENSE_SHAPES, batches=[1, 8], dtypes=["fp32", "bf16", "int8"], repeats=9)
DENSE_FULL = dict(shapes=DENSE_SHAPES + [(2048, 5632), (5632, 2048)], batches=[1, 2, 4, 8, 16], dtypes=["fp32", "bf16", "int8"], repeats=25)
COLD_BYTES_DENSE = 256 << 20  # the copies cycled: a decode step reads each weight once, from memory


@functools.lru_cache(maxsize=1)
def bandwidth() -> float:
    """The in-run memory read bandwidth (GB/s), measured once per process."""
    from .gemv import read_bandwidth

    return read_bandwidth()


@functools.lru_cache(maxsize=1)
def _probe_buffer() -> torch.Tensor:
    from .gemv import probe_buffer

    return probe_buffer(256)  # far beyond any L3


def probe_now(reads: int = 2) -> float:
    """The memory read bandwidth (GB/s) right now: the best of ``reads`` timed reads of a 256 MB
    buffer. A shared host's bandwidth drifts over a run, so each case of the dense grid is set
    against probes taken beside its own timings."""
    from .gemv import read_bandwidth

    return read_bandwidth(repeats=reads, buf=_probe_buffer())


def _on_hugepages(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``ts`` side by side in one arena on huge pages (``ts`` themselves where there are
    none), each starting on a 4 KiB line."""
    from ..runtime.memory import ALIGN, arena, available

    if not available():
        return ts
    sizes = [-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in ts]
    buf = arena(sum(sizes))
    out, off = [], 0
    for t, n in zip(ts, sizes):
        out.append(buf[off : off + t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t))
        off += n
    return out


@torch.inference_mode()
def measure_dense(in_f: int, out_f: int, batch: int, dtype: str, repeats: int) -> dict[str, Any]:
    """The runtime's dense GEMV on (in, out) weights in ``dtype`` against torch ``F.linear`` (fp32
    weights, and bf16 weights for bf16), each on weight copies cycled beyond the caches."""
    from . import gemv as G

    torch.manual_seed(0)
    elem = {"fp32": 4, "bf16": 2, "int8": 1}[dtype]
    n_copies = max(2, -(-COLD_BYTES_DENSE // (in_f * out_f * elem)))
    n_torch = max(2, -(-COLD_BYTES_DENSE // (in_f * out_f * 4)))
    w = torch.randn(out_f, in_f)
    # every weight copy on 2 MiB pages where the OS offers them, torch's included: the runtime
    # keeps its weights there (lazyneuron.runtime.memory), and torch is given the same memory
    packed = [G.prepare_weight(w + 0.001 * k, dtype) for k in range(n_copies)]
    packed = list(zip(_on_hugepages([p[0] for p in packed]), [p[1] for p in packed]))
    tw = _on_hugepages([torch.randn(out_f, in_f) for _ in range(n_torch)])
    x = torch.randn(batch, in_f)
    fns: dict[str, Callable[[int], Any]] = {
        "torch": lambda k: F.linear(x, tw[k % n_torch]),
        "own": lambda k: G.gemv(x, *packed[k % n_copies]),
    }
    if dtype == "bf16":
        n_b = max(2, -(-COLD_BYTES_DENSE // (in_f * out_f * 2)))
        tb = _on_hugepages([t.to(torch.bfloat16) for t in tw[:n_b]] + [torch.randn(out_f, in_f).to(torch.bfloat16) for _ in range(max(0, n_b - n_torch))])
        xb = x.to(torch.bfloat16)
        fns["torch_bf16"] = lambda k: F.linear(xb, tb[k % n_b])
    for f in fns.values():
        for k in range(max(n_copies, n_torch)):
            f(k)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    probes: list[float] = []
    calls = max(n_copies, 3)
    for _ in range(max(3, repeats // 3)):
        probes.append(probe_now())  # the bandwidth beside these timings
        for name, f in fns.items():
            samples[name].append(_median_time(f, calls))
    t = {k: statistics.median(v) for k, v in samples.items()}
    nbytes = in_f * out_f * elem + (out_f * 4 if dtype == "int8" else 0)
    gbps = nbytes / t["own"] / 1e9
    bw = statistics.median(probes)
    # % of bandwidth: the median of per-sample ratios (each sample's GB/s against the probe taken
    # just before it), which the host's drift between samples moves less than a ratio of medians
    pct = statistics.median(100 * nbytes / s_ / 1e9 / p_ for s_, p_ in zip(samples["own"], probes))
    out = {
        "kernel": "dense", "shape": f"{in_f}x{out_f}", "batch": batch, "dtype": dtype, "time_us": t["own"] * 1e6,
        "time_torch_us": t["torch"] * 1e6, "gbps": gbps, "probe_gbps": bw, "pct_of_bandwidth": pct,
        "speedup_vs_torch": t["torch"] / t["own"], "threads": torch.get_num_threads(), "fast_path": G.available(),
    }
    if "torch_bf16" in t:
        out["time_torch_bf16_us"] = t["torch_bf16"] * 1e6
        out["speedup_vs_torch_bf16"] = t["torch_bf16"] / t["own"]
    return out


# -- CMM (fast feedforward) ------------------------------------------------------------------
CMM_DIMS = [(768, 3072, 11), (384, 1536, 10)]  # (d_model, dense FFN width, FFF depth): BERT-base, MiniLM
CMM_QUICK = dict(dims=CMM_DIMS, batches=[1, 128], dtypes=["float32"], repeats=15)
CMM_FULL = dict(dims=CMM_DIMS, batches=[1, 8, 128, 1024], dtypes=["float32", "bfloat16"], repeats=31)


COLD_BYTES_CMM = 256 << 20  # the copies cycled: a layer inside a stack of ~10 (BERT-base has 12)
N_INPUTS = 16  # distinct inputs cycled: a tree never sees the same tokens twice in a row


def _cmm_case(d: int, hidden: int, depth: int, batch: int, dtype: str, cold_bytes: int, min_copies: int, device: str,
              place: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Callable[[int], torch.Tensor], Callable[[int], torch.Tensor], int, int]:
    """The two calls a CMM benchmark compares, each taking call index k: the dense FFN
    (``F.linear`` -> GELU -> ``F.linear``) on the k-th of as many weight copies as fill
    ``cold_bytes`` (at least ``min_copies``), and the walk on the k-th packed tree, both on the
    k-th of ``N_INPUTS`` random inputs (distinct per token). ``place`` puts each weight where the
    benchmark wants it (2 MiB pages on the CPU). Returns (dense, cmm, nodes per tree, copies of the
    more numerous kind)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    wdt = getattr(torch, dtype)
    esz = 2 if dtype == "bfloat16" else 4
    n = (2 << depth) - 1
    nd = max(min_copies, -(-cold_bytes // (2 * d * hidden * esz)))
    nf = max(min_copies, -(-cold_bytes // (2 * d * n * esz)))

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev)

    dense = [(place(rand(hidden, d).to(wdt)), rand(hidden).to(wdt), place(rand(d, hidden).to(wdt)), rand(d).to(wdt)) for _ in range(nd)]
    packed = [place(rand(n, 2 * d).to(wdt)) for _ in range(nf)]
    trees = [(t[:, :d], rand(n), t[:, d:], rand(d)) for t in packed]
    xs = [rand(batch, d) for _ in range(N_INPUTS)]
    xts = [x.to(wdt) for x in xs]

    def run_dense(k: int) -> torch.Tensor:
        w1, b1, w2, b2 = dense[k % nd]
        return F.linear(F.gelu(F.linear(xts[k % N_INPUTS], w1, b1)), w2, b2)

    def run_cmm(k: int) -> torch.Tensor:
        wi, bi, wo, bo = trees[k % nf]
        return cm.cmm(xs[k % N_INPUTS], wi, bi, wo, bo, "gelu")[0]

    return run_dense, run_cmm, n, max(nd, nf)


@torch.inference_mode()
def measure_cmm(d: int, hidden: int, depth: int, batch: int, dtype: str, repeats: int) -> dict[str, Any]:
    """Dense FFN (``F.linear`` -> GELU -> ``F.linear``) vs the CMM walk, a distinct random input
    per token. Cold: each call takes the next of as many weight copies as fill 256 MB (a layer
    inside a model, whose other layers run in between) and the next of 16 inputs, so the rows a
    walk reads are not the ones the previous call on that copy left in the cache. Warm: the same
    weights and input on every call. Weights of both sit on 2 MiB pages where the OS has them; the
    trees are laid out as :meth:`FFFLayer.pack_for_inference` keeps them (each node's input and
    output rows side by side)."""
    # both on 2 MiB pages where the OS has them: FFFLayer keeps its trees there for inference, and
    # the dense weights get the same, so the comparison is like for like
    run_dense, run_cmm, n, copies = _cmm_case(d, hidden, depth, batch, dtype, COLD_BYTES_CMM, 1, "cpu", cm.hugepage_copy)

    # each cold call takes the next (copy, input) pair over the whole run, not the k-th of its block;
    # warm, reported beside cold: the same weights and input again and again (the rows stay cached)
    calls = {"torch": itertools.count(), "cmm": itertools.count()}
    fns = {"torch": lambda k: run_dense(next(calls["torch"])), "cmm": lambda k: run_cmm(next(calls["cmm"])),
           "torch_warm": lambda k: run_dense(0), "cmm_warm": lambda k: run_cmm(0)}
    for f in fns.values():
        for k in range(copies):
            f(k)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(5):
        for name, f in fns.items():
            samples[name].append(_median_time(f, max(3, repeats // 5)))
    t = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "kernel": "cmm", "d_model": d, "dense_width": hidden, "depth": depth, "nodes": n, "nodes_evaluated": depth + 1, "batch": batch, "dtype": dtype,
        "time_torch_us": t["torch"] * 1e6, "time_cmm_us": t["cmm"] * 1e6, "speedup_vs_torch": t["torch"] / t["cmm"],
        "time_torch_warm_us": t["torch_warm"] * 1e6, "time_cmm_warm_us": t["cmm_warm"] * 1e6, "speedup_vs_torch_warm": t["torch_warm"] / t["cmm_warm"],
        "us_per_token_cmm": t["cmm"] * 1e6 / batch, "flop_ratio": hidden / (depth + 1), "threads": torch.get_num_threads(), "fast_path": cm.available(),
    }


GPU_COLD_BYTES = 1 << 30  # copies cycled on a GPU: far beyond its L2 (50 MB on an H100)
GPU_CALLS = 20  # calls per timed sample (per graph)
GPU_REPLAYS = 3  # graph replays per timed sample


@torch.inference_mode()
def measure_cmm_gpu(d: int, hidden: int, depth: int, batch: int, dtype: str, repeats: int, device: str = "cuda") -> dict[str, Any]:
    """:func:`measure_cmm` on a GPU: the dense FFN in torch (cuBLAS, TF32 off so fp32 stays fp32)
    against the Triton walk, distinct random inputs per token. A sample is ``GPU_CALLS`` calls,
    its time divided by the calls; cold samples take a different weight copy and input for each
    call (copies fill 1 GB, far beyond the L2), warm ones one copy throughout. Two timings: calls
    replayed from a CUDA graph (the GPU's time, as a deployment with graphs or ``torch.compile``
    sees it; the headline ``speedup_vs_torch``) and plain eager calls, whose launch overheads on
    the host can exceed the GPU work at small batches (``*_eager``)."""
    dev = torch.device(device)
    run_dense, run_cmm, n, _ = _cmm_case(d, hidden, depth, batch, dtype, GPU_COLD_BYTES, GPU_CALLS, device, lambda t: t)

    runs = {"torch": run_dense, "cmm": run_cmm}
    counters = {k: itertools.count() for k in runs}

    def eager(name: str, warm: bool) -> Callable[[], None]:
        def f() -> None:
            for _ in range(GPU_CALLS):
                runs[name](0 if warm else next(counters[name]))
        return f

    def graphed(name: str, warm: bool) -> Callable[[], None]:
        calls = [0 if warm else i for i in range(GPU_CALLS)]  # cold: GPU_CALLS distinct copies and inputs
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up before capture, as CUDA graphs require
            for k in calls:
                runs[name](k)
        torch.cuda.current_stream(dev).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for k in calls:
                runs[name](k)
        return g.replay

    def sample(f: Callable[[], None], eager: bool) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if eager:  # the host's launches count, as a user waits for them
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            f()
            torch.cuda.synchronize(dev)
            return (time.perf_counter() - t0) / GPU_CALLS
        f()  # one replay untimed: the GPU leaves the idle state the eager samples' gaps put it in
        start.record()
        for _ in range(GPU_REPLAYS):
            f()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / (GPU_REPLAYS * GPU_CALLS)  # the GPU's time over the replays

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fns: dict[str, Callable[[], None]] = {}
        for name in runs:
            for _ in range(3):
                eager(name, False)()
            fns[name] = graphed(name, False)
            fns[f"{name}_warm"] = graphed(name, True)
            fns[f"{name}_eager"] = eager(name, False)
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(max(5, repeats // 3)):
            for name, f in fns.items():
                samples[name].append(sample(f, name.endswith("_eager")))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    t = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "kernel": "cmm", "d_model": d, "dense_width": hidden, "depth": depth, "nodes": n, "nodes_evaluated": depth + 1, "batch": batch, "dtype": dtype,
        "time_torch_us": t["torch"] * 1e6, "time_cmm_us": t["cmm"] * 1e6, "speedup_vs_torch": t["torch"] / t["cmm"],
        "time_torch_warm_us": t["torch_warm"] * 1e6, "time_cmm_warm_us": t["cmm_warm"] * 1e6, "speedup_vs_torch_warm": t["torch_warm"] / t["cmm_warm"],
        "time_torch_eager_us": t["torch_eager"] * 1e6, "time_cmm_eager_us": t["cmm_eager"] * 1e6,
        "speedup_vs_torch_eager": t["torch_eager"] / t["cmm_eager"], "timing": "cuda graph (headline), eager",
        "us_per_token_cmm": t["cmm"] * 1e6 / batch, "flop_ratio": hidden / (depth + 1), "fast_path": cmm_gpu.available(dev),
        "device": f"cuda: {torch.cuda.get_device_name(dev)}",
    }


# -- GEMM (long inputs: prefill, encoder forwards) ------------------------------------------------
GEMM_SHAPES = [(1500, 512, 512), (1500, 512, 2048), (1500, 2048, 512),  # Whisper base encoder: attention, FFN in, FFN out
               (256, 576, 1536), (256, 1536, 576),                          # SmolLM2 prefill of 256 tokens
               (128, 384, 1536), (128, 1536, 384)]                           # MiniLM-L6 on a batch of 128 tokens
GEMM_QUICK = dict(shapes=GEMM_SHAPES[:2] + GEMM_SHAPES[3:4], repeats=5)
GEMM_FULL = dict(shapes=GEMM_SHAPES, repeats=9)
GEMM_FORMATS = (("fp32", True), ("bf16", True), ("bf16", False), ("int8", True), ("int8", False))  # (weights, bf16 dot products where the CPU has them)


@torch.inference_mode()
def measure_gemm(tokens: int, in_f: int, out_f: int, repeats: int) -> list[dict[str, Any]]:
    """The runtime's blocked GEMM (x (tokens, in) @ W) in each weight format against torch's fp32
    ``F.linear`` on the same input, interleaved per repeat: GFLOP/s (2 * tokens * in * out / time)
    and the speedup; bf16 and int8 twice, with the bf16 dot products (input rounded to bf16) where
    the CPU has them and with fp32 compute."""
    from . import gemv as G

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g)
    packed = {dt: G.prepare_weight(w, dt) for dt in ("fp32", "bf16", "int8")}
    dot_prev = G.set_bf16_dot(True)
    has_dot = G.bf16_dot()
    fmts = [(dt, dot) for dt, dot in GEMM_FORMATS if dot or has_dot]  # without the instructions each format has one path
    fns: dict[Any, Callable[[], Any]] = {"torch": lambda: F.linear(x, w)}
    for dt, dot in fmts:
        fns[(dt, dot)] = lambda dt=dt, dot=dot: (G.set_bf16_dot(dot), G.gemm(x, *packed[dt]))
    try:
        for f in fns.values():
            f()
        samples: dict[Any, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                samples[k].append(time.perf_counter() - t0)
    finally:
        G.set_bf16_dot(dot_prev)
    t = {k: statistics.median(v) for k, v in samples.items()}
    flop = 2.0 * tokens * in_f * out_f
    return [{"kernel": "gemm", "shape": f"{tokens}x{in_f}x{out_f}", "tokens": tokens, "dtype": dt,
             "compute": "bf16 dot" if dt != "fp32" and dot and has_dot else "fp32", "time_us": t[(dt, dot)] * 1e6,
             "time_torch_us": t["torch"] * 1e6, "gflops": flop / t[(dt, dot)] / 1e9, "gflops_torch": flop / t["torch"] / 1e9,
             "speedup_vs_torch": t["torch"] / t[(dt, dot)], "threads": torch.get_num_threads(), "fast_path": G.available()} for dt, dot in fmts]


KERNELS = ("sparse_gemv", "cmm", "dense", "gemm")


def run(kernel: str = "sparse_gemv", quick: bool = False, progress: bool = True, device: str = "cpu") -> list[dict[str, Any]]:
    """The kernel's grid of cases (``quick``: a subset in under a minute). ``device``: "cpu", or a
    CUDA device for the CMM walk (the Triton kernel against cuBLAS)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; available: {list(KERNELS)}")
    from ..bench.records import environment

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type != "cpu":
        if kernel != "cmm":
            raise ConfigError(f"kernel {kernel!r} runs on the CPU only; drop --device {device} or use --kernel cmm")
        if not cmm_gpu.available(dev):
            raise ConfigError(f"device {device!r}: the GPU CMM walk needs a CUDA device visible to torch and Triton installed "
                             f"(cuda available: {torch.cuda.is_available()}); use --device cpu")
    if kernel == "cmm":
        c = CMM_QUICK if quick else CMM_FULL
        measure_fn: Callable[..., dict[str, Any]] = measure_cmm if dev.type == "cpu" else functools.partial(measure_cmm_gpu, device=device)
        cases: list[tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]] = [
            (measure_fn, (d, h, dep, b, dt, c["repeats"])) for dt in c["dtypes"] for (d, h, dep) in c["dims"] for b in c["batches"]]
    elif kernel == "dense":
        c = DENSE_QUICK if quick else DENSE_FULL
        cases = [(measure_dense, (i, o, b, dt, c["repeats"])) for dt in c["dtypes"] for (i, o) in c["shapes"] for b in c["batches"]]
    elif kernel == "gemm":
        c = GEMM_QUICK if quick else GEMM_FULL
        cases = [(measure_gemm, (n, i, o, c["repeats"])) for (n, i, o) in c["shapes"]]
    else:
        p = QUICK if quick else FULL
        cases = [(measure, (i, o, b, s, d, p["repeats"])) for d in p["dtypes"] for (i, o) in p["shapes"] for b in p["batches"] for s in p["sparsities"]]
    it: Any = cases
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(cases, desc=kernel, unit="case")
    env = environment()
    out: list[dict[str, Any]] = []
    for fn, args in it:
        got = fn(*args)
        out += [{"device": env["device"], **r, "git_sha": env["git_sha"]} for r in (got if isinstance(got, list) else [got])]
    return out


def table(recs: list[dict[str, Any]]) -> str:
    if recs and recs[0].get("kernel") == "cmm":
        head = (f"{'d_model':>7} {'width':>6} {'depth':>5} {'batch':>5} {'dtype':>8} {'dense us':>9} {'cmm us':>8} {'us/token':>8} {'x torch':>8}"
                f" {'warm x':>7}")
        eager = "speedup_vs_torch_eager" in recs[0]  # GPU records: CUDA-graph timings, then eager calls
        if eager:
            head += f" {'eager x':>7}"
        lines = [head, "-" * len(head)]
        for r in recs:
            lines.append(f"{r['d_model']:>7} {r['dense_width']:>6} {r['depth']:>5} {r['batch']:>5} {r['dtype']:>8} {r['time_torch_us']:>9.1f} "
                         f"{r['time_cmm_us']:>8.1f} {r['us_per_token_cmm']:>8.2f} {r['speedup_vs_torch']:>8.1f} {r.get('speedup_vs_torch_warm', float('nan')):>7.1f}"
                         + (f" {r['speedup_vs_torch_eager']:>7.1f}" if eager else ""))
        return "\n".join(lines)
    if recs and recs[0].get("kernel") == "gemm":
        head = f"{'tokens x in x out':>18} {'weights':>7} {'compute':>8} {'own us':>9} {'torch us':>9} {'GFLOP/s':>8} {'x torch':>8}"
        lines = [head, "-" * len(head)]
        for r in recs:
            lines.append(f"{r['shape']:>18} {r['dtype']:>7} {r['compute']:>8} {r['time_us']:>9.0f} {r['time_torch_us']:>9.0f} {r['gflops']:>8.0f} "
                         f"{r['speedup_vs_torch']:>8.2f}")
        lines.append("(torch: fp32 F.linear on the same input; bf16 dot: the input rounded to bf16, the CPU's bf16 dot products, fp32 accumulation)")
        return "\n".join(lines)
    if recs and recs[0].get("kernel") == "dense":
        head = f"{'shape':>12} {'batch':>5} {'dtype':>5} {'own us':>8} {'torch us':>9} {'GB/s':>6} {'% bw':>5} {'x torch':>8}"
        lines = [head, "-" * len(head)]
        for r in recs:
            lines.append(f"{r['shape']:>12} {r['batch']:>5} {r['dtype']:>5} {r['time_us']:>8.1f} {r['time_torch_us']:>9.1f} {r['gbps']:>6.1f} "
                         f"{r['pct_of_bandwidth']:>5.0f} {r['speedup_vs_torch']:>8.2f}")
        bws = [r["probe_gbps"] for r in recs if "probe_gbps" in r] or [float("nan")]
        lines.append(f"(memory read bandwidth probed beside each case's timings: {min(bws):.1f}-{max(bws):.1f} GB/s, median of its probes per case; "
                     "torch: fp32 F.linear)")
        return "\n".join(lines)
    head = f"{'shape':>12} {'batch':>5} {'dtype':>8} {'s':>4} {'skipped':>7} {'torch us':>9} {'own us':>8} {'sparse us':>9} {'x torch':>8} {'x own':>6} {'% ideal':>7}"
    lines = [head, "-" * len(head)]
    for r in recs:
        lines.append(f"{r['shape']:>12} {r['batch']:>5} {r['dtype']:>8} {r['sparsity']:>4} {r['rows_skipped']:>7.2f} {r['time_torch_us']:>9.0f} "
                     f"{r['time_own_dense_us']:>8.0f} {r['time_sparse_us']:>9.0f} {r['speedup_vs_torch']:>8.2f} {r['speedup_vs_own_dense']:>6.2f} {r['pct_of_ideal']:>7.0f}")
    return "\n".join(lines)
