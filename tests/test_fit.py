"""`lazyneuron fit` on a Llama-family model the project was never tuned on: a tiny one saved with
save_pretrained, with a BOS-adding tokenizer and the user's own text files; then `bench` finds
the fitted checkpoints."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import empty_checkpoint_cache, tiny_bert, tiny_causal_lm
from test_bench import _bos_tokenizer

from lazyneuron import data, fitting
from lazyneuron.cli import main
from lazyneuron.errors import ConfigError


def _text(path, seed: int, lo: int, docs: int = 40) -> str:
    """``docs`` paragraphs of ~1,000 characters of w-words drawn mostly from ids lo..lo+40 (so two
    files read as two domains); 4 paragraphs make one ~4,000-character document."""
    rng = random.Random(seed)
    paras = [" ".join(f"w{rng.randrange(lo, lo + 40) if rng.random() < 0.8 else rng.randrange(3, 128)}" for _ in range(230)) for _ in range(docs * 4)]
    path.write_text("\n\n".join(paras))
    return str(path)


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    m = tiny_causal_lm("llama", layers=4)
    m.save_pretrained(root / "tiny")
    _bos_tokenizer().save_pretrained(root / "tiny")
    return root, str(root / "tiny"), _text(root / "a.txt", 1, 3), _text(root / "b.txt", 2, 80)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    empty_checkpoint_cache(tmp_path, monkeypatch)


def test_fit_gates_exits_then_bench_finds_them(user_model, capsys) -> None:
    root, model, a, b = user_model
    assert main(["fit", "gates", "--model", model, "--context", f"domain=alpha:{a},beta:{b}", "--target", "0.25", "--budget", "2", "--json"]) == 0
    g = json.loads(capsys.readouterr().out)
    assert g["skipped_modules"] == 2 and g["modules"] == 8 and g["contexts"] == ["alpha", "beta"]
    for v in ("alpha", "beta"):  # each context's mask is at least as good as the static one on held-out text
        r = g["heldout"][v]
        assert r["fitted_loss"] <= r["static_loss"] + 1e-9  # of the start and each accepted swap, the best held out
    assert main(["fit", "exits", "--model", model, "--corpus", a, "--windows", "8", "--budget", "2", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["layers"] == [1, 2] and 0 <= e["calibration_agreement"] <= 1
    assert main(["bench", "--model", model, "--method", "module_gating", "--method", "early_exit", "--corpus", a, "--quick", "--repeats", "1",
                 "--new-tokens", "8", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    methods = {r["method"] for r in recs}
    assert {"module_gating", "early_exit"} <= methods
    gate = next(r for r in recs if r["method"] == "module_gating")
    assert gate["params"]["checkpoint"] == g["checkpoint"]


def test_fit_gates_resumes_and_keeps_the_result(user_model, capsys) -> None:
    """A second run with the same job reuses the cached order and searches (no new work) and
    writes the same masks."""
    from lazyneuron.methods.gating import GatePredictor

    root, model, a, b = user_model
    model_obj, tok = __import__("lazyneuron").models.load(model)
    ctx = {"domain": {"alpha": a, "beta": b}}
    first = fitting.fit_gates(model_obj, tok, model, ctx, 0.25, progress=False)
    p1, _ = GatePredictor.load(first["checkpoint"])
    second = fitting.fit_gates(model_obj, tok, model, ctx, 0.25, progress=False)
    p2, _ = GatePredictor.load(second["checkpoint"])
    assert second["seconds"] < first["seconds"]
    for k, v in p1.state_dict().items():
        assert torch.equal(v, p2.state_dict()[k])


def test_runtime_reaches_the_layers_inside_fitted_methods(user_model, tmp_path) -> None:
    """The runtime, applied after early exit or module gating (which wrap the layer stack), moves
    every linear of the layers onto its kernels, and revert_ restores the model bit for bit."""
    import lazyneuron as ln
    from lazyneuron.methods.early_exit import EarlyExitConfig
    from lazyneuron.methods.gating import ModuleGatingConfig
    from lazyneuron.runtime import RuntimeConfig
    from lazyneuron.runtime.linear import FastLinear

    _, model, a, b = user_model
    m, tok = ln.models.load(model)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    e = fitting.fit_exits(m, tok, model, corpus=a, train_windows=8, epochs=2, steps=2, progress=False)
    g = fitting.fit_gates(m, tok, model, {"domain": {"alpha": a}}, 0.25, rounds=1, progress=False)
    for cfg in (EarlyExitConfig(checkpoint=e["checkpoint"], threshold=e["threshold"]), ModuleGatingConfig(checkpoint=g["checkpoint"])):
        ln.apply_(m, [cfg, RuntimeConfig()])
        assert sum(isinstance(x, FastLinear) for x in m.modules()) == 4 * 7 + 1
        ln.revert_(m)
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())


def test_bench_without_a_fitted_checkpoint_says_how_to_fit(user_model, capsys) -> None:
    _, model, _, _ = user_model
    assert main(["bench", "--model", model, "--method", "early_exit", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "has none; run `lazyneuron fit exits --model" in err


def test_context_specs_and_user_files(tmp_path) -> None:
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"doc {i} " * 50, "domain": "x" if i % 2 else "y"}) for i in range(30)) + "\n")
    ctx = fitting.parse_contexts(["domain=news,austen"], corpus=str(f), field=None)
    assert ctx == {"domain": {"news": "news", "austen": "austen"}}
    ctx = fitting.parse_contexts([], corpus=str(f), field="domain")
    assert ctx == {"domain": {"y": f"{f}::domain=y", "x": f"{f}::domain=x"}}
    assert len(data.texts(ctx["domain"]["x"], "train")) + len(data.texts(ctx["domain"]["x"], "calibration")) + len(data.texts(ctx["domain"]["x"], "test")) == 15
    with pytest.raises(ConfigError, match="key=value:FILE"):
        fitting.parse_contexts(["domain"])
    with pytest.raises(Exception, match="nor a local .txt / .jsonl file"):
        fitting.parse_contexts(["domain=legal:/no/such/file.txt"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(Exception, match="bad.jsonl:2 is not valid JSON"):
        data.texts(str(bad), "train")


def test_fit_gates_training_after_the_search(user_model) -> None:
    """--train-steps: Gumbel-Softmax training from the searched masks, kept only if it lowers the
    held-out loss; either way the checkpoint loads for this model and the model is left dense."""
    from lazyneuron.methods.gating import GatePredictor

    _, model, a, b = user_model
    m, tok = __import__("lazyneuron").models.load(model)
    info = fitting.fit_gates(m, tok, model, {"domain": {"alpha": a, "beta": b}}, 0.25, rounds=1, train_steps=2, progress=False)
    t = info["training"]
    assert t["steps"] == 2 and t["kept"] == (t["heldout_loss_after"] < t["heldout_loss_before"])
    GatePredictor.load(info["checkpoint"], m)
    assert type(m.model).__name__ == "LlamaModel"


def test_fit_refuses_bad_targets_and_budgets(user_model) -> None:
    _, model, a, _ = user_model
    m, tok = __import__("lazyneuron").models.load(model)
    with pytest.raises(ConfigError, match="target=1.5 is invalid"):
        fitting.fit_gates(m, tok, model, None, 1.5)
    with pytest.raises(ConfigError, match="skips no module of 8"):
        fitting.fit_gates(m, tok, model, None, 0.01)
    with pytest.raises(ConfigError, match="budget=0 minutes is invalid"):
        fitting.fit_exits(m, tok, model, corpus=a, budget=0)
    with pytest.raises(ConfigError, match="one context key at a time"):
        fitting.fit_gates(m, tok, model, {"a": {"x": a}, "b": {"y": a}}, 0.25)
    with pytest.raises(ConfigError, match="this is a bert encoder"):
        fitting.fit_gates(tiny_bert(), tok, "tiny-bert", None, 0.25)
    with pytest.raises(ConfigError, match="per-token exits run on Llama-family causal LMs"):
        fitting.fit_exits(tiny_causal_lm("gpt2"), tok, "tiny-gpt2", corpus=a)
