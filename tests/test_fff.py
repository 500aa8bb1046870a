"""Fast feedforward: the CMM kernel against its references, FFFLayer training / inference paths,
the FastFeedForward method on BERT and GPT-2, checkpoints and layer-wise distillation."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import fff_tree, tiny_bert, tiny_causal_lm

import lazyneuron as ln
from lazyneuron.kernels import cmm as K
from lazyneuron.methods.fff import FastFeedForward, FastFeedForwardConfig, FFFBlock, FFFLayer, distill_layers, load_fff, save_fff


_tree = fff_tree


@pytest.mark.parametrize("depth", [0, 1, 3, 6, 10])
# 1 token: lock-step chains; 2+ tokens: two phases over blocks of 64 (65: a last block of one token)
@pytest.mark.parametrize("batch", [1, 3, 8, 37, 65, 130, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cmm_kernel_matches_references(depth: int, batch: int, dtype: torch.dtype) -> None:
    d, o = 48, 40
    w_in, b_in, w_out, b_out = _tree(depth, d, o, dtype, seed=depth)
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(batch))
    y_ref, nodes_ref = K.reference(x, w_in, b_in, w_out, b_out)
    y, nodes = K.cmm(x, w_in, b_in, w_out, b_out, return_nodes=True)
    assert y.dtype == torch.float32 and y.shape == (batch, o)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(y, y_ref, atol=tol * (depth + 1), rtol=1e-4)
    assert torch.equal(nodes, nodes_ref)
    assert torch.allclose(K.masked_dense(x, w_in, b_in, w_out, b_out), y_ref, atol=1e-3 * (depth + 1), rtol=1e-4)


# the dot works in chunks of 32 inputs and the two-phase output in chunks of 64 columns: widths with
# no full chunk, whole chunks, and chunks plus a tail, on both sides; bf16 rows are widened in the
# same chunks
@pytest.mark.parametrize(("d", "o"), [(5, 24), (32, 64), (64, 100), (100, 7), (768, 768), (40, 130)])
@pytest.mark.parametrize("batch", [1, 37, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cmm_kernel_matches_reference_across_widths(d: int, o: int, batch: int, dtype: torch.dtype) -> None:
    w_in, b_in, w_out, b_out = _tree(5, d, o, dtype, seed=d)
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(d + batch))
    y_ref, nodes_ref = K.reference(x, w_in, b_in, w_out, b_out)
    y, nodes = K.cmm(x, w_in, b_in, w_out, b_out, return_nodes=True)
    assert torch.equal(nodes, nodes_ref)
    assert torch.allclose(y, y_ref, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("activation", sorted(K.ACTIVATIONS))
def test_cmm_activations_and_no_bias(activation: str) -> None:
    w_in, _, w_out, _ = _tree(4, 16, 12, bias=False)
    x = torch.randn(9, 16)
    y, _ = K.cmm(x, w_in, None, w_out, None, activation)
    assert torch.allclose(y, K.reference(x, w_in, None, w_out, None, activation)[0], atol=1e-4)


def test_cmm_reads_only_the_path() -> None:
    """Each token touches depth + 1 nodes, and they form a root-to-leaf path."""
    depth = 7
    w_in, b_in, w_out, b_out = _tree(depth, 32, 32)
    x = torch.randn(50, 32)
    _, nodes = K.cmm(x, w_in, b_in, w_out, b_out, return_nodes=True)
    assert nodes.shape == (50, depth + 1) and bool((nodes[:, 0] == 0).all())
    a = x @ w_in.t() + b_in
    for t in range(50):
        for l in range(depth):
            n = int(nodes[t, l])
            assert int(nodes[t, l + 1]) == 2 * n + 1 + int(a[t, n] > 0)
    # a poisoned node off every path changes nothing
    off = sorted(set(range(w_in.shape[0])) - set(nodes.flatten().tolist()))[0]
    w_in2, w_out2 = w_in.clone(), w_out.clone()
    w_in2[off] = float("nan")
    w_out2[off] = float("nan")
    assert torch.isfinite(K.cmm(x, w_in2, b_in, w_out2, b_out)[0]).all()


def test_cmm_distinct_rows_give_distinct_paths() -> None:
    w_in, b_in, w_out, b_out = _tree(10, 64, 64)
    _, nodes = K.cmm(torch.randn(64, 64), w_in, b_in, w_out, b_out, return_nodes=True)
    assert len({tuple(r) for r in nodes.tolist()}) > 32


@pytest.mark.parametrize("batch", [1, 37, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cmm_accepts_row_strided_weights(batch: int, dtype: torch.dtype) -> None:
    """A packed layout (each node's input and output rows side by side in one buffer) is read
    through row strides, no copy: the same result as contiguous weights."""
    w_in, b_in, w_out, b_out = _tree(6, 48, 40, dtype)
    packed = torch.cat([w_in, w_out], 1)
    pi, po = packed[:, :48], packed[:, 48:]
    assert not pi.is_contiguous() and pi.stride(0) == 88
    x = torch.randn(batch, 48)
    y, nodes = K.cmm(x, pi, b_in, po, b_out, return_nodes=True)
    y_ref, nodes_ref = K.reference(x, w_in, b_in, w_out, b_out)
    assert torch.allclose(y, y_ref, atol=1e-3, rtol=1e-4) and torch.equal(nodes, nodes_ref)
    with pytest.raises(ValueError, match="contiguous rows"):
        K.cmm(x, w_in.t().contiguous().t(), b_in, w_out, b_out)


def test_cmm_rejects_bad_shapes() -> None:
    w_in, b_in, w_out, b_out = _tree(3, 16, 8)
    with pytest.raises(ValueError, match="15 features"):
        K.cmm(torch.randn(2, 15), w_in, b_in, w_out, b_out)
    with pytest.raises(ValueError, match="full binary tree"):
        K.cmm(torch.randn(2, 16), w_in[:-1], None, w_out[:-1], None)
    with pytest.raises(ValueError, match="activation"):
        K.cmm(torch.randn(2, 16), w_in, b_in, w_out, b_out, "tanh")
    with pytest.raises(ValueError, match="b_out has 7 entries for 8 outputs"):
        K.cmm(torch.randn(2, 16), w_in, b_in, w_out, b_out[:-1])
    with pytest.raises(ValueError, match="share a dtype"):
        K.cmm(torch.randn(2, 16), w_in, b_in, w_out.bfloat16(), b_out)
    y, _ = K.cmm(torch.randn(2, 16), w_in, b_in, w_out, b_out)  # a good call after the failed checks
    assert y.shape == (2, 8)


def test_fff_layer_paths_agree() -> None:
    torch.manual_seed(0)
    f = FFFLayer(24, 20, 5, routing="hard")
    x = torch.randn(2, 7, 24)
    f.eval()
    y_inf = f(x)
    f.train()
    y_hard = f(x)  # hard routing trains on the inference path
    assert torch.allclose(y_inf, y_hard, atol=1e-4)
    f.routing, f.temperature = "soft", 1e-4
    assert torch.allclose(f(x), y_hard, atol=1e-3)  # a cold soft routing is the hard path
    f.temperature = 1.0
    a = x.reshape(-1, 24) @ f.w_in.t() + f.b_in
    p = f.reach_probability(a)
    for lvl in range(6):  # every level's probabilities sum to one
        assert torch.allclose(p[:, (1 << lvl) - 1 : (2 << lvl) - 1].sum(1), torch.ones(14), atol=1e-5)
    f(x).pow(2).sum().backward()
    assert bool((f.w_in.grad.abs().sum(1) > 0).all())  # soft routing reaches every node
    assert bool((f.w_out.grad.abs().sum(1) > 0).all())


def test_fff_from_dense_places_every_neuron() -> None:
    torch.manual_seed(0)
    w1, b1, w2, b2 = torch.randn(40, 16), torch.randn(40), torch.randn(12, 40), torch.randn(12)
    f = FFFLayer.from_dense(w1, b1, w2, b2, depth=5)  # 63 nodes >= 40 neurons
    rows = {tuple(r.tolist()) for r in f.w_in.detach()}
    assert all(tuple(r.tolist()) in rows for r in w1)
    assert torch.equal(f.b_out.detach(), b2)
    small = FFFLayer.from_dense(w1, b1, w2, b2, depth=2)  # 7 nodes < 40 neurons
    assert small.n_nodes == 7


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_fff_method_apply_revert(kind: str) -> None:
    m = tiny_bert() if kind == "bert" else tiny_causal_lm("gpt2")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    out = (lambda: m(ids).last_hidden_state) if kind == "bert" else (lambda: m(ids).logits)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    dense = out()
    rep = ln.apply_(m, FastFeedForwardConfig(depth=4))[0]
    blocks = [x for x in m.modules() if isinstance(x, FFFBlock)]
    assert len(blocks) == 2 and rep.summary["evaluated_per_token"] == 5
    changed = out()
    assert changed.shape == dense.shape and torch.isfinite(changed).all() and not torch.allclose(changed, dense)
    from lazyneuron.bench.accounting import skipped_fraction, tracking

    with tracking(m):
        out()
    assert 0 < skipped_fraction(m) < 1
    ln.revert_(m)
    assert not any(isinstance(x, ln.LazyModule) for x in m.modules())
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(out(), dense)


def test_fff_bf16_trees_match_fp32_trees_and_round_trip(tmp_path) -> None:
    """tree_dtype=bfloat16: the trees are stored in bf16 (packed, biases fp32), the output is the
    fp32 trees' output within bf16 rounding of the weights, exactly the fp32 walk over the
    bf16-rounded trees, and training, saving and revert_ still work."""
    m = tiny_bert()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    dense = m(ids).last_hidden_state
    ln.apply_(m, FastFeedForwardConfig(depth=4))
    y32 = m(ids).last_hidden_state
    ln.revert_(m)
    rep = ln.apply_(m, FastFeedForwardConfig(depth=4, tree_dtype="bfloat16"))[0]
    assert rep.summary["tree_dtype"] == "bfloat16"
    blocks = [x for x in m.modules() if isinstance(x, FFFBlock)]
    for b in blocks:
        f = b.fff
        assert f.w_in.dtype == f.w_out.dtype == torch.bfloat16 and f.b_in.dtype == torch.float32
        assert f.w_out.data_ptr() == f.w_in.data_ptr() + 2 * f.d_in  # still packed
    y16 = m(ids).last_hidden_state
    assert not torch.equal(y16, y32) and torch.allclose(y16, y32, atol=0.05)
    f = blocks[0].fff
    x = torch.randn(9, f.d_in)
    ref, _ = K.reference(x, f.w_in.float(), f.b_in, f.w_out.float(), f.b_out, f.activation)
    assert torch.allclose(f(x), ref, atol=1e-5)
    f.train()  # training on bf16 trees runs in the input's dtype and reaches the bf16 parameters
    f.forward_train(x).sum().backward()
    assert f.w_in.grad is not None and f.w_in.grad.dtype == torch.bfloat16
    f.eval()
    path = tmp_path / "fff16.safetensors"
    save_fff(m, path)
    ln.revert_(m)
    assert torch.equal(m(ids).last_hidden_state, dense)
    ln.apply_(m, FastFeedForwardConfig(depth=4, checkpoint=str(path), tree_dtype="bfloat16"))
    assert torch.equal(m(ids).last_hidden_state, y16)
    with pytest.raises(ln.ConfigError, match="tree_dtype"):
        FastFeedForwardConfig(tree_dtype="float16")
    with pytest.raises(ln.ConfigError, match="float16"):
        f.set_tree_dtype(torch.float16)


def test_fff_refuses_gated_mlp() -> None:
    with pytest.raises(ln.ConfigError, match="gated"):
        ln.apply_(tiny_causal_lm("llama"), FastFeedForwardConfig(depth=3))


def test_fff_config_validation() -> None:
    with pytest.raises(ln.ConfigError, match="depth"):
        FastFeedForwardConfig(depth=40)
    with pytest.raises(ln.ConfigError, match="activation"):
        FastFeedForwardConfig(activation="tanh")
    cfg = ln.MethodConfig.parse("fast_feedforward:depth=6,routing=hard")
    assert isinstance(cfg, FastFeedForwardConfig) and cfg.depth == 6 and cfg.routing == "hard"


def test_fff_checkpoint_round_trip_and_errors(tmp_path) -> None:
    m = tiny_bert()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    ln.apply_(m, FastFeedForwardConfig(depth=3))
    with torch.no_grad():
        for x in m.modules():
            if isinstance(x, FFFBlock):
                assert x.fff.w_out.data_ptr() == x.fff.w_in.data_ptr() + 4 * x.fff.d_in  # packed by apply_
                x.fff.w_out.add_(0.05)  # "trained": differs from the dense initialisation
    y = m(ids).last_hidden_state
    path = tmp_path / "fff.safetensors"
    save_fff(m, path)
    ln.revert_(m)
    ln.apply_(m, FastFeedForwardConfig(depth=3, checkpoint=str(path)))
    assert torch.equal(m(ids).last_hidden_state, y)
    ln.revert_(m)
    with pytest.raises(ln.ConfigError, match="gpt2|bert"):
        ln.apply_(tiny_causal_lm("gpt2"), FastFeedForwardConfig(depth=3, checkpoint=str(path)))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ln.ConfigError, match="readable"):
        load_fff(bad)
    with pytest.raises(ln.ConfigError, match="does not exist"):
        load_fff(tmp_path / "missing.safetensors")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ln.ConfigError):
        ln.apply_(m, FastFeedForwardConfig(depth=3, checkpoint=str(bad)))
    assert not any(isinstance(x, ln.LazyModule) for x in m.modules())  # nothing lost
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())


def test_layerwise_distillation_reduces_error() -> None:
    torch.manual_seed(0)
    m = tiny_bert()
    inputs = [torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(20)]
    ref = FastFeedForward()
    from lazyneuron.methods.fff import collect_ffn_io

    paths = ["encoder.layer.0.intermediate", "encoder.layer.1.intermediate"]
    io = collect_ffn_io(m, paths, inputs)
    init = FFFLayer.from_dense(*ref.dense_parts(m, paths[0])[:4], depth=3)
    init.eval()
    x, y = io[paths[0]]
    err0 = float(((init(x) - y) ** 2).mean() / y.var())
    errs = distill_layers(m, FastFeedForwardConfig(depth=3), inputs, steps=120, batch_tokens=128, progress=False)
    assert set(errs) == set(paths)
    assert errs[paths[0]] < 0.7 * err0
    assert all(isinstance(x, FFFBlock) for p, x in ln.surgery.lazy_modules(m) if p.endswith("intermediate"))


def test_hugepage_copy_keeps_values_and_aligns() -> None:
    big = torch.randn(8191, 80)  # 2.6 MB: at least one 2 MiB page
    for t in (big, big.to(torch.bfloat16), torch.randn(10)):
        h = K.hugepage_copy(t)
        assert h.dtype == t.dtype and h.shape == t.shape and h.is_contiguous() and torch.equal(h, t)
    h = K.hugepage_copy(big)
    if K.available() and sys.platform.startswith("linux"):
        assert h.data_ptr() != big.data_ptr() and h.data_ptr() % (2 << 20) == 0
        h[0, 0] = 1e9  # a copy, not a view
        assert big[0, 0] != 1e9
    assert torch.equal(K.hugepage_copy(big[:, :40]), big[:, :40])  # non-contiguous input: a contiguous copy


def test_fff_layer_pack_for_inference_changes_nothing_but_layout() -> None:
    torch.manual_seed(0)
    layer = FFFLayer(80, 48, depth=12, routing="hard").eval()  # 8191 x 128 floats: 4.2 MB
    x = torch.randn(37, 80)
    w_in, w_out = layer.w_in.detach().clone(), layer.w_out.detach().clone()
    with torch.no_grad():
        y0, n0 = K.cmm(x, layer.w_in, layer.b_in, layer.w_out, layer.b_out, "gelu", return_nodes=True)
    assert layer.pack_for_inference() is layer
    assert isinstance(layer.w_in, torch.nn.Parameter) and layer.w_in.requires_grad
    assert torch.equal(layer.w_in, w_in) and torch.equal(layer.w_out, w_out)
    # one buffer: node n's output row right after its input row
    assert layer.w_in.stride() == (128, 1) and layer.w_out.stride() == (128, 1)
    assert layer.w_out.data_ptr() == layer.w_in.data_ptr() + 80 * 4
    if K.available() and sys.platform.startswith("linux"):
        assert layer.w_in.data_ptr() % (2 << 20) == 0
    with torch.no_grad():
        y1, n1 = K.cmm(x, layer.w_in, layer.b_in, layer.w_out, layer.b_out, "gelu", return_nodes=True)
        assert torch.equal(n1, n0) and torch.equal(y1, y0)
        ref, _ = K.reference(x, layer.w_in, layer.b_in, layer.w_out, layer.b_out, "gelu")
        assert torch.allclose(y1, ref, atol=1e-4)
    layer.train()  # still trainable, and the optimizer updates the packed views in place
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer(x).square().mean().backward()
    assert layer.w_in.grad is not None and torch.isfinite(layer.w_in.grad).all()
    opt.step()
    assert not torch.equal(layer.w_in, w_in) and layer.w_in.stride() == (128, 1)
