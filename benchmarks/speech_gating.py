"""Context-aware module gating on multilingual Whisper base (language and task contexts), against
the dense model, the static greedy baseline and faster-whisper (CTranslate2), in one run.

    .venv/bin/python benchmarks/speech_gating.py            # ~40 min on 2 cores (data synthesised on first use)
    .venv/bin/python benchmarks/speech_gating.py --quick    # a few utterances per split: a smoke run (~5 min)
    .venv/bin/python benchmarks/speech_gating.py --plots-only

Data: espeak-ng speech (en, de, es) from held-out sentences (lazyneuron.data.speech: disjoint train /
calib / test splits, voices and speeds varied) and the LibriVox clips of pocketsphinx-testdata
(real speech, English, test only). Task: transcribe (language given, greedy, no timestamps).

Variants, all decided once per utterance:
- dense: the unmodified transformers model through the same greedy loop;
- static-dec-K: the first K decoder modules of the greedy removal order (the module whose removal
  raises the calibration distillation loss least, one at a time), the same for every utterance;
- gated-dec-K: the gate predictor (time-pooled front-end output + language and task embeddings),
  its context table started from the static mask, trained by distillation on the train split
  (Gumbel-sigmoid, sparsity loss with the squared term), its threshold calibrated so that the mean
  number of decoder modules skipped on the calibration split equals K;
- +enc3: the same with the first 3 of 12 encoder modules of the encoder's greedy order removed;
- faster-whisper: CTranslate2 on the same weights (fp32 compute), same features, same prompt.
Timing: encoder + greedy decode per utterance (features excluded), the variants interleaved per
utterance in rotating order. WER on normalised text (lazyneuron.data.speech.wer) with bootstrap
95% intervals; per-utterance paired WER differences against static with their intervals.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

import lazyneuron as ln
from lazyneuron.bench import peers, plots
from lazyneuron.bench.records import Record, read, write
from lazyneuron.data import speech as sd
from lazyneuron.methods import gating_speech as gs
from lazyneuron.methods.gating import GatePredictor, ModuleGatingConfig
from lazyneuron.paths import cache_dir
from lazyneuron.surgery import quiet_applies
from lazyneuron.speech import load_whisper, prompt_tokens
from lazyneuron.speech.evaluate import TimedTranscriber, gating_batches

RESULTS = Path(__file__).parent / "results"
RECORDS = RESULTS / "speech_gating.jsonl"
MODEL = "whisper-base"
LANGS = ("en", "de", "es")
log = logging.getLogger("speech_gating")


def rec(run: str, method: str, params: dict, metric: str, value: float, unit: str = "") -> dict:
    r = Record(MODEL, method, params, metric, float(value), unit).to_dict()
    r["run"] = run
    return r


def paired_delta_ci(a_err: list[int], b_err: list[int], words: list[int], seed: int = 0, n: int = 1000) -> tuple[float, float, float]:
    """WER(a) - WER(b) in points over the same utterances, with a paired bootstrap 95% interval."""
    a, b, w = np.asarray(a_err, float), np.asarray(b_err, float), np.asarray(words, float)
    d = 100 * (a.sum() - b.sum()) / w.sum()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(w), (n, len(w)))
    boots = 100 * ((a[idx].sum(1) - b[idx].sum(1)) / w[idx].sum(1))
    return float(d), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def utt_errors(ref: str, hyp: str, lang: str) -> tuple[int, int]:
    r = sd.wer([ref], [hyp], lang, bootstrap=0)
    return int(r["errors"]), int(r["words"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--plots-only", action="store_true")
    ap.add_argument("--from-raw", help="recompute the records from a run's raw results (.raw.pt)")
    ap.add_argument("--train", type=int, default=36, help="train utterances per language")
    ap.add_argument("--calib", type=int, default=8, help="calibration utterances per language (static orders, selection)")
    ap.add_argument("--test", type=int, default=40, help="test utterances per language")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=8, help="rank of the adapters trained with the gates / static masks (0: none)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.plots_only:
        return draw()
    if args.from_raw:
        return report(Path(args.from_raw))
    if args.quick:
        args.train, args.calib, args.test = 4, 2, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_run = time.time()
    run = f"speech-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    model, proc = load_whisper(MODEL)
    slots = gs.speech_slots(model)
    n_dec = sum(1 for s in slots if s[0] == "decoder")
    n_enc = len(slots) - n_dec
    ck = cache_dir("checkpoints", "speech")
    tag = "quick" if args.quick else "full"

    train = [u for lang in LANGS for u in sd.utterances("espeak", lang, "train", args.train)]
    calib = [u for lang in LANGS for u in sd.utterances("espeak", lang, "calib", args.calib)]
    test = [u for lang in LANGS for u in sd.utterances("espeak", lang, "test", args.test)]
    libri = sd.utterances("librivox", "en", "test")
    log.info("utterances: train %d, calib %d, test %d + %d LibriVox", len(train), len(calib), len(test), len(libri))

    t0 = time.time()
    train_b = gating_batches(model, proc, train, batch_size=6)
    calib_b = gating_batches(model, proc, calib, batch_size=8)
    log.info("dense teacher transcripts in %.0f s", time.time() - t0)

    # static orders: decoder (teacher-forced distillation loss on the calibration split) and encoder (on 2 per language)
    none = _save(gs.static_speech_predictor(model, []), ck / f"none-{tag}.safetensors")
    ln.apply_(model, ModuleGatingConfig(checkpoint=str(none)))
    t0 = time.time()
    counts = (5, 9)  # 28% and 50% of the 18 decoder modules
    # the greedy orders depend on the model and the calibration utterances only: cached by their ids
    key = f"{MODEL}-{len(calib)}-{hashlib.sha1('|'.join(u.id for u in calib).encode()).hexdigest()[:12]}"
    cached = cache_dir("bench") / f"speech_orders-{key}.json"
    if cached.is_file():
        got = json.loads(cached.read_text())
        dec_order, enc_order = [tuple(x) for x in got["decoder"]], [tuple(x) for x in got["encoder"]]
    else:
        dec_order = gs.static_speech_order(model, calib_b, max(counts), stack="decoder")
        enc_small = gating_batches(model, proc, [u for lang in LANGS for u in sd.utterances("espeak", lang, "calib", 2)], batch_size=2)
        enc_order = gs.static_speech_order(model, enc_small, 3, stack="encoder")
        cached.write_text(json.dumps({"decoder": dec_order, "encoder": enc_order, "seconds": time.time() - t0}))
    order_s = time.time() - t0
    log.info("static orders in %.0f s: decoder %s; encoder %s", order_s, dec_order, enc_order)
    ln.revert_(model)

    # variant -> (checkpoint, params); every gated / static variant is applied from its checkpoint
    variants: dict[str, tuple[Path | None, dict]] = {"dense": (None, {"encoder_sparsity": 0.0, "decoder_sparsity": 0.0, "lora_rank": 0}),
                                                     # the gated stack keeping every module: the cost of running the layers through the wrappers
                                                     "all-kept": (none, {"encoder_sparsity": 0.0, "decoder_sparsity": 0.0, "lora_rank": 0})}
    contexts = {"language": list(LANGS), "task": ["transcribe"]}
    gate_info: dict[str, dict] = {}
    epochs = 1 if args.quick else 8
    for k in counts:
        sp = k / n_dec
        skip = dec_order[:k]
        keep = torch.ones(len(slots), 1, dtype=torch.bool)
        for s_ in skip:
            keep[slots.index(s_), 0] = False
        for rank in ((0, args.lora_rank) if k == min(counts) else (args.lora_rank,)):
            sfx = f"-lora{rank}" if rank else ""
            p = {"encoder_sparsity": 0.0, "decoder_sparsity": sp, "lora_rank": rank}
            static_path = _save(gs.static_speech_predictor(model, skip), ck / f"static-dec{k}{sfx}-{tag}.safetensors")
            if rank:  # the static mask with the same adapter training as the gates (the fair static baseline)
                t0 = time.time()
                gs.train_speech_gates(model, train_b, contexts, gs.SpeechGateTraining(decoder_target=sp, epochs=epochs, lora_rank=rank, train_gates=False),
                                      init=gs.static_speech_predictor(model, skip), out=static_path, seed=0)
                gate_info[f"static-dec{k}{sfx}"] = {"train_s": time.time() - t0, "calib_kl": _calib_loss(model, calib_b)}
                ln.revert_(model)
            variants[f"static-dec{k}{sfx}"] = (static_path, p)
            init = gs.new_predictor(model, contexts)  # context table started from the static mask; training finds per-language changes
            init.init_masks({"language": {None: keep, **{lang: keep for lang in LANGS}}, "task": {None: keep, "transcribe": keep}}, margin=2.0)
            t0 = time.time()
            gs.train_speech_gates(model, train_b, contexts, gs.SpeechGateTraining(decoder_target=sp, epochs=epochs, lr=3e-3, lora_rank=rank,
                                                                                                 estimator="relaxed", tau=(0.5, 0.1)),
                                  init=init, seed=0)
            train_s = time.time() - t0
            gs.calibrate_speech_threshold(model, calib_b, sp)
            gated_path = _save_gated(model, ck / f"gated-dec{k}{sfx}-{tag}.safetensors")
            gate_info[f"gated-dec{k}{sfx}"] = {"train_s": train_s, "calib_kl": _calib_loss(model, calib_b),
                                               "threshold": gs.speech_gates(model).predictor.threshold}
            if not rank:
                ln.revert_(model)
                ln.apply_(model, ModuleGatingConfig(checkpoint=str(static_path)))
                gate_info[f"static-dec{k}"] = {"calib_kl": _calib_loss(model, calib_b)}
            ln.revert_(model)
            variants[f"gated-dec{k}{sfx}"] = (gated_path, p)
            log.info("dec %d rank %d: %s", k, rank, {n: v for n, v in gate_info.items() if str(k) in n})
    # + encoder: the first 3 of 12 encoder modules of the encoder order removed on top of the 50% decoder variants
    k, sfx = max(counts), f"-lora{args.lora_rank}" if args.lora_rank else ""
    for kind in ("static", "gated"):
        src_path, p = variants[f"{kind}-dec{k}{sfx}"]
        pred, lora = GatePredictor.load(src_path)
        with torch.no_grad():
            for s_ in enc_order:
                if pred.static:
                    pred.logits[slots.index(s_), 0] = -4.0
                else:
                    pred.mlp[2].bias[slots.index(s_)] = -1e4
        out_path = ck / f"{kind}-dec{k}{sfx}+enc3-{tag}.safetensors"
        pred.save(out_path, lora or None)
        variants[f"{kind}-dec{k}{sfx}+enc3"] = (out_path, {**p, "encoder_sparsity": len(enc_order) / n_enc})

    fw = None
    if peers.faster_whisper_available():
        from lazyneuron.speech.whisper import ct2_directory

        fw = peers.FasterWhisper(ct2_directory(MODEL), threads=args.threads)
    else:
        log.warning("faster-whisper is not installed: no peer row (%s)", peers.WHISPER_INSTALL)

    tr = TimedTranscriber(model, proc, max_new_tokens=72)
    names = list(variants) + (["faster-whisper"] if fw else [])
    results: dict[str, list[dict]] = {n: [] for n in names}
    history: dict[str, dict[str, list[torch.Tensor]]] = {n: {} for n in variants}
    sets = [("espeak", u) for u in test] + [("librivox", u) for u in libri]
    for _ in range(2):  # warm-up
        tr(test[0])
    t_start = time.time()
    for i, (src, u) in enumerate(sets):
        order = names[i % len(names):] + names[: i % len(names)]
        for n in order:
            if n == "faster-whisper":
                f, _m = tr.feats(u)
                prompt = prompt_tokens(model, language=u.language, task="transcribe")
                ids, dt = fw.transcribe_ids(f, prompt, max_new_tokens=72)
                eos = model.generation_config.eos_token_id
                ids = [t for t in ids if t != eos]
                nt = len(ids)
                text = proc.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            else:
                path, _p = variants[n]
                with quiet_applies():
                    ln.revert_(model)
                    if path is not None:
                        ln.apply_(model, ModuleGatingConfig(checkpoint=str(path), context=f"language={u.language}|task=transcribe"))
                        model.model.decoder.merge()
                        gs.speech_gates(model).track = False
                text, dt, nt = tr(u)
                if path is not None:
                    history[n].setdefault((src, u.language), []).append(gs.speech_gates(model).gates.detach().clone()[0])
            e, w = utt_errors(u.text, text, u.language)
            results[n].append({"src": src, "lang": u.language, "id": u.id, "s": dt, "tokens": nt, "errors": e, "words": w, "hyp": text, "ref": u.text})
        if i % 10 == 0:
            log.info("%d / %d utterances (%.0f s)", i + 1, len(sets), time.time() - t_start)
    ln.revert_(model)
    raw = cache_dir("bench") / f"{run}.raw.pt"  # everything the records are computed from (--from-raw recomputes them)
    torch.save({"run": run, "results": results, "history": history, "variants": {n: [str(p), v] for n, (p, v) in variants.items()},
                "gate_info": gate_info, "order_s": order_s, "dec_order": dec_order, "enc_order": enc_order, "slots": slots,
                "n_enc": n_enc, "n_dec": n_dec, "names": names, "args": vars(args), "t_run": t_run, "t_start": t_start,
                "t_end": time.time()}, raw)
    log.info("raw results in %s", raw)
    report(raw)


def report(raw_path: Path) -> None:
    raw = torch.load(raw_path, weights_only=True)
    run, results, history, gate_info = raw["run"], raw["results"], raw["history"], raw["gate_info"]
    variants = {n: (None if p == "None" else Path(p), v) for n, (p, v) in raw["variants"].items()}
    order_s, dec_order, enc_order, slots = raw["order_s"], raw["dec_order"], raw["enc_order"], raw["slots"]
    n_enc, n_dec, names = raw["n_enc"], raw["n_dec"], raw["names"]
    args = argparse.Namespace(**raw["args"])
    t_run, t_start = raw["t_run"], raw["t_start"]
    records = []
    for n, info in gate_info.items():
        for m, v in info.items():
            records.append(rec(run, "module_gating", {**variants[n][1], "variant": n, "language": "all", "task": "transcribe"}, m, float(v)))
    records.append(rec(run, "module_gating", {"variant": "static orders", "language": "all", "task": "transcribe"}, "search_s", order_s, "s"))
    groups = [(src, lang) for src, lang in [("espeak", l) for l in LANGS] + [("librivox", "en")]]
    for n in names:
        p = dict(variants[n][1]) if n in variants else {"encoder_sparsity": 0.0, "decoder_sparsity": 0.0}
        method = "dense" if n == "dense" else "faster-whisper" if n == "faster-whisper" else "module_gating"
        for src, lang in groups:
            rows = [r for r in results[n] if r["src"] == src and r["lang"] == lang]
            dense_rows = [r for r in results["dense"] if r["src"] == src and r["lang"] == lang]
            if not rows:
                continue
            w = sd.wer([r["ref"] for r in rows], [r["hyp"] for r in rows], lang)
            base = {**p, "variant": n, "language": lang, "task": "transcribe", "source": src, "utterances": len(rows)}
            records.append(rec(run, method, base, "wer", 100 * w["wer"], "%"))
            records.append(rec(run, method, base, "wer_ci95_lo", 100 * w["ci95"][0], "%"))
            records.append(rec(run, method, base, "wer_ci95_hi", 100 * w["ci95"][1], "%"))
            tot, dtot = sum(r["s"] for r in rows), sum(r["s"] for r in dense_rows)
            records.append(rec(run, method, base, "seconds_per_utterance", tot / len(rows), "s"))
            records.append(rec(run, method, base, "time_vs_dense", tot / dtot, "x"))
            records.append(rec(run, method, base, "time_saved_pct", 100 * (1 - tot / dtot), "%"))
            kept = [r for r in results["all-kept"] if r["src"] == src and r["lang"] == lang]
            records.append(rec(run, method, base, "time_vs_all_kept", tot / sum(r["s"] for r in kept), "x"))
            records.append(rec(run, method, base, "new_tokens_per_utterance", sum(r["tokens"] for r in rows) / len(rows), "tokens"))
            d = paired_delta_ci([r["errors"] for r in rows], [r["errors"] for r in dense_rows], [r["words"] for r in rows])
            for m, v in zip(("wer_delta_vs_dense", "wer_delta_vs_dense_lo", "wer_delta_vs_dense_hi"), d):
                records.append(rec(run, method, base, m, v, "points"))
            if n.startswith("gated") and n.replace("gated", "static") in results:
                st = [r for r in results[n.replace("gated", "static")] if r["src"] == src and r["lang"] == lang]
                d = paired_delta_ci([r["errors"] for r in rows], [r["errors"] for r in st], [r["words"] for r in rows])
                for m, v in zip(("wer_delta_vs_static", "wer_delta_vs_static_lo", "wer_delta_vs_static_hi"), d):
                    records.append(rec(run, method, base, m, v, "points"))
            if (src, lang) in history.get(n, {}):
                h = torch.stack(history[n][(src, lang)])
                records.append(rec(run, method, base, "decoder_modules_skipped", float(1 - h[:, n_enc:].mean()), "fraction"))
                records.append(rec(run, method, base, "encoder_modules_skipped", float(1 - h[:, :n_enc].mean()), "fraction"))
    # which modules each language keeps, and how often the decisions differ between languages
    for n in (x for x in variants if x.startswith("gated")):  # espeak test utterances (LibriVox is a different source)
        keep = {lang: torch.stack(history[n][("espeak", lang)]).mean(0).tolist() for lang in LANGS if history[n].get(("espeak", lang))}
        maj = {lang: [v > 0.5 for v in vals] for lang, vals in keep.items()}
        pairs = [(a, b) for i, a in enumerate(maj) for b in list(maj)[i + 1:]]
        diff = [sum(x != y for x, y in zip(maj[a][n_enc:], maj[b][n_enc:])) / n_dec for a, b in pairs]
        per_utt = {lang: torch.stack(history[n][("espeak", lang)]) for lang in maj}
        records.append(rec(run, "module_gating", {**variants[n][1], "variant": n, "language": "all", "task": "transcribe", "keep": keep},
                           "decoder_decisions_differing_between_languages", float(np.mean(diff)) if diff else 0.0, "fraction"))
        # within a language: each utterance's decoder mask against the language's majority mask
        within = [float((h[:, n_enc:] != (h[:, n_enc:].mean(0, keepdim=True) > 0.5).float()).float().mean()) for h in per_utt.values()]
        records.append(rec(run, "module_gating", {**variants[n][1], "variant": n, "language": "all", "task": "transcribe"},
                           "decoder_decisions_differing_within_language", float(np.mean(within)), "fraction"))
    records.append(rec(run, "config", {"train": args.train, "calib": args.calib, "test": args.test, "quick": args.quick,
                                       "decoder_order": [list(s) for s in dec_order], "encoder_order": [list(s) for s in enc_order],
                                       "slots": [list(s) for s in slots]}, "run_seconds", raw["t_end"] - t_run, "s"))
    records.append(rec(run, "config", {}, "eval_seconds", raw["t_end"] - t_start, "s"))
    out = RECORDS if not args.quick else RESULTS / "speech_gating_quick.jsonl"
    write(records, out)
    (cache_dir("bench") / f"{run}.transcripts.json").write_text(json.dumps(results, ensure_ascii=False))
    log.info("wrote %d records to %s", len(records), out)
    draw(out)
    table(out)


def _save(pred: torch.nn.Module, path: Path) -> Path:
    pred.save(path)
    return path


def _save_gated(model: torch.nn.Module, path: Path) -> Path:
    dec = model.model.decoder
    gs.speech_gates(model).predictor.save(path, dec.lora_state() if dec.lora_paths else None)
    return path


def _calib_loss(model: torch.nn.Module, batches: list) -> float:
    """Mean KL(dense || current) per scored token on the calibration batches (contexts from the batches)."""
    teachers = gs.teacher_logits(model, batches)
    with torch.no_grad():
        tot = sum(float(gs.distill_loss(gs.decoder_logits(model, b, reuse_encoder=True), t, b)) for b, t in zip(batches, teachers))
    return tot / max(1, len(batches))


def latest(path: Path) -> list[dict]:
    recs = read(path)
    runs = [r["run"] for r in recs if r.get("run")]
    return [r for r in recs if r.get("run") == runs[-1]] if runs else []


def draw(path: Path = RECORDS) -> None:
    recs = latest(path)
    if not recs:
        return
    cfg = next(r for r in recs if r["metric"] == "run_seconds")
    slots = [tuple(s) for s in cfg["params"]["slots"]]
    for r in recs:
        if r["metric"] == "decoder_decisions_differing_between_languages":
            out = RESULTS / f"speech_gates_{r['params']['variant']}.png"
            plots.speech_gates(r["params"]["keep"], slots, out, title=f"Whisper base, {r['params']['variant']}: keep probability (test utterances)")
            log.info("wrote %s", out)
    # WER against time saved, espeak test, averaged over languages
    pts = {}
    for r in recs:
        p = r["params"]
        if p.get("source") == "espeak" and r["metric"] in ("wer_delta_vs_dense", "time_saved_pct"):
            pts.setdefault(p["variant"], {}).setdefault(r["metric"], []).append(r["value"])
    plt = plots._plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, v in pts.items():
        x, y = float(np.mean(v["time_saved_pct"])), float(np.mean(v["wer_delta_vs_dense"]))
        style = "s" if n.startswith("static") else "o" if n.startswith("gated") else "^" if n == "faster-whisper" else "D"
        ax.plot(x, y, style, markersize=8, label=n)
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_xlabel("transcription time saved vs dense (%; encoder + greedy decode, same run)")
    ax.set_ylabel("WER change vs dense (points, mean of en/de/es)")
    ax.set_title("Whisper base on espeak-ng speech: module gating vs static removal")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    out = RESULTS / "speech_gating_wer_vs_time.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    log.info("wrote %s", out)


def table(path: Path = RECORDS) -> None:
    recs = latest(path)
    rows: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in recs:
        p = r["params"]
        if "source" in p:
            rows.setdefault((p["variant"], p["source"], p["language"]), {})[r["metric"]] = r["value"]
    print("| variant | data | lang | WER % [95% CI] | Δ vs dense (pts) | Δ vs static (pts) | time saved vs dense | vs all-kept | tokens | dec. skipped |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (n, src, lang), m in rows.items():
        vs = f"{m['wer_delta_vs_static']:+.1f} [{m['wer_delta_vs_static_lo']:+.1f}, {m['wer_delta_vs_static_hi']:+.1f}]" if "wer_delta_vs_static" in m else ""
        print(f"| {n} | {src} | {lang} | {m['wer']:.1f} [{m['wer_ci95_lo']:.1f}, {m['wer_ci95_hi']:.1f}] | "
              f"{m['wer_delta_vs_dense']:+.1f} [{m['wer_delta_vs_dense_lo']:+.1f}, {m['wer_delta_vs_dense_hi']:+.1f}] | {vs} | "
              f"{m['time_saved_pct']:.1f}% | {100 * (1 - m['time_vs_all_kept']):.1f}% | {m['new_tokens_per_utterance']:.1f} | "
              f"{m.get('decoder_modules_skipped', 0):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
