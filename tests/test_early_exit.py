"""Early exit: encoder exits with batch compaction, decoder per-token exits with CALM state
propagation, simulation / thresholds, checkpoints and errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_causal_lm

import lazyneuron as ln
from lazyneuron.bench.decode import lean_generate
from lazyneuron.bench.quality import perplexity
from lazyneuron.methods.early_exit import (
    EarlyExitConfig,
    ExitHeads,
    ExitingDecoder,
    ExitingEncoder,
    classifier_stats,
    collect_classifier_states,
    collect_lm_states,
    lm_stats,
    simulate,
    thresholds_for,
    train_classifier_exits,
    train_lm_exits,
)
from lazyneuron.tasks import Batch, TextClassifier


def _clf(layers: int = 4) -> TextClassifier:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=64)
    return TextClassifier(BertModel(cfg), 3).eval()


def _batches(n: int = 6, b: int = 8, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 128, (b, 12), generator=g)
        mask = torch.ones_like(ids)
        lens = torch.randint(4, 13, (b,), generator=g)
        for i, n_ in enumerate(lens):
            mask[i, n_:] = 0
            ids[i, n_:] = 0
        out.append(Batch(ids, mask, torch.randint(0, 3, (b,), generator=g)))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    clf = _clf()
    data = _batches()
    heads = train_classifier_exits(clf, data, epochs=3, progress=False)
    path = tmp_path_factory.mktemp("exits") / "heads.safetensors"
    heads.save(path)
    return clf, data, heads, str(path)


def test_never_exit_equals_dense(trained) -> None:
    clf, data, heads, path = trained
    dense = [clf(b.input_ids, b.attention_mask) for b in data]
    cfg = EarlyExitConfig(criterion="max_prob", checkpoint=path).at_zero_strength()
    with ln.applied(clf, cfg):
        got = [clf(b.input_ids, b.attention_mask) for b in data]
    for a, b in zip(got, dense):
        assert torch.allclose(a, b, atol=1e-5)


def _untied_threshold(scores: torch.Tensor) -> float:
    """A threshold between the 30% and 70% quantiles of the first exit's scores, at the middle of
    the widest gap between any two scores of any exit layer: batched and one-by-one arithmetic
    differ in the last bits, so a threshold on (or within rounding of) a score would let that
    difference decide whether the sample exits."""
    first = scores[0].double()
    lo, hi = float(first.quantile(0.3)), float(first.quantile(0.7))
    s = scores.double().flatten().sort().values
    s = s[(s >= lo) & (s <= hi)]
    gaps = s[1:] - s[:-1]
    k = int(gaps.argmax())
    assert gaps[k] > 1e-4, "no gap between the scores wide enough for a threshold off every tie"
    return float((s[k] + s[k + 1]) / 2)


@pytest.mark.parametrize("criterion", ["max_prob", "entropy", "patience", "learned"])
def test_compacted_batch_matches_one_by_one_and_simulation(trained, criterion: str) -> None:
    clf, data, heads, path = trained
    pooled, final, labels = collect_classifier_states(clf, data)
    stats = classifier_stats(heads, pooled, final, labels)
    # a threshold at which some samples exit and others do not, away from every sample's score
    threshold = 2.0 if criterion == "patience" else _untied_threshold({"max_prob": stats.maxp, "entropy": stats.entropy, "learned": stats.score}[criterion])
    sim_pred, sim_ran = simulate(stats, criterion, threshold)
    cfg = EarlyExitConfig(criterion=criterion, threshold=threshold, checkpoint=path)
    with ln.applied(clf, cfg):
        enc = clf.bert.encoder
        assert isinstance(enc, ExitingEncoder)
        enc.track = True
        batched = torch.cat([clf(b.input_ids, b.attention_mask) for b in data])
        ran = torch.tensor(enc.layers_run)
        enc.layers_run = []
        single = torch.cat([clf(b.input_ids[i : i + 1], b.attention_mask[i : i + 1]) for b in data for i in range(len(b.labels))])
    assert torch.allclose(batched, single, atol=1e-4)  # compaction changes nothing per sample
    assert torch.equal(batched.argmax(-1), sim_pred)  # the simulation predicts the real run exactly
    assert torch.equal(ran, sim_ran)
    if criterion != "patience":
        assert len(set(ran.tolist())) > 1  # samples leave the batch at different layers


def test_thresholds_for_meets_the_budget(trained) -> None:
    clf, data, heads, _ = trained
    stats = classifier_stats(heads, *collect_classifier_states(clf, data))
    for crit in ("max_prob", "entropy", "learned", "patience"):
        for budget in (0.0, 0.05):
            r = thresholds_for(stats, crit, budget)
            pred, ran = simulate(stats, crit, r["threshold"])
            assert r["dense_quality"] - (pred == stats.labels).float().mean().item() <= budget + 1e-9
            assert abs(ran.float().mean().item() - r["mean_layers"]) < 1e-6
    with pytest.raises(ln.ConfigError, match="fraction"):
        thresholds_for(stats, "max_prob", 5)


def test_exit_heads_checkpoint_errors(trained, tmp_path) -> None:
    clf, _, heads, path = trained
    back = ExitHeads.load(path, clf)
    for k, v in heads.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    with pytest.raises(ln.ConfigError, match="does not exist"):
        ExitHeads.load(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense" * 4)
    with pytest.raises(ln.ConfigError, match="readable"):
        ExitHeads.load(tmp_path / "bad.safetensors")
    with pytest.raises(ln.ConfigError, match="trained for"):
        ln.apply_(tiny_causal_lm("llama"), EarlyExitConfig(checkpoint=path))
    with pytest.raises(ln.ConfigError, match="checkpoint"):
        EarlyExitConfig()
    with pytest.raises(ln.ConfigError, match="criterion"):
        EarlyExitConfig(criterion="confidence", checkpoint=path)
    with pytest.raises(ln.ConfigError, match="TextClassifier"):
        ln.apply_(tiny_bert(), EarlyExitConfig(checkpoint=path))


# -- decoder ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    m = tiny_causal_lm("llama", layers=4)
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    heads = train_lm_exits(m, windows, [0, 1, 2], epochs=2, progress=False)
    path = tmp_path_factory.mktemp("lmexits") / "heads.safetensors"
    heads.save(path)
    return m, windows, heads, str(path)


def test_decoder_never_exit_equals_dense(lm) -> None:
    m, windows, _, path = lm
    prompt = windows[:1, :10]
    dense_ids = lean_generate(m, prompt, 12)
    dense_ppl = perplexity(m, windows[:2])
    with ln.applied(m, EarlyExitConfig(checkpoint=path).at_zero_strength()):
        assert torch.equal(lean_generate(m, prompt, 12), dense_ids)
        assert abs(perplexity(m, windows[:2]) / dense_ppl - 1) < 1e-4  # evaluated token by token


def test_decoder_exit_fills_every_skipped_key_value(lm) -> None:
    """Exit after layer 0 for every decoded token: each skipped layer still gets the token's
    key / value, computed from the exited state (CALM), so no later read finds a hole."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m, windows, _, path = lm
    cfg = EarlyExitConfig(criterion="learned", threshold=-1.0, checkpoint=path)  # score >= -1: always exit at the first exit
    with ln.applied(m, cfg):
        dec = m.model
        assert isinstance(dec, ExitingDecoder)
        cache = DynamicCache(config=m.config)
        prompt = windows[:1, :6]
        with torch.inference_mode():
            m(input_ids=prompt, past_key_values=cache, use_cache=True)
            captured = {}
            hook = dec.base.layers[0].register_forward_hook(lambda mod, a, out: captured.__setitem__("h", out))
            dec.track, dec.tokens_seen, dec.weights_skipped = True, 0, 0.0
            for step in range(3):
                pos = 6 + step
                m(input_ids=windows[:1, pos : pos + 1], past_key_values=cache, use_cache=True, position_ids=torch.tensor([[pos]]))
                for j in range(4):
                    assert cache.get_seq_length(j) == pos + 1, (j, step)
            hook.remove()
            assert dec.layers_run == [1, 1, 1]
            # accounting: each token skipped layers 1..3 except their key / value projections
            per_layer = [sum(p.numel() for n, p in layer.named_parameters() if n.endswith("proj.weight") and not n.endswith(("k_proj.weight", "v_proj.weight")))
                         for layer in dec.base.layers]
            assert dec.tokens_seen == 3 and dec.weights_skipped == 3 * sum(per_layer[1:])
            # the last token's K/V at layer 2 are the projections of the state that left layer 0
            h = captured["h"]
            layer = dec.base.layers[2]
            x = layer.input_layernorm(h)
            k = layer.self_attn.k_proj(x).view(1, 1, -1, layer.self_attn.head_dim).transpose(1, 2)
            v = layer.self_attn.v_proj(x).view(1, 1, -1, layer.self_attn.head_dim).transpose(1, 2)
            cos, sin = dec.base.rotary_emb(h, position_ids=torch.tensor([[8]]))
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            keys, values = cache.layers[2].keys, cache.layers[2].values
            assert torch.allclose(keys[:, :, -1:], k, atol=1e-5) and torch.allclose(values[:, :, -1:], v, atol=1e-5)


def test_decoder_stats_and_thresholds(lm) -> None:
    m, windows, heads, _ = lm
    st = collect_lm_states(m, windows, heads.layers)
    final = st.final_pred
    stats = lm_stats(heads, m, st.hidden, final)
    assert torch.equal(stats.pred[0], st.preds[0])
    assert torch.allclose(m.lm_head(st.final_hidden).argmax(-1), final)  # the final normalised state is what the head reads
    r = thresholds_for(stats, "learned", 0.1)
    pred, ran = simulate(stats, "learned", r["threshold"])
    assert (pred == final).float().mean().item() >= r["dense_quality"] - 0.1 - 1e-9
    assert r["mean_layers"] <= 4


def test_demo_rows_need_trained_heads(tmp_path, monkeypatch) -> None:
    from lazyneuron.methods.early_exit import EarlyExit
    from lazyneuron.methods.fff import FastFeedForward

    monkeypatch.setenv("LAZYNEURON_CACHE", str(tmp_path))
    assert EarlyExit.demo_configs() == [] and "`lazyneuron fit exits --model smollm2-135m`" in EarlyExit.demo_notes()[0]
    assert FastFeedForward.demo_configs() == [] and "lazyneuron demo --model minilm-l6" in FastFeedForward.demo_notes()[0]
    assert "`lazyneuron fit fff --model minilm-l6`" in FastFeedForward.demo_notes("minilm-l6")[0]
    heads = ExitHeads("causal_lm", [0, 1], 8, 0, "llama")
    heads.save(tmp_path / "checkpoints" / "smollm2-135m.exits.safetensors")
    (cfg,) = EarlyExit.demo_configs()
    assert cfg.checkpoint.endswith("smollm2-135m.exits.safetensors") and EarlyExit.demo_notes() == []


def test_loop_calibrated_threshold_meets_its_budget(lm) -> None:
    from lazyneuron.bench.quality import reference_logprobs, window_logits
    from lazyneuron.methods.early_exit import calibrate_lm_threshold

    m, windows, _, path = lm
    w = windows[:2, :16]
    r = calibrate_lm_threshold(m, path, w, 0.2, steps=4, progress=False)
    ref = reference_logprobs(m, w)
    with ln.applied(m, EarlyExitConfig(criterion="learned", threshold=r["threshold"], checkpoint=path)), torch.inference_mode():
        # measured in the real decode loop, token by token through the cache
        q = sum((window_logits(m, x, loop=True).argmax(-1) == top1).sum().item() for x, (top1, _) in zip(w, ref)) / w.numel()
    assert q == pytest.approx(r["quality"]) and q >= 0.8 - 1e-9
    strict = calibrate_lm_threshold(m, path, w, 0.2, steps=4, delta=0.1, progress=False)
    assert strict["loss_upper"] <= 0.2 + 1e-9 and strict["loss_upper"] >= 1 - strict["quality"] - 1e-9
    assert strict["threshold"] >= r["threshold"]  # a confidence bound can only exit less
    both = calibrate_lm_threshold(m, path, w, [0.2, 0.5], steps=4, progress=False)
    assert both[0] == {**r, "max_quality_loss": 0.2} and both[1]["threshold"] <= r["threshold"] and 1 - both[1]["quality"] <= 0.5
    with pytest.raises(ln.ConfigError, match="delta"):
        calibrate_lm_threshold(m, path, w[:1], 0.2, delta=0.1, progress=False)
    with pytest.raises(ln.ConfigError, match="max_quality_loss"):
        calibrate_lm_threshold(m, path, w, 5.0, progress=False)


@pytest.fixture(scope="module")
def lens_path(lm, tmp_path_factory):
    m, windows, _, _ = lm
    heads = train_lm_exits(m, windows, [0, 1, 2], epochs=2, lens=True, progress=False)
    path = tmp_path_factory.mktemp("lens") / "heads.safetensors"
    heads.save(path)
    return str(path)


def test_fit_lens_recovers_an_affine_map() -> None:
    from lazyneuron.methods.early_exit import _rms, fit_lens

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g) * 3
    a, b = torch.randn(16, 16, generator=g), torch.randn(16, generator=g)
    lin = fit_lens(x, _rms(x) @ a.T + b, ridge=1e-9)
    assert torch.allclose(lin.weight, a, atol=1e-4) and torch.allclose(lin.bias, b, atol=1e-4)


def test_lens_heads_round_trip_and_zero_strength(lm, lens_path) -> None:
    m, windows, _, _ = lm
    heads = ExitHeads.load(lens_path, m)
    assert len(heads.lens) == 3
    fresh = train_lm_exits(m, windows, [0, 1, 2], epochs=2, lens=True, progress=False)
    for k, v in fresh.lens.state_dict().items():
        assert torch.allclose(heads.lens.state_dict()[k], v)  # closed form: the same fit again
    st = collect_lm_states(m, windows, [1])
    # the lens maps the exit state closer to the final state than the logit lens (final norm) does
    lens_err = (heads.exit_hidden(1, st.hidden[1], m.model.norm) - st.final_hidden).pow(2).mean()
    plain_err = (m.model.norm(st.hidden[1]) - st.final_hidden).pow(2).mean()
    assert lens_err < plain_err
    dense = perplexity(m, windows[:2])
    with ln.applied(m, EarlyExitConfig(checkpoint=lens_path).at_zero_strength()):
        assert abs(perplexity(m, windows[:2]) / dense - 1) < 1e-4
    with pytest.raises(ln.ConfigError, match="causal_lm"):
        ExitHeads("classifier", [0], 8, 2, lens=True)


@pytest.mark.parametrize("criterion,grid", [("learned", [i / 100 for i in range(30, 71)]), ("max_prob", [i / 1000 for i in range(5, 30)]),
                                            ("entropy", [4.70 + i / 200 for i in range(40)]), ("patience", [2, 3])])
@pytest.mark.parametrize("with_lens", [False, True])
def test_teacher_forced_exits_equal_the_decode_loop(lm, lens_path, criterion, grid, with_lens) -> None:
    """``ExitingDecoder.window_logits`` (whole windows, layer by layer) gives the logits and exit
    layers of the token-by-token decode loop with CALM propagation, for thresholds that make
    tokens exit at different layers."""
    from lazyneuron.bench.quality import window_logits

    m, windows, _, path = lm
    path = lens_path if with_lens else path
    mixed = 0
    for t in grid:
        with ln.applied(m, EarlyExitConfig(criterion=criterion, threshold=t, checkpoint=path)), torch.inference_mode():
            dec = m.model
            dec.track, dec.layers_run = True, []
            loop = window_logits(m, windows[1], loop=True)
            loop_layers, dec.layers_run = dec.layers_run, []
            exact = window_logits(m, windows[1])
            assert dec.layers_run == loop_layers, t
            assert torch.allclose(exact, loop, atol=1e-5), t
        mixed += 1 < len(set(loop_layers))
        if mixed >= 3:
            break
    assert mixed, f"no threshold in the grid made tokens exit at different layers for {criterion}"
