"""The planner: budgets, the candidate space from the registry, the search on a tiny model (with a
deterministic speed model, so the search logic is tested apart from timing noise), the model left
unchanged, clear errors, verification records, the CLI, and combinations in ``bench``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import tiny_bert, tiny_causal_lm

import lazyneuron as ln
from lazyneuron import data, plan
from lazyneuron.methods.activation_sparsity import ActivationSparsity, ActivationSparsityConfig
from lazyneuron.runtime import FastLinear, RuntimeConfig
from lazyneuron.surgery import LazyModule


def _stream(tok: Any, corpus: str, split: str, n: int) -> list[int]:
    off = {"train": 0, "calibration": 5, "test": 11}.get(split, 0)
    return [3 + (i * 7 + i // 13 + off) % 120 for i in range(min(n, 20000))]


def _fake_speed(self: Any, model: torch.nn.Module) -> float:
    """Deterministic stand-in for a timing: 1 + the fraction of weight reads skipped on a fixed
    input, plus a little for a smaller runtime format."""
    from lazyneuron.bench.accounting import skipped_fraction, tracking

    with tracking(model), torch.inference_mode():
        model(input_ids=torch.arange(3, 19).view(1, -1))
    s = 1.0 + skipped_fraction(model)
    dtypes = {m.dtype for m in model.modules() if isinstance(m, FastLinear)}
    return s + (0.05 if "int8" in dtypes else 0.03 if "bf16" in dtypes else 0.0)


@pytest.fixture()
def fake_timing(monkeypatch):
    monkeypatch.setattr(data, "token_stream", _stream)
    monkeypatch.setattr(plan._LM, "speed", _fake_speed)


def _unchanged(m: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return not any(isinstance(x, LazyModule) for x in m.modules()) and all(torch.equal(m.state_dict()[k], v) for k, v in before.items())


def test_budgets_parse_and_refuse_with_the_fix() -> None:
    assert plan.Budget.parse("ppl:+5%").limit == 5.0 and plan.Budget.parse("ppl:5").limit == 5.0
    assert plan.Budget.parse("acc:-0.5").limit == 0.5 and plan.Budget.parse("acc:1").limit == 1.0
    assert plan.Budget.parse("agree:0.95").limit == pytest.approx(5.0) and plan.Budget.parse("agree:90%").limit == pytest.approx(10.0)
    with pytest.raises(ln.ConfigError, match="unknown budget metric 'wer'.*ppl"):
        plan.Budget.parse("wer:3")
    with pytest.raises(ln.ConfigError, match="cannot read the value"):
        plan.Budget.parse("ppl:five")
    with pytest.raises(ln.ConfigError, match="fraction in"):
        plan.Budget.parse("agree:1.5")
    with pytest.raises(ln.ConfigError, match="better quality than the dense"):
        plan.Budget.parse("ppl:-5%")
    b = plan.Budget.parse("ppl:+10%")
    assert b.combine([10.0, 10.0]) == pytest.approx(21.0)  # perplexity ratios multiply
    assert plan.Budget.parse("acc:-1").combine([0.3, 0.4]) == pytest.approx(0.7)


def test_spec_round_trips_and_splits_only_between_methods() -> None:
    cfgs = [ActivationSparsityConfig(rule="teal", sparsity=0.3, targets=("attn_in", "attn_out")), RuntimeConfig(dtype="bf16")]
    text = plan.spec(cfgs)
    assert text == "activation_sparsity:targets=attn_in|attn_out,sparsity=0.3,rule=teal + runtime:dtype=bf16"
    assert plan.parse_spec(text) == cfgs
    assert plan.split_spec("early_exit:threshold=1e+3,checkpoint=a+b.safetensors + runtime") == \
        ["early_exit:threshold=1e+3,checkpoint=a+b.safetensors", "runtime"]
    with pytest.raises(ln.ConfigError, match="empty method combination"):
        plan.parse_spec("  ")


def test_every_registered_method_with_axes_joins_the_space() -> None:
    m = tiny_causal_lm("llama", layers=4)
    axes, rt = plan.plan_axes(m)
    names = {c.name for axis in axes for c in axis}
    assert {"activation_sparsity", "expert_routing", "runtime"} <= names
    assert [c.dtype for c in axes[rt]] == ["fp32", "bf16", "int8"]
    # a method without plan_axes of its own joins through its demo settings (one point each)
    assert all(len(axis) >= 1 for axis in axes)


@pytest.fixture(scope="module")
def planned():
    mp = pytest.MonkeyPatch()
    mp.setattr(data, "token_stream", _stream)
    mp.setattr(plan._LM, "speed", _fake_speed)
    m = tiny_causal_lm("llama", layers=4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = plan.plan(m, None, ["ppl:+50%", "agree:0.7"], minutes=5, settings=plan.quick_settings(), progress=False, strict=False)
    yield m, before, res, mp
    mp.undo()


def test_plan_meets_each_budget_and_leaves_the_model_unchanged(planned) -> None:
    m, before, res, _ = planned
    assert _unchanged(m, before)
    assert any(len(c.methods) >= 2 for c in res.candidates)  # combinations were measured, not only singles
    assert len(res.candidates) < 200  # not a full grid
    for ch in res.choices:
        c = ch.candidate
        assert c is not None, ch.reason
        assert res.loss(c, ch.budget) <= ch.budget.limit and c.speedup > 1.0
        assert plan.parse_spec(ch.spec) == c.configs
        # the search never returns something slower than the best single method it found
        assert ch.best_single is not None and (c is ch.best_single or (ch.duel is not None and ch.duel >= 1.0 + res.settings.tie))
        # nothing measured at the choice's rung that meets the budget is faster by more than a tie
        rivals = [x for x in res.candidates if x.quality and not x.error and res.loss(x, ch.budget) <= ch.budget.limit and x.rung >= min(c.rung, 1)]
        if c is not ch.best_single or ch.best_combination is None:
            assert all(x.speedup <= c.speedup * (1 + res.settings.tie) + 1e-9 for x in rivals)
            assert all(len(x.configs) >= len(c.configs) for x in rivals if x.speedup > c.speedup)  # a faster rival only within the tie, and no simpler
    with ln.applied(m, plan.parse_spec(res.choices[0].spec), res.calibration):
        assert any(isinstance(x, LazyModule) for x in m.modules())
    assert _unchanged(m, before)


def test_verify_measures_choices_on_the_test_split(planned) -> None:
    m, before, res, _ = planned
    recs = plan.verify("tiny", m, None, res, repeats=1, windows=2, progress=False, peers=False)
    got = {(r.method, r.params.get("budget"), r.metric): r.value for r in recs}
    for b in res.budgets:
        for k in ("cal_loss", "test_loss", "test_loss_se", "meets_budget", "decode_speedup_b1", "decode_vs_runtime_b1"):
            assert ("plan", b.text, k) in got and ("best_single", b.text, k) in got, (b.text, k)
        assert got[("plan", b.text, "meets_budget")] in (0.0, 1.0)
    assert _unchanged(m, before)
    from lazyneuron.bench.plots import plan_front

    text = plan.table(res, recs)
    assert "best single" in text and res.choices[0].spec in text


def test_plot_of_the_search(planned, tmp_path) -> None:
    _, _, res, _ = planned
    from lazyneuron.bench.plots import plan_front

    recs = [r.to_dict() for r in plan.candidate_records("tiny", res)]
    assert plan_front(recs, tmp_path / "plan.png").stat().st_size > 5000


def test_a_budget_nothing_meets_is_one_clear_error(fake_timing, monkeypatch) -> None:
    m = tiny_causal_lm("llama", layers=4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    monkeypatch.setattr(ActivationSparsity, "plan_axes", classmethod(lambda cls, model, name=None: [[ActivationSparsityConfig(rule="teal", sparsity=0.95)]]))
    with pytest.raises(plan.PlanError, match="as fast as the dense model meets agree:1.0"):
        plan.plan(m, None, "agree:1.0", methods=["activation_sparsity"], exclude=["runtime"], minutes=2, settings=plan.quick_settings(), progress=False)
    assert _unchanged(m, before)


def test_bad_requests_are_refused_before_any_work(fake_timing) -> None:
    m = tiny_causal_lm("llama")
    with pytest.raises(ln.ConfigError, match="needs a classifier"):
        plan.plan(m, None, "acc:-0.5", progress=False)
    with pytest.raises(ln.ConfigError, match="unknown method"):
        plan.plan(m, None, "ppl:+5%", methods=["pruning"], progress=False)
    with pytest.raises(ln.ConfigError, match="cannot plan a bare"):
        plan.plan(tiny_bert(), None, "ppl:+5%", progress=False)
    with pytest.raises(plan.PlanError, match="no registered method applies"):
        plan.plan(m, None, "ppl:+5%", methods=["fast_feedforward"], exclude=["runtime"], progress=False)
    with pytest.raises(ln.ConfigError, match="positive time"):
        plan.plan(m, None, "ppl:+5%", minutes=0, progress=False)


def test_the_planner_is_part_of_the_public_api() -> None:
    assert ln.plan.plan is plan.plan and "plan" in ln.__all__


def test_cli_refuses_a_bad_budget_without_loading_a_model(capsys) -> None:
    from lazyneuron.cli import main

    assert main(["plan", "--model", "no-such-model", "--budget", "wer:2"]) == 2
    assert "unknown budget metric 'wer'" in capsys.readouterr().err


def test_bench_runs_a_combination_as_one_variant(monkeypatch) -> None:
    from lazyneuron.bench import BenchSettings, run
    from lazyneuron.cli import _configs

    monkeypatch.setattr(data, "token_stream", _stream)
    cfgs = _configs(["activation_sparsity:rule=teal,sparsity=0.3,targets=attn_in|attn_out + activation_sparsity:rule=teal,sparsity=0.2,targets=mlp_in|mlp_out"])
    assert len(cfgs) == 1 and [c.targets for c in cfgs[0]] == [("attn_in", "attn_out"), ("mlp_in", "mlp_out")]
    m = tiny_causal_lm("llama")
    s = BenchSettings(new_tokens=3, prompt_tokens=8, prefill_tokens=16, batches=(1,), repeats=1, ppl_windows=2, ppl_length=32, calib_texts=2,
                      hf_generate=False)
    from conftest import calib_batches

    recs = run("tiny", m, None, cfgs, s, progress=False, calibration=ln.calibrate(m, calib_batches(), list(cfgs[0])))
    combo = [r for r in recs if r.method == "activation_sparsity+activation_sparsity"]
    assert combo and combo[0].params["runtime"] == "fp32" and "targets=attn_in|attn_out" in combo[0].params["configs"]
    assert {r.metric for r in combo} >= {"decode_speedup_b1", "ppl_delta_pct", "compute_skipped"}
    assert not any(isinstance(x, LazyModule) for x in m.modules())


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 128)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]")


def _rows(split: str) -> list[tuple[str, int]]:
    g = torch.Generator().manual_seed({"train": 0, "calibration": 1, "test": 2}[split])
    out = []
    for _ in range(96):
        y = int(torch.randint(0, 2, (1,), generator=g))
        n = int(torch.randint(4, 12, (1,), generator=g))
        words = torch.randint(2, 64, (n,), generator=g) + 64 * y  # the label shows in the words
        out.append((" ".join(f"w{int(w)}" for w in words.clamp(max=127)), y))
    return out


def test_a_classifier_is_planned_on_accuracy_with_its_fitted_exit_heads(monkeypatch, tmp_path) -> None:
    from conftest import empty_checkpoint_cache
    from transformers import BertConfig, BertModel

    from lazyneuron.fitting import fit_classifier_exits
    from lazyneuron.tasks import TextClassifier

    empty_checkpoint_cache(tmp_path, monkeypatch)
    monkeypatch.setattr(data, "labeled", lambda corpus, split: _rows(split))

    def speed(self: Any, model: torch.nn.Module) -> float:  # deterministic: layers an exit skipped and weight reads skipped
        from lazyneuron.bench.accounting import skipped_fraction, tracking

        with tracking(model), torch.inference_mode():
            for b in self.timing:
                model(b.input_ids, b.attention_mask)
        return 1.0 + skipped_fraction(model)

    monkeypatch.setattr(plan._Classifier, "speed", speed)
    torch.manual_seed(0)
    clf = TextClassifier(BertModel(BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                              max_position_embeddings=64)), 2).eval()
    tok = _word_tokenizer()
    path = fit_classifier_exits(clf, tok, "tiny-clf-task", "task", epochs=2, progress=False)
    axes, _ = plan.plan_axes(clf, "tiny-clf-task")
    exits = [ax for ax in axes if ax[0].name == "early_exit"]
    assert exits and exits[0][0].checkpoint == str(path) and exits[0][0].criterion == "max_prob"
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    s = plan.quick_settings(task="task", rows=(48, 96), batch_size=16)
    res = plan.plan(clf, tok, ["acc:-100"], model_name="tiny-clf-task", minutes=3, settings=s, progress=False)
    ch = res.choices[0]
    assert ch.candidate is not None and res.loss(ch.candidate, ch.budget) <= 100 and ch.candidate.speedup >= 1.05
    assert any("early_exit" in c.methods for c in res.candidates)
    assert _unchanged(clf, before)
    recs = plan.verify("tiny-clf", clf, tok, res, repeats=1, progress=False)
    got = {(r.method, r.metric) for r in recs}
    assert {("plan", "test_loss"), ("plan", "speedup"), ("plan", "test_accuracy")} <= got
    assert _unchanged(clf, before)
