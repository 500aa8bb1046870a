"""The runtime: dense / sparse GEMV kernels in fp32, bf16 and int8 against their references, the
fused decode ops, the conversion (apply / revert bit for bit, composition with activation
sparsity) and the lean decode step against the Hugging Face model."""

from __future__ import annotations

import pytest
import torch
from conftest import calib_batches, tiny_causal_lm

import lazyneuron as ln
from lazyneuron.bench.decode import lean_generate
from lazyneuron.kernels import decode_ops as D
from lazyneuron.kernels import gemv as G
from lazyneuron.methods import ActivationSparsityConfig
from lazyneuron.runtime import FastLinear, RuntimeConfig, generate, supports_step

needs_ext = pytest.mark.skipif(not (G.available() and D.available()), reason="C++ kernels did not build here (the fallback is the reference itself)")


@needs_ext
@pytest.mark.parametrize("dtype", G.DTYPES)
@pytest.mark.parametrize("in_f,out_f", [(64, 48), (576, 192), (40, 100), (1536, 576), (7, 2049), (300, 33), (96, 70000)])
@pytest.mark.parametrize("batch", [1, 2, 5, 8, 16])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_gemv_matches_reference(dtype: str, in_f: int, out_f: int, batch: int, mode: str) -> None:
    g = torch.Generator().manual_seed(in_f * 31 + out_f + batch)
    x = torch.randn(batch, in_f, generator=g)
    wt, scale = G.prepare_weight(torch.randn(out_f, in_f, generator=g), dtype)
    bias = torch.randn(out_f, generator=g) if in_f % 2 == 0 else None
    centre = thr = None
    if mode == "sparse":
        centre = 0.1 * torch.randn(in_f, generator=g)
        thr = torch.tensor([0.8])
    y, rows = G.gemv(x, wt, scale, bias, centre, thr)
    ref = G.reference(x, wt, scale, bias, centre, thr)
    assert y.shape == (batch, out_f) and y.dtype == torch.float32
    assert (y - ref).abs().max().item() <= 1e-4 * (1 + ref.abs().max().item())
    if mode == "dense":
        assert rows == in_f
    else:
        assert rows == int(((x - centre).abs() > thr).any(0).sum())


@needs_ext
@pytest.mark.parametrize("dtype", G.DTYPES)
@pytest.mark.parametrize("in_f,out_f", [(576, 1536), (1536, 576), (100, 40)])
def test_sparse_call_skipping_few_rows_reads_them_all(dtype: str, in_f: int, out_f: int) -> None:
    """At batch 1 a call that skips under 15% of its rows reads every row as the dense stream
    (the skipped ones with coefficient 0) and says so; with more skipped, or set_dense_below(0),
    or two tokens, it reads only the active rows. The result is the masked product every time."""
    g = torch.Generator().manual_seed(in_f + out_f)
    wt, scale = G.prepare_weight(torch.randn(out_f, in_f, generator=g), dtype)
    thr = torch.tensor([0.5])

    def inputs(skipped: int, batch: int = 1) -> torch.Tensor:
        x = torch.randn(batch, in_f, generator=g).sign() * (1 + torch.rand(batch, in_f, generator=g))  # |x| >= 1
        x[:, torch.randperm(in_f, generator=g)[:skipped]] = 0.01
        return x

    def check(x: torch.Tensor, rows_expected: int) -> None:
        y, rows = G.gemv(x, wt, scale, None, None, thr)
        ref = G.reference(x, wt, scale, None, None, thr)
        assert rows == rows_expected and (y - ref).abs().max().item() <= 1e-4 * (1 + ref.abs().max().item())

    few, many = in_f // 10, in_f // 4
    check(inputs(few), in_f)  # too few skipped to pay: every row read
    check(inputs(many), in_f - many)
    check(inputs(few, batch=2), in_f - few)  # the rows two tokens skip: never read
    prev = G.set_dense_below(0.0)
    try:
        check(inputs(few), in_f - few)
    finally:
        assert G.set_dense_below(prev) == 0.0
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        G.set_dense_below(1.5)


@needs_ext
@pytest.mark.parametrize("dtype,dot", [("fp32", True), ("bf16", True), ("bf16", False), ("int8", True), ("int8", False)])
@pytest.mark.parametrize("in_f,out_f", [(64, 48), (576, 192), (300, 1537), (7, 65), (520, 33), (130, 96), (48, 20)])
@pytest.mark.parametrize("tokens", [17, 40, 97, 301])
def test_gemm_matches_reference(dtype: str, dot: bool, in_f: int, out_f: int, tokens: int) -> None:
    """The blocked GEMM for long inputs, over every tail: tokens not a multiple of the micro-tile,
    outputs not a multiple of the column tile, inputs not a multiple of the packed panel (odd ones
    included: the bf16 dot products pair input channels). bf16 and int8 weights run both paths: bf16
    dot products on a bf16-rounded input where the CPU has them, and fp32 compute."""
    prev = G.set_bf16_dot(dot)
    try:
        g = torch.Generator().manual_seed(in_f * 7 + out_f + tokens)
        x = torch.randn(tokens, in_f, generator=g)
        wt, scale = G.prepare_weight(torch.randn(out_f, in_f, generator=g), dtype)
        bias = torch.randn(out_f, generator=g) if tokens % 2 else None
        y = G.gemm(x, wt, scale, bias)
        ref = G.gemm_reference(x, wt, scale, bias)
        assert y.shape == (tokens, out_f) and y.dtype == torch.float32
        assert (y - ref).abs().max().item() <= 1e-4 * (1 + ref.abs().max().item())
        if dtype != "fp32" and G.bf16_dot():  # the input really is rounded: far closer to that reference than to fp32 compute
            assert (y - ref).abs().max().item() < 0.1 * (y - G.reference(x, wt, scale, bias)).abs().max().item()
        fl = FastLinear(torch.nn.Linear(in_f, out_f), dtype)  # the runtime's linear takes the GEMM above the GEMV's batch
        xb = torch.randn(3, tokens, in_f, generator=g)
        want = G.gemm_reference(xb.view(-1, in_f), fl.wt, fl.scale, fl.bias).view(3, tokens, out_f)
        assert torch.allclose(fl(xb), want, atol=1e-4, rtol=1e-4)
    finally:
        G.set_bf16_dot(prev)


@needs_ext
@pytest.mark.parametrize("dtype", G.DTYPES)
def test_fast_linear_edge_shapes_and_gradients(dtype: str) -> None:
    """One output (a regression head) or one input; and with a backward pass to come the input
    gradient flows (the reference path), equal to the eager linear's in fp32."""
    for in_f, out_f in ((32, 1), (1, 24)):
        fl = FastLinear(torch.nn.Linear(in_f, out_f), dtype)
        for n in (1, 40):
            x = torch.randn(n, in_f)
            ref = (G.gemm_reference if n > G.MAX_BATCH else G.reference)(x, fl.wt, fl.scale, fl.bias)
            assert torch.allclose(fl(x), ref, atol=1e-5)
    lin = torch.nn.Linear(48, 40)
    ref = torch.nn.Linear(48, 40)
    ref.load_state_dict(lin.state_dict())
    fl = FastLinear(lin, dtype)
    for n in (3, 40):
        x = torch.randn(n, 48, requires_grad=True)
        fl(x).square().sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        if dtype == "fp32":
            x2 = x.detach().clone().requires_grad_(True)
            ref(x2).square().sum().backward()
            assert torch.allclose(x.grad, x2.grad, atol=1e-5)


@needs_ext
def test_gemm_errors_name_the_problem() -> None:
    wt, scale = G.prepare_weight(torch.randn(5, 10), "int8")
    with pytest.raises(ValueError, match="scale"):
        G.gemm(torch.randn(40, 10), wt, None)
    with pytest.raises(ValueError, match="features"):
        G.gemm(torch.randn(40, 11), wt, scale)
    with pytest.raises(ValueError, match="bias"):
        G.gemm(torch.randn(40, 10), wt, scale, torch.randn(4))


@pytest.mark.parametrize("dtype", G.DTYPES)
def test_prepare_weight_formats(dtype: str) -> None:
    w = torch.randn(40, 24)
    wt, scale = G.prepare_weight(w, dtype)
    assert wt.shape == (24, 40) and wt.is_contiguous()
    back = G.dequantize(wt, scale).t()
    err = (back - w).abs().max().item()
    bound = {"fp32": 0.0, "bf16": 2**-8 * w.abs().max().item(), "int8": 0.51 * (w.abs().amax(1) / 127).max().item()}[dtype]
    assert err <= bound
    assert (scale is None) == (dtype != "int8")
    with pytest.raises(ValueError, match="not supported"):
        G.prepare_weight(w, "fp8")


@needs_ext
def test_gemv_errors_name_the_problem() -> None:
    wt, scale = G.prepare_weight(torch.randn(5, 10), "int8")
    with pytest.raises(ValueError, match="scale"):
        G.gemv(torch.randn(1, 10), wt, None)
    with pytest.raises(ValueError, match="features"):
        G.gemv(torch.randn(1, 11), wt, scale)
    big, _ = G.gemv(torch.randn(40, 10), wt, scale)  # above the kernel's batch: the reference
    assert big.shape == (40, 5)


def test_read_bandwidth_is_positive() -> None:
    assert G.read_bandwidth(mbytes=16, repeats=1) > 0


@needs_ext
@pytest.mark.parametrize("batch", [1, 3])
def test_norm_ops_match_reference(batch: int) -> None:
    h, d, w = torch.randn(batch, 48), torch.randn(batch, 48), torch.randn(48)
    assert torch.allclose(D.rmsnorm(h, w, 1e-5), D.rmsnorm_reference(h, w, 1e-5), atol=1e-5)
    h2 = h.clone()
    y = D.add_rmsnorm(h2, d, w, 1e-5)
    assert torch.allclose(h2, h + d, atol=1e-6)
    assert torch.allclose(y, D.rmsnorm_reference(h + d, w, 1e-5), atol=1e-5)


@needs_ext
@pytest.mark.parametrize("heads,kv", [(4, 2), (9, 3), (2, 2)])
@pytest.mark.parametrize("batch", [1, 4])
def test_attn_decode_matches_reference(heads: int, kv: int, batch: int) -> None:
    g = torch.Generator().manual_seed(heads * 10 + batch)
    D_, L, pos = 16, 12, 7
    q, k, v = torch.randn(batch, heads * D_, generator=g), torch.randn(batch, kv * D_, generator=g), torch.randn(batch, kv * D_, generator=g)
    ang = torch.rand(D_ // 2, generator=g) * 3
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    kc, vc = torch.randn(batch, kv, L, D_, generator=g), torch.randn(batch, kv, L, D_, generator=g)
    kc2, vc2 = kc.clone(), vc.clone()
    y = D.attn_decode(q, k, v, cos, sin, kc, vc, pos, 0.25)
    ref = D.attn_decode_reference(q, k, v, cos, sin, kc2, vc2, pos, 0.25)
    assert torch.allclose(y, ref, atol=1e-5)
    assert torch.allclose(kc, kc2, atol=1e-6) and torch.equal(vc, vc2)
    with pytest.raises(ValueError, match="outside the cache"):
        D.attn_decode(q, k, v, cos, sin, kc, vc, L, 0.25)
    # q | k | v side by side in one row (a fused projection's output), k and v empty
    kc3, vc3 = kc2.clone(), vc2.clone()
    y3 = D.attn_decode(torch.cat([q, k, v], 1), torch.empty(0), torch.empty(0), cos, sin, kc3, vc3, pos, 0.25)
    assert torch.allclose(y3, ref, atol=1e-5) and torch.allclose(kc3, kc2, atol=1e-6) and torch.equal(vc3, vc2)


@needs_ext
@pytest.mark.parametrize("cache", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos", [0, 63, 64, 200, 650])
@pytest.mark.parametrize("batch,D_,heads,kv", [(1, 64, 9, 3), (2, 64, 8, 2), (1, 64, 4, 4), (1, 64, 6, 3), (1, 64, 10, 2), (1, 24, 9, 3)])
def test_attn_decode_long_cache_in_chunks(pos: int, batch: int, D_: int, heads: int, kv: int, cache: torch.dtype) -> None:
    """Long caches are split into chunks of positions (across threads) and merged: the result must
    not depend on the split, for every chunk count, a last chunk of one position, 1 to 4 query heads
    per key / value head (heads of 64 keep their accumulators in registers), a head size off the
    vector width, and a bf16 cache (read exactly as stored; the new key and value are bf16 values
    and the rotation the identity there, so that no rounding to bf16 can fall on a tie between
    the kernel's fp32 rotation and torch's)."""
    g = torch.Generator().manual_seed(pos * 7 + batch + D_ + heads)
    L = 700
    q, k, v = torch.randn(batch, heads * D_, generator=g), torch.randn(batch, kv * D_, generator=g), torch.randn(batch, kv * D_, generator=g)
    ang = torch.rand(D_ // 2, generator=g) * 3
    if cache == torch.bfloat16:
        k, v, ang = k.to(cache).float(), v.to(cache).float(), torch.zeros(D_ // 2)
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    kc, vc = torch.randn(batch, kv, L, D_, generator=g).to(cache), torch.randn(batch, kv, L, D_, generator=g).to(cache)
    kc2, vc2 = kc.clone(), vc.clone()
    scale = D_ ** -0.5
    y = D.attn_decode(q, k, v, cos, sin, kc, vc, pos, scale)
    ref = D.attn_decode_reference(q, k, v, cos, sin, kc2, vc2, pos, scale)
    assert (y - ref).abs().max().item() < 1e-5
    assert torch.allclose(kc.float(), kc2.float(), atol=1e-6) and torch.equal(vc, vc2)
    with torch.no_grad():  # one thread: the same result as two
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            y1 = D.attn_decode(q, k, v, cos, sin, kc2.clone(), vc2.clone(), pos, scale)
        finally:
            torch.set_num_threads(n)
    assert (y1 - ref).abs().max().item() < 1e-5


@needs_ext
@pytest.mark.parametrize("batch", [1, 3])
def test_silu_mul_matches_reference(batch: int) -> None:
    gu = 4 * torch.randn(batch, 2 * 37, generator=torch.Generator().manual_seed(batch))
    assert torch.allclose(D.silu_mul(gu), D.silu_mul_reference(gu), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="gate columns"):
        D.silu_mul(torch.randn(2, 7))


@pytest.mark.parametrize("dtype", G.DTYPES)
def test_runtime_apply_revert_bit_exact(dtype: str, ids: torch.Tensor) -> None:
    m = tiny_causal_lm("llama")
    m.config.tie_word_embeddings = True
    m.tie_weights()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    dense = m(ids).logits
    step = m(ids[:1, :1]).logits
    rep = ln.apply_(m, RuntimeConfig(dtype=dtype))
    assert len(rep[0].paths) == 2 * 7 + 1  # every linear, the LM head included
    assert all(isinstance(m.get_submodule(p), FastLinear) for p in rep[0].paths)
    tol = {"fp32": 1e-5, "bf16": 0.05, "int8": 0.1}[dtype]
    assert (m(ids).logits - dense).abs().max() <= tol * (1 + dense.abs().max())
    assert (m(ids[:1, :1]).logits - step).abs().max() <= tol * (1 + step.abs().max())
    with pytest.raises(ln.ConfigError, match="already on the runtime"):
        ln.apply_(m, RuntimeConfig())
    ln.revert_(m)
    after = m.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v) and after[k].is_contiguous(), k
    assert m.lm_head.weight is m.model.embed_tokens.weight  # ties survive
    assert torch.equal(m(ids).logits, dense)


def test_runtime_config_errors() -> None:
    with pytest.raises(ln.ConfigError, match="dtype"):
        RuntimeConfig(dtype="fp16")
    assert ln.MethodConfig.parse("runtime:dtype=int8") == RuntimeConfig(dtype="int8")


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_activation_sparsity_rows_in_runtime_dtype(dtype: str, ids: torch.Tensor) -> None:
    m = tiny_causal_lm("llama")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = ActivationSparsityConfig(rule="teal", sparsity=0.0)
    cal = ln.calibrate(m, calib_batches(), cfg)
    dense = m(ids[:1, :1]).logits
    ln.apply_(m, [cfg, RuntimeConfig(dtype=dtype)], cal)
    sp = m.model.layers[0].mlp.down_proj
    assert sp.weight_dtype == dtype and sp.wt.dtype == {"bf16": torch.bfloat16, "int8": torch.int8}[dtype]
    assert isinstance(m.lm_head, FastLinear)  # the head no method took is on the runtime
    tol = {"bf16": 0.05, "int8": 0.1}[dtype]
    assert (m(ids[:1, :1]).logits - dense).abs().max() <= tol * (1 + dense.abs().max())
    out = m(ids[:1, :1]).logits
    ln.revert_(m)
    ln.apply_(m, [RuntimeConfig(dtype=dtype), cfg], cal)  # the runtime given first is still applied last
    assert isinstance(m.model.layers[0].mlp.down_proj, type(sp)) and torch.equal(m(ids[:1, :1]).logits, out)
    ln.revert_(m)
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k


@needs_ext
@pytest.mark.parametrize("dtype", G.DTYPES)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_siblings_stored_side_by_side_and_read_in_one_call(dtype: str, sparse: bool, batch: int) -> None:
    """The runtime stores q / k / v and gate / up side by side; the decode step reads each group
    in one call. Its logits equal the step that calls every projection alone, and the model's own
    forward (the members read their column blocks) is unchanged by the fusion."""
    from lazyneuron.runtime import DecodeStep
    from lazyneuron.runtime.linear import fused_args

    m = tiny_causal_lm("qwen2", layers=2)  # q / k / v with biases
    ids = torch.randint(0, 128, (batch, 10), generator=torch.Generator().manual_seed(4))
    cfgs: list = [RuntimeConfig(dtype=dtype)]
    cal = None
    if sparse:
        cfg = ActivationSparsityConfig(rule="teal", sparsity=0.4)
        cal = ln.calibrate(m, calib_batches(), cfg)
        cfgs = [cfg, *cfgs]
    ln.apply_(m, cfgs, cal)
    att, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    group = att.q_proj._ln_fused[0]
    assert att.k_proj._ln_fused[0] is group and att.v_proj.wt.data_ptr() > group.wt.data_ptr() and mlp.up_proj._ln_fused[0] is mlp.gate_proj._ln_fused[0]
    fwd = m(ids).logits

    def run(fused: bool) -> list[torch.Tensor]:
        st = DecodeStep(m, batch, 16)
        if not fused:
            st._fast = [f[:4] + (None, f[5] if f[5] is None or not isinstance(f[5][1], list) else None, f[6]) for f in st._fast]
        else:
            equal = not sparse or all(torch.equal(a.threshold, att.q_proj.threshold) for a in (att.k_proj, att.v_proj))
            qkv = st._fast[0][4]
            assert (qkv is not None) == equal
            if qkv is not None:
                assert qkv[1] == [a.out_features for a in (att.q_proj, att.k_proj, att.v_proj)]
        st.prefill(ids[:, :6])
        return [st.step(ids[:, p], p) for p in range(6, 10)]

    for a, b in zip(run(True), run(False)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    tol = {"fp32": 1e-4, "bf16": 0.05, "int8": 0.1}[dtype] if not sparse else None
    if tol is not None:  # dense: the step against the model's forward on the same weights
        steps = run(True)
        for p, lg in zip(range(6, 10), steps):
            assert (lg - fwd[:, p]).abs().max() <= tol * (1 + fwd[:, p].abs().max())
    if sparse:  # unequal thresholds: the group's rows differ per member, so each is read alone
        att.k_proj.threshold = att.k_proj.threshold + 1.0
        assert fused_args([att.q_proj, att.k_proj, att.v_proj], [(t.wt, None, torch.empty(0), torch.empty(0), t.threshold) for t in (att.q_proj, att.k_proj, att.v_proj)]) is None
    ln.revert_(m)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_reproduces_the_model(family: str, batch: int) -> None:
    m = tiny_causal_lm(family, layers=3)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 128, (batch, 9), generator=g)
    ref = lean_generate(m, prompt, 20)
    assert supports_step(m)
    ln.apply_(m, RuntimeConfig())
    assert torch.equal(generate(m, prompt, 20), ref)  # greedy tokens identical to the eager model
    ln.revert_(m)
    assert torch.equal(generate(m, prompt, 20), ref)  # the step alone, on torch's linears


def test_decode_step_logits_match_forward() -> None:
    from lazyneuron.runtime import DecodeStep

    m = tiny_causal_lm("llama", layers=2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    full = m(ids).logits  # (2, 12, V)
    st = DecodeStep(m, 2, 16)
    st.prefill(ids[:, :8])
    for p in range(8, 12):
        assert torch.allclose(st.step(ids[:, p], p), full[:, p], atol=1e-4)
    st = DecodeStep(m, 2, 16)
    st._ext = None  # no compiled kernels: the step's pure-torch form
    st.prefill(ids[:, :8])
    for p in range(8, 12):
        assert torch.allclose(st.step(ids[:, p], p), full[:, p], atol=1e-4)


@needs_ext
def test_attn_decode_bf16_cache_rounds_as_torch() -> None:
    """A value written into a bf16 cache is rounded to nearest even, as torch converts: halfway
    cases, the largest finite values, infinities and NaN."""
    D_, kv = 16, 1
    vals = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.3895314e38, 3.4e38, float("inf"), -float("inf"), 0.0, -0.0, 1e-40,
                         2 ** -133, 1.0, 0.1, -7.77, 65504.0, float("nan")])
    q = torch.randn(1, D_)
    k, v = torch.zeros(1, D_), vals.view(1, D_)
    cos, sin = torch.ones(D_), torch.zeros(D_)
    kc, vc = torch.zeros(1, kv, 4, D_, dtype=torch.bfloat16), torch.zeros(1, kv, 4, D_, dtype=torch.bfloat16)
    D.attn_decode(q, k, v, cos, sin, kc, vc, 0, 0.25)
    want = vals.to(torch.bfloat16)
    got = vc[0, 0, 0]
    assert torch.isnan(got[-1]) and torch.equal(got[:-1].view(torch.int16), want[:-1].view(torch.int16))


def test_decode_step_bf16_cache() -> None:
    """RuntimeConfig(kv_cache="bf16"): the step keeps keys and values in bf16; its logits are the
    model's, up to the cache's rounding, with the kernels and in pure torch; revert restores fp32."""
    from lazyneuron.runtime import DecodeStep

    m = tiny_causal_lm("llama", layers=2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    full = m(ids).logits  # (2, 12, V)
    ln.apply_(m, RuntimeConfig(kv_cache="bf16"))
    for kernels in (True, False):
        st = DecodeStep(m, 2, 16)
        assert st.kv_cache == "bf16" and st.kc[0].dtype == torch.bfloat16
        if not kernels:
            st._ext = None
        st.prefill(ids[:, :8])
        for p in range(8, 12):
            got = st.step(ids[:, p], p)
            err = (got - full[:, p]).abs().max().item()
            assert 0 < err < 0.02 * full[:, p].abs().max().item()  # rounded, not exact, and close
    assert generate(m, ids[:, :8], 6).shape == (2, 6)
    ln.revert_(m)
    assert DecodeStep(m, 2, 16).kc[0].dtype == torch.float32
    with pytest.raises(ValueError, match="kv_cache"):
        RuntimeConfig(kv_cache="fp16").validate()
    with pytest.raises(ValueError, match="kv_cache"):
        DecodeStep(m, 2, 16, kv_cache="int4")


@pytest.mark.parametrize("kernels", [True, False])
def test_decode_step_runs_gated_models_skipping_modules(tmp_path, kernels: bool) -> None:
    """A module-gated model decodes on the lean step: per-sequence masks (here forced, different
    per sample, with modules every sample skips, some samples skip and none skips) give the gated
    model's own logits, on the runtime's kernels and in the step's pure-torch form; a module every
    sequence skips is never called."""
    from lazyneuron.methods.gating import ModuleGatingConfig, gated_stacks, static_predictor
    from lazyneuron.runtime import DecodeStep

    m = tiny_causal_lm("llama", layers=4)
    static_predictor(m, [(1, "attn")]).save(tmp_path / "g.safetensors")
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(3))
    keep = torch.ones(3, 4, 2, dtype=torch.bool)
    keep[:, 1, 0] = False  # every sequence skips layer 1's attention
    keep[:, 3, 1] = False  # and layer 3's MLP
    keep[0, 2, 0] = keep[2, 0, 1] = False  # only some skip these
    ln.apply_(m, [ModuleGatingConfig(checkpoint=str(tmp_path / "g.safetensors")), RuntimeConfig()])
    assert supports_step(m)
    st = gated_stacks(m)[0]
    st.force = keep
    with torch.no_grad():
        full = m(ids, use_cache=False).logits
    called = []
    hooks = [st.layers[1].self_attn.register_forward_hook(lambda *a: called.append("attn1")),
             st.layers[3].mlp.register_forward_hook(lambda *a: called.append("mlp3"))]
    step = DecodeStep(m, 3, 16)
    if not kernels:
        step._ext = None
    step.prefill(ids[:, :8])
    assert torch.equal(step.keep, keep.float())
    for p in range(8, 12):
        assert torch.allclose(step.step(ids[:, p], p), full[:, p], atol=1e-4)
    assert called == []
    for h in hooks:
        h.remove()
    ln.revert_(m)


@pytest.mark.parametrize("lens", [False, True])
@pytest.mark.parametrize("kernels", [True, False])
def test_decode_step_runs_early_exit_like_its_own_loop(tmp_path, lens: bool, kernels: bool) -> None:
    """An early-exit model decodes on the lean step with the logits of its own decode loop: exit
    scores set far from the threshold (never after layer 0, always after layer 1 from the second
    token on), so every token leaves after layer 1 and layers 2-3 get CALM keys / values."""
    from transformers import DynamicCache

    from lazyneuron.methods.early_exit import EarlyExitConfig, ExitHeads, ExitingDecoder
    from lazyneuron.runtime import DecodeStep

    m = tiny_causal_lm("llama", layers=4)
    heads = ExitHeads("causal_lm", [0, 1], 64, 0, "llama", lens=lens)
    with torch.no_grad():
        for j, b in ((0, -30.0), (1, 30.0)):
            heads.scores[str(j)].weight.zero_()
            heads.scores[str(j)].bias.fill_(b)
    heads.save(tmp_path / "x.safetensors")
    ln.apply_(m, [EarlyExitConfig(checkpoint=str(tmp_path / "x.safetensors"), threshold=0.5), RuntimeConfig()])
    assert supports_step(m)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the model's own loop: prefill, then one token at a time
        cache = DynamicCache(config=m.config)
        m(ids[:, :8], past_key_values=cache, use_cache=True)
        want = [m(ids[:, p:p + 1], past_key_values=cache, use_cache=True).logits[0, -1] for p in range(8, 12)]
    dec = next(x for x in m.modules() if isinstance(x, ExitingDecoder))
    dec.track, dec.layers_run = True, []
    step = DecodeStep(m, 1, 16)
    if not kernels:
        step._ext = None
    step.prefill(ids[:, :8])
    for p, w in zip(range(8, 12), want):
        assert torch.allclose(step.step(ids[:, p], p)[0], w, atol=1e-4)
    assert dec.layers_run[-4:] == [2, 2, 2, 2]
    ln.revert_(m)


def test_step_falls_back_where_it_does_not_apply() -> None:
    for fam in ("gpt2", "qwen3"):
        m = tiny_causal_lm(fam)
        assert not supports_step(m)
        prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
        assert torch.equal(generate(m, prompt, 5), lean_generate(m, prompt, 5))


def _has_avx512() -> bool:
    from pathlib import Path

    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not (_has_avx512() and G.available()), reason="the host has no AVX-512: the default build already is the AVX2 path")
def test_kernels_on_the_avx2_path() -> None:
    """The kernels choose their vector width when they are compiled (-march=native): on an
    AVX-512 host the AVX2 path is built with -mno-avx512f and held to the same references."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    env = {**os.environ, "LAZYNEURON_KERNEL_FLAGS": "-mno-avx512f"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(here / "test_runtime.py"), str(here / "test_kernels.py"),
           str(here / "test_fff.py"), "-k", "(gemv or gemm or attn or norm or sparse or cats or per_channel or decode_step or cmm) and not avx2"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=here.parent)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout


@needs_ext
@pytest.mark.parametrize("dtype", G.DTYPES)
@pytest.mark.parametrize("centred", [False, True])
def test_long_inputs_sparsified_then_dense_gemm(dtype: str, centred: bool) -> None:
    """Above the kernel's batch, activation sparsity sparsifies the input in one pass and runs a
    dense GEMM: the same values as the reference."""
    from lazyneuron.kernels import sparse_gemv as K

    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 96, generator=g)
    wt, scale = G.prepare_weight(torch.randn(50, 96, generator=g), dtype)
    bias, centre = torch.randn(50, generator=g), (0.1 * torch.randn(96, generator=g) if centred else None)
    for thr in (torch.tensor([0.6]), torch.rand(96, generator=g)):
        y = K.masked_matmul(x, wt, bias, centre, thr, scale)
        ref = K.reference(x, wt, bias, centre, thr, scale)
        assert torch.allclose(y, ref, atol=1e-4, rtol=1e-5)  # fp32 compute, also where bf16 dot products exist


def test_step_profile_splits_the_step() -> None:
    from lazyneuron.runtime import step_profile

    m = tiny_causal_lm("llama")
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="RuntimeConfig"):
        step_profile(m, prompt, steps=2, repeats=1)
    ln.apply_(m, RuntimeConfig())
    p = step_profile(m, prompt, steps=2, repeats=1)
    # per layer: q / k / v in one call (stored side by side), o, gate / up in one call, down; then the head
    assert p["kernel_calls"] == 2 * 4 + 1 and 0 <= p["non_gemv_share"] <= 1 and p["step_s"] > 0


@needs_ext
@pytest.mark.parametrize("T,H,D", [(150, 2, 64), (67, 3, 32), (6, 1, 64), (1, 2, 16), (130, 1, 50)])
def test_attention_kernel_matches_reference(T: int, H: int, D: int) -> None:
    """The bf16 flash-style attention for long inputs against fp32 attention and against fp32
    attention on the same bf16-rounded q, k, v: key blocks with tails, query blocks with tails,
    head sizes below the tile."""
    if not G.bf16_dot():
        pytest.skip("this CPU has no bf16 dot-product instructions; attention runs torch's")
    g = torch.Generator().manual_seed(T * 10 + D)
    q, k, v = (torch.randn(2, T, H, D, generator=g) * 2 for _ in range(3))
    out = G.attention(q, k, v, D ** -0.5)
    ref = G.attention_reference(q, k, v, D ** -0.5)
    rnd = G.attention_reference(*((t * (D ** -0.5 if i == 0 else 1)).bfloat16().float() for i, t in enumerate((q, k, v))), 1.0)
    assert out.shape == q.shape and out.dtype == torch.float32
    scale = ref.abs().max().item()
    assert (out - rnd).abs().max().item() < 1e-2 * scale  # only the probabilities' rounding differs
    assert (out - ref).abs().max().item() < 3e-2 * scale
    prev = G.set_bf16_dot(False)
    try:
        assert torch.allclose(G.attention(q, k, v, D ** -0.5), ref)  # switched off: torch's fp32 attention
    finally:
        G.set_bf16_dot(prev)


def _hugepages(monkeypatch):
    from lazyneuron.runtime import memory

    if not (memory.available() and G.available()):
        pytest.skip("no transparent huge pages (or no C++ extension) here")
    monkeypatch.setattr(memory, "MIN_BYTES", 0)  # the tiny models' weights are far below the real floor
    return memory


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", G.DTYPES)
@pytest.mark.parametrize("sparse", [False, True])
def test_weights_on_hugepages_change_nothing_and_revert(family: str, dtype: str, sparse: bool, ids: torch.Tensor, monkeypatch) -> None:
    """The runtime's weights move into one 2 MiB-aligned arena: logits and generated tokens equal
    those of the same runtime on ordinary pages, the embedding (tied to the head) stays where it
    is, and revert_ leaves no model tensor in the arena (GPT-2's Conv1D weights, which a sparse
    linear reads in place, never go there)."""
    memory = _hugepages(monkeypatch)
    m = tiny_causal_lm(family)
    if family == "llama":
        m.config.tie_word_embeddings = True
        m.tie_weights()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    emb = m.get_input_embeddings().weight.data_ptr()
    cfgs, cal = [], None
    if sparse:
        cfgs = [ActivationSparsityConfig(rule="teal", sparsity=0.3)]
        cal = ln.calibrate(m, calib_batches(), cfgs[0])
    outs = {}
    for huge in (False, True):
        rep = ln.apply_(m, [*cfgs, RuntimeConfig(dtype=dtype, hugepages=huge)], cal)
        stored = [t for mod in m.modules() for t in memory._stored_weights(mod)]
        ptrs = {w.untyped_storage().data_ptr() for w in stored}
        if huge:
            assert rep[-1].summary["hugepage_bytes"] > 0
            arenas = {p for p in ptrs if p % (2 << 20) == 0}
            assert len(arenas) == 1  # the moved weights share one arena
            arena = next(iter(arenas))
            if family == "llama" or dtype != "fp32" or not sparse:  # else: GPT-2's sparse fp32 rows are its own Conv1D weights
                assert ptrs == arenas
        else:
            assert rep[-1].summary["hugepage_bytes"] == 0
        assert m.get_input_embeddings().weight.data_ptr() == emb
        with torch.inference_mode():
            outs[huge] = (m(ids).logits, generate(m, ids[:1, :4], 6))
        ln.revert_(m)
        after = m.state_dict()
        for k, v in before.items():
            assert torch.equal(after[k], v) and after[k].is_contiguous(), k
            assert not huge or after[k].untyped_storage().data_ptr() != arena, k
    assert torch.equal(outs[False][0], outs[True][0]) and torch.equal(outs[False][1], outs[True][1])


def test_hugepages_move_only_the_runtimes_buffers(monkeypatch) -> None:
    """A runtime linear's weight moves with every view of it the method modules hold and with its
    nn.Linear's weight (which shares it in fp32); a tensor a method module merely holds (it may live
    on in a cache), and a buffer another module of the model also uses, stay where they are."""
    from torch import nn

    memory = _hugepages(monkeypatch)
    seq = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32))
    a, b = FastLinear(seq[0], "fp32"), FastLinear(seq[1], "fp32")
    seq[0], seq[1] = a, b
    a.alias, a.held = a.wt[:, :10], torch.randn(128, 128)
    seq.register_buffer("shared", b.wt)  # the model's own module uses b's buffer too
    x = torch.randn(3, 64)
    y0 = seq(x)
    keep = {"held": a.held.data_ptr(), "b": b.wt.data_ptr()}
    out = memory.to_hugepages(seq)
    assert out["tensors"] == 3 and out["bytes"] >= 64 * 96 * 4  # a.wt, its alias and its base's weight
    assert a.wt.untyped_storage().data_ptr() % (2 << 20) == 0
    assert a.alias.data_ptr() == a.wt.data_ptr() and a.base.weight.data_ptr() == a.wt.data_ptr()
    assert a.held.data_ptr() == keep["held"] and b.wt.data_ptr() == keep["b"] == seq.shared.data_ptr()
    assert torch.equal(seq(x), y0)
    assert memory.to_hugepages(nn.Sequential(nn.Linear(8, 8))) == {"tensors": 0, "bytes": 0}  # no method module: nothing to move
