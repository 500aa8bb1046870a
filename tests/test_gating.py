"""Module gating: skipped modules are not called (and their KV cache is untouched), masks held
per sequence, batches with mixed masks, contexts, checkpoints, training, the static baseline."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_causal_lm, torchrun_worker

import lazyneuron as ln
from lazyneuron.bench.decode import lean_generate
from lazyneuron.config import MethodConfig
from lazyneuron.methods.gating import (
    MODULES,
    GatedStack,
    GatePredictor,
    GateTraining,
    ModuleGatingConfig,
    lm_loss,
    calibrate_threshold,
    context,
    set_context,
    sparsity_loss,
    static_greedy_order,
    static_predictor,
    searched_predictor,
    swap_search,
    train_gates,
)
from lazyneuron.tasks import TextClassifier

SKIP = [(1, "attn"), (2, "mlp"), (0, "attn")]


@pytest.fixture()
def lm():
    return tiny_causal_lm("llama", layers=4)


@pytest.fixture()
def ids():
    return torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))


def _static(model, tmp_path, skip=SKIP) -> str:  # type: ignore[no-untyped-def]
    path = tmp_path / "static.safetensors"
    static_predictor(model, skip).save(path)
    return str(path)


def _zeroed(model, skip, ids):  # type: ignore[no-untyped-def]
    """Reference: the dense model with the skipped modules' outputs replaced by zeros."""
    hooks = []
    for j, mod in skip:
        sub = model.model.layers[j].self_attn if mod == "attn" else model.model.layers[j].mlp
        hooks.append(sub.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), out[1]) if isinstance(out, tuple) else torch.zeros_like(out)))
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()


def _trained(model, tmp_path, target=0.4, lora_rank=0, epochs=3):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 128, (4, 16), generator=g), {"domain": ["a", "b", "a", "b"]}) for _ in range(8)]
    path = tmp_path / f"gates-{lora_rank}.safetensors"
    train_gates(model, batches, {"domain": ["a", "b"]}, GateTraining(target=target, epochs=epochs, lora_rank=lora_rank), gate_tokens=8,
                progress=False, out=path)
    return batches, str(path)


def test_zero_strength_equals_dense_and_revert_is_exact(lm, ids, tmp_path) -> None:
    sd = {k: v.clone() for k, v in lm.state_dict().items()}
    with torch.no_grad():
        dense = lm(input_ids=ids).logits
    dense_gen = lean_generate(lm, ids[:1, :8], 10)
    cfg = ModuleGatingConfig(checkpoint=_static(lm, tmp_path))
    with ln.applied(lm, cfg.at_zero_strength()):
        with torch.no_grad():
            assert torch.equal(lm(input_ids=ids).logits, dense)
        assert torch.equal(lean_generate(lm, ids[:1, :8], 10), dense_gen)
    with ln.applied(lm, cfg):
        pass
    assert type(lm.model).__name__ == "LlamaModel"
    assert all(torch.equal(v, sd[k]) for k, v in lm.state_dict().items())


def test_skipped_modules_are_not_called_and_match_the_zeroed_reference(lm, ids, tmp_path) -> None:
    ref = _zeroed(lm, SKIP, ids)
    calls: dict[tuple[int, str], int] = {}
    with ln.applied(lm, ModuleGatingConfig(checkpoint=_static(lm, tmp_path))):
        st = lm.model
        assert isinstance(st, GatedStack)
        hooks = [getattr(st.layers[j], "self_attn" if m == "attn" else "mlp").register_forward_hook(
            lambda mod, a, out, key=(j, m): calls.__setitem__(key, calls.get(key, 0) + 1)) for j in range(4) for m in MODULES]
        with torch.no_grad():
            out = lm(input_ids=ids).logits
        for h in hooks:
            h.remove()
    assert torch.allclose(out, ref, atol=1e-5)
    assert set(calls) == {(j, m) for j in range(4) for m in MODULES} - set(SKIP)
    from lazyneuron.bench.accounting import linear_weight_elements, skipped_fraction, tracking
    from lazyneuron.methods.gating import module_costs

    with ln.applied(lm, ModuleGatingConfig(checkpoint=_static(lm, tmp_path))):
        with tracking(lm), torch.no_grad():
            lm(input_ids=ids)
        costs = module_costs(lm)
        want = float(sum(costs[j, MODULES.index(m)] for j, m in SKIP)) / linear_weight_elements(lm)
        assert abs(skipped_fraction(lm) - want) < 1e-9


def test_skipped_attention_neither_writes_nor_reads_its_kv_cache(lm, ids, tmp_path) -> None:
    from transformers import DynamicCache

    with ln.applied(lm, ModuleGatingConfig(checkpoint=_static(lm, tmp_path))):
        cache = DynamicCache(config=lm.config)
        with torch.inference_mode():
            lm(input_ids=ids[:1, :8], past_key_values=cache, use_cache=True)
            for i in range(8, 12):
                lm(input_ids=ids[:1, i:i + 1], past_key_values=cache, use_cache=True, position_ids=torch.tensor([[i]]))
        for j in range(4):
            want = 0 if (j, "attn") in SKIP else 12
            assert cache.get_seq_length(j) == want, j
        # the mask was decided once, from the prompt, and held for the whole decode
        got = lean_generate(lm, ids[:1, :8], 10)
        seq = ids[:1, :8]
        for _ in range(10):  # reference: full recomputation without a cache at every step
            with torch.no_grad():
                seq = torch.cat([seq, lm(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(got, seq[:, 8:])


def test_per_sample_masks_in_one_batch_match_one_by_one(lm, tmp_path) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 128, (6, 16), generator=g)
    masks = (torch.rand(6, 4, 2, generator=g) > 0.4).float()
    masks[0] = 1.0
    masks[1, :, 0] = 0.0  # no attention at all
    with ln.applied(lm, ModuleGatingConfig(checkpoint=_static(lm, tmp_path))):
        st = lm.model
        st.force = masks
        with torch.no_grad():
            batch = lm(input_ids=x, use_cache=False).logits
        for i in range(6):
            st.force = masks[i:i + 1]
            with torch.no_grad():
                one = lm(input_ids=x[i:i + 1], use_cache=False).logits
            assert torch.allclose(one[0], batch[i], atol=1e-5)
        # batched decode with a cache (attention runs for the union, zeroed for the skippers)
        st.force = masks[:3]
        got = lean_generate(lm, x[:3, :8], 6)
        for i in range(3):
            st.force = masks[i:i + 1]
            assert torch.equal(lean_generate(lm, x[i:i + 1, :8], 6)[0], got[i])


def test_contexts_errors_and_fallback(lm, tmp_path, caplog) -> None:
    _, path = _trained(lm, tmp_path, epochs=1)
    ln.revert_(lm)
    x = torch.randint(0, 128, (2, 12))
    with ln.applied(lm, ModuleGatingConfig(checkpoint=path)):
        with pytest.raises(ln.ConfigError, match="'task' is not one this gate predictor was trained with"):
            set_context(lm, task="mr")
        with torch.no_grad():
            none = lm(input_ids=x).logits
        with caplog.at_level(logging.WARNING):
            with context(lm, domain="legal"):
                with torch.no_grad():
                    unseen = lm(input_ids=x).logits
        assert "never seen in training" in caplog.text
        assert torch.equal(none, unseen)  # documented fallback: the input-only path
        with pytest.raises(ln.ConfigError, match="2 values for a batch of 3"):
            with context(lm, domain=["a", "b"]):
                lm(input_ids=torch.randint(0, 128, (3, 12)))
    with ln.applied(lm, ModuleGatingConfig(checkpoint=path, unknown="error")):
        with pytest.raises(ln.ConfigError, match="never seen in training"):
            set_context(lm, domain="legal")


def test_config_context_is_the_default_context(lm, tmp_path) -> None:
    """ModuleGatingConfig(context="domain=b") runs every input with that context, exactly as
    set_context does; set_context still overrides it; an unknown key or a malformed one is an error."""
    _, path = _trained(lm, tmp_path, epochs=1)
    ln.revert_(lm)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with ln.applied(lm, ModuleGatingConfig(checkpoint=path)), torch.no_grad():
        set_context(lm, domain="b")
        want_b = lm(input_ids=x).logits
        set_context(lm, domain="a")
        want_a = lm(input_ids=x).logits
    with ln.applied(lm, MethodConfig.parse(f"module_gating:checkpoint={path},context=domain=b")), torch.no_grad():
        assert torch.equal(lm(input_ids=x).logits, want_b)
        set_context(lm, domain="a")
        assert torch.equal(lm(input_ids=x).logits, want_a)
    with pytest.raises(ln.ConfigError, match="'task' is not one this gate predictor was trained with"):
        ln.apply_(lm, ModuleGatingConfig(checkpoint=path, context="task=mr"))
    assert type(lm.model).__name__ == "LlamaModel"
    with pytest.raises(ln.ConfigError, match="context='domain' is invalid"):
        ModuleGatingConfig(checkpoint=path, context="domain")


def test_checkpoint_errors(lm, tmp_path) -> None:
    path = _static(lm, tmp_path)
    other = tiny_causal_lm("llama", layers=2)
    with pytest.raises(ln.ConfigError, match="4 layers"):
        ln.apply_(other, ModuleGatingConfig(checkpoint=path))
    assert type(other.model).__name__ == "LlamaModel"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(ln.ConfigError, match="not a readable safetensors"):
        ln.apply_(lm, ModuleGatingConfig(checkpoint=str(bad)))
    with pytest.raises(ln.ConfigError, match="does not exist"):
        ln.apply_(lm, ModuleGatingConfig(checkpoint=str(tmp_path / "missing.safetensors")))
    with pytest.raises(ln.ConfigError, match="needs a gate checkpoint"):
        ModuleGatingConfig()
    with pytest.raises(ln.ConfigError, match="cannot skip"):
        static_predictor(lm, [(9, "attn")])
    gpt2 = tiny_causal_lm("gpt2")
    with pytest.raises(ln.ConfigError, match="Llama-family"):
        ln.apply_(gpt2, ModuleGatingConfig(checkpoint=path))


def test_training_reaches_the_target_and_checkpoints_round_trip(lm, tmp_path) -> None:
    batches, path = _trained(lm, tmp_path, target=0.4, lora_rank=4)
    st = lm.model
    assert st.lora_paths and any(float(m.b.abs().sum()) > 0 for m in st.lora_modules())  # adapters learned
    t = calibrate_threshold(lm, [(b[0][:, :8], b[1]) for b in batches], 0.4)
    keep = []
    with torch.no_grad():
        for x, ctx in batches:
            st.context = ctx
            lm(input_ids=x)
            keep.append(st.last_gates)
    assert abs((1 - torch.cat(keep).mean().item()) - 0.4) < 0.05
    x = batches[0][0]
    st.context = {"domain": "a"}
    with torch.no_grad():
        trained = lm(input_ids=x).logits
    st.predictor.save(tmp_path / "back.safetensors", st.lora_state())
    ln.revert_(lm)
    assert type(lm.model).__name__ == "LlamaModel" and not any("lora" in n for n, _ in lm.named_modules())
    with ln.applied(lm, ModuleGatingConfig(checkpoint=str(tmp_path / "back.safetensors"))):
        assert lm.model.predictor.threshold == t
        set_context(lm, domain="a")
        with torch.no_grad():
            assert torch.allclose(lm(input_ids=x).logits, trained, atol=1e-6)


def test_lm_loss_without_teacher_trains_adapters_on_the_text(lm) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 128, (2, 12), generator=g)
    logits = torch.randn(2, 12, 128)
    ce = torch.nn.functional.cross_entropy(logits[:, 3:-1].flatten(0, 1), x[:, 4:].flatten())
    assert lm_loss(logits, (x, {}), start=3).item() == pytest.approx(ce.item())
    assert lm_loss(logits, (x, {}), logits.clone(), kd=0.5, start=3).item() == pytest.approx(ce.item(), abs=1e-5)  # KL to itself is 0
    assert lm_loss(logits, (x, {}), torch.randn(2, 12, 128), kd=0.5, start=3).item() > ce.item()
    with pytest.raises(ln.ConfigError, match="task_loss"):
        GateTraining(target=0.2, teacher=False)
    seen = []

    def loss(logits, batch, teacher):  # type: ignore[no-untyped-def]
        seen.append(teacher)
        return lm_loss(logits, batch, teacher)

    batches = [(torch.randint(0, 128, (2, 16), generator=g), {"domain": ["a", "b"]}) for _ in range(4)]
    train_gates(lm, batches, {"domain": ["a", "b"]}, GateTraining(target=0.25, lora_rank=2, task_loss=loss, teacher=False), gate_tokens=8, progress=False)
    assert seen and all(t is None for t in seen)  # no dense teacher forward
    assert any(float(m.b.abs().sum()) > 0 for m in lm.model.lora_modules())


def test_sparsity_loss_has_absolute_and_squared_terms() -> None:
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0])  # skip rate 0.25
    assert sparsity_loss(keep, 0.25).item() == 0.0
    assert abs(sparsity_loss(keep, 0.75).item() - (0.5 + 0.25)) < 1e-6
    k = torch.full((8,), 0.5, requires_grad=True)
    sparsity_loss(k, 0.0).backward()
    assert (k.grad < 0).all()  # too much skipping: descent raises keep


def test_gumbel_gates_are_straight_through(lm) -> None:
    pred = GatePredictor(64, 4, {"domain": ["a"]}, gate_tokens=4, model_type="llama")
    st = GatedStack(lm.model, pred)
    st.mode = "gumbel"
    h0 = torch.randn(3, 6, 64)
    g = st.gates(h0)
    assert torch.allclose(g.detach(), g.detach().round(), atol=1e-6)  # values are hard 0 / 1
    g.sum().backward()
    assert pred.mlp[2].bias.grad is not None and pred.mlp[2].bias.grad.abs().sum() > 0


def test_static_greedy_order_picks_the_cheapest_removal_first(lm) -> None:
    w = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    order = static_greedy_order(lm, w, 3, progress=False)
    assert len(set(order)) == 3
    losses = {}
    for j in range(4):
        for m in MODULES:
            logits = _zeroed(lm, [(j, m)], w)
            losses[(j, m)] = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), w[:, 1:].flatten()).item()
    assert order[0] == min(losses, key=losses.get)


def _loss_zeroed(lm, skip, w, score_from=0) -> float:  # type: ignore[no-untyped-def]
    logits = _zeroed(lm, skip, w)
    return torch.nn.functional.cross_entropy(logits[:, score_from:-1].flatten(0, 1), w[:, score_from + 1:].flatten()).item()


def test_swap_search_keeps_the_count_and_lowers_the_loss(lm) -> None:
    w = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    single = {(j, m): _loss_zeroed(lm, [(j, m)], w, 4) for j in range(4) for m in MODULES}
    worst = sorted(single, key=single.get)[-2:]  # start from the two most harmful removals
    keep = torch.ones(4, 2, dtype=torch.bool)
    for j, m in worst:
        keep[j, MODULES.index(m)] = False
    new, hist, masks = swap_search(lm, w, keep, score_from=4, rounds=4, progress=False)
    assert int((~new).sum()) == 2 and not torch.equal(new, keep)
    assert len(masks) == len(hist) and torch.equal(masks[0], keep) and torch.equal(masks[-1], new)
    assert all(int((~m).sum()) == 2 for m in masks)
    assert all(b < a for a, b in zip(hist, hist[1:])) and len(hist) >= 2
    skip = [(j, MODULES[mi]) for j, mi in (~new).nonzero().tolist()]
    assert hist[-1] == pytest.approx(_loss_zeroed(lm, skip, w, 4), abs=1e-5)  # the scorer's loss is the real model's
    assert hist[0] == pytest.approx(_loss_zeroed(lm, worst, w, 4), abs=1e-5)
    with pytest.raises(ln.ConfigError, match="keep mask"):
        swap_search(lm, w, torch.ones(3, 2, dtype=torch.bool), progress=False)
    with pytest.raises(ln.ConfigError, match="longer than"):
        swap_search(lm, w[:, :4], keep, score_from=4, progress=False)


def test_swap_search_with_verify_windows_accepts_by_their_loss(lm) -> None:
    w = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    v = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(6))
    single = {(j, m): _loss_zeroed(lm, [(j, m)], w, 4) for j in range(4) for m in MODULES}
    keep = torch.ones(4, 2, dtype=torch.bool)
    for j, m in sorted(single, key=single.get)[-2:]:
        keep[j, MODULES.index(m)] = False
    new, hist, masks = swap_search(lm, w, keep, score_from=4, rounds=4, verify=v, progress=False)
    assert int((~new).sum()) == 2 and len(hist) >= 2 and all(b < a for a, b in zip(hist, hist[1:]))
    for m, h in zip(masks, hist):  # the recorded losses are the verify windows' losses of the real model
        skip = [(j, MODULES[mi]) for j, mi in (~m).nonzero().tolist()]
        assert h == pytest.approx(_loss_zeroed(lm, skip, v, 4), abs=1e-5)
    plain = swap_search(lm, w, keep, score_from=4, rounds=4, progress=False)
    assert plain.losses[0] == pytest.approx(_loss_zeroed(lm, [(j, MODULES[mi]) for j, mi in (~keep).nonzero().tolist()], w, 4), abs=1e-5)


def test_searched_predictor_builds_context_masks_chosen_on_heldout_text(lm, tmp_path) -> None:
    g = torch.Generator().manual_seed(7)
    w = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    single = {(j, m): _loss_zeroed(lm, [(j, m)], w, 4) for j in range(4) for m in MODULES}
    keep = torch.ones(4, 2, dtype=torch.bool)
    for j, m in sorted(single, key=single.get)[-2:]:  # a poor start, so the searches have something to find
        keep[j, MODULES.index(m)] = False
    texts = {"a": {"search": w, "heldout": torch.randint(0, 128, (3, 16), generator=g)},
             "b": {"search": torch.randint(0, 128, (2, 16), generator=g), "heldout": torch.randint(0, 128, (3, 16), generator=g),
                   "verify": torch.randint(0, 128, (3, 16), generator=g)}}
    pred, info = searched_predictor(lm, "domain", texts, keep, score_from=4, gate_tokens=4, progress=False)
    assert info["a"]["chosen_step"] > 0  # the start was poor on this text: a searched mask generalised to the held-out windows
    path = tmp_path / "searched.safetensors"
    pred.save(path)
    ids = torch.randint(0, 128, (1, 12), generator=g)
    with ln.applied(lm, ModuleGatingConfig(checkpoint=str(path))):
        for v, t in texts.items():
            set_context(lm, domain=v)
            lm(input_ids=ids)
            got = lm.model.last_gates[0].bool()
            assert int((~got).sum()) == 2  # as many modules skipped as the start
            held = info[v]["heldout_loss"]
            assert held[info[v]["chosen_step"]] == min(held) and min(held) <= held[0]  # never worse than the start on held-out text
            skip = [(j, MODULES[mi]) for j, mi in (~got).nonzero().tolist()]
            assert min(held) == pytest.approx(_loss_zeroed(lm, skip, t["heldout"], 4), abs=1e-5)  # the mask in the predictor is the chosen one
        set_context(lm)
        lm(input_ids=ids)
        assert torch.equal(lm.model.last_gates[0].bool(), keep)  # no context: the start
    with pytest.raises(ln.ConfigError, match="no texts"):
        searched_predictor(lm, "domain", {}, keep, progress=False)
    with pytest.raises(ln.ConfigError, match="heldout"):
        searched_predictor(lm, "domain", {"a": {"search": w}}, keep, progress=False)


def test_encoder_task_gating(tmp_path) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64))
    clf = TextClassifier(enc, 2).eval()
    ids = torch.randint(1, 128, (4, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        dense = clf(ids, mask)
    path = tmp_path / "s.safetensors"
    static_predictor(clf, [(1, "attn"), (2, "mlp")]).save(path)
    with ln.applied(clf, ModuleGatingConfig(checkpoint=str(path)).at_zero_strength()):
        with torch.no_grad():
            assert torch.allclose(clf(ids, mask), dense, atol=1e-6)
    with ln.applied(clf, ModuleGatingConfig(checkpoint=str(path))):
        with torch.no_grad():
            got = clf(ids, mask)
    # reference: post-LN blocks with the skipped sublayer replaced by the identity
    layers = clf.bert.encoder.layer
    hooks = [layers[1].attention.register_forward_hook(lambda m, a, out: (a[0],) + tuple(out[1:])),
             layers[2].output.register_forward_hook(lambda m, a, out: a[1])]
    with torch.no_grad():
        ref = clf(ids, mask)
    for h in hooks:
        h.remove()
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.slow
def test_gate_training_under_torchrun_two_processes(tmp_path) -> None:
    torchrun_worker(tmp_path, "gates")
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(w0, w1)
    assert (tmp_path / "gates.safetensors").exists()


def test_multitask_encoder_gates_with_full_finetune(tmp_path) -> None:
    """Task contexts on a shared encoder, trained jointly with every weight; the teacher stays the
    dense model; the threshold calibration hits the target on padded batches."""
    from transformers import BertConfig, BertModel

    from lazyneuron.tasks import Batch, MultiTaskClassifier

    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64))
    clf = MultiTaskClassifier(enc, {"a": 2, "b": 3}).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(8):
        t = "ab"[i % 2]
        ids = torch.randint(1, 128, (4, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        batches.append(((t, Batch(ids, mask, torch.randint(0, 2 if t == "a" else 3, (4,), generator=g))), {"task": [t] * 4}))
    before = {k: v.clone() for k, v in clf.state_dict().items()}

    def fwd(m, x):  # type: ignore[no-untyped-def]
        getattr(m, "module", m).task = x[0]
        return m(x[1].input_ids, x[1].attention_mask)

    def loss(logits, batch, teacher):  # type: ignore[no-untyped-def]
        assert not teacher.requires_grad
        return torch.nn.functional.cross_entropy(logits, batch[0][1].labels)

    train_gates(clf, batches, {"task": ["a", "b"]}, GateTraining(target=0.3, full_finetune=True, task_loss=loss, epochs=2), gate_tokens=64,
                forward=fwd, progress=False)
    after = {k.replace("encoder.base.", "encoder."): v for k, v in clf.state_dict().items()}
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("bert.encoder."))  # the base learned
    calibrate_threshold(clf, [(b[0][1], b[1]) for b in batches], 0.3, embed=lambda b: (clf.bert.embeddings(input_ids=b.input_ids), b.attention_mask.bool()))
    st = clf.bert.encoder
    keep = []
    with torch.no_grad():
        for (t, b), ctx in batches:
            st.context = ctx
            clf.for_task(t)(b.input_ids, b.attention_mask)
            keep.append(st.last_gates)
    assert abs((1 - torch.cat(keep).mean().item()) - 0.3) < 0.05
    with pytest.raises(ln.ConfigError, match="task 'c' has no head"):
        clf.for_task("c")


def test_demo_rows_need_trained_gates(tmp_path, monkeypatch) -> None:
    from lazyneuron.methods.gating import ModuleGating, default_gates_path

    monkeypatch.setenv("LAZYNEURON_CACHE", str(tmp_path))
    assert ModuleGating.demo_configs() == [] and "`lazyneuron fit gates --model smollm2-135m" in ModuleGating.demo_notes()[0]
    path = default_gates_path("smollm2-135m", 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    GatePredictor(576, 30, {"domain": ["news"]}, model_type="llama").save(path)
    (cfg,) = ModuleGating.demo_configs()
    assert cfg.checkpoint == str(path) and cfg.context == "domain=news"  # the bench reads news: its context


def test_plot_gates_cli(tmp_path) -> None:
    import json

    from lazyneuron.cli import main

    keep = {"domain=news": [[1.0, 0.2], [0.5, 0.9]], "domain=austen": [[0.9, 0.1], [0.4, 1.0]]}
    (tmp_path / "keep.json").write_text(json.dumps(keep))
    assert main(["plot", "gates", str(tmp_path / "keep.json"), "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_hf_generate_matches_the_lean_loop_with_layer0_attention_skipped(lm, tmp_path) -> None:
    """Layer 0's cache stays empty when its attention is skipped; positions come from the stack's
    own count, so Hugging Face ``generate`` still decodes the same tokens."""
    x = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with ln.applied(lm, ModuleGatingConfig(checkpoint=_static(lm, tmp_path, [(0, "attn"), (2, "mlp")]))):
        a = lean_generate(lm, x, 8)
        b = lm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 8:]
    assert torch.equal(a, b)
