from __future__ import annotations

import math

import pytest

import torch
import torch.nn.functional as F
from conftest import tiny_causal_lm

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
