"""Real models and corpora from packages (slow: they load real weights; CI runs them)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import empty_checkpoint_cache

import lazyneuron as ln
from lazyneuron import data
from lazyneuron.cli import main

pytestmark = pytest.mark.slow


def test_smollm2_roles_all_30_layers() -> None:
    m, tok = ln.models.load("smollm2-135m")
    rep = ln.inspect(m)
    assert rep["family"] == "llama" and rep["num_layers"] == 30
    assert len(rep["roles"]["attn_in"]) == 90 and len(rep["roles"]["mlp_in"]) == 60
    assert len(rep["roles"]["attn_out"]) == 30 and len(rep["roles"]["mlp_out"]) == 30
    assert rep["roles"]["mlp_out"][0] == {"path": "model.layers.0.mlp.down_proj", "type": "Linear", "in": 1536, "out": 576}
    assert tok("hello")["input_ids"]


def test_minilm_roles() -> None:
    m, tok = ln.models.load("minilm-l6")
    rep = ln.inspect(m)
    assert rep["family"] == "bert" and rep["num_layers"] == 6
    assert rep["roles"]["mlp_in"][0]["in"] == 384 and rep["roles"]["mlp_in"][0]["out"] == 1536


def test_splits_are_disjoint_and_fixed() -> None:
    for corpus in ("news", "hamlet", "austen", "wikipedia"):
        parts = {s: data.texts(corpus, s) for s in data.SPLITS}
        assert all(parts.values()), corpus
        assert not set(parts["train"]) & set(parts["test"]) and not set(parts["calibration"]) & set(parts["test"])
        assert parts["test"] == data.texts(corpus, "test")
    mr = data.labeled("mr", "test")
    assert len(mr) > 900 and {y for _, y in mr} == {0, 1}


def test_bench_json_on_smollm2(capsys) -> None:
    assert main(["bench", "--model", "smollm2-135m", "--quick", "--json", "--new-tokens", "8", "--repeats", "2"]) == 0
    recs = json.loads(capsys.readouterr().out)
    metrics = {r["metric"] for r in recs}
    assert {"decode_tps_b1", "prefill_tps", "ppl_news", "top1_agreement", "compute_skipped"} <= metrics
    ppl = next(r["value"] for r in recs if r["metric"] == "ppl_news")
    assert 5 < ppl < 200
    assert all(r["device"] and r["git_sha"] for r in recs)


def test_bench_json_on_minilm_encoder(capsys) -> None:
    assert main(["bench", "--model", "minilm-l6", "--quick", "--json", "--repeats", "2", "--method", "fast_feedforward:depth=4"]) == 0
    recs = json.loads(capsys.readouterr().out)
    got = {(r["method"], r["metric"]): r["value"] for r in recs}
    assert {("dense", "encode_tps_b1"), ("dense", "encode_tps_long"), ("fast_feedforward", "encode_speedup_b1"),
            ("fast_feedforward", "embedding_cosine"), ("fast_feedforward", "compute_skipped")} <= got.keys()
    assert got[("dense", "embedding_cosine")] == pytest.approx(1.0)
    assert got[("fast_feedforward", "compute_skipped")] > 0.2  # the FFNs' weight reads, nearly all skipped


def test_demo_on_the_default_model_and_on_an_encoder(tmp_path, capsys, monkeypatch) -> None:
    """The README's first command, quick, from a cache with no fitted checkpoints: the demo fits
    exit heads and gates for SmolLM2 on first use and shows a row for every family that applies
    (activation sparsity at 25% and 50%, module gating, early exit, the runtime), with one
    calibration pass for the sparsity rules; on the MiniLM encoder it fits FFF trees and leaves out
    the rules that need a gated MLP with a note; the table reports forwards and output states."""
    empty_checkpoint_cache(tmp_path, monkeypatch)
    assert main(["demo", "--quick", "--out", str(tmp_path / "lm")]) == 0
    out = capsys.readouterr().out
    rows = ["activation_sparsity rule=teal,sparsity=0.25", "activation_sparsity rule=teal,sparsity=0.5", "activation_sparsity rule=cats,sparsity=0.5",
            "module_gating ", "early_exit ", "runtime dtype=bf16", "runtime dtype=int8"]
    assert all(r in out for r in rows), out
    assert "fitted exit heads" in out and "fitted gates" in out and "perplexity" in out
    assert (tmp_path / "lm" / "demo.jsonl").exists() and (tmp_path / "lm" / "pareto.png").exists()
    assert main(["demo", "--model", "minilm-l6", "--quick", "--out", str(tmp_path / "enc")]) == 0
    out = capsys.readouterr().out
    assert "emb. cosine" in out and "activation_sparsity rule=teal" in out and "rule=cats,sparsity=0.5: not run on minilm-l6" in out
    assert "fitted FFF trees" in out and "fast_feedforward " in out


def test_hf_generate_reported_next_to_lean_loop(capsys) -> None:
    from lazyneuron.bench import BenchSettings, run

    m, tok = ln.models.load("smollm2-135m")
    s = BenchSettings(new_tokens=6, prompt_tokens=16, prefill_tokens=32, batches=(1,), repeats=1, ppl_windows=1, ppl_length=32)
    recs = run("smollm2-135m", m, tok, [], s, progress=False)
    metrics = {r.metric for r in recs}
    assert {"decode_tps_b1", "hf_generate_tps_b1"} <= metrics


def test_activation_sparsity_on_smollm2_fast_path_matches_reference_path() -> None:
    """One decode-shaped step through all 210 sparse linears: C++ kernel vs pure-torch reference.
    (Float rounding may flip a channel sitting on its threshold, so compare closely, not bitwise.)"""
    from lazyneuron.methods import ActivationSparsityConfig as C

    m, tok = ln.models.load("smollm2-135m")
    cal = ln.calibrate(m, data.texts("news", "calibration")[:4], C(rule="teal"), tok, max_length=128)
    ids = torch.tensor(data.token_stream(tok, "news", "test", 4)).view(4, 1)  # 4 single-token sequences
    outs = []
    for backend in ("auto", "reference"):
        ln.apply_(m, C(rule="teal", sparsity=0.5, backend=backend), cal)
        with torch.no_grad():
            outs.append(m(input_ids=ids).logits[:, -1])
        ln.revert_(m)
    cos = torch.nn.functional.cosine_similarity(outs[0], outs[1], dim=-1)
    assert cos.min() > 0.999
    assert torch.equal(outs[0].argmax(-1), outs[1].argmax(-1))


def test_fp32_runtime_decodes_the_same_tokens_as_the_eager_model() -> None:
    """SmolLM2 on the fp32 runtime and its lean decode step: the greedy tokens of 8 news prompts,
    64 new tokens each at batch 1, are the eager Hugging Face model's."""
    from lazyneuron import runtime
    from lazyneuron.bench.decode import lean_generate

    m, tok = ln.models.load("smollm2-135m")
    stream = data.token_stream(tok, "news", "test", 8 * 48)
    prompts = [torch.tensor([stream[i * 48 : (i + 1) * 48]]) for i in range(8)]
    eager = [lean_generate(m, p, 64) for p in prompts]
    ln.apply_(m, runtime.RuntimeConfig(dtype="fp32"))
    assert runtime.supports_step(m)
    for p, ref in zip(prompts, eager):
        assert torch.equal(runtime.generate(m, p, 64), ref)
    ln.revert_(m)
