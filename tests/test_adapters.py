from __future__ import annotations

import pytest
import torch
from conftest import LLAMA_LIKE, UnknownNet, tiny_bert, tiny_causal_lm
from torch import nn

import lazyneuron as ln
from lazyneuron.adapters import get_adapter


@pytest.mark.parametrize("model_type", LLAMA_LIKE)
def test_llama_like_roles(model_type: str) -> None:
    m = tiny_causal_lm(model_type)
    ad = get_adapter(m)
    assert ad.family == "llama" and ad.num_layers == 2 and ad.causal_lm
    for role in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
        paths = ad.paths(role)
        assert paths, role
        for p in paths:
            assert isinstance(m.get_submodule(p), nn.Linear)
    assert all(p.endswith("o_proj") for p in ad.paths("attn_out"))
    assert all(p.endswith("down_proj") for p in ad.paths("mlp_out"))
    if model_type == "phi3":  # fused projections
        assert [p.rsplit(".", 1)[1] for p in ad.paths("attn_in")[:1]] == ["qkv_proj"]
        assert ad.paths("mlp_in")[0].endswith("gate_up_proj")
    else:
        assert len(ad.paths("attn_in")) == 3 * 2 and len(ad.paths("mlp_in")) == 2 * 2
    assert ad.paths("head") == ["lm_head"]


def test_bert_roles() -> None:
    for m in (tiny_bert(), tiny_bert(classifier=True)):
        ad = get_adapter(m)
        assert ad.family == "bert" and ad.num_layers == 2
        assert [p.rsplit(".", 2)[-2:] for p in ad.paths("attn_in")[:3]] == [["self", "query"], ["self", "key"], ["self", "value"]]
        assert ad.paths("mlp_in")[0].endswith("intermediate.dense")
        assert ad.paths("mlp_out")[0].endswith("output.dense") and "attention" not in ad.paths("mlp_out")[0]


def test_gpt2_conv1d_roles() -> None:
    m = tiny_causal_lm("gpt2")
    rep = ln.inspect(m)
    assert rep["family"] == "gpt2"
    assert {e["type"] for e in rep["roles"]["attn_in"]} == {"Conv1D"}
    assert rep["roles"]["attn_in"][0]["in"] == 64 and rep["roles"]["attn_in"][0]["out"] == 192
    assert rep["roles"]["mlp_in"][0]["out"] == 256


def test_generic_discovery_classifies_by_shape() -> None:
    m = UnknownNet()
    ad = get_adapter(m)
    assert ad.discovered and ad.layers_path == "blocks" and ad.num_layers == 3
    assert ad.block_roles["attn_in"] == ("mixer_in",)
    assert ad.block_roles["attn_out"] == ("mixer_out",)
    assert ad.block_roles["mlp_in"] == ("ff1",)
    assert ad.block_roles["mlp_out"] == ("ff2",)


def test_unsupported_model_names_what_was_tried() -> None:
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ln.UnsupportedModelError) as e:
        ln.inspect(m)
    msg = str(e.value)
    assert "generic discovery" in msg and "ModuleList" in msg and "Supported model types" in msg


def test_inspect_lists_every_layer() -> None:
    rep = ln.inspect(tiny_causal_lm("llama", layers=3))
    assert len(rep["roles"]["layer"]) == 3
    assert sorted({e["path"].split(".")[2] for e in rep["roles"]["mlp_out"]}) == ["0", "1", "2"]
    assert rep["roles"]["mlp_in"][0]["in"] == 64


def test_adapter_output_unchanged_by_inspect(ids: torch.Tensor) -> None:
    m = tiny_causal_lm("llama")
    before = m(ids).logits
    ln.inspect(m)
    assert torch.equal(before, m(ids).logits)


def test_local_gguf_is_dequantized_once_and_cached(tmp_path, monkeypatch) -> None:
    """A local .gguf loads from its dequantized safetensors copy after the first time; a changed
    file (size, mtime or header) is dequantized again."""
    import os

    from lazyneuron import models

    monkeypatch.setenv("LAZYNEURON_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_gguf(file):
        calls.append(file)
        return tiny_causal_lm("llama"), None

    monkeypatch.setattr(models, "_load_gguf", fake_gguf)
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    a, _ = models.load(str(f))
    b, _ = models.load(str(f))
    assert len(calls) == 1
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    key = models.gguf_cache_key(f)
    f.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 8)  # same size, new header
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns))
    assert models.gguf_cache_key(f) != key
    models.load(str(f))
    assert len(calls) == 2
