"""Whisper on the runtime against the eager model and faster-whisper (CTranslate2), one interleaved run.

    .venv/bin/python benchmarks/speech_runtime.py            # ~10 min on 2 cores
    .venv/bin/python benchmarks/speech_runtime.py --quick    # smoke run
    .venv/bin/python benchmarks/speech_runtime.py --table    # the markdown table of the records
    .venv/bin/python benchmarks/speech_runtime.py --gates dec5=G1.safetensors --gates dec9=G2.safetensors
                                                             # + module gating on the bf16 runtime

Writes benchmarks/results/speech_runtime.jsonl (one JSON object per measurement: run, engine,
model, method, dtype, params, metric, value).

Multilingual Whisper base, task transcribe, language given, greedy, no timestamps, 72 new tokens
at most. Engines, all on the same weights and the same log-mel features (feature extraction
excluded everywhere):
- ``torch``: the eager transformers model (fp32) through lazyneuron's greedy loop;
- ``lazyneuron``: the same model with every linear on the runtime (``RuntimeConfig``: the encoder's
  1500-frame forwards on the blocked GEMM, decode steps on the GEMV, the 51,865-row output
  projection included) in fp32, bf16 and int8 weights (bf16 / int8: the encoder's attention on bf16
  dot products too, where the CPU has them);
- ``faster-whisper`` (when installed: ``bash scripts/setup.sh --with-peers``): CTranslate2's
  Whisper on the same CTranslate2 files lazyneuron's model was converted from, float32 and int8;
- ``--gates NAME=CKPT`` (repeatable): module gating from a Whisper gate checkpoint (as
  benchmarks/speech_gating.py trains them) on the bf16 runtime, its context the utterance's
  language, compared with the dense bf16 runtime (``time_vs_runtime_dense``).
Every utterance runs every variant once, in rotating order, with the same threads (2 here); time
is encoder + greedy decode. ``time_vs_*`` records are medians of per-utterance ratios, which host
drift moves far less than absolute seconds. WER on normalised text (lazyneuron.data.speech.wer).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lazyneuron as ln
from lazyneuron.bench import Record, peers, read, write
from lazyneuron.data import speech as sd
from lazyneuron.methods import gating_speech as gs
from lazyneuron.methods.gating import ModuleGatingConfig
from lazyneuron.runtime import RuntimeConfig
from lazyneuron.speech import load_whisper, prompt_tokens
from lazyneuron.speech.whisper import DecodeTimings, ct2_directory, features, greedy_transcribe

OUT = Path(__file__).parent / "results" / "speech_runtime.jsonl"
MODEL = "whisper-base"
LANGS = ("en", "de", "es")
MAX_NEW = 72
log = logging.getLogger("speech_runtime")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--test", type=int, default=20, help="espeak-ng test utterances per language (plus the 10 LibriVox clips)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--table", action="store_true", help="print the markdown table of the records in --out")
    ap.add_argument("--gates", action="append", default=[], help="NAME=CKPT: a Whisper gate checkpoint, run on the bf16 runtime (repeatable)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.table:
        print(table(read(args.out)))
        return
    gates = [tuple(g.split("=", 1)) for g in args.gates]
    if any(len(g) != 2 or not Path(g[1]).is_file() for g in gates):
        raise SystemExit(f"--gates takes NAME=CKPT with an existing checkpoint file, got {args.gates}")
    recs = measure(2 if args.quick else args.test, args.threads, libri=not args.quick, gates=gates)
    write(recs, args.out, append=False)
    print(table(recs))


def measure(n_test: int, threads: int, libri: bool = True, gates: list[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    run = time.strftime("speech-runtime-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    model, proc = load_whisper(MODEL)
    utts = [u for lang in LANGS for u in sd.utterances("espeak", lang, "test", n_test)]
    if libri:
        utts += sd.utterances("librivox", "en", "test")
    groups = {u.id: "librivox" if u.source == "librivox" else u.language for u in utts}

    ours: dict[tuple[str, str, str], Any] = {("torch", "fp32", "dense"): model}
    for dt in ("fp32", "bf16", "int8"):
        m = copy.deepcopy(model)
        ln.apply_(m, RuntimeConfig(dtype=dt))
        ours[("lazyneuron", dt, "dense")] = m
    for name, path in gates:
        m = copy.deepcopy(model)
        ln.apply_(m, [ModuleGatingConfig(checkpoint=str(path), context="language=en|task=transcribe"), RuntimeConfig(dtype="bf16")])
        m.model.decoder.merge()
        ours[("lazyneuron", "bf16", f"module_gating:{name}")] = m
    fws: dict[tuple[str, str, str], peers.FasterWhisper] = {}
    if peers.faster_whisper_available():
        ct2 = peers.ctranslate2()
        have = set(ct2.get_supported_compute_types("cpu"))
        for ct, label in (("float32", "f32"), ("int8", "int8")):
            if ct in have:
                fws[("faster-whisper", label, "dense")] = peers.FasterWhisper(ct2_directory(MODEL), threads, compute_type=ct)
    else:
        log.warning("faster-whisper is not installed, so it is left out of this run; %s", peers.WHISPER_INSTALL)
    names = list(ours) + list(fws)
    res: dict[tuple[str, str, str], list[dict[str, Any]]] = {n: [] for n in names}

    feats = {u.id: features(proc, [u.audio]) for u in utts}
    with torch.inference_mode():  # warm-up: first calls build kernels and caches
        f, m = feats[utts[0].id]
        for n in names:
            _one(n, ours, fws, model, f, m, utts[0].language)
    t_run = time.time()
    for i, u in enumerate(utts):
        f, m = feats[u.id]
        order = names[i % len(names):] + names[: i % len(names)]
        with torch.inference_mode():
            for n in order:
                ids, enc_s, total_s, steps = _one(n, ours, fws, model, f, m, u.language)
                text = proc.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                r = {"id": u.id, "group": groups[u.id], "ref": u.text, "text": text, "s": total_s, "enc_s": enc_s, "steps": steps}
                if n[2] != "dense":  # the modules this utterance skipped
                    sk = gs.speech_gates(ours[n])
                    g = sk.gates[0]
                    r["dec_skipped"] = float((g[sk.n_enc:] < 0.5).float().mean())
                    r["enc_skipped"] = float((g[: sk.n_enc] < 0.5).float().mean())
                res[n].append(r)
        if (i + 1) % 10 == 0:
            log.info("%d / %d utterances (%.0f s)", i + 1, len(utts), time.time() - t_run)

    recs: list[dict[str, Any]] = []

    def rec(name: tuple[str, str, str], metric: str, value: float, unit: str, **params: Any) -> None:
        r = Record(MODEL, name[2], {"threads": threads, "utterances": len(utts), "max_new_tokens": MAX_NEW, **params}, metric, float(value), unit,
                   dtype=name[1]).to_dict()
        recs.append({"run": run, "engine": name[0], **r})

    base = res[("torch", "fp32", "dense")]
    fw32 = res.get(("faster-whisper", "f32", "dense"))
    rt16 = res[("lazyneuron", "bf16", "dense")]
    for n in names:
        rs = res[n]
        rec(n, "transcribe_s", statistics.median(r["s"] for r in rs), "s", language="all")
        rec(n, "time_vs_torch", float(np.median([r["s"] / b["s"] for r, b in zip(rs, base)])), "ratio", language="all")
        if fw32 is not None:
            rec(n, "time_vs_faster_whisper_f32", float(np.median([r["s"] / b["s"] for r, b in zip(rs, fw32)])), "ratio", language="all")
        if n[2] != "dense":
            rec(n, "time_vs_runtime_dense", float(np.median([r["s"] / b["s"] for r, b in zip(rs, rt16)])), "ratio", language="all")
            rec(n, "decoder_modules_skipped", float(np.mean([r["dec_skipped"] for r in rs])), "fraction", language="all")
            rec(n, "encoder_modules_skipped", float(np.mean([r["enc_skipped"] for r in rs])), "fraction", language="all")
        if n[0] != "faster-whisper":
            rec(n, "encoder_s", statistics.median(r["enc_s"] for r in rs), "s", language="all")
            rec(n, "decode_ms_per_token", statistics.median(1e3 * (r["s"] - r["enc_s"]) / max(r["steps"], 1) for r in rs), "ms", language="all")
        rec(n, "same_text_as_torch", float(np.mean([r["text"] == b["text"] for r, b in zip(rs, base)])), "fraction", language="all")
        for g in [*LANGS, "librivox"]:
            sel = [r for r in rs if r["group"] == g]
            if sel:
                w = sd.wer([r["ref"] for r in sel], [r["text"] for r in sel], "en" if g == "librivox" else g)
                rec(n, "wer", 100 * w["wer"], "%", language=g, ci95=[100 * c for c in w["ci95"]], words=w["words"])
    log.info("run %s: %d utterances x %d variants in %.0f s", run, len(utts), len(names), time.time() - t_run)
    return recs


def _one(n: tuple[str, str, str], ours: dict, fws: dict, model: Any, f: torch.Tensor, m: torch.Tensor, language: str) -> tuple[list[int], float, float, int]:
    """(token ids, encoder seconds (0 for the peer), total seconds, decode steps) of one utterance."""
    if n in fws:
        ids, dt = fws[n].transcribe_ids(f, prompt_tokens(model, language=language, task="transcribe"), max_new_tokens=MAX_NEW)
        eot = model.generation_config.eos_token_id
        return [t for t in ids if t != eot], 0.0, dt, len(ids)
    if n[2] != "dense":
        gs.speech_gates(ours[n]).context = {"language": language, "task": "transcribe"}
    t = DecodeTimings()
    t0 = time.perf_counter()
    ids = greedy_transcribe(ours[n], f, language=language, task="transcribe", max_new_tokens=MAX_NEW, timings=t, attention_mask=m)[0]
    return ids, t.encoder_s, time.perf_counter() - t0, t.steps


def table(recs: list[dict[str, Any]]) -> str:
    if not recs:
        return "(no records)"
    run = recs[-1]["run"]
    recs = [r for r in recs if r["run"] == run]
    names = list(dict.fromkeys((r["engine"], r["dtype"], r["method"]) for r in recs))

    def get(n: tuple[str, str, str], metric: str, lang: str = "all") -> float | None:
        for r in recs:
            if (r["engine"], r["dtype"], r["method"]) == n and r["metric"] == metric and r["params"].get("language") == lang:
                return r["value"]
        return None

    def f(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    langs = [g for g in [*LANGS, "librivox"] if get(names[0], "wer", g) is not None]
    head = ("| engine | weights | method | decoder modules skipped | transcription s (median) | × eager torch | × faster-whisper f32 | "
            "× dense on the same runtime | encoder s | decode ms / token | "
            + " | ".join(f"WER {g}" for g in langs) + " | same text as eager |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for n in names:
        lines.append(f"| {n[0]} | {n[1]} | {n[2]} | {f(get(n, 'decoder_modules_skipped'), '.0%')} | {f(get(n, 'transcribe_s'), '.3f')} | "
                     f"{f(get(n, 'time_vs_torch'), '.2f')} | {f(get(n, 'time_vs_faster_whisper_f32'), '.2f')} | {f(get(n, 'time_vs_runtime_dense'), '.2f')} | "
                     f"{f(get(n, 'encoder_s'), '.3f')} | {f(get(n, 'decode_ms_per_token'), '.1f')} | "
                     + " | ".join(f(get(n, "wer", g), ".1f") for g in langs) + f" | {f(get(n, 'same_text_as_torch'), '.0%')} |")
    n_utt = recs[0]["params"].get("utterances")
    lines.append(f"\n(run {run}: {n_utt} utterances, every variant on each in rotating order; ratios are medians of per-utterance ratios)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
