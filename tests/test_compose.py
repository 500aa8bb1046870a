"""Composition contract over every pair of registered methods: on tiny models of each family both
support, two methods either compose (each at zero strength leaves the other's model exactly as it
was, revert restores the exact state, a saved calibration gives the same outputs, the compute
accounting counts each weight once) or ``apply_`` refuses them with one error naming both and
leaves the model untouched."""

from __future__ import annotations

import itertools
from typing import Any, Callable

import pytest
import torch
from conftest import assert_restored, calib_batches, tiny_causal_lm

import lazyneuron as ln
from lazyneuron.bench.accounting import skipped_fraction, tracking
from lazyneuron.config import MethodConfig, registry
from lazyneuron.methods.activation_sparsity import ActivationSparsityConfig
from lazyneuron.methods.early_exit import EarlyExitConfig, train_classifier_exits, train_lm_exits
from lazyneuron.methods.experts import ExpertRoutingConfig
from lazyneuron.methods.fff import FastFeedForwardConfig
from lazyneuron.methods.gating import ModuleGatingConfig, static_predictor
from lazyneuron.runtime import RuntimeConfig
from lazyneuron.tasks import Batch, TextClassifier

ATTN = ("attn_in", "attn_out")


def _clf() -> TextClassifier:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                               max_position_embeddings=64))
    return TextClassifier(enc, 2).eval()


def _lm() -> torch.nn.Module:
    return tiny_causal_lm("llama", layers=4)


def _exits(model: torch.nn.Module, path: str) -> None:
    g = torch.Generator().manual_seed(3)
    if isinstance(model, TextClassifier):
        batches = [Batch(torch.randint(1, 128, (8, 12), generator=g), torch.ones(8, 12, dtype=torch.long), torch.randint(0, 2, (8,), generator=g))
                   for _ in range(3)]
        heads = train_classifier_exits(model, batches, epochs=2, progress=False)
    else:
        heads = train_lm_exits(model, torch.randint(0, 128, (6, 24), generator=g), [1, 2], epochs=2, progress=False)
    heads.save(path)


# one tiny setting per registered method, (model, tmp directory, "restrict") -> config; restrict:
# the method shares the model with one that takes the MLP, so a method that can also run on
# attention only does so. A method registered without an entry here fails test_every_method_has_a_setting.
def _as(m: Any, d: Any, restrict: bool) -> MethodConfig:
    return ActivationSparsityConfig(rule="teal", sparsity=0.5, targets=ATTN if restrict else ActivationSparsityConfig.targets)


def _ee(m: Any, d: Any, restrict: bool) -> MethodConfig:
    path = str(d / "exits.safetensors")
    _exits(m, path)
    return EarlyExitConfig(criterion="max_prob", threshold=0.3, checkpoint=path) if isinstance(m, TextClassifier) else \
        EarlyExitConfig(criterion="learned", threshold=0.0, checkpoint=path)


def _mg(m: Any, d: Any, restrict: bool) -> MethodConfig:
    path = d / "gates.safetensors"
    static_predictor(m, [(1, "attn"), (2, "mlp")]).save(path)
    return ModuleGatingConfig(checkpoint=str(path))


SETTINGS: dict[str, Callable[[Any, Any, bool], MethodConfig]] = {
    "activation_sparsity": _as,
    "expert_routing": lambda m, d, r: ExpertRoutingConfig(experts=4, top_k=2),
    "early_exit": _ee,
    "module_gating": _mg,
    "fast_feedforward": lambda m, d, r: FastFeedForwardConfig(depth=3),
    "runtime": lambda m, d, r: RuntimeConfig(dtype="bf16"),
}
MLP_METHODS = {"expert_routing", "fast_feedforward"}  # take whole FFN blocks
FAMILIES = {"llama": _lm, "bert": _clf}
SUPPORTS = {"fast_feedforward": {"bert"}}  # plain two-layer FFNs only
# pairs that cannot share a model, and the words their refusal must contain
REFUSED = {frozenset({"early_exit", "module_gating"}): "both run the whole layer stack",
           frozenset({"expert_routing", "fast_feedforward"}): "both convert"}


def _pairs() -> list[tuple[str, str, str]]:
    out = []
    for a, b in itertools.combinations(sorted(registry()), 2):
        for fam in FAMILIES:
            if fam in SUPPORTS.get(a, {fam}) and fam in SUPPORTS.get(b, {fam}):
                out.append((a, b, fam))
    return out


PAIRS = _pairs()


def test_every_method_has_a_setting() -> None:
    assert set(registry()) <= set(SETTINGS), f"add a tiny setting for {sorted(set(registry()) - set(SETTINGS))} to SETTINGS"


def _inputs(model: torch.nn.Module) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 16), generator=g)
    if isinstance(model, TextClassifier):
        mask = torch.ones_like(ids)
        mask[1, 10:] = 0
        return (lambda: model(ids, mask)), [torch.randint(1, 128, (1, 32), generator=g) for _ in range(6)]
    return (lambda: model(ids).logits), calib_batches()


def _setup(a: str, b: str, fam: str, tmp_path: Any) -> tuple[torch.nn.Module, MethodConfig, MethodConfig]:
    m = FAMILIES[fam]()
    restrict = bool({a, b} & MLP_METHODS)
    return m, SETTINGS[a](m, tmp_path, restrict), SETTINGS[b](m, tmp_path, restrict)


@pytest.fixture(autouse=True)
def _fp32_compute():
    """Compositions are checked for exact agreement between paths that compute the same weights
    (a kernel, a method's reference); the bf16 dot-product GEMM also rounds its input, which only
    the runtime's own GEMM does, so it is off here (tests/test_runtime.py checks it)."""
    from lazyneuron.kernels import gemv as G

    prev = G.set_bf16_dot(False)
    yield
    G.set_bf16_dot(prev)


@pytest.mark.parametrize("a,b,fam", PAIRS, ids=[f"{a}+{b}-{f}" for a, b, f in PAIRS])
def test_pair_composes_or_is_refused(a: str, b: str, fam: str, tmp_path: Any) -> None:
    m, ca, cb = _setup(a, b, fam, tmp_path)
    out, batches = _inputs(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        dense = out()
    refusal = REFUSED.get(frozenset({a, b}))
    if refusal is not None:
        cal = _cal_for(m, [ca, cb], batches)
        with pytest.raises(ln.ConfigError, match=refusal) as e:
            ln.apply_(m, [ca, cb], cal)
        assert a in str(e.value) and b in str(e.value)
        assert not any(isinstance(x, ln.LazyModule) for x in m.modules())
        assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
        return
    cal = _cal_for(m, [ca, cb], batches)
    # each at zero strength leaves the other's model exactly as it was alone (both at zero: dense)
    for full, zero in ((ca, cb), (cb, ca)):
        z = zero.at_zero_strength()
        if z is None:  # no zero-strength setting (FFF trees)
            continue
        if full.at_zero_strength() is not None:
            with ln.applied(m, [full.at_zero_strength(), z], cal), torch.no_grad():
                assert (out() - dense).abs().max() <= 1e-5
        with ln.applied(m, full, cal), torch.no_grad():
            alone = out()
        with ln.applied(m, [z, full], cal), torch.no_grad():  # given in either order
            both = out()
        assert (both - alone).abs().max() <= 1e-5 * (1 + alone.abs().max()), (full.name, zero.name)
    # both at their settings: a different model, revert restores the exact state and outputs
    reports = ln.apply_(m, [cb, ca], cal)
    assert sorted(r.method for r in reports) == sorted([a, b])
    with torch.no_grad():
        combined = out()
    assert not torch.equal(combined, dense)
    ln.revert_(m)
    assert_restored(m, before)
    with torch.no_grad():
        assert torch.equal(out(), dense)
    # a saved and reloaded calibration gives the same combined model
    if cal is not None:
        cal.save(tmp_path / "cal.safetensors")
        with ln.applied(m, [ca, cb], ln.Calibration.load(tmp_path / "cal.safetensors")), torch.no_grad():
            assert torch.equal(out(), combined)


def _cal_for(m: torch.nn.Module, cfgs: list[MethodConfig], batches: list[torch.Tensor]) -> ln.Calibration | None:
    need = [c for c in cfgs if registry()[c.name].needs_calibration]
    return ln.calibrate(m, batches, need) if need else None


@pytest.mark.parametrize("mlp", sorted(MLP_METHODS))
def test_activation_sparsity_on_the_mlp_is_refused_beside_an_mlp_method(mlp: str, tmp_path: Any) -> None:
    m = _clf() if mlp == "fast_feedforward" else _lm()
    _, batches = _inputs(m)
    full, other = SETTINGS["activation_sparsity"](m, tmp_path, False), SETTINGS[mlp](m, tmp_path, False)
    cal = _cal_for(m, [full, other], batches)
    with pytest.raises(ln.ConfigError, match="targets=attn_in\\|attn_out") as e:
        ln.apply_(m, [other, full], cal)
    assert "activation_sparsity" in str(e.value) and mlp in str(e.value)
    assert not any(isinstance(x, ln.LazyModule) for x in m.modules())


def test_accounting_counts_each_weight_once(tmp_path: Any) -> None:
    """Sparse linears inside a gated stack: the combined skipped fraction is the gating's share
    plus the sparse layers' share of what still runs, never more than the parts summed."""
    m = _lm()
    out, batches = _inputs(m)
    a, g = SETTINGS["activation_sparsity"](m, tmp_path, False), SETTINGS["module_gating"](m, tmp_path, False)
    cal = _cal_for(m, [a], batches)
    parts = []
    for cfgs in ([a], [g], [a, g]):
        with ln.applied(m, cfgs, cal), tracking(m), torch.no_grad():
            out()
            parts.append(skipped_fraction(m))
    s_a, s_g, s_ag = parts
    assert 0 < s_g < s_ag < s_a + s_g <= 1


def test_same_module_twice_is_refused() -> None:
    m = _lm()
    c1, c2 = ActivationSparsityConfig(rule="teal", sparsity=0.3), ActivationSparsityConfig(rule="teal", sparsity=0.5, targets=("mlp_out",))
    cal = ln.calibrate(m, calib_batches(), [c1])
    with pytest.raises(ln.ConfigError, match="both convert 'model.layers.0.mlp.down_proj'"):
        ln.apply_(m, [c1, c2], cal)
    assert not any(isinstance(x, ln.LazyModule) for x in m.modules())
