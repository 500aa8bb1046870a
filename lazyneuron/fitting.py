"""Fitting the methods that learn something, on any supported model: what ``lazyneuron fit`` runs.

- :func:`fit_exits`: early-exit heads of a causal LM (a tuned lens per exit, fitted in closed
  form, and a learned exit score), then the exit threshold that keeps top-1 agreement with the
  dense model within a budget on calibration text.
- :func:`fit_gates`: context-aware module gates. On a causal LM: the static greedy mask at the
  target (modules removed one by one, the one that raises the next-token loss least first), then
  per context value that mask improved on the value's own text by swap search and kept only where
  it helps on held-out text; optionally Gumbel-Softmax training from there. (Encoder
  classifiers: ``train_gates``, see docs/gating.md.)
- :func:`fit_fff`: fast-feedforward trees for plain two-layer FFNs (BERT, GPT-2): layer-wise
  distillation, then all trees end to end.

Every fit reads text from a built-in corpus or the user's own files (:mod:`lazyneuron.data`: a
path where a corpus name goes), writes a safetensors checkpoint where ``bench`` and ``demo`` find
it (:func:`lazyneuron.models.checkpoint_key`) with a JSON sidecar of what it did and measured,
stops at ``budget`` minutes keeping the best result so far, and resumes: the steps it finished
(greedy order, per-context searches, training steps) are cached next to the checkpoint. Training
runs under ``torchrun`` (see :mod:`lazyneuron.train`).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from . import data
from .adapters import get_adapter
from .errors import ConfigError

log = logging.getLogger(__name__)


class Budget:
    """A wall-clock budget in minutes (``None``: none). ``deadline(share)``: a ``time.monotonic()``
    value ``share`` of the way through the time that is left."""

    def __init__(self, minutes: float | None) -> None:
        if minutes is not None and not minutes > 0:
            raise ConfigError(f"budget={minutes} minutes is invalid; pass a positive number of minutes, or none for no limit")
        self.end = None if minutes is None else time.monotonic() + 60.0 * minutes

    def deadline(self, share: float = 1.0) -> float | None:
        if self.end is None:
            return None
        now = time.monotonic()
        return now + max(0.0, self.end - now) * share

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _stack_family(model: torch.nn.Module) -> str:
    """llama / bert: the layer-stack layouts gating and exits run; "" for any other."""
    from .methods.gating import _family

    ad = get_adapter(model)
    try:
        return _family(model.get_submodule(ad.layers_path.rpartition(".")[0]))
    except ConfigError:
        return ""


def _is_main() -> bool:
    from .train import is_main

    return is_main()


# -- early exit ------------------------------------------------------------------------------------
def default_exit_layers(num_layers: int) -> list[int]:
    """Exit points from a quarter of the way in to the second-last layer, at most ~12 of them."""
    first = max(1, num_layers // 4)
    step = max(1, math.ceil((num_layers - 1 - first) / 12))
    return list(range(first, num_layers - 1, step))


def fit_exits(model: torch.nn.Module, tokenizer: Any, model_name: str, *, corpus: str = "news", layers: Sequence[int] | None = None,
              train_windows: int = 32, cal_windows: int | None = None, length: int = 256, lens: bool = True, agreement_loss: float = 0.1,
              epochs: int = 30, steps: int = 8, budget: float | None = None, out: str | os.PathLike | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Exit heads for a causal LM, and the threshold that keeps top-1 agreement with the dense
    model within ``agreement_loss`` (0.1: 90% of tokens decode as dense would) on the corpus's
    calibration split. Writes the heads (default: where ``bench`` / ``demo`` look) and their
    ``.thresholds.json``; returns what was fitted and measured."""
    from .methods.early_exit import calibrate_lm_threshold, default_lm_exits_path, train_lm_exits

    ad = get_adapter(model)
    if not ad.causal_lm or _stack_family(model) != "llama":
        raise ConfigError(f"fit exits: per-token exits run on Llama-family causal LMs, and this is a {ad.model_type} {'LM' if ad.causal_lm else 'encoder'}; "
                          "for an encoder classifier train exit heads with lazyneuron.methods.early_exit.train_classifier_exits")
    if tokenizer is None:
        raise ConfigError("fit exits needs the model's tokenizer to read text; save it next to the model (tokenizer.save_pretrained(DIR))")
    if not 0 <= agreement_loss < 1:
        raise ConfigError(f"agreement_loss={agreement_loss} must be a fraction in [0, 1) (0.1 = keep 90% of tokens as dense decodes them)")
    b = Budget(budget)
    n = ad.num_layers
    layers = sorted(set(int(x) for x in layers)) if layers else default_exit_layers(n)
    if not layers:
        raise ConfigError(f"a model of {n} layers has no layer to exit after (exits sit after layers 0..{n - 2}); it needs at least 2 layers")
    path = Path(out) if out else Path(default_lm_exits_path(model_name))
    t0 = time.perf_counter()
    train_w = data.windows(tokenizer, corpus, "train", length, train_windows, spread=True)
    cal_w = data.windows(tokenizer, corpus, "calibration", length, cal_windows or max(4, train_windows // 2), spread=True)
    heads = train_lm_exits(model, train_w, layers, epochs=epochs, lens=lens, progress=progress, deadline=b.deadline(0.5))
    info: dict[str, Any] = {"method": "early_exit", "model": model_name, "corpus": corpus, "layers": layers, "lens": lens,
                            "train_tokens": int(train_w.numel()), "calibration_tokens": int(cal_w.numel()), "agreement_loss": agreement_loss}
    if _is_main():
        heads.save(path, {"trained_on": f"{corpus} train, {train_windows} x {length} tokens", "lens": lens})
    pick = calibrate_lm_threshold(model, str(path), cal_w, agreement_loss, steps=steps, progress=progress, deadline=b.deadline())
    info.update({"threshold": min(float(pick["threshold"]), 2.0), "calibration_agreement": pick["quality"], "mean_layers": pick["mean_layers"],
                 "num_layers": n, "seconds": time.perf_counter() - t0, "checkpoint": str(path)})
    if pick["threshold"] > 1:
        info["note"] = "no threshold tried kept the agreement budget on calibration text: the heads never exit (raise agreement_loss or fit on more text)"
    if _is_main():
        _write_json(path.with_suffix(".thresholds.json"), {"learned": info["threshold"], **{k: v for k, v in info.items() if k != "threshold"}})
    return info


# -- module gating ---------------------------------------------------------------------------------
def parse_contexts(specs: Sequence[str], *, corpus: str | None = None, field: str | None = None) -> dict[str, dict[str, str]]:
    """``--context`` values -> ``{key: {value: corpus}}``. Each spec is ``key=v1:SRC,v2:SRC,...``
    (SRC a built-in corpus name or a text / JSONL file) or ``key=v1,v2`` (each value a built-in
    corpus of that name). ``field`` with a JSONL ``corpus``: one value per distinct value of that
    field, each reading the lines that carry it."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs:
        key, eq, rest = spec.partition("=")
        key = key.strip()
        if not eq or not key or not rest.strip():
            raise ConfigError(f"cannot read --context {spec!r}; write key=value:FILE,value:FILE (or key=news,austen for built-in corpora)")
        vals: dict[str, str] = {}
        for item in rest.split(","):
            item = item.strip()
            if not item:
                continue
            value, colon, src = item.partition(":")
            src = src if colon else value
            if value in vals:
                raise ConfigError(f"--context {key}: the value {value!r} is given twice")
            data._check(src, "train")  # a clear error for an unknown corpus or a missing file
            vals[value] = src
        out.setdefault(key, {}).update(vals)
    if field:
        if not corpus or not corpus.endswith(".jsonl"):
            raise ConfigError(f"--context-field {field!r} reads its values from a JSONL corpus; pass --corpus FILE.jsonl")
        out.setdefault(field, {}).update({v: f"{corpus}::{field}={v}" for v in data.jsonl_values(corpus, field)})
    return out


def _keep_from(order: Sequence[Sequence[Any]], k: int, n: int) -> torch.Tensor:
    from .methods.gating import MODULES

    skip = {(int(j), str(m)) for j, m in order[:k]}
    return torch.tensor([[(j, m) not in skip for m in MODULES] for j in range(n)])


def fit_gates(model: torch.nn.Module, tokenizer: Any, model_name: str, contexts: dict[str, dict[str, str]] | None, target: float, *,
              corpus: str = "news", budget: float | None = None, length: int = 128, prompt: int = 32, order_windows: int = 4,
              search_windows: int = 6, heldout_windows: int = 4, rounds: int = 4, train_steps: int = 0, out: str | os.PathLike | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Gates that skip ``target`` of the modules (attention and feed-forward blocks) of ``model``,
    per context value (``contexts``: ``{key: {value: corpus or file}}``, one key; none: one static
    mask for every input). Each sequence's mask is decided from its first ``prompt`` tokens;
    losses are scored on the tokens after them. Causal LMs of the Llama family; see the module
    docstring for the procedure. ``train_steps > 0`` adds Gumbel-Softmax training (KL to the
    dense model + the sparsity loss) from the searched masks, kept only if it lowers the held-out
    loss. Writes the gate checkpoint (default: where ``bench`` / ``demo`` look) after every stage,
    so a stop keeps the best so far."""
    ad = get_adapter(model)
    family = _stack_family(model)
    if tokenizer is None:
        raise ConfigError("fit gates needs the model's tokenizer to read text; save it next to the model (tokenizer.save_pretrained(DIR))")
    if not 0 < target < 1:
        raise ConfigError(f"target={target} is invalid; pass the fraction of modules to skip, in (0, 1), e.g. 0.25")
    contexts = {k: dict(v) for k, v in (contexts or {}).items() if v}
    if len(contexts) > 1:
        raise ConfigError(f"fit gates takes one context key at a time, got {sorted(contexts)}; fit one checkpoint per key")
    n = ad.num_layers
    k = round(target * n * 2)
    if k < 1:
        raise ConfigError(f"target={target} skips no module of {n * 2} (layers x attention / feed-forward); use at least {1 / (2 * n):.3f}")
    from .methods.gating import default_gates_path

    path = Path(out) if out else Path(default_gates_path(model_name, target, "fit"))
    if family != "llama" or not ad.causal_lm:
        raise ConfigError(f"fit gates searches masks of causal LMs (Llama family); this is a {ad.model_type} "
                          f"{'LM' if ad.causal_lm else 'encoder'}. Gates for an encoder classifier (lazyneuron.tasks.TextClassifier) "
                          "are trained with lazyneuron.methods.gating.train_gates (docs/gating.md)")
    return _fit_gates_searched(model, tokenizer, model_name, contexts, target, k, path, corpus=corpus, budget=Budget(budget), length=length,
                               prompt=prompt, order_windows=order_windows, search_windows=search_windows, heldout_windows=heldout_windows,
                               rounds=rounds, train_steps=train_steps, progress=progress)


def _fit_gates_searched(model: torch.nn.Module, tokenizer: Any, model_name: str, contexts: dict[str, dict[str, str]], target: float, k: int,
                        path: Path, *, corpus: str, budget: Budget, length: int, prompt: int, order_windows: int, search_windows: int,
                        heldout_windows: int, rounds: int, train_steps: int, progress: bool) -> dict[str, Any]:
    from .models import checkpoint_key
    from .methods.gating import GatePredictor, MaskScorer, model_type_of, search_context_mask, static_greedy_order

    n = get_adapter(model).num_layers
    key = next(iter(contexts), None)
    values = contexts.get(key, {}) if key else {}
    sources = list(values.values()) or [corpus]
    t0 = time.perf_counter()
    job = {"model": checkpoint_key(model_name), "target": target, "contexts": contexts, "corpus": corpus, "length": length, "prompt": prompt,
           "order_windows": order_windows, "search_windows": search_windows, "heldout_windows": heldout_windows, "rounds": rounds}
    side = _sidecar(path)
    state = json.loads(side.read_text()) if side.exists() else {}
    if state.get("job") != job:
        state = {"job": job}
    # 1. the static greedy mask on calibration text of every source (shared by all contexts)
    if "order" not in state:
        per = max(1, order_windows // len(sources))
        wins = torch.cat([data.windows(tokenizer, s, "calibration", length, per, spread=True) for s in sources])
        shortlist = 0 if 2 * n <= 24 else min(2 * n, max(k + 8, 2 * k))
        order = static_greedy_order(model, wins, k, score_from=prompt, progress=progress, shortlist=shortlist, deadline=budget.deadline(0.4))
        state["order"] = [list(x) for x in order]
        state["order_windows_tokens"] = int(wins.numel())
    static = _keep_from(state["order"], k, n)

    def save() -> None:
        searched = state.get("search", {})  # a value not searched (yet) keeps the static mask, never an empty row
        masks = {None: static, **{v: torch.tensor(searched[v]["keep"]).bool() if v in searched else static for v in values}}
        torch.manual_seed(0)  # the predictor's unused input path starts the same every run
        if key:
            pred = GatePredictor(model.config.hidden_size, n, {key: list(values)}, gate_tokens=prompt, model_type=model_type_of(model))
            pred.init_masks({key: masks})
        else:
            from .methods.gating import static_predictor, MODULES

            pred = static_predictor(model, [(j, MODULES[m]) for j, m in (~static).nonzero().tolist()])
            pred.gate_tokens = prompt
        pred.meta.update({"target_sparsity": k / (2 * n), "trained_on": "static greedy mask" + (f", swap search per {key} value on its own text" if key else ""),
                          "fitted_by": "lazyneuron fit gates"})
        if _is_main():
            pred.save(path)
            _write_json(side, state)

    save()
    # 2. per context value: the static mask improved on that value's own text, kept where it helps held out
    state.setdefault("search", {})
    todo = [v for v in values if v not in state["search"]]
    for i, v in enumerate(todo):
        if budget.passed():
            log.info("fit gates: time budget reached; %d of %d context values keep the static mask", len(todo) - i, len(values))
            break
        src = values[v]
        search = data.windows(tokenizer, src, "train", length, search_windows, spread=True)
        held = data.windows(tokenizer, src, "calibration", length, heldout_windows, spread=True)
        mask, r = search_context_mask(model, search, static, held, score_from=prompt, rounds=rounds, progress=progress,
                                      desc=f"mask search {key}={v}", deadline=budget.deadline(1.0 / (len(todo) - i)))
        state["search"][v] = {"keep": mask.int().tolist(), "heldout_loss_static": r["heldout_loss"][0], "heldout_loss": r["heldout_loss"][r["chosen_step"]],
                              "swaps": r["chosen_step"]}
        save()
    # held-out next-token loss: dense against the fitted masks, per source
    report = {}
    with torch.no_grad():
        for v, src in (values.items() if values else [(corpus, corpus)]):
            held = data.windows(tokenizer, src, "calibration", length, heldout_windows, spread=True)
            sc = MaskScorer(model, held, prompt)
            dense = sc.loss(torch.ones_like(static))
            mine = torch.tensor(state["search"][v]["keep"]).bool() if v in state["search"] else static
            report[v] = {"dense_loss": dense, "static_loss": sc.loss(static), "fitted_loss": sc.loss(mine)}
    info = {"method": "module_gating", "model": model_name, "checkpoint": str(path), "target": target, "skipped_modules": k, "modules": 2 * n,
            "context_key": key, "contexts": list(values), "searched": sorted(state["search"]), "heldout": report,
            "seconds": time.perf_counter() - t0}
    if train_steps > 0 and not budget.passed():
        info["training"] = _train_from(model, tokenizer, path, contexts, target, prompt=prompt, length=length, steps=train_steps, budget=budget,
                                       progress=progress, corpus=corpus)
    state["result"] = info
    if _is_main():
        _write_json(side, state)
    return info


def _gate_batches(tokenizer: Any, contexts: dict[str, dict[str, str]], corpus: str, length: int, steps: int) -> list[tuple[torch.Tensor, dict[str, list[str]]]]:
    key = next(iter(contexts), None)
    values = contexts.get(key, {}) if key else {}
    if not values:
        w = data.windows(tokenizer, corpus, "train", length, 4 * steps, spread=True)
        return [(w[4 * i: 4 * i + 4], {}) for i in range(steps)]
    ws = {v: data.windows(tokenizer, src, "train", length, steps, spread=True) for v, src in values.items()}
    return [(torch.stack([ws[v][i] for v in values]), {key: list(values)}) for i in range(steps)]


def _selection_loss(model: torch.nn.Module, tokenizer: Any, contexts: dict[str, dict[str, str]], corpus: str, length: int, prompt: int) -> float:
    import torch.nn.functional as F

    from .methods.gating import set_context

    key = next(iter(contexts), None)
    values = contexts.get(key, {}) if key else {corpus: corpus}
    losses = []
    with torch.no_grad():
        for v, src in values.items():
            w = data.windows(tokenizer, src, "calibration", length, 4, spread=True)
            set_context(model, **({key: v} if key else {}))
            logits = model(input_ids=w, use_cache=False).logits[:, prompt:-1].float()
            losses.append(float(F.cross_entropy(logits.flatten(0, 1), w[:, prompt + 1:].flatten())))
    return sum(losses) / len(losses)


def _train_from(model: torch.nn.Module, tokenizer: Any, path: Path, contexts: dict[str, dict[str, str]], target: float, *, prompt: int, length: int,
                steps: int, budget: Budget, progress: bool, corpus: str) -> dict[str, Any]:
    """Gumbel-Softmax training of the gates in ``path`` (causal LM, KL to dense), kept if it
    lowers the held-out loss."""
    from .api import applied, revert_
    from .methods.gating import GatePredictor, GateTraining, ModuleGatingConfig, calibrate_threshold, train_gates

    batches = _gate_batches(tokenizer, contexts, corpus, length, steps)
    with applied(model, ModuleGatingConfig(checkpoint=str(path))):
        before = _selection_loss(model, tokenizer, contexts, corpus, length, prompt)
    init, _ = GatePredictor.load(path, model)
    cfg = GateTraining(target=target, lr=1e-3, tau=(0.5, 0.1))
    ctx_vals = {k: list(v) for k, v in contexts.items()}
    try:
        train_gates(model, batches, ctx_vals, cfg, gate_tokens=prompt, init=init, checkpoint=str(path) + ".train", progress=progress,
                    deadline=budget.deadline())
        calibrate_threshold(model, [(b[0][:, :prompt], b[1]) for b in batches], target)
        after = _selection_loss(model, tokenizer, contexts, corpus, length, prompt)
        stack = next(m for m in model.modules() if type(m).__name__ == "GatedStack")
        kept = after < before
        if kept and _is_main():
            stack.predictor.meta.update({"fitted_by": "lazyneuron fit gates", "trained_on": f"searched masks, then {len(batches)} Gumbel-Softmax steps"})
            stack.predictor.save(path)
    finally:
        revert_(model)
        Path(str(path) + ".train").unlink(missing_ok=True)
    return {"steps": len(batches), "heldout_loss_before": before, "heldout_loss_after": after, "kept": kept}


# -- fast feedforward ------------------------------------------------------------------------------
def fit_fff(model: torch.nn.Module, tokenizer: Any, model_name: str, *, corpus: str = "news", depth: int = 10, windows: int = 160,
            length: int = 128, distill_steps: int = 300, epochs: int = 2, lr: float = 5e-4, max_tokens: int = 40_000, budget: float | None = None,
            out: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """FFF trees for every plain two-layer FFN of ``model``: each distilled to its dense FFN's
    outputs on the corpus's train text, then all trained together to hold the model's output
    (encoders: output states and mean-pooled embeddings; causal LMs: next-token distribution) to
    the dense model's. Saved where ``bench`` / ``demo`` look. The model is left as it was."""
    import copy

    import torch.nn.functional as F

    from .api import revert_
    from .methods.fff import FastFeedForwardConfig, default_fff_path, distill_layers, fff_layers, save_fff
    from .train import fit

    ad = get_adapter(model)
    if tokenizer is None:
        raise ConfigError("fit fff needs the model's tokenizer to read text; save it next to the model (tokenizer.save_pretrained(DIR))")
    b = Budget(budget)
    path = Path(out) if out else Path(default_fff_path(model_name))
    t0 = time.perf_counter()
    wins = data.windows(tokenizer, corpus, "train", length, windows, spread=True)
    if not ad.causal_lm and getattr(tokenizer, "cls_token_id", None) is not None and getattr(tokenizer, "sep_token_id", None) is not None \
            and int(wins[0, 0]) != tokenizer.cls_token_id:
        wins = torch.cat([torch.full((len(wins), 1), tokenizer.cls_token_id), wins[:, :-2], torch.full((len(wins), 1), tokenizer.sep_token_id)], 1)
    inputs = [w.view(1, -1) for w in wins]
    dense = copy.deepcopy(model)
    errs = distill_layers(model, FastFeedForwardConfig(depth=depth), inputs, steps=distill_steps, batch_tokens=512, max_tokens=max_tokens, progress=progress)
    batches = [wins[i: i + 16] for i in range(0, len(wins), 16)]
    with torch.no_grad():
        target = [dense(x).logits if ad.causal_lm else dense(x).last_hidden_state for x in batches]
    del dense
    trees = fff_layers(model)
    for f in trees.values():
        f.routing = "hard"

    def loss(m: torch.nn.Module, i: int) -> torch.Tensor:
        x, t = batches[i], target[i]
        if ad.causal_lm:
            return F.kl_div(F.log_softmax(m(x).logits.float(), -1).flatten(0, 1), F.log_softmax(t.float(), -1).flatten(0, 1), log_target=True,
                            reduction="batchmean")
        h = m(x).last_hidden_state
        return ((h - t) ** 2).mean() / t.var() + (1 - F.cosine_similarity(h.mean(1), t.mean(1), dim=-1)).mean()

    try:
        res = fit(model, loss, list(range(len(batches))), epochs=epochs, lr=lr, params=[q for f in trees.values() for q in f.parameters()],
                  desc="FFF end to end", progress=progress, checkpoint=str(path) + ".train", deadline=b.deadline())
        model.eval()
        if _is_main():
            save_fff(model, path)
    finally:
        revert_(model)
        Path(str(path) + ".train").unlink(missing_ok=True)
    info = {"method": "fast_feedforward", "model": model_name, "checkpoint": str(path), "depth": depth, "modules": len(errs),
            "distill_rel_error": errs, "end_to_end_steps": res.steps, "end_to_end_loss": res.mean_loss, "stopped_early": res.stopped_early,
            "train_tokens": int(wins.numel()), "seconds": time.perf_counter() - t0}
    if _is_main():
        _write_json(_sidecar(path), info)
    return info


# -- the demo's fits -------------------------------------------------------------------------------
DEMO_GATE_TARGET = 0.25


def demo_fits(model_name: str, model: torch.nn.Module, tokenizer: Any, *, quick: bool = False, progress: bool = True) -> list[str]:
    """Fast default fits for ``lazyneuron demo``, run on first use and cached like any fit (a few
    minutes on 2 cores): for a Llama-family causal LM, exit heads (closed-form lens, 24 x 256 news
    tokens, threshold for at most 20% of tokens decoding differently) and gates at 25% (the static
    greedy mask, then one swap-search round per domain on news and Austen); for a model with plain
    two-layer FFNs, FFF trees (depth 8). Returns one line per fit that ran, saying what and how
    long. ``quick``: smaller fits (smoke runs)."""
    ad = get_adapter(model)
    notes: list[str] = []
    family = _stack_family(model)
    if tokenizer is None:
        return ["no fits: the model has no tokenizer"]
    if ad.causal_lm and family == "llama":
        if fitted_checkpoint("early_exit", model_name) is None:
            # the demo's operating point: at most 20% of tokens decode differently from dense
            kw = dict(train_windows=4, cal_windows=2, epochs=3, steps=3, budget=1) if quick else dict(train_windows=24, cal_windows=8, epochs=30, steps=8, budget=3)
            kw["agreement_loss"] = 0.2
            info = fit_exits(model, tokenizer, model_name, progress=progress, **kw)  # type: ignore[arg-type]
            notes.append(f"fitted exit heads ({info['seconds']:.0f} s, cached): threshold {info['threshold']:.3g} keeps top-1 agreement "
                         f"{info['calibration_agreement']:.2f} on calibration text (`lazyneuron fit exits` for a longer fit)")
        if fitted_checkpoint("module_gating", model_name) is None:
            domains = {"news": "news"}
            try:
                data.windows(tokenizer, "austen", "train", 16, 1)
                domains["austen"] = "austen"
            except Exception as e:  # not fetched: news alone
                log.info("demo gates without the austen context: %s", e)
            kw = dict(order_windows=1, search_windows=1, heldout_windows=1, budget=1) if quick else dict(order_windows=2, search_windows=4, heldout_windows=2, budget=4)
            info = fit_gates(model, tokenizer, model_name, {"domain": domains}, DEMO_GATE_TARGET, rounds=1, progress=progress, **kw)  # type: ignore[arg-type]
            notes.append(f"fitted gates skipping {info['skipped_modules']} of {info['modules']} modules per context {list(domains)} "
                         f"({info['seconds']:.0f} s, cached; `lazyneuron fit gates` for a longer search)")
    elif ad.family in ("bert", "gpt2") and fitted_checkpoint("fast_feedforward", model_name) is None:
        kw = dict(windows=16, distill_steps=10, epochs=1, budget=1) if quick else dict(windows=160, distill_steps=200, epochs=2, budget=4)
        info = fit_fff(model, tokenizer, model_name, depth=8, progress=progress, **kw)  # type: ignore[arg-type]
        notes.append(f"fitted FFF trees of depth 8 for {info['modules']} FFNs ({info['seconds']:.0f} s, cached; `lazyneuron fit fff` for a longer fit)")
    return notes


# -- finding fitted checkpoints ----------------------------------------------------------------------
FITTED = ("module_gating", "early_exit", "fast_feedforward")


def fitted_checkpoint(method: str, model_name: str) -> dict[str, Any] | None:
    """The settings that point ``method`` at this model's fitted checkpoint (for a config given
    without ``checkpoint=``), or None when there is none: early exit takes its calibrated
    threshold too; module gating the most recently fitted gates."""
    from .methods.early_exit import default_lm_exits_path
    from .methods.fff import default_fff_path
    from .methods.gating import default_gates_path

    if method == "early_exit":
        p = Path(default_lm_exits_path(model_name))
        if not p.exists():
            return None
        t = p.with_suffix(".thresholds.json")
        thr = json.loads(t.read_text()).get("learned") if t.exists() else None
        return {"checkpoint": str(p), **({"threshold": float(thr)} if thr is not None else {})}
    if method == "fast_feedforward":
        p = Path(default_fff_path(model_name))
        return {"checkpoint": str(p)} if p.exists() else None
    if method == "module_gating":
        probe = Path(default_gates_path(model_name, 0.25, "fit"))
        found = [f for f in glob.glob(str(probe.with_name(probe.name.replace("-fit-25", "-*")))) if not f.endswith((".init.safetensors", ".train"))]
        found = [f for f in found if f.endswith(".safetensors")]
        return {"checkpoint": max(found, key=os.path.getmtime)} if found else None
    return None


def fit_command(method: str, model_name: str) -> str:
    what = {"module_gating": "gates", "early_exit": "exits", "fast_feedforward": "fff"}[method]
    return f"lazyneuron fit {what} --model {model_name}"
