"""Expert routing: the experts kernel and router against their pure-torch references, k = E equal
to dense, native MoE models reproduced exactly, checkpoints, runtime formats, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import UnknownNet, calib_batches, tiny_causal_lm

import lazyneuron as ln
from lazyneuron.bench.accounting import tracking
from lazyneuron.errors import ConfigError
from lazyneuron.kernels import experts as X
from lazyneuron.kernels import gemv as G
from lazyneuron.methods.experts import ExpertMLP, ExpertRoutingConfig as C, NativeMoE, TokenSample, balanced_assign, split_experts
from lazyneuron.runtime import RuntimeConfig

kernel = pytest.mark.skipif(not G.available(), reason="C++ kernel did not build here (the fallback is the reference itself)")


def _blocks(gated: bool, dtype: str, E: int = 8, fe: int = 40, d: int = 48, out: int = 56, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(E * fe, d, generator=g) if gated else None
    up, down = torch.randn(E * fe, d, generator=g), torch.randn(out, E * fe, generator=g)
    gb = torch.randn(E * fe, generator=g) if gated else None
    return X.prepare_experts(gate, up, down, E, dtype, gate_bias=gb, up_bias=torch.randn(E * fe, generator=g)), torch.randn(out, generator=g)


@kernel
@pytest.mark.parametrize("gated,act", [(True, "silu"), (False, "gelu"), (False, "gelu_tanh"), (True, "relu")])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("batch", [1, 3, 8, 16])
def test_expert_kernel_matches_reference(gated: bool, act: str, dtype: str, batch: int) -> None:
    blk, db = _blocks(gated, dtype, seed=batch)
    g = torch.Generator().manual_seed(batch + 7)
    x = torch.randn(batch, 48, generator=g)
    coef = torch.rand(batch, 8, generator=g) * (torch.rand(batch, 8, generator=g) < 0.4)
    ref = X.reference(x, blk["gu"], blk["gu_scale"], blk["gu_bias"], blk["down"], blk["down_scale"], db, coef, act, gated)
    y, hit = X.expert_mlp(x, blk, db, coef, act, gated)
    assert (y - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())
    assert hit == int((coef != 0).any(0).sum())  # experts no token chose are never read


def test_prepared_blocks_dequantize_to_the_weights() -> None:
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g), torch.randn(24, 64, generator=g)
    blk = X.prepare_experts(gate, up, down, 4, "fp32")
    assert torch.equal(blk["gu"][1][:, :16], gate[16:32].t()) and torch.equal(blk["gu"][1][:, 16:], up[16:32].t())
    assert torch.equal(blk["down"], down.t())
    with pytest.raises(ValueError, match="do not split into 5 equal experts"):
        X.prepare_experts(gate, up, down, 5)


def _router(kind: str, gated: bool, E: int = 8, shared: int = 2, top_k: int = 3, share: float = 1.0, d: int = 48, seed: int = 0) -> X.Router:
    g = torch.Generator().manual_seed(seed)
    K = E - shared if kind != "native" else E
    if kind == "learned":
        return X.Router("learned", torch.randn(d, 32, generator=g), torch.randn(32, generator=g), torch.randn(32, K, generator=g), torch.randn(K, generator=g),
                        top_k=top_k, share=share, shared=shared)
    if kind == "analytic":
        P = K * 3
        return X.Router("analytic", torch.randn(d, P * (2 if gated else 1), generator=g), torch.randn(P * (2 if gated else 1), generator=g),
                        norm=torch.rand(P, generator=g) + 0.1, probes=3, top_k=top_k, share=share, shared=shared)
    return X.Router("native", torch.randn(d, K, generator=g), top_k=top_k, share=share, renorm=share < 1)


@kernel
@pytest.mark.parametrize("kind", ["learned", "analytic", "native"])
@pytest.mark.parametrize("share", [1.0, 0.5])
@pytest.mark.parametrize("batch", [1, 5, 16, 40, 70])
def test_router_and_experts_in_one_call_match_reference(kind: str, share: float, batch: int) -> None:
    """Up to the decode kernel's batch, router and experts in one call; beyond (40, 70), the same
    router over every token, then the grouped GEMM."""
    gated = kind != "learned"  # both FFN kinds covered
    blk, db = _blocks(gated, "fp32", seed=batch)
    r = _router(kind, gated, shared=0 if kind == "native" else 2, share=share, seed=batch)
    x = torch.randn(batch, 48, generator=torch.Generator().manual_seed(batch))
    y, coef = X.routed_mlp(x, r, blk, db, "silu" if gated else "gelu", gated)
    ref_coef = X.route_reference(x, r, 8, "silu" if gated else "gelu", gated)
    assert torch.equal(coef != 0, ref_coef != 0)
    assert torch.allclose(coef, ref_coef, atol=1e-6)
    ref = X.reference(x, blk["gu"], blk["gu_scale"], blk["gu_bias"], blk["down"], blk["down_scale"], db, ref_coef, "silu" if gated else "gelu", gated)
    assert (y - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())
    routed = (coef[:, 0 if kind == "native" else 2:] != 0).sum(1)
    assert (routed <= 3).all() and (routed >= 1).all()
    if share == 1.0:
        assert (routed == 3).all()


def test_balanced_split_is_a_partition() -> None:
    sim = torch.randn(96, 6, generator=torch.Generator().manual_seed(0))
    a = balanced_assign(sim, 16)
    assert torch.equal(torch.bincount(a, minlength=6), torch.full((6,), 16))
    contrib = torch.rand(200, 96, generator=torch.Generator().manual_seed(1))
    perm, _ = split_experts(contrib, 8, 2)
    assert sorted(perm.tolist()) == list(range(96))
    assert set(perm[:24].tolist()) == set(contrib.mean(0).argsort(descending=True)[:24].tolist())  # shared experts: the most active neurons


def test_token_sample_keeps_a_bounded_seeded_sample() -> None:
    a, b = TokenSample(capacity=50), TokenSample(capacity=50)
    for i in range(7):
        x = torch.randn(2, 13, 8, generator=torch.Generator().manual_seed(i))
        a.update(x)
        b.update(x)
    assert a.state()["x"].shape == (50, 8) and torch.equal(a.state()["x"], b.state()["x"])
    with pytest.raises(ConfigError, match="saw no tokens"):
        TokenSample().state()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("router", ["analytic", "learned"])
def test_all_experts_reproduce_dense(family: str, router: str, ids: torch.Tensor) -> None:
    """k = E (and shared + k = E) computes the dense FFN: logits within 1e-5, prefill and decode shapes."""
    m = tiny_causal_lm(family)
    dense, step = m(ids).logits, m(ids[:1, :1]).logits
    cfg = C(experts=8, shared=2, top_k=6, router=router)
    cal = ln.calibrate(m, calib_batches(), cfg)
    ln.apply_(m, cfg, cal)
    from lazyneuron.adapters import get_adapter

    assert isinstance(m.get_submodule(get_adapter(m).paths("mlp")[0]), ExpertMLP)
    assert (m(ids).logits - dense).abs().max() <= 1e-5
    assert (m(ids[:1, :1]).logits - step).abs().max() <= 1e-5
    ln.revert_(m)
    assert torch.equal(m(ids).logits, dense)


def test_fewer_experts_read_less_and_say_so(ids: torch.Tensor) -> None:
    m = tiny_causal_lm("llama")
    cfg = C(experts=8, shared=1, top_k=2, router="learned")
    cal = ln.calibrate(m, calib_batches(), cfg)
    dense = m(ids).logits
    with ln.applied(m, cfg, cal):
        with tracking(m):
            out = m(ids[:1, :1]).logits
            m(ids)
        mods = [x for x in m.modules() if isinstance(x, ExpertMLP)]
        assert all(x.experts_read == 3 * x.tokens_seen for x in mods)  # shared + top_k per token
        from lazyneuron.bench.accounting import achieved_sparsity

        x = mods[0]  # 5 of 8 experts skipped per token, less the router's own weights
        expect = (5 * x.fe * (2 * x.d + x.out_features) - x.router_spec.elements()) / x.weight_elements()
        assert achieved_sparsity(m) == pytest.approx(expect)
    assert not torch.allclose(out, dense[:1, :1])


def test_checkpoint_round_trip_and_another_models_checkpoint(tmp_path, ids: torch.Tensor) -> None:
    path = str(tmp_path / "experts.safetensors")
    m = tiny_causal_lm("llama")
    cfg = C(experts=8, top_k=3, router="learned", checkpoint=path)
    cal = ln.calibrate(m, calib_batches(), cfg)
    with ln.applied(m, cfg, cal):
        a = m(ids).logits
    cal2 = ln.calibrate(m, calib_batches(), cfg)  # a fresh calibration object: the experts come from the file
    with ln.applied(m, cfg, cal2):
        assert torch.equal(m(ids).logits, a)
    other = tiny_causal_lm("llama", layers=3)
    cal3 = ln.calibrate(other, calib_batches(), cfg)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ConfigError, match="made for another model"):
        ln.apply_(other, cfg, cal3)
    assert not any(isinstance(x, ln.LazyModule) for x in other.modules())
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(ConfigError, match="built with"):
        ln.apply_(m, C(experts=8, top_k=3, router="analytic", checkpoint=path), cal)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_runs_on_the_runtime_formats(dtype: str, ids: torch.Tensor) -> None:
    m = tiny_causal_lm("llama")
    cfg = C(experts=8, top_k=4, router="learned")
    cal = ln.calibrate(m, calib_batches(), cfg)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with ln.applied(m, cfg, cal):
        fp32 = m(ids[:1, :4]).logits
    with ln.applied(m, [cfg, RuntimeConfig(dtype=dtype)], cal):
        mod = next(x for x in m.modules() if isinstance(x, ExpertMLP))
        want = {"bf16": torch.bfloat16, "int8": torch.int8}[dtype]
        assert mod.weight_dtype == dtype and mod.blocks["gu"].dtype == want
        assert mod.router_spec.w1.dtype == want and (mod.router_spec.w1_scale is not None) == (dtype == "int8")  # the router in the runtime's format
        r = mod.router_spec
        for n in (5, 40):  # the decode kernel's router; beyond its batch, route_tokens (first layer on the GEMM)
            x = torch.randn(n, mod.d, generator=torch.Generator().manual_seed(2))
            sc = torch.relu(x @ r.first_layer() + r.b1) @ r.w2 + r.b2
            top = sc.topk(r.top_k + 1, -1).values
            assert bool((top[:, -2] - top[:, -1] > 1e-3).all())  # no near-tie at the top-k boundary: the choice is well defined
            _, coef = X.routed_mlp(x, r, mod.blocks, mod.down_bias, mod.act, mod.gated)
            assert torch.equal(coef, X.route_reference(x, r, mod.E, mod.act, mod.gated))  # the kernel reads the stored router as the reference does
        step = m(ids[:1, :4]).logits
    assert (step - fp32).abs().max() < 0.05 * (1 + fp32.abs().max())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    ln.apply_(m, cfg, cal)  # without the runtime: the fp32 router
    assert next(x for x in m.modules() if isinstance(x, ExpertMLP)).router_spec.w1.dtype == torch.float32
    ln.revert_(m)


def test_bad_input_stops_with_one_clear_error(ids: torch.Tensor) -> None:
    m = tiny_causal_lm("llama")  # 128 neurons per FFN
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match="does not divide the 128 neurons"):
        ln.apply_(m, C(experts=12, top_k=4), None)
    with pytest.raises(ConfigError, match="top_k=9 must be in"):
        C(experts=8, top_k=9)
    with pytest.raises(ConfigError, match="shared=8 must be in"):
        C(experts=8, shared=8, top_k=0)
    with pytest.raises(Exception, match="needs a calibration"):
        ln.apply_(m, C(experts=8, top_k=4), None)
    from conftest import tiny_bert

    with pytest.raises(ConfigError, match="does not divide the 128 neurons"):  # a BERT FFN is checked the same way
        ln.apply_(tiny_bert(), C(experts=12, top_k=4), None)
    with pytest.raises(ConfigError, match="needs feed-forward blocks"):
        ln.apply_(UnknownNet(), C(experts=8, top_k=4), None)
    assert not any(isinstance(x, ln.LazyModule) for x in m.modules())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    cfg = C(experts=8, top_k=4)
    cal = ln.calibrate(m, calib_batches(), cfg)
    ln.runtime.prepare(m, "fp32")  # the runtime first: the FFN's linears are no longer the model's own
    with pytest.raises(ConfigError, match="already on the runtime; apply the runtime last"):
        ln.apply_(m, cfg, cal)
    assert sum(isinstance(x, ln.LazyModule) for x in m.modules()) == 2 * 7 + 1  # the runtime's linears only
    ln.revert_(m)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def _tiny_moe(kind: str):
    from transformers import MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    c = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**c, intermediate_size=64, num_local_experts=8)).eval()
    if kind == "qwen2_moe":
        return Qwen2MoeForCausalLM(Qwen2MoeConfig(**c, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8)).eval()
    if kind == "qwen3_moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**c, head_dim=16, intermediate_size=64, moe_intermediate_size=32, num_experts=8, norm_topk_prob=True)).eval()
    return OlmoeForCausalLM(OlmoeConfig(**c, intermediate_size=32, num_experts=8, pad_token_id=0, eos_token_id=1, bos_token_id=2)).eval()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_native_moe_most_conservative_setting_is_exact(kind: str, ids: torch.Tensor) -> None:
    """share=1 reproduces the model (prefill and decode shapes); share=0.5 runs one expert per
    token (the top expert always holds at least half of the top-2 mass), and the count is reported."""
    m = _tiny_moe(kind)
    dense, step = m(ids).logits, m(ids[:1, :1]).logits
    reps = ln.apply_(m, C(top_k=0, share=1.0))  # no calibration needed
    assert reps[0].summary["native"] and isinstance(m.model.layers[0].mlp, NativeMoE)
    with tracking(m):
        assert (m(ids).logits - dense).abs().max() <= 1e-5
        assert (m(ids[:1, :1]).logits - step).abs().max() <= 1e-5
    mods = [x for x in m.modules() if isinstance(x, NativeMoE)]
    assert all(x.experts_read == 2 * x.tokens_seen for x in mods)
    ln.revert_(m)
    assert torch.equal(m(ids).logits, dense)
    ln.apply_(m, C(top_k=0, share=0.5))
    with tracking(m):
        half = m(ids).logits
    assert all(x.experts_read == x.tokens_seen for x in m.modules() if isinstance(x, NativeMoE))
    assert not torch.allclose(half, dense)


def test_learned_routers_build_under_inference_mode(ids: torch.Tensor) -> None:
    m = tiny_causal_lm("llama")
    cfg = C(experts=8, top_k=4, router="learned")
    cal = ln.calibrate(m, calib_batches(), cfg)
    with torch.inference_mode():
        ln.apply_(m, cfg, cal)
        assert m(ids).logits.isfinite().all()


@pytest.mark.parametrize("router", ["analytic", "learned"])
def test_bert_ffn_as_experts(router: str) -> None:
    """BERT's FFN (intermediate + output.dense siblings): every expert reproduces the encoder;
    fewer change it; revert restores both modules exactly."""
    from conftest import tiny_bert

    m = tiny_bert()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    dense = m(ids).last_hidden_state
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cal = ln.calibrate(m, calib_batches(), C(experts=8, top_k=8, router=router))
    with ln.applied(m, C(experts=8, top_k=8, router=router), cal):
        assert type(m.encoder.layer[0].output.dense).__name__ == "FFNDone"
        assert (m(ids).last_hidden_state - dense).abs().max() <= 1e-5
    with ln.applied(m, C(experts=8, top_k=2, router=router), cal):
        assert not torch.allclose(m(ids).last_hidden_state, dense, atol=1e-4)
    assert type(m.encoder.layer[0].output.dense) is torch.nn.Linear and type(m.encoder.layer[0].intermediate).__name__ == "BertIntermediate"
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert torch.equal(m(ids).last_hidden_state, dense)


@kernel
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_expert_activation_holds_at_large_inputs(act: str) -> None:
    """The kernel's own exp (vectorised) against torch where pre-activations reach +-1e3."""
    blk, db = _blocks(True, "fp32", seed=3)
    x = 40 * torch.randn(4, 48, generator=torch.Generator().manual_seed(3))
    coef = torch.ones(4, 8)
    ref = X.reference(x, blk["gu"], None, blk["gu_bias"], blk["down"], None, db, coef, act, True)
    y, _ = X.expert_mlp(x, blk, db, coef, act, True)
    assert (y - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("gated", [True, False])
def test_masked_path_for_short_inputs_matches_grouped_reference(dtype: str, gated: bool) -> None:
    """Long inputs where grouping does not pay run dense products weighted by the routing: the
    same result as the grouped reference."""
    blk, db = _blocks(gated, dtype, seed=5)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 48, generator=g)
    coef = torch.rand(40, 8, generator=g) * (torch.rand(40, 8, generator=g) < 0.5)
    args = (x, blk["gu"], blk["gu_scale"], blk["gu_bias"], blk["down"], blk["down_scale"], db, coef, "silu" if gated else "gelu", gated)
    ref = X.reference(*args)
    assert (X.masked_reference(*args) - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())
    assert not X.grouping_pays(torch.ones(20, 16)) and X.grouping_pays((torch.arange(16) < 2).float().expand(640, 16))


@kernel
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("density,binary", [(0.1, False), (0.6, False), (0.6, True)])
def test_long_inputs_on_the_runtime_gemm_match_reference(dtype: str, gated: bool, density: float, binary: bool) -> None:
    """Prefill-length inputs run each hit expert on the runtime's GEMM for the tokens that chose
    it: the reference's result, experts no token chose left out (one chosen by every token: no
    gather)."""
    from lazyneuron.kernels import gemv as G

    blk, db = _blocks(gated, dtype, seed=11)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 48, generator=g)
    coef = torch.rand(64, 8, generator=g) * (torch.rand(64, 8, generator=g) < density)
    coef[:, 3] = 0  # an expert no token chose
    coef[:, 0] = 0.5  # one every token chose
    if binary:  # MoEfication's coefficients: 1 where chosen
        coef = (coef != 0).float()
    args = (x, blk["gu"], blk["gu_scale"], blk["gu_bias"], blk["down"], blk["down_scale"], db, coef, "silu" if gated else "gelu", gated)
    ref = X.reference(*args)
    prev = G.set_bf16_dot(False)  # the bf16 dot-product GEMM also rounds the input (tests/test_runtime.py holds it to its own bound)
    try:
        y = X.grouped_gemm(*args)
    finally:
        G.set_bf16_dot(prev)
    assert (y - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())
    y2, hit = X.expert_mlp(x, blk, db, coef, "silu" if gated else "gelu", gated)  # the public entry takes this path for long inputs
    assert hit == 7 and (y2 - ref).abs().max() <= (1e-4 if dtype == "fp32" else 2e-2) * (1 + ref.abs().max())


@kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_grouped_gemm_thread_schedules_match_reference(threads: int, dtype: str) -> None:
    """Both schedules of the long-input kernel on 1-3 threads: whole experts shared out among the
    threads (at least two hit experts per thread) and each product split across them (fewer), in
    every format, with the bf16 dot products off (held to fp32 precision) and on where the CPU has
    them (the input and activations rounded to bf16)."""
    from lazyneuron.kernels import gemv as G

    blk, db = _blocks(True, dtype, E=16, fe=24, seed=21)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(70, 48, generator=g)
    many = (torch.rand(70, 16, generator=g) < 0.5).float()  # every expert hit
    few = torch.zeros(70, 16)
    few[:, 3] = 1.0
    few[::2, 9] = 0.5  # two experts hit, one by half the tokens
    prev_threads, prev_dot = torch.get_num_threads(), G.bf16_dot()
    try:
        torch.set_num_threads(threads)
        for coef in (many, few):
            args = (x, blk["gu"], blk["gu_scale"], blk["gu_bias"], blk["down"], blk["down_scale"], db, coef, "silu", True)
            ref = X.reference(*args)
            for dot, tol in ((False, 1e-4), (True, 2e-2)):
                G.set_bf16_dot(dot)
                y = X.grouped_gemm(*args)
                assert (y - ref).abs().max() <= tol * (1 + ref.abs().max()), (threads, dtype, dot, int((coef != 0).any(0).sum()))
    finally:
        torch.set_num_threads(prev_threads)
        G.set_bf16_dot(prev_dot)


@kernel
def test_long_input_path_choice_and_expert_gemm_input_checks() -> None:
    """Inputs above the decode kernel's batch take the grouped GEMM on the CPU with the extension,
    torch's products without it; the kernel refuses mismatched coefficients with a message naming
    them."""
    from lazyneuron.kernels._build import extension

    ext = extension("gemv")
    blk, db = _blocks(True, "fp32", seed=13)
    sparse = (torch.arange(8) < 2).float().expand(20, 8).contiguous()
    assert X.long_input_path(torch.randn(20, 48), sparse, "auto", ext) is X.grouped_gemm
    assert X.long_input_path(torch.randn(20, 48), torch.ones(20, 8), "auto", ext) is X.grouped_gemm
    assert X.long_input_path(torch.randn(20, 48), torch.ones(20, 8), "auto", None) is X.masked_reference
    assert X.long_input_path(torch.randn(20, 48), sparse, "reference", ext) is X.reference
    x = torch.randn(20, 48)
    args = (blk["gu"], blk["gu_scale"], blk["gu_bias"], blk["down"], blk["down_scale"], db)
    y = X.grouped_gemm(x, *args, sparse, "silu", True)
    ref = X.reference(x, *args, sparse, "silu", True)
    assert (y - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())
    with pytest.raises(ValueError, match="expert coefficients"):
        X.grouped_gemm(x, *args, sparse[:, :5].contiguous(), "silu", True)


@kernel
def test_analytic_router_with_no_active_probe_routes_as_the_reference() -> None:
    """ReLU probes all inactive: no predicted mass; the kernel keeps every top-k expert, as the
    reference (and prefill) does (before: the kernel treated the scores as uniform and kept fewer)."""
    blk, db = _blocks(False, "fp32", seed=9)
    r = X.Router("analytic", torch.zeros(48, 6 * 3), -torch.ones(6 * 3), norm=torch.ones(6 * 3), probes=3, top_k=3, share=0.5, shared=2)
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(9))
    _, coef = X.routed_mlp(x, r, blk, db, "relu", False)
    ref = X.route_reference(x, r, 8, "relu", False)
    # which of the equal-scored experts run is a tie either path may break its own way; how many is not
    assert torch.equal(coef.sum(1), ref.sum(1)) and (coef.sum(1) == 5).all() and (coef[:, :2] == 1).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_recovery_trains_merges_saves_and_reloads(tmp_path, family: str) -> None:
    """Low-rank recovery: with zero updates the differentiable student equals the routed model and
    the teacher the dense one; training brings the routed model closer to the dense one on held-out
    windows; the updates are merged into the expert blocks (the model's weights untouched, revert
    exact), saved, and reloaded through ``recovery=`` (also on the bf16 runtime)."""
    from lazyneuron.methods import experts_recovery as R

    m = tiny_causal_lm(family)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = C(experts=4, top_k=1, router="learned")
    cal = ln.calibrate(m, calib_batches(), cfg)
    held = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(11))
    dense = m(held).logits
    ln.apply_(m, cfg, cal)
    routed = m(held).logits
    mods = [mm for mm in m.modules() if isinstance(mm, ExpertMLP)]
    for mm in mods:
        R.install(mm, 4)
        mm.mode = "recovery"
    assert torch.allclose(m(held).logits, routed, atol=1e-5)
    for mm in mods:
        mm.mode = "teacher"
    assert torch.allclose(m(held).logits, dense, atol=1e-5)
    for mm in mods:
        mm.mode, mm.recovery = "routed", None

    train = [torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(100 + i)) for i in range(40)]
    fit_ids = torch.cat(train[:8])
    with torch.no_grad():
        teacher = {"held": dense, "fit": None}
        for mm in mods:
            mm.mode = "teacher"
        teacher["fit"] = m(fit_ids).logits
        for mm in mods:
            mm.mode = "routed"

    def kl(ids: torch.Tensor, ref: torch.Tensor) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.kl_div(torch.log_softmax(m(ids).logits, -1), torch.log_softmax(ref, -1), log_target=True, reduction="batchmean"))

    k0, f0 = kl(held, dense), kl(fit_ids, teacher["fit"])
    res = R.recover(m, train, rank=4, epochs=3, lr=1e-2, progress=False, checkpoint=str(tmp_path / "fit.safetensors"))
    assert res.steps == 120 and not any(p.requires_grad for mm in mods for p in mm.recovery.parameters())
    k1, f1 = kl(held, dense), kl(fit_ids, teacher["fit"])
    assert f1 < 0.85 * f0, (f0, f1)  # the routed model, merged blocks and all, is closer to the dense one where it trained
    assert k1 < k0, (k0, k1)  # and closer on windows it never saw
    after = m(held).logits
    path = str(tmp_path / "rec.safetensors")
    R.save_recovery(m, path)
    ln.revert_(m)
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k
    ln.apply_(m, C(experts=4, top_k=1, router="learned", recovery=path), cal)
    assert torch.allclose(m(held).logits, after, atol=1e-5)
    ln.revert_(m)
    ln.apply_(m, [C(experts=4, top_k=1, router="learned", recovery=path), RuntimeConfig(dtype="bf16")], cal)
    assert (m(held).logits - after).abs().max() <= 0.05 * (1 + after.abs().max())
    ln.revert_(m)
    # a file for another split, a corrupt file: one clear error, the model unchanged
    with pytest.raises(ConfigError, match="trained on experts"):
        ln.apply_(m, C(experts=2, top_k=1, router="learned", recovery=path), ln.calibrate(m, calib_batches(), C(experts=2, top_k=1, router="learned")))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a readable"):
        ln.apply_(m, C(experts=4, top_k=1, router="learned", recovery=str(bad)), cal)
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="no split FFN"):
        R.recover(m, train)
    # on the runtime (gradients through its linears), and a second recover() continues the same updates
    ln.apply_(m, [C(experts=4, top_k=1, router="learned", recovery=path), RuntimeConfig()], cal)
    res2 = R.recover(m, train[:4], rank=4, progress=False)
    assert res2.steps == 4 and not m.training
    ln.revert_(m)
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_calls_the_experts_kernel_directly(batch: int, ids: torch.Tensor) -> None:
    """The lean decode step runs router and experts in one kernel call per FFN, no module call:
    the same logits as the module path, and tracking (which counts in the module) still counts."""
    from lazyneuron.runtime import DecodeStep

    m = tiny_causal_lm("llama")
    cfg = C(experts=8, shared=1, top_k=3, router="learned")
    cal = ln.calibrate(m, calib_batches(), cfg)
    ln.apply_(m, [cfg, RuntimeConfig(dtype="fp32")], cal)
    x = ids[:batch] if ids.shape[0] >= batch else ids[:1].repeat(batch, 1)

    def run(direct: bool) -> list[torch.Tensor]:
        st = DecodeStep(m, batch, 16)
        assert all(f[6] is not None for f in st._fast)
        if not direct:
            st._fast = [f[:6] + (None,) for f in st._fast]
        st.prefill(x[:, :6])
        return [st.step(x[:, p], p) for p in range(6, 10)]

    for a, b in zip(run(True), run(False)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    with tracking(m):
        run(True)
    mods = [x for x in m.modules() if isinstance(x, ExpertMLP)]
    assert all(mod.tokens_seen == 10 * batch for mod in mods)  # the prompt's 6 tokens and the 4 steps, through the tracked module
    ln.revert_(m)
