"""`lazyneuron fit` on a Llama-family model the project was never tuned on: a tiny one saved with
save_pretrained, with a BOS-adding tokenizer and the user's own text files; then `bench` finds
the fitted checkpoints."""

from __future__ import annotations

import json
import random
from pathlib import Path

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
    side = json.loads(Path(g["checkpoint"]).with_suffix(".json").read_text())
    for v in ("alpha", "beta"):  # each context's mask is at least as good as the static one on the calibration text it was chosen on
        r = side["search"][v]
        assert r["heldout_loss"] <= r["heldout_loss_static"] + 1e-9  # of the start and each accepted swap, the best there
    assert g["heldout_split"] == "test" and set(g["heldout"]) == {"alpha", "beta"}  # reported on text no choice saw
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


def test_fit_gates_training_after_the_search(user_model, monkeypatch) -> None:
    """--train-steps: Gumbel-Softmax training from the searched masks, kept only if it lowers the
    held-out loss; either way the checkpoint loads for this model and the model is left dense."""
    from lazyneuron.methods.gating import GatePredictor

    _, model, a, b = user_model
    m, tok = __import__("lazyneuron").models.load(model)
    splits = []
    windows = data.windows
    monkeypatch.setattr(data, "windows", lambda tok, src, split, *a, **k: splits.append((split, k.get("spread", False))) or windows(tok, src, split, *a, **k))
    info = fitting.fit_gates(m, tok, model, {"domain": {"alpha": a, "beta": b}}, 0.25, rounds=1, train_steps=2, progress=False)
    t = info["training"]
    assert t["steps"] == 2 and t["kept"] == (t["heldout_loss_after"] < t["heldout_loss_before"])
    # the keep / revert decision reads the opening calibration windows, which the searches (spread windows) never saw; test text is for reporting
    assert splits[-2:] == [("calibration", False), ("calibration", False)]
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


def test_rerun_keeps_trained_gates(user_model, monkeypatch) -> None:
    """A rerun of the same job does not overwrite gates trained with --train-steps by the searched
    masks, reuses the cached training, and reports it."""
    _, model, a, _ = user_model
    m, tok = __import__("lazyneuron").models.load(model)
    losses = iter([1.0, 0.5])  # training "helps": its gates are kept
    monkeypatch.setattr(fitting, "_selection_loss", lambda *a, **k: next(losses))
    ctx = {"domain": {"alpha": a}}
    first = fitting.fit_gates(m, tok, model, ctx, 0.25, rounds=1, train_steps=2, progress=False)
    assert first["training"]["kept"]
    trained = Path(first["checkpoint"]).read_bytes()
    for steps in (0, 2):  # no retraining either way (the loss iterator is spent)
        again = fitting.fit_gates(m, tok, model, ctx, 0.25, rounds=1, train_steps=steps, progress=False)
        assert Path(again["checkpoint"]).read_bytes() == trained and again["training"] == first["training"]


def test_budget_cut_order_and_search_are_continued(user_model, monkeypatch, tmp_path) -> None:
    """A greedy order or swap search cut by the budget is cached as partial, and a rerun with more
    time continues it to what an uninterrupted fit finds."""
    from lazyneuron.methods import gating

    _, model, a, b = user_model
    m, tok = __import__("lazyneuron").models.load(model)
    ctx = {"domain": {"alpha": a, "beta": b}}
    cut = fitting.fit_gates(m, tok, model, ctx, 0.25, rounds=2, budget=1e-9, progress=False)
    side = json.loads(Path(cut["checkpoint"]).with_suffix(".json").read_text())
    assert cut["partial_order"] and side["order_greedy"] == 1 and cut["searched"] == []
    swap = gating.swap_search
    monkeypatch.setattr(gating, "swap_search", lambda *a, **k: swap(*a, **{**k, "deadline": 0.0}))  # every search stops before its first round
    mid = fitting.fit_gates(m, tok, model, ctx, 0.25, rounds=2, progress=False)
    side = json.loads(Path(mid["checkpoint"]).with_suffix(".json").read_text())
    assert not mid["partial_order"] and side["order_greedy"] == 2 and mid["partial"] == ["alpha", "beta"] and mid["searched"] == []
    assert all(side["search"][v]["partial"] and len(side["search"][v]["path"]) == 1 for v in ("alpha", "beta"))
    monkeypatch.setattr(gating, "swap_search", swap)
    done = fitting.fit_gates(m, tok, model, ctx, 0.25, rounds=2, progress=False)
    fresh = fitting.fit_gates(m, tok, model, ctx, 0.25, rounds=2, progress=False, out=tmp_path / "fresh.safetensors")
    assert done["partial"] == [] and done["searched"] == ["alpha", "beta"]
    s1, s2 = (json.loads(Path(x["checkpoint"]).with_suffix(".json").read_text()) for x in (done, fresh))
    assert s1["order"] == s2["order"] and {v: r["keep"] for v, r in s1["search"].items()} == {v: r["keep"] for v, r in s2["search"].items()}


def test_swap_search_says_when_the_deadline_cut_it(user_model) -> None:
    from lazyneuron.methods.gating import swap_search

    _, model, a, _ = user_model
    m, tok = __import__("lazyneuron").models.load(model)
    w = data.windows(tok, a, "train", 32, 2)
    keep = torch.ones(4, 2, dtype=torch.bool)
    keep[1, 0] = keep[2, 1] = False
    for deadline, stopped in ((0.0, True), (None, False)):
        st: dict = {}
        res = swap_search(m, w, keep, score_from=4, rounds=2, progress=False, deadline=deadline, stats=st)
        assert st["stopped_early"] is stopped and (len(res.masks) == 1 or not stopped)


def test_fitted_checkpoints_literal_names_and_quick_fits(tmp_path, monkeypatch) -> None:
    """Checkpoint lookup takes the cache path literally (glob characters in it), and fits of
    `demo --quick` are found only by a quick demo, and only where there is no full fit."""
    from lazyneuron.methods.early_exit import EarlyExit

    root = tmp_path / "c[1]*"
    monkeypatch.setenv("LAZYNEURON_CACHE", str(root))
    name = "smollm2-135m"
    gates, quick_gates = (fitting.demo_checkpoint_path("module_gating", name, q) for q in (False, True))
    assert "[" in str(gates) and gates != quick_gates
    gates.touch()
    assert fitting.fitted_checkpoint("module_gating", name) == {"checkpoint": str(gates)}
    gates.unlink()
    quick_gates.touch()
    assert fitting.fitted_checkpoint("module_gating", name) is None
    assert fitting.fitted_checkpoint("module_gating", name, quick=True) == {"checkpoint": str(quick_gates)}
    exits = fitting.demo_checkpoint_path("early_exit", name, True)
    exits.touch()
    exits.with_suffix(".thresholds.json").write_text('{"learned": 0.7}')
    assert fitting.fitted_checkpoint("early_exit", name) is None and EarlyExit.demo_configs(name) == []
    (cfg,) = EarlyExit.demo_configs(name, quick=True)
    assert cfg.checkpoint == str(exits) and cfg.threshold == 0.7
    full = fitting.demo_checkpoint_path("early_exit", name)
    full.touch()
    assert fitting.fitted_checkpoint("early_exit", name, quick=True) == {"checkpoint": str(full)}  # a full fit beats a quick one


def test_learned_threshold_only_for_the_learned_criterion(tmp_path) -> None:
    from lazyneuron.cli import _configs
    from lazyneuron.methods.early_exit import EarlyExitConfig

    p = fitting.demo_checkpoint_path("early_exit", "smollm2-135m")
    p.touch()
    p.with_suffix(".thresholds.json").write_text('{"learned": 0.7}')
    (learned,) = _configs(["early_exit"], "smollm2-135m")
    assert learned.threshold == 0.7 and learned.checkpoint == str(p)
    for crit in ("entropy", "max_prob"):
        (c,) = _configs([f"early_exit:criterion={crit}"], "smollm2-135m")
        assert c.criterion == crit and c.threshold == EarlyExitConfig.threshold and c.checkpoint == str(p)
    (c,) = _configs(["early_exit:criterion=patience,threshold=2"], "smollm2-135m")
    assert c.threshold == 2 and c.checkpoint == str(p)


def test_demo_goes_on_when_a_fit_fails_and_keys_quick_fits_apart(user_model, monkeypatch) -> None:
    _, model, _, _ = user_model
    m, tok = __import__("lazyneuron").models.load(model)
    outs = {}

    def failing_exits(*a, out, **k):
        outs["exits"] = out
        Path(out).touch()  # a half-written checkpoint
        raise RuntimeError("boom")

    def gates(*a, out, **k):
        outs["gates"] = out
        Path(out).touch()
        return {"skipped_modules": 2, "modules": 8, "seconds": 0.0}

    monkeypatch.setattr(fitting, "fit_exits", failing_exits)
    monkeypatch.setattr(fitting, "fit_gates", gates)
    notes = fitting.demo_fits(model, m, tok, quick=True, progress=False)
    assert any("early_exit: the demo's fit failed (RuntimeError: boom)" in n for n in notes) and any("fitted gates" in n for n in notes)
    assert not outs["exits"].exists() and fitting.fitted_checkpoint("early_exit", model, quick=True) is None
    assert outs["gates"] == fitting.demo_checkpoint_path("module_gating", model, True)
    assert fitting.fitted_checkpoint("module_gating", model) is None  # a full demo fits its own
    assert fitting.fitted_checkpoint("module_gating", model, quick=True) == {"checkpoint": str(outs["gates"])}


def test_small_or_unbroken_files_say_what_is_missing(tmp_path) -> None:
    from lazyneuron.errors import LazyNeuronError

    flat = tmp_path / "flat.txt"
    flat.write_text("word " * 5000)  # no blank line: one document
    with pytest.raises(LazyNeuronError, match=r"flat.txt' gives only 1 documents.* from its 1 lines, so its calibration split .* is empty.*more text"):
        data.texts(str(flat), "calibration")
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(9)) + "\n")
    assert len(data.texts(str(short), "calibration")) == 1
    with pytest.raises(LazyNeuronError, match=r"short.jsonl' gives only 9 lines with a 'text' field from its 9 lines, so its test split"):
        data.texts(str(short), "test")


def test_sync_waits_only_under_torchrun(monkeypatch) -> None:
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append(1))
    fitting._sync()
    assert calls == []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    fitting._sync()
    assert calls == [1]
