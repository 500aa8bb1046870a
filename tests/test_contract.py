"""Contract every registered method must meet, on tiny models of each family it supports."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_restored, calib_batches, tiny_causal_lm

import lazyneuron as ln
from lazyneuron.config import MethodConfig, registry

# configs tied to a checkpoint of one real model (trained exit heads, FFF trees) have their own tests
def _contract_configs() -> list[MethodConfig]:
    """Each registered method's demo settings, one per (method, rule), and every activation
    sparsity rule (the demo shows two of them)."""
    from lazyneuron.methods.activation_sparsity import RULES, ActivationSparsityConfig

    out: dict[tuple[str, str], MethodConfig] = {}
    for c in [c for meth in registry().values() for c in meth.demo_configs()] + [ActivationSparsityConfig(rule=r, sparsity=0.5) for r in RULES]:
        if not getattr(c, "checkpoint", ""):
            out.setdefault((c.name, getattr(c, "rule", getattr(c, "dtype", ""))), c)
    return list(out.values())


METHOD_CONFIGS = _contract_configs()
IDS = [f"{c.name}-{getattr(c, 'rule', getattr(c, 'dtype', ''))}" for c in METHOD_CONFIGS]


def _calibrate(model, cfg):
    meth = registry()[cfg.name]
    return ln.calibrate(model, calib_batches(), cfg) if meth.needs_calibration else None


@pytest.mark.parametrize("cfg", METHOD_CONFIGS, ids=IDS)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_zero_strength_equals_dense(cfg: MethodConfig, family: str, ids: torch.Tensor) -> None:
    m = tiny_causal_lm(family)
    dense = m(ids).logits
    dense_step = m(ids[:1, :1]).logits  # batch-1 decode shape: the fast kernel path
    zero = cfg.at_zero_strength()
    cal = _calibrate(m, zero)
    ln.apply_(m, zero, cal)
    assert (m(ids).logits - dense).abs().max() <= 1e-5
    assert (m(ids[:1, :1]).logits - dense_step).abs().max() <= 1e-5


@pytest.mark.parametrize("cfg", METHOD_CONFIGS, ids=IDS)
def test_apply_revert_restores_state_and_outputs(cfg: MethodConfig, ids: torch.Tensor) -> None:
    m = tiny_causal_lm("llama")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    dense = m(ids).logits
    cal = _calibrate(m, cfg)
    reports = ln.apply_(m, cfg, cal)
    assert reports[0].paths and any(isinstance(x, ln.LazyModule) for x in m.modules())
    changed = m(ids).logits
    assert not torch.equal(changed, dense)  # the method does something at its default strength
    ln.revert_(m)
    assert_restored(m, before)
    assert torch.equal(m(ids).logits, dense)


@pytest.mark.parametrize("cfg", METHOD_CONFIGS, ids=IDS)
def test_config_round_trips(cfg: MethodConfig) -> None:
    assert MethodConfig.from_dict(cfg.to_dict()) == cfg
    assert MethodConfig.from_dict(__import__("json").loads(cfg.to_json())) == cfg
    vals = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "overrides"}
    text = cfg.name + ":" + ",".join(f"{k}={'|'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in vals.items())
    assert MethodConfig.parse(text) == cfg


@pytest.mark.parametrize("cfg", METHOD_CONFIGS, ids=IDS)
def test_calibration_save_load_bit_exact(cfg: MethodConfig, tmp_path, ids: torch.Tensor) -> None:
    if not registry()[cfg.name].needs_calibration:
        pytest.skip("method has no calibration")
    m = tiny_causal_lm("llama")
    cal = _calibrate(m, cfg)
    path = tmp_path / "cal.safetensors"
    cal.save(path)
    back = ln.Calibration.load(path)
    assert back.meta == cal.meta
    for meth, d in cal.stats.items():
        for key, st in d.items():
            for n, t in st.items():
                assert torch.equal(back.stats[meth][key][n], t) and back.stats[meth][key][n].dtype == t.dtype
    ln.apply_(m, cfg, cal)
    a = m(ids).logits
    ln.revert_(m)
    ln.apply_(m, cfg, back)
    assert torch.equal(m(ids).logits, a)


def test_configs_compose_in_order(ids: torch.Tensor) -> None:
    from lazyneuron.methods import ActivationSparsityConfig as C

    m = tiny_causal_lm("llama")
    a, b = C(rule="teal", sparsity=0.3, targets=("mlp_out",)), C(rule="teal", sparsity=0.5, targets=("attn_in",))
    cal = ln.calibrate(m, calib_batches(), [a, b])
    reps = ln.apply_(m, [a, b], cal)
    assert [len(r.paths) for r in reps] == [2, 6]
    ln.revert_(m)
    assert not any(isinstance(x, ln.LazyModule) for x in m.modules())
