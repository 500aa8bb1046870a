from __future__ import annotations

import pytest
import torch
from conftest import calib_batches, tiny_causal_lm

import lazyneuron as ln
from lazyneuron.bench.accounting import per_module, skipped_fraction, tracking
from lazyneuron.calibration import ChannelHistogram
from lazyneuron.methods import ActivationSparsityConfig as C
from lazyneuron.methods.activation_sparsity import SparseLinear, threshold_for


def test_histogram_threshold_hits_the_quantile() -> None:
    torch.manual_seed(0)
    x = torch.randn(4000, 16) * torch.linspace(0.01, 5, 16)  # channels of very different scales
    h = ChannelHistogram(16)
    h.update(x[:2000])
    h.update(x[2000:])  # streaming: two updates add up
    st = h.state()
    assert int(st["hist"].sum()) == x.numel()
    for s in (0.25, 0.5, 0.9):
        t = threshold_for(st["hist"], st["edges"], None, s)
        assert abs((x.abs() <= t).float().mean().item() - s) < 0.01


def test_achieved_sparsity_tracks_target_on_held_out_data() -> None:
    m = tiny_causal_lm("llama")
    cal = ln.calibrate(m, calib_batches(n=12, seed=3), C())
    held_out = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(99))
    for rule in ("teal", "scap"):
        ln.apply_(m, C(rule=rule, sparsity=0.5, allocation="uniform"), cal)
        with tracking(m):
            m(held_out)
        got = per_module(m)
        assert abs(sum(got.values()) / len(got) - 0.5) < 0.05, rule
        assert 0 < skipped_fraction(m) < 0.5
        ln.revert_(m)


def test_overrides_and_include_exclude() -> None:
    m = tiny_causal_lm("llama")
    cal = ln.calibrate(m, calib_batches(), C())
    cfg = C(sparsity=0.5, overrides=(("*.layers.0.*", 0.1),), exclude=("*.k_proj",), allocation="uniform")
    rep = ln.apply_(m, cfg, cal)[0]
    assert not any(p.endswith("k_proj") for p in rep.paths)
    mods = dict(ln.surgery.lazy_modules(m))
    assert mods["model.layers.0.mlp.down_proj"].sparsity == 0.1
    assert mods["model.layers.1.mlp.down_proj"].sparsity == 0.5
    assert isinstance(mods["model.layers.1.mlp.down_proj"], SparseLinear)


@pytest.mark.parametrize("rule", ["teal", "scap"])
def test_greedy_allocation_meets_each_block_target(rule: str) -> None:
    m = tiny_causal_lm("llama")
    cal = ln.calibrate(m, calib_batches(n=12, seed=3), C())
    cfg = C(rule=rule, sparsity=0.5, overrides=(("*.layers.0.*", 0.2),), allocation="greedy")
    ln.apply_(m, cfg, cal)
    mods = dict(ln.surgery.lazy_modules(m))
    for layer, target in (("layers.0.", 0.2), ("layers.1.", 0.5)):
        block = [mod for p, mod in mods.items() if layer in p]
        w = [mod.weight_elements() for mod in block]
        got = sum(mod.sparsity * n for mod, n in zip(block, w)) / sum(w)
        assert abs(got - target) < 1e-4, (layer, got)
        assert len({round(mod.sparsity, 4) for mod in block}) > 1  # not uniform
    q, k, v = (mods[f"model.layers.1.self_attn.{x}_proj"].sparsity for x in "qkv")
    assert q == k == v  # one input, one sparsity
    held_out = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(99))
    with tracking(m):
        m(held_out)
    assert abs(skipped_fraction(m) - sum(m_.sparsity * m_.weight_elements() for m_ in mods.values()) / sum(m_.weight_elements() for m_ in mods.values())) < 0.08
    ln.revert_(m)


def test_greedy_error_curve_is_monotone_and_normalised() -> None:
    from lazyneuron.methods.activation_sparsity import error_curve, greedy_allocation

    x = torch.randn(3000, 8) * torch.linspace(0.1, 3, 8)
    h = ChannelHistogram(8)
    h.update(x)
    st = h.state()
    fr, er = error_curve(st["hist"], st["edges"], torch.ones(8))
    assert fr[0] == 0 and er[0] == 0 and abs(float(fr[-1]) - 1) < 1e-9 and abs(float(er[-1]) - 1) < 1e-9
    assert bool((fr.diff() >= 0).all()) and bool((er.diff() >= 0).all())
    # a unit whose error rises slowly takes the sparsity first
    cheap = (torch.linspace(0, 1, 11, dtype=torch.float64), torch.linspace(0, 1, 11, dtype=torch.float64) ** 4)
    dear = (torch.linspace(0, 1, 11, dtype=torch.float64), torch.linspace(0, 1, 11, dtype=torch.float64) ** 0.5)
    s = greedy_allocation({"a": (100, [cheap]), "b": (100, [dear])}, 0.3)
    assert s["a"] > s["b"] and abs((s["a"] + s["b"]) / 2 - 0.3) < 1e-9


def test_greedy_is_refused_for_cats() -> None:
    with pytest.raises(ln.ConfigError, match="allocation"):
        C(rule="cats", allocation="greedy")


def test_scap_centring_is_exact_before_thresholding() -> None:
    """Folding W @ m into the bias changes nothing until values are dropped."""
    lin = torch.nn.Linear(32, 16)
    centre = torch.randn(32)
    x = torch.randn(3, 32)
    dense = lin(x)
    sl = SparseLinear(lin, float("-inf"), centre, "scap", 0.0, False, "auto")
    assert torch.allclose(sl(x), dense, atol=1e-5)
    assert sl.centre is not None
    sl.restore_base()
    assert lin.weight.is_contiguous()


def test_decode_only_keeps_prefill_dense(ids) -> None:
    m = tiny_causal_lm("llama")
    dense = m(ids).logits
    cal = ln.calibrate(m, calib_batches(), C())
    ln.apply_(m, C(sparsity=0.7, decode_only=True), cal)
    assert torch.allclose(m(ids).logits, dense, atol=1e-5)  # prefill: dense
    step = m(ids[:, :1]).logits  # one token per sequence: sparse
    ln.revert_(m)
    assert not torch.allclose(step, m(ids[:, :1]).logits, atol=1e-4)


@pytest.mark.parametrize("rule", ["scap", "teal", "cats"])
def test_fast_path_matches_reference_backend(rule: str, ids) -> None:
    """One token (the decode kernels) and a long input (17+ tokens: the runtime's GEMM for CATS'
    gate and down projections) give the reference backend's result."""
    m = tiny_causal_lm("llama")
    cal = ln.calibrate(m, calib_batches(), C(rule=rule))
    long = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    outs = []
    for backend in ("auto", "reference"):
        ln.apply_(m, C(rule=rule, sparsity=0.6, backend=backend), cal)
        outs.append((m(ids[:1, :1]).logits, m(long).logits))
        ln.revert_(m)
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-4)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-4)


def test_gpt2_conv1d_and_bert_are_supported() -> None:
    from conftest import tiny_bert

    for m, inputs in ((tiny_causal_lm("gpt2"), torch.randint(0, 128, (1, 20))), (tiny_bert(), torch.randint(0, 128, (1, 20)))):
        ref = m(input_ids=inputs)[0]
        cal = ln.calibrate(m, calib_batches(), C())
        ln.apply_(m, C(sparsity=0.0), cal)
        assert torch.allclose(m(input_ids=inputs)[0], ref, atol=1e-5)
        ln.revert_(m)
        ln.apply_(m, C(sparsity=0.5), cal)
        assert not torch.allclose(m(input_ids=inputs)[0], ref, atol=1e-4)
        ln.revert_(m)
