"""Module gating on Whisper (encoder-decoder speech): tiny models built from configs."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import lazyneuron as ln
from lazyneuron.errors import ConfigError
from lazyneuron.methods import gating_speech as gs
from lazyneuron.methods.gating import ModuleGatingConfig, set_context


def tiny_whisper(seed: int = 0) -> transformers.WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = transformers.WhisperConfig(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=50,
                                     max_target_positions=40, decoder_start_token_id=1, eos_token_id=2, pad_token_id=2, bos_token_id=2,
                                     suppress_tokens=[], begin_suppress_tokens=[])
    return transformers.WhisperForConditionalGeneration(cfg).eval()


FEAT = torch.randn(2, 16, 100, generator=torch.Generator().manual_seed(1))
IDS = torch.tensor([[1, 5, 7, 9, 11], [1, 3, 4, 8, 6]])


def masked_reference(model: transformers.WhisperForConditionalGeneration, skip: list[tuple[str, int, str]]) -> torch.Tensor:
    """Dense HF forward with the skipped modules' residual branches zeroed by hooks (the ground truth)."""
    hooks = []
    for stack, j, name in skip:
        layer = (model.model.encoder if stack == "encoder" else model.model.decoder).layers[j]
        if name == "mlp":
            hooks.append(layer.fc2.register_forward_hook(lambda m, i, o: o * 0))
        else:
            mod = layer.self_attn if name == "attn" else layer.encoder_attn
            hooks.append(mod.register_forward_hook(lambda m, i, o: (o[0] * 0,) + tuple(o[1:])))
    try:
        with torch.no_grad():
            return model(input_features=FEAT, decoder_input_ids=IDS).logits
    finally:
        for h in hooks:
            h.remove()


def save(pred: torch.nn.Module, tmp_path, name: str = "g.safetensors") -> str:
    p = str(tmp_path / name)
    pred.save(p)
    return p


def test_roles_listed():
    info = ln.api.inspect(tiny_whisper())
    roles = info["roles"]
    assert [e["path"] for e in roles["front_end"]] == ["model.encoder.conv1", "model.encoder.conv2"]
    assert len(roles["enc_attn"]) == 2 and len(roles["cross_attn"]) == 3 and len(roles["mlp_in"]) == 3
    assert roles["enc_mlp_in"][0]["path"] == "model.encoder.layers.0.fc1"


def test_zero_strength_is_dense_and_revert_is_exact(tmp_path):
    m = tiny_whisper()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        ref = m(input_features=FEAT, decoder_input_ids=IDS).logits
        gen_ref = m.generate(FEAT, max_new_tokens=6, do_sample=False)
    p = save(gs.new_predictor(m, {"language": ["en", "de"], "task": ["transcribe"]}), tmp_path)
    ln.apply_(m, ModuleGatingConfig(checkpoint=p).at_zero_strength())
    assert isinstance(m.model.encoder, gs.GatedWhisperEncoder) and isinstance(m.model.decoder, gs.GatedWhisperDecoder)
    with torch.no_grad():
        assert torch.equal(m(input_features=FEAT, decoder_input_ids=IDS).logits, ref)
        assert torch.equal(m.generate(FEAT, max_new_tokens=6, do_sample=False), gen_ref)
    ln.revert_(m)
    assert type(m.model.encoder).__name__ == "WhisperEncoder"
    assert set(m.state_dict()) == set(sd) and all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())


SKIP = [("encoder", 0, "attn"), ("encoder", 1, "mlp"), ("decoder", 0, "cross"), ("decoder", 1, "attn"), ("decoder", 2, "mlp")]


def test_static_skip_equals_masked_reference_and_skipped_modules_never_run(tmp_path):
    m = tiny_whisper()
    ref = masked_reference(m, SKIP)
    ln.apply_(m, ModuleGatingConfig(checkpoint=save(gs.static_speech_predictor(m, SKIP), tmp_path)))
    calls = []
    base_enc, base_dec = m.model.encoder.base, m.model.decoder.base
    for stack, j, name in SKIP:
        layer = (base_enc if stack == "encoder" else base_dec).layers[j]
        mods = [layer.fc1, layer.fc2] if name == "mlp" else [layer.self_attn if name == "attn" else layer.encoder_attn]
        for mod in mods:
            mod.register_forward_hook(lambda *a, s=(stack, j, name): calls.append(s))
    with torch.no_grad():
        out = m(input_features=FEAT, decoder_input_ids=IDS).logits
    assert (out - ref).abs().max().item() < 1e-5
    assert calls == []
    sk = gs.speech_gates(m)
    assert sk.gates is not None and int((sk.gates == 0).sum()) == 2 * len(SKIP)


def test_cached_decoding_matches_full_recompute_with_skipped_self_attention(tmp_path):
    """A skipped self-attention writes no cache; positions must not shift: step-by-step decoding with
    the cache gives the logits of a full teacher-forced forward at every step."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    m = tiny_whisper()
    skip = [("decoder", 0, "attn"), ("decoder", 2, "cross")]
    ln.apply_(m, ModuleGatingConfig(checkpoint=save(gs.static_speech_predictor(m, skip), tmp_path)))
    with torch.no_grad():
        full = m(input_features=FEAT, decoder_input_ids=IDS).logits
        enc = m.model.encoder(FEAT).last_hidden_state
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        steps = []
        h = m.model.decoder(input_ids=IDS[:, :2], encoder_hidden_states=enc, past_key_values=cache, use_cache=True).last_hidden_state
        steps.append(m.proj_out(h))
        for t in range(2, IDS.shape[1]):
            h = m.model.decoder(input_ids=IDS[:, t:t + 1], encoder_hidden_states=enc, past_key_values=cache, use_cache=True).last_hidden_state
            steps.append(m.proj_out(h))
    inc = torch.cat(steps, 1)
    assert (inc - full).abs().max().item() < 1e-5
    assert cache.self_attention_cache.get_seq_length(0) == 0  # layer 0's self-attention never wrote its cache
    assert cache.self_attention_cache.get_seq_length(1) == IDS.shape[1]


def test_batch_with_different_masks_equals_each_utterance_alone(tmp_path):
    m = tiny_whisper()
    ln.apply_(m, ModuleGatingConfig(checkpoint=save(gs.static_speech_predictor(m, []), tmp_path)))
    sk = gs.speech_gates(m)
    n = len(sk.slots)
    force = torch.ones(2, n, dtype=torch.bool)
    force[0, sk.slots.index(("decoder", 1, "mlp"))] = False
    force[1, sk.slots.index(("decoder", 0, "attn"))] = False
    force[1, sk.slots.index(("encoder", 1, "attn"))] = False
    sk.force = force
    with torch.no_grad():
        both = m(input_features=FEAT, decoder_input_ids=IDS).logits
        gen_both = m.generate(FEAT, max_new_tokens=5, do_sample=False)
        for i in range(2):
            sk.force = force[i]
            one = m(input_features=FEAT[i:i + 1], decoder_input_ids=IDS[i:i + 1]).logits
            assert (one - both[i:i + 1]).abs().max().item() < 1e-5
            gen_one = m.generate(FEAT[i:i + 1], max_new_tokens=5, do_sample=False)
            assert gen_one[0].tolist() == gen_both[i].tolist()


def _batches(m: transformers.WhisperForConditionalGeneration) -> list[gs.SpeechBatch]:
    out = []
    for i, lang in enumerate(["en", "de", "en", "de"]):
        g = torch.Generator().manual_seed(10 + i)
        feat = torch.randn(2, 16, 100, generator=g) + (0.5 if lang == "de" else -0.5)
        toks = torch.randint(3, 96, (2, 7), generator=g)
        toks[:, 0] = 1
        out.append(gs.SpeechBatch(feat, None, toks, torch.ones_like(toks), 2, {"language": [lang, lang], "task": ["transcribe"] * 2}))
    return out


def test_training_reaches_the_decoder_target_and_round_trips(tmp_path):
    m = tiny_whisper()
    batches = _batches(m)
    cfg = gs.SpeechGateTraining(decoder_target=0.5, epochs=6, lr=3e-2)
    pred = gs.train_speech_gates(m, batches, {"language": ["en", "de"], "task": ["transcribe"]}, cfg, progress=False,
                                 out=tmp_path / "trained.safetensors")
    t = gs.calibrate_speech_threshold(m, batches, 0.5)
    assert math.isfinite(t)
    sk = gs.speech_gates(m)
    sk.track = True
    with torch.no_grad():
        for bt in batches:
            sk.context = bt.context
            m(input_features=bt.features, decoder_input_ids=bt.tokens)
    rate = float(1 - torch.cat(sk.history)[:, sk.n_enc:].mean())
    assert abs(rate - 0.5) <= 0.17  # calibrated on these utterances: half of the decoder's modules skipped
    assert float(torch.cat(sk.history)[:, : sk.n_enc].mean()) > 0.5  # no encoder target: the encoder mostly runs
    pred.save(tmp_path / "cal.safetensors")
    keep = sk.history[1]  # batch 1 (German) under the calibrated threshold
    ln.revert_(m)
    # the saved checkpoint reproduces the decisions on a fresh copy of the model
    m2 = tiny_whisper()
    ln.apply_(m2, ModuleGatingConfig(checkpoint=str(tmp_path / "cal.safetensors"), context="language=de|task=transcribe"))
    sk2 = gs.speech_gates(m2)
    sk2.track = True
    with torch.no_grad():
        m2(input_features=batches[1].features, decoder_input_ids=batches[1].tokens)
    assert torch.equal(sk2.history[-1], keep)


def test_precomputed_cross_attention_gives_the_same_losses(tmp_path):
    m = tiny_whisper()
    skip = [("decoder", 1, "cross"), ("decoder", 0, "mlp")]
    ln.apply_(m, ModuleGatingConfig(checkpoint=save(gs.static_speech_predictor(m, skip), tmp_path)))
    plain, cached = _batches(m)[:2], _batches(m)[:2]
    gs.prepare(m, plain)
    gs.prepare(m, cached, cross=True)
    assert plain[0].cross is None and len(cached[0].cross) == 3
    with torch.no_grad():
        for a, b in zip(plain, cached):
            la = gs.decoder_logits(m, a, reuse_encoder=True)
            lb = gs.decoder_logits(m, b, reuse_encoder=True)
            lc = gs.decoder_logits(m, a, reuse_encoder=False)  # the encoder runs again (all its modules kept)
            assert (la - lb).abs().max().item() < 1e-5 and (la - lc).abs().max().item() < 1e-5


def test_static_order_and_contexts(tmp_path):
    m = tiny_whisper()
    ln.apply_(m, ModuleGatingConfig(checkpoint=save(gs.static_speech_predictor(m, []), tmp_path)))
    order = gs.static_speech_order(m, _batches(m)[:2], 3, progress=False)
    assert len(order) == 3 and len(set(order)) == 3 and all(s[0] == "decoder" for s in order)
    ln.revert_(m)
    p = save(gs.new_predictor(m, {"language": ["en", "de"]}), tmp_path, "ctx.safetensors")
    with pytest.raises(ConfigError, match="task"):
        ln.apply_(m, ModuleGatingConfig(checkpoint=p, context="task=translate"))
    ln.apply_(m, ModuleGatingConfig(checkpoint=p, context="language=en"))
    set_context(m, language=["en", "de"])
    with pytest.raises(ConfigError, match="never seen"):
        ln.revert_(m)
        ln.apply_(m, ModuleGatingConfig(checkpoint=p, unknown="error"))
        set_context(m, language="fr")


def test_errors(tmp_path):
    m = tiny_whisper()
    with pytest.raises(ConfigError, match="cannot skip"):
        gs.static_speech_predictor(m, [("decoder", 7, "mlp")])
    p = save(gs.new_predictor(m, {}), tmp_path)
    other = tiny_whisper()
    other.model.decoder.layers = other.model.decoder.layers[:2]
    other.config.decoder_layers = 2
    with pytest.raises(ConfigError, match="train gates for this model"):
        ln.apply_(other, ModuleGatingConfig(checkpoint=p))
    ln.apply_(m, ModuleGatingConfig(checkpoint=p))
    with pytest.raises(ConfigError, match="run model.model.encoder"):
        gs.speech_gates(m).gates = None
        m.model.decoder(input_ids=IDS, encoder_hidden_states=torch.zeros(2, 50, 32))
    with pytest.raises(ConfigError, match="mel features of length 100"):
        m.model.encoder(torch.zeros(1, 16, 80))


def test_low_rank_adapters_train_save_reload_and_revert(tmp_path):
    m = tiny_whisper()
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        dense = m(input_features=FEAT, decoder_input_ids=IDS).logits
    batches = _batches(m)
    cfg = gs.SpeechGateTraining(decoder_target=0.3, epochs=3, lr=3e-2, lora_rank=2, lora_lr=1e-2)
    gs.train_speech_gates(m, batches, {"language": ["en", "de"], "task": ["transcribe"]}, cfg, progress=False, out=tmp_path / "l.safetensors")
    dec = m.model.decoder
    assert len(dec.lora_paths) == 3 * len(gs.LORA_DECODER)
    assert any(float(x.b.abs().sum()) > 0 for x in dec.lora_modules())  # the adapters moved
    sk = gs.speech_gates(m)
    sk.mode = "dense"  # the teacher path runs the base weights only: the dense model exactly
    with torch.no_grad():
        assert torch.equal(m(input_features=FEAT, decoder_input_ids=IDS).logits, dense)
    sk.mode = "hard"
    sk.context = {"language": "en"}
    with torch.no_grad():
        trained = m(input_features=FEAT, decoder_input_ids=IDS).logits
    ln.revert_(m)
    assert set(m.state_dict()) == set(sd0) and all(torch.equal(v, m.state_dict()[k]) for k, v in sd0.items())
    ln.apply_(m, ModuleGatingConfig(checkpoint=str(tmp_path / "l.safetensors"), context="language=en"))
    assert len(m.model.decoder.lora_paths) == 3 * len(gs.LORA_DECODER)
    with torch.no_grad():
        again = m(input_features=FEAT, decoder_input_ids=IDS).logits
    assert (again - trained).abs().max().item() < 1e-5
    ln.revert_(m)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd0.items())
    # on the runtime: the adapted linears run their merged weights on the kernels, same logits
    from lazyneuron.runtime import RuntimeConfig

    ln.apply_(m, [ModuleGatingConfig(checkpoint=str(tmp_path / "l.safetensors"), context="language=en"), RuntimeConfig(dtype="fp32")])
    lora = m.model.decoder.lora_modules()
    assert all(x.weight_dtype == "fp32" for x in lora)
    with torch.no_grad():
        fast = m(input_features=FEAT, decoder_input_ids=IDS).logits
    assert all(x.__dict__.get("_fast") is not None for x in lora)  # the kernels ran
    assert (fast - trained).abs().max().item() < 1e-4 * (1 + trained.abs().max().item())
    assert not any("_fast" in k for k in m.state_dict())
    ln.revert_(m)
    assert set(m.state_dict()) == set(sd0) and all(torch.equal(v, m.state_dict()[k]) for k, v in sd0.items())


def test_gates_compose_with_the_runtime(tmp_path):
    """Module gating, then the runtime: the modules that run do so on the runtime's kernels, the
    skipped ones still never run, the logits equal the masked reference, revert is exact."""
    from lazyneuron.runtime import FastLinear, RuntimeConfig

    m = tiny_whisper()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    ref = masked_reference(m, SKIP)
    ln.apply_(m, [ModuleGatingConfig(checkpoint=save(gs.static_speech_predictor(m, SKIP), tmp_path)), RuntimeConfig(dtype="fp32")])
    dec = m.model.decoder.base
    assert isinstance(dec.layers[0].fc1, FastLinear) and isinstance(dec.layers[2].encoder_attn.q_proj, FastLinear)
    assert isinstance(m.model.encoder.base.layers[1].self_attn.v_proj, FastLinear) and isinstance(m.proj_out, FastLinear)
    calls = []
    for stack, j, name in SKIP:
        layer = (m.model.encoder.base if stack == "encoder" else dec).layers[j]
        mods = [layer.fc1, layer.fc2] if name == "mlp" else [layer.self_attn if name == "attn" else layer.encoder_attn]
        for mod in mods:
            mod.register_forward_hook(lambda *a, s=(stack, j, name): calls.append(s))
    with torch.no_grad():
        out = m(input_features=FEAT, decoder_input_ids=IDS).logits
    assert (out - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    assert calls == []
    ln.revert_(m)
    assert not any(isinstance(x, (FastLinear, gs.GatedWhisperDecoder)) for x in m.modules())
    assert set(m.state_dict()) == set(sd) and all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())
