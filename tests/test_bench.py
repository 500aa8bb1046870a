from __future__ import annotations

import math

import pytest

import torch
import torch.nn.functional as F
from conftest import calib_batches, tiny_bert, tiny_causal_lm

import lazyneuron as ln
from lazyneuron.bench import Record, read, write
from lazyneuron.bench.decode import hf_generate, lean_generate
from lazyneuron.bench.plots import pareto, per_layer
from lazyneuron.bench.quality import agreement, perplexity, reference_logprobs
from lazyneuron.bench.runner import table
from lazyneuron.bench.timing import Variant, interleave, summary


def test_lean_loop_matches_hf_generate() -> None:
    m = tiny_causal_lm("llama")
    prompt = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = lean_generate(m, prompt, 6)
    theirs, _ = hf_generate(m, prompt, 6)
    assert ours.shape == (2, 6) and torch.equal(ours, theirs)


def test_perplexity_and_agreement() -> None:
    m = tiny_causal_lm("llama")
    w = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    logits = m(w).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 128), w[:, 1:].reshape(-1))
    assert math.isclose(perplexity(m, w), math.exp(nll.item()), rel_tol=1e-5)
    ref = reference_logprobs(m, w)
    agr = agreement(m, w, ref)
    assert agr["top1_agreement"] > 0.99 and agr["kl"] < 1e-2


def test_interleave_runs_every_variant_each_repeat() -> None:
    m = tiny_causal_lm("llama")
    seen = []
    out = interleave(m, [Variant("dense"), Variant("dense2")], {"x": lambda mm: seen.append(1) or 1.0}, repeats=3, warmup=1)
    assert len(seen) == 8 and out["dense"]["x"] == [1.0] * 3
    assert summary([1.0, 2.0, 3.0, 4.0, 5.0])[0] == 3.0


def test_records_round_trip_and_plots(tmp_path) -> None:
    recs = [
        Record("tiny", "dense", {}, "decode_tps_b1", 10.0, "tokens/s"),
        Record("tiny", "m", {"sparsity": 0.5}, "decode_speedup_b1", 1.6, "x dense"),
        Record("tiny", "m", {"sparsity": 0.5}, "ppl_delta_pct", 5.0, "%"),
        Record("tiny", "m", {"sparsity": 0.5, "layer": 0}, "layer_skipped", 0.4, "fraction"),
    ]
    p = write(recs, tmp_path / "r.jsonl", append=False)
    back = read(p)
    assert back[0]["metric"] == "decode_tps_b1" and back[0]["git_sha"] and "torch" in back[0]["versions"]
    assert pareto(back, tmp_path / "p.png").stat().st_size > 1000
    assert per_layer(back, tmp_path / "l.png").stat().st_size > 1000
    assert "m sparsity=0.5" in table(back)


def test_spread_windows_are_disjoint_fixed_and_cover_the_split(monkeypatch) -> None:
    from lazyneuron import data

    monkeypatch.setattr(data, "token_stream", lambda tok, c, s, n: list(range(1000))[:n])
    w = data.windows(None, "news", "train", 100, 4, spread=True)
    assert w.shape == (4, 100) and w[:, 0].tolist() == [125, 375, 625, 875]
    assert torch.equal(w, data.windows(None, "news", "train", 100, 4, spread=True))
    assert torch.equal(data.windows(None, "news", "train", 100, 4)[:, 0], torch.tensor([0, 100, 200, 300]))
    tight = data.windows(None, "news", "train", 240, 4, spread=True)  # barely fits: still disjoint, in range
    starts = tight[:, 0].tolist()
    assert all(b - a >= 240 for a, b in zip(starts, starts[1:])) and starts[-1] + 240 <= 1000
    with pytest.raises(ln.LazyNeuronError, match="fewer than"):
        data.windows(None, "news", "train", 300, 4, spread=True)


def test_bench_on_an_encoder_times_forwards_and_scores_output_states(monkeypatch) -> None:
    """An encoder (no next-token logits) is benched by forward tokens/s and by how close its output
    states stay to the dense model's; windows longer than its positions are cut to fit."""
    from lazyneuron import data
    from lazyneuron.bench import BenchSettings, run
    from lazyneuron.methods import FastFeedForwardConfig

    monkeypatch.setattr(data, "token_stream", lambda tok, c, s, n: [3 + i * 7 % 120 for i in range(n)])
    m = tiny_bert()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    s = BenchSettings(prompt_tokens=8, prefill_tokens=200, batches=(1, 2), repeats=1, ppl_windows=2, ppl_length=100)
    recs = run("tiny-bert", m, None, [FastFeedForwardConfig(depth=3)], s, progress=False)
    got = {(r.method, r.metric): r.value for r in recs}
    assert {("dense", k) for k in ("encode_tps_b1", "encode_tps_b2", "encode_tps_long", "embedding_cosine", "state_rel_error")} <= got.keys()
    assert got[("dense", "embedding_cosine")] == pytest.approx(1.0) and got[("dense", "state_rel_error")] == pytest.approx(0.0, abs=1e-6)
    assert ("fast_feedforward", "encode_speedup_b1") in got and ("fast_feedforward", "encode_speedup_long") in got
    assert -1 <= got[("fast_feedforward", "embedding_cosine")] < 0.9999 and got[("fast_feedforward", "state_rel_error")] > 0
    assert 0 < got[("fast_feedforward", "compute_skipped")] < 1
    assert not any(isinstance(x, ln.LazyModule) for x in m.modules())
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    t = table(recs)
    assert "emb. cosine" in t and "fast_feedforward" in t and "perplexity" not in t


def test_bench_calibration_serves_every_setting_of_a_method(monkeypatch) -> None:
    """Settings of one method that observe different modules (SCAP's input histograms, CATS's gates)
    share one calibration pass, and it covers them all: each applies with it."""
    from lazyneuron import data
    from lazyneuron.bench.runner import BenchSettings, build_variants
    from lazyneuron.methods import ActivationSparsityConfig as C

    monkeypatch.setattr(data, "texts", lambda corpus, split: calib_batches(8))
    m = tiny_causal_lm("llama")
    cfgs = [C(rule="scap", sparsity=0.5), C(rule="teal", sparsity=0.5), C(rule="cats", sparsity=0.5)]
    variants = build_variants(m, None, cfgs, BenchSettings(calib_texts=8), progress=False)
    # by default the methods run on the runtime (fp32), beside the dense model on it and the eager dense baseline
    assert [v.name for v in variants] == ["dense", "runtime", "activation_sparsity#2", "activation_sparsity#3", "activation_sparsity#4"]
    assert all([c.name for c in v.configs] == ["activation_sparsity", "runtime"] for v in variants[2:])
    for v in variants[1:]:
        ln.apply_(m, v.configs, v.calibration)
        ln.revert_(m)
    eager = build_variants(m, None, cfgs, BenchSettings(calib_texts=8, runtime="eager"), progress=False)
    assert [v.name for v in eager] == ["dense", "activation_sparsity#1", "activation_sparsity#2", "activation_sparsity#3"]
    with pytest.raises(ln.ConfigError, match="runtime"):
        build_variants(m, None, cfgs, BenchSettings(calib_texts=8, runtime="fp16"), progress=False)


def test_demo_skips_settings_that_do_not_apply_and_says_why() -> None:
    from lazyneuron.cli import _demo_configs

    cfgs, skipped = _demo_configs("tiny-bert", tiny_bert())
    rules = {getattr(c, "rule", None) for c in cfgs if c.name == "activation_sparsity"}
    assert rules == {"teal"}  # CATS needs a gated MLP
    assert any("cats" in n and "gated" in n for n in skipped)
    assert not any(getattr(c, "checkpoint", "") for c in cfgs)  # no trained exits / gates / trees of this model


def test_table_labels_tell_settings_apart() -> None:
    recs = [Record("m", "activation_sparsity", {"rule": r, "sparsity": 0.5, "allocation": "auto", "backend": "auto", "targets": ["mlp_in"]},
                   "decode_tps_b1", 1.0, "tokens/s") for r in ("scap", "teal")]
    recs.append(Record("m", "module_gating", {"checkpoint": "/x/y/m.gates-frozen-25.safetensors", "threshold": float("nan")}, "decode_tps_b1", 1.0, "tokens/s"))
    t = table(recs)
    assert "activation_sparsity rule=scap,sparsity=0.5" in t and "activation_sparsity rule=teal,sparsity=0.5" in t
    assert "module_gating checkpoint=m.gates-frozen-25 " in t and "threshold" not in t and "backend" not in t


def _bos_tokenizer():
    """A real fast tokenizer (word level, 128 ids) that puts <s> in front of every sequence, as
    Llama-3 and Gemma tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_perplexity_of_a_bos_model_equals_the_hand_computed_one(monkeypatch) -> None:
    """Windows start with BOS where the tokenizer adds one, and the harness's perplexity equals
    one computed by hand: next-token log-probabilities from a forward per prefix."""
    from lazyneuron import data

    tok = _bos_tokenizer()
    docs = [" ".join(f"w{3 + (7 * i + 3 * j) % 125}" for j in range(40)) for i in range(6)]
    monkeypatch.setattr(data, "texts", lambda corpus, split: docs)
    assert data.bos_id(tok) == 1 and tok("w5 w6")["input_ids"] == [1, 5, 6]
    wins = data.windows(tok, "news", "test", 16, 3)
    stream = data.token_stream(tok, "news", "test", 1000)
    assert wins.shape == (3, 16) and (wins[:, 0] == 1).all()
    assert wins[:, 1:].flatten().tolist() == stream[: 3 * 15]  # BOS, then the stream's tokens in order
    m = tiny_causal_lm("llama")
    nll = n = 0
    with torch.no_grad():
        for w in wins:
            for i in range(1, len(w)):
                logits = m(input_ids=w[:i].unsqueeze(0)).logits[0, -1]
                nll -= F.log_softmax(logits.double(), -1)[w[i]].item()
                n += 1
    assert math.isclose(perplexity(m, wins), math.exp(nll / n), rel_tol=1e-5)
    plain = data.windows(_no_bos(tok), "news", "test", 16, 3)  # a tokenizer that adds nothing: the stream as it is
    assert plain.flatten().tolist() == stream[:48]


def _no_bos(tok):
    class NoBos:
        bos_token_id, eos_token_id = tok.bos_token_id, tok.eos_token_id

        def __call__(self, text, add_special_tokens=True, verbose=False):
            return tok(text, add_special_tokens=False, verbose=verbose)

    return NoBos()
