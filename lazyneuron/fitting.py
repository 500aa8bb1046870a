"""Fitting the methods that learn something, on any supported model: what ``lazyneuron fit`` runs.

- :func:`fit_exits`: early-exit heads of a causal LM (a tuned lens per exit, fitted in closed
  form, and a learned exit score), then the exit threshold that keeps top-1 agreement with the
  dense model within a budget on calibration text.
- :func:`fit_gates`: context-aware module gates. On a causal LM: the static greedy mask at the
  target (modules removed one by one, the one that raises the next-token loss least first), then
  per context value that mask improved on the value's own text by swap search and kept only where
  it helps on the value's calibration text; optionally Gumbel-Softmax training from there, kept
  only if it lowers the loss on calibration windows no search read. Reported held-out losses are
  on test text. (Encoder
  classifiers: ``train_gates``, see docs/gating.md.)
- :func:`fit_fff`: fast-feedforward trees for plain two-layer FFNs (BERT, GPT-2): layer-wise
  distillation, then all trees end to end.

Every fit reads text from a built-in corpus or the user's own files (:mod:`lazyneuron.data`: a
path where a corpus name goes), writes a safetensors checkpoint where ``bench`` and ``demo`` find
it (:func:`lazyneuron.models.checkpoint_key`) with a JSON sidecar of what it did and measured,
stops at ``budget`` minutes keeping the best result so far, and resumes: the steps it finished
(greedy order, per-context searches, training steps) are cached next to the checkpoint, and a
budget-cut greedy order or search is cached as partial and continued by the next run. Training
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


def _sync() -> None:
    """Under torchrun, wait until every rank is here (rank 0 has written what the others read next)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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
    _sync()  # every rank reads the heads back next
    pick = calibrate_lm_threshold(model, str(path), cal_w, agreement_loss, steps=steps, progress=progress, deadline=b.deadline())
    info.update({"threshold": min(float(pick["threshold"]), 2.0), "calibration_agreement": pick["quality"], "mean_layers": pick["mean_layers"],
                 "num_layers": n, "seconds": time.perf_counter() - t0, "checkpoint": str(path)})
    if pick["threshold"] > 1:
        info["note"] = "no threshold tried kept the agreement budget on calibration text: the heads never exit (raise agreement_loss or fit on more text)"
    if _is_main():
        _write_json(path.with_suffix(".thresholds.json"), {"learned": info["threshold"], **{k: v for k, v in info.items() if k != "threshold"}})
    return info


# -- module gating ---------------------------------------------------------------------------------
def fit_classifier_exits(clf: torch.nn.Module, tokenizer: Any, model_name: str, task: str, *, epochs: int = 40, progress: bool = True) -> Path:
    """Exit heads for a classifier fine-tuned on ``task`` (backbone frozen, trained on the task's
    train rows), cached where the planner and ``bench`` find them for ``model_name`` (e.g.
    ``minilm-l6-mr``). Returns the checkpoint path."""
    from . import tasks
    from .methods.early_exit import default_lm_exits_path, train_classifier_exits

    out = default_lm_exits_path(model_name)
    train = tasks.make_batches(tokenizer, data.labeled(task, "train"), 64, seed=0)
    heads = train_classifier_exits(clf, train, epochs=epochs, progress=progress)
    if _is_main():
        heads.save(out)
    return out


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
    from .methods.gating import GatePredictor, MaskScorer, model_type_of, static_greedy_order, swap_search

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
    changed = not path.exists()  # the checkpoint is rewritten only when what it holds changes (never over gates trained on the same masks)
    # 1. the static greedy mask on calibration text of every source (shared by all contexts); a budget-cut order is continued
    if "order" not in state or state.get("order_greedy", k) < k:
        per = max(1, order_windows // len(sources))
        wins = torch.cat([data.windows(tokenizer, s, "calibration", length, per, spread=True) for s in sources])
        shortlist = 0 if 2 * n <= 24 else min(2 * n, max(k + 8, 2 * k))
        old = state.get("order")
        done = [tuple(x) for x in old[: state.get("order_greedy", len(old))]] if old else []
        stats: dict[str, Any] = {}
        order = static_greedy_order(model, wins, k, score_from=prompt, progress=progress, shortlist=shortlist, deadline=budget.deadline(0.4),
                                    start=done, stats=stats)
        state.update(order=[list(x) for x in order], order_greedy=stats["greedy_steps"], order_windows_tokens=int(wins.numel()))
        if stats["greedy_steps"] < k:
            log.info("fit gates: time budget reached after %d of %d greedy steps; cached as partial, a rerun continues the order", stats["greedy_steps"], k)
        if old is None or not torch.equal(_keep_from(old, k, n), _keep_from(state["order"], k, n)):
            state["search"] = {}  # searched from another static mask: start over
            changed = True
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
        state.pop("training", None)  # the checkpoint now holds searched masks, not trained gates
        if _is_main():
            pred.save(path)
            _write_json(side, state)
        _sync()  # every rank reads the checkpoint next (training)

    if changed:
        save()
    # 2. per context value: the static mask improved on that value's own text, kept where it helps held out;
    # a budget-cut search is cached as partial (with the masks it went through) and continued by a rerun
    state.setdefault("search", {})
    todo = [v for v in values if v not in state["search"] or state["search"][v].get("partial")]
    for i, v in enumerate(todo):
        if budget.passed():
            log.info("fit gates: time budget reached; %d of %d context values keep the static mask or a partial search", len(todo) - i, len(values))
            break
        src = values[v]
        search = data.windows(tokenizer, src, "train", length, search_windows, spread=True)
        held = data.windows(tokenizer, src, "calibration", length, heldout_windows, spread=True)
        walked = [torch.tensor(m).bool() for m in state["search"].get(v, {}).get("path", [])] or [static]
        stats = {}
        res = swap_search(model, search, walked[-1], score_from=prompt, rounds=rounds - (len(walked) - 1), progress=progress,
                          desc=f"mask search {key}={v}", deadline=budget.deadline(1.0 / (len(todo) - i)), stats=stats)
        walked += res.masks[1:]
        sel = MaskScorer(model, held, prompt)  # of the start and each accepted swap, the mask best on the value's calibration text
        losses = [sel.loss(m) for m in walked]
        best = min(range(len(losses)), key=losses.__getitem__)
        state["search"][v] = {"keep": walked[best].int().tolist(), "heldout_loss_static": losses[0], "heldout_loss": losses[best], "swaps": best}
        if stats["stopped_early"]:
            state["search"][v].update(partial=True, path=[m.int().tolist() for m in walked])
        save()
    # held-out next-token loss on test text (windows no choice above saw): dense against the fitted masks, per source
    report = {}
    with torch.no_grad():
        for v, src in (values.items() if values else [(corpus, corpus)]):
            held = data.windows(tokenizer, src, "test", length, heldout_windows, spread=True)
            sc = MaskScorer(model, held, prompt)
            dense = sc.loss(torch.ones_like(static))
            mine = torch.tensor(state["search"][v]["keep"]).bool() if v in state["search"] else static
            report[v] = {"dense_loss": dense, "static_loss": sc.loss(static), "fitted_loss": sc.loss(mine)}
    info = {"method": "module_gating", "model": model_name, "checkpoint": str(path), "target": target, "skipped_modules": k, "modules": 2 * n,
            "context_key": key, "contexts": list(values), "searched": sorted(v for v, r in state["search"].items() if not r.get("partial")),
            "partial": sorted(v for v, r in state["search"].items() if r.get("partial")), "partial_order": state.get("order_greedy", k) < k,
            "heldout": report, "heldout_split": "test", "seconds": time.perf_counter() - t0}
    trained = state.get("training")
    if train_steps > 0 and trained is not None and trained["steps"] == train_steps:
        info["training"] = trained  # cached: this training ran on these masks (the checkpoint holds its gates when kept)
    elif train_steps > 0 and not budget.passed():
        if trained is not None:
            save()  # train from the searched masks, not from gates trained before
        state["training"] = info["training"] = _train_from(model, tokenizer, path, contexts, target, prompt=prompt, length=length, steps=train_steps,
                                                           budget=budget, progress=progress, corpus=corpus)
    elif trained is not None and trained["kept"]:
        info["training"] = trained  # the checkpoint holds these trained gates
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
            # the opening windows of the calibration split: the searches read windows spread from an
            # eighth of the way in, and the test split stays for reporting only
            w = data.windows(tokenizer, src, "calibration", length, 4)
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
QUICK_TAG = "quick"  # in the names of the checkpoints ``demo --quick`` fits


def demo_fits(model_name: str, model: torch.nn.Module, tokenizer: Any, *, quick: bool = False, progress: bool = True) -> list[str]:
    """Fast default fits for ``lazyneuron demo``, run on first use and cached like any fit (a few
    minutes on 2 cores): for a Llama-family causal LM, exit heads (closed-form lens, 24 x 256 news
    tokens, threshold for at most 20% of tokens decoding differently) and gates at 25% (the static
    greedy mask, then one swap-search round per domain on news and Austen); for a model with plain
    two-layer FFNs, FFF trees (depth 8). Returns one line per fit that ran, saying what and how
    long. ``quick``: smaller fits (smoke runs), cached under names of their own
    (:func:`demo_checkpoint_path`). A fit that fails is logged and noted, and its partial
    checkpoint removed: the demo goes on without that method's rows."""
    ad = get_adapter(model)
    notes: list[str] = []
    family = _stack_family(model)
    if tokenizer is None:
        return ["no fits: the model has no tokenizer"]

    def attempt(method: str, run: Any) -> None:
        out = demo_checkpoint_path(method, model_name, quick)
        try:
            notes.append(run(out))
        except Exception as e:  # noqa: BLE001 -- one method's failed fit must not end the demo
            log.warning("demo: fitting %s for %s failed (%s: %s); the demo goes on without its rows. `%s` fits it and shows the full error",
                        method, model_name, type(e).__name__, e, fit_command(method, model_name))
            notes.append(f"{method}: the demo's fit failed ({type(e).__name__}: {e}), so it has no rows; run `{fit_command(method, model_name)}` to fit it")
            if _is_main():
                out.unlink(missing_ok=True)  # no half-fitted checkpoint for this demo (or a later one) to pick up

    if ad.causal_lm and family == "llama":
        if fitted_checkpoint("early_exit", model_name, quick=quick) is None:
            def exits(out: Path) -> str:
                # the demo's operating point: at most 20% of tokens decode differently from dense
                kw = dict(train_windows=4, cal_windows=2, epochs=3, steps=3, budget=1) if quick else dict(train_windows=24, cal_windows=8, epochs=30, steps=8, budget=3)
                kw["agreement_loss"] = 0.2
                info = fit_exits(model, tokenizer, model_name, progress=progress, out=out, **kw)  # type: ignore[arg-type]
                return (f"fitted exit heads ({info['seconds']:.0f} s, cached): threshold {info['threshold']:.3g} keeps top-1 agreement "
                        f"{info['calibration_agreement']:.2f} on calibration text (`lazyneuron fit exits` for a longer fit)")

            attempt("early_exit", exits)
        if fitted_checkpoint("module_gating", model_name, quick=quick) is None:
            def gates(out: Path) -> str:
                domains = {"news": "news"}
                try:
                    data.windows(tokenizer, "austen", "train", 16, 1)
                    domains["austen"] = "austen"
                except Exception as e:  # not fetched: news alone
                    log.info("demo gates without the austen context: %s", e)
                kw = dict(order_windows=1, search_windows=1, heldout_windows=1, budget=1) if quick else dict(order_windows=2, search_windows=4, heldout_windows=2, budget=4)
                info = fit_gates(model, tokenizer, model_name, {"domain": domains}, DEMO_GATE_TARGET, rounds=1, progress=progress, out=out, **kw)  # type: ignore[arg-type]
                return (f"fitted gates skipping {info['skipped_modules']} of {info['modules']} modules per context {list(domains)} "
                        f"({info['seconds']:.0f} s, cached; `lazyneuron fit gates` for a longer search)")

            attempt("module_gating", gates)
    elif ad.family in ("bert", "gpt2") and fitted_checkpoint("fast_feedforward", model_name, quick=quick) is None:
        def fff(out: Path) -> str:
            kw = dict(windows=16, distill_steps=10, epochs=1, budget=1) if quick else dict(windows=160, distill_steps=200, epochs=2, budget=4)
            info = fit_fff(model, tokenizer, model_name, depth=8, progress=progress, out=out, **kw)  # type: ignore[arg-type]
            return f"fitted FFF trees of depth 8 for {info['modules']} FFNs ({info['seconds']:.0f} s, cached; `lazyneuron fit fff` for a longer fit)"

        attempt("fast_feedforward", fff)
    return notes


# -- finding fitted checkpoints ----------------------------------------------------------------------
FITTED = ("module_gating", "early_exit", "fast_feedforward")


def demo_checkpoint_path(method: str, model_name: str, quick: bool = False) -> Path:
    """Where ``lazyneuron demo`` caches its fit of ``method`` for this model: the default
    checkpoint (where ``bench`` looks), or for ``demo --quick`` one of its own (``-quick`` in the
    name), so a full demo never takes the smaller fits of a quick run."""
    from .methods.early_exit import default_lm_exits_path
    from .methods.fff import default_fff_path
    from .methods.gating import default_gates_path

    if method == "module_gating":
        return Path(default_gates_path(model_name, DEMO_GATE_TARGET, QUICK_TAG if quick else "fit"))
    p = Path({"early_exit": default_lm_exits_path, "fast_feedforward": default_fff_path}[method](model_name))
    return p.with_name(p.name.removesuffix(".safetensors") + f"-{QUICK_TAG}.safetensors") if quick else p


def fitted_checkpoint(method: str, model_name: str, *, quick: bool = False) -> dict[str, Any] | None:
    """The settings that point ``method`` at this model's fitted checkpoint (for a config given
    without ``checkpoint=``), or None when there is none: early exit takes its calibrated
    threshold too; module gating the most recently fitted gates. Fits of ``demo --quick`` count
    only with ``quick`` (and only where there is no full fit)."""
    from .models import checkpoint_key

    if method in ("early_exit", "fast_feedforward"):
        paths = [demo_checkpoint_path(method, model_name)] + ([demo_checkpoint_path(method, model_name, True)] if quick else [])
        p = next((x for x in paths if x.exists()), None)
        if p is None:
            return None
        if method == "fast_feedforward":
            return {"checkpoint": str(p)}
        t = p.with_suffix(".thresholds.json")
        thr = json.loads(t.read_text()).get("learned") if t.exists() else None
        return {"checkpoint": str(p), **({"threshold": float(thr)} if thr is not None else {})}
    if method == "module_gating":
        probe = demo_checkpoint_path(method, model_name)
        key = checkpoint_key(model_name)
        found = [f for f in glob.glob(glob.escape(str(probe.parent / key)) + ".gates-*.safetensors")
                 if not f.endswith(".init.safetensors") and not Path(f).name.startswith(f"{key}.gates-{QUICK_TAG}-")]
        if found:
            return {"checkpoint": max(found, key=os.path.getmtime)}
        q = demo_checkpoint_path(method, model_name, True)
        return {"checkpoint": str(q)} if quick and q.exists() else None
    return None


def fit_command(method: str, model_name: str) -> str:
    what = {"module_gating": "gates", "early_exit": "exits", "fast_feedforward": "fff"}[method]
    return f"lazyneuron fit {what} --model {model_name}"
