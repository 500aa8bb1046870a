"""Peer engines measured in the same run: llama.cpp through ``llama-cpp-python`` and faster-whisper
(CTranslate2) for speech, both optional.

Install with ``bash scripts/setup.sh --with-peers`` (pip builds llama.cpp from source: ~6 minutes
on 2 cores). :func:`llama_cpp_gguf` writes the GGUF formats of the same weights lazyneuron's
SmolLM2 is dequantized from (the shipped Q4_1 file requantized to F32 / F16 / Q8_0), and
:class:`LlamaCppDecoder` runs greedy decoding on the same prompt token ids, with the same number of
new tokens and threads, timing prefill and decode as :func:`lazyneuron.runtime.generate` does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..errors import MissingPackageError
from ..paths import cache_dir

FTYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_1": 3}
INSTALL = "bash scripts/setup.sh --with-peers   (or: pip install llama-cpp-python; pip builds llama.cpp, ~6 min on 2 cores)"


def llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise MissingPackageError(f"llama.cpp is not installed; to compare against it: {INSTALL}") from None
    return llama_cpp


def available() -> bool:
    try:
        llama_cpp()
        return True
    except MissingPackageError:
        return False


def llama_cpp_gguf(src: Path, fmt: str) -> Path:
    """``src`` (a GGUF file) in format ``fmt`` (f32, f16, q8_0, q4_1), requantized once and cached."""
    if fmt not in FTYPES:
        raise ValueError(f"unknown llama.cpp format {fmt!r}; use one of {list(FTYPES)}")
    lc = llama_cpp()
    dst = cache_dir("peers") / f"{src.stem}.{fmt}.gguf"
    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    params = lc.llama_model_quantize_default_params()
    params.ftype = FTYPES[fmt]
    params.allow_requantize = True
    tmp = dst.with_suffix(".tmp")
    rc = _quiet(lambda: lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), params))
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not write {fmt} from {src} (return code {rc})")
    tmp.rename(dst)
    return dst


def _quiet(fn: Any) -> Any:
    """Run ``fn`` with the process's standard error (where llama.cpp logs every tensor) silenced."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            return fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class LlamaCppDecoder:
    """One llama.cpp model loaded for greedy decoding at batch 1."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int = 512) -> None:
        lc = llama_cpp()
        self.llm = _quiet(lambda: lc.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx, verbose=False))

    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> tuple[list[int], tuple[float, float]]:
        """Greedy ids and (prefill_seconds, decode_seconds) for tokens 2..max_new_tokens."""
        import numpy as np

        ids = [int(t) for t in prompt.view(-1)]
        llm, lc = self.llm, llama_cpp()
        llm._logits_all = False  # noqa: SLF001  (only the last position's logits, as a decode step needs)
        ctx, n_vocab = llm._ctx.ctx, llm.n_vocab()  # noqa: SLF001

        def last() -> int:
            return int(np.argmax(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))))

        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        nxt = last()
        t1 = time.perf_counter()
        out = [nxt]
        for _ in range(max_new_tokens - 1):
            llm.eval([nxt])
            nxt = last()
            out.append(nxt)
        return out, (t1 - t0, time.perf_counter() - t1)

    def perplexity(self, windows: torch.Tensor) -> float:
        """exp(mean next-token NLL) over ``windows`` (count, length), each scored alone."""
        import math

        import numpy as np

        nll, n = 0.0, 0
        llm = self.llm
        for w in windows:
            ids = [int(t) for t in w]
            llm.reset()
            llm._logits_all = True  # noqa: SLF001  (every position's logits)
            llm.eval(ids)
            lg = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
            lg = lg - lg.max(1, keepdims=True)
            lp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
            nll -= float(lp[np.arange(len(ids) - 1), ids[1:]].sum())
            n += len(ids) - 1
        return math.exp(nll / n)


# -- speech: faster-whisper (CTranslate2) ------------------------------------------------------------
WHISPER_INSTALL = "pip install faster-whisper   (or: bash scripts/setup.sh --with-peers)"


def ctranslate2() -> Any:
    try:
        import ctranslate2 as ct2
    except ImportError:
        raise MissingPackageError(f"faster-whisper (CTranslate2) is not installed; to compare against it: {WHISPER_INSTALL}") from None
    return ct2


def faster_whisper_available() -> bool:
    try:
        ctranslate2()
        return True
    except MissingPackageError:
        return False


class FasterWhisper:
    """faster-whisper's engine (CTranslate2) on a CTranslate2 Whisper directory: encoder + greedy
    decoding from the same prompt on the same mel features lazyneuron gets (feature extraction
    excluded on both sides), ``compute_type`` float32 by default (the fp16 files are widened at
    load, as lazyneuron's fp32 model is), ``threads`` intra-op threads."""

    def __init__(self, ct2_dir: str | Path, threads: int, compute_type: str = "float32") -> None:
        ct2 = ctranslate2()
        self.model = ct2.models.Whisper(str(ct2_dir), device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1)

    def transcribe_ids(self, features: torch.Tensor, prompt: list[int], max_new_tokens: int = 128) -> tuple[list[int], float]:
        """Greedy token ids after ``prompt`` for one utterance's features (1, mels, 3000), and the seconds it took."""
        import numpy as np

        ct2 = ctranslate2()
        sv = ct2.StorageView.from_array(np.ascontiguousarray(features.float().numpy()))
        t0 = time.perf_counter()
        res = self.model.generate(sv, [prompt], beam_size=1, max_length=len(prompt) + max_new_tokens, suppress_blank=True, suppress_tokens=[-1])
        dt = time.perf_counter() - t0
        return list(res[0].sequences_ids[0]), dt
