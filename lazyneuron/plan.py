"""``lazyneuron.plan``: the fastest combination of methods that stays within a quality budget.

The candidate space comes from the registry: every method declares its knobs as axes of settings
from weakest to strongest (:meth:`~lazyneuron.methods.base.Method.plan_axes`), the runtime's axis
is the weight format every candidate runs on, and a candidate takes at most one point per axis
from axes that can share the model (:func:`lazyneuron.api.check_compose`). The search:

1. walks each axis alone on the first rung (few calibration windows, a short timing), stopping
   once past every budget;
2. predicts combinations from those singles (quality losses add, in log perplexity for a
   perplexity budget; time fractions multiply) and measures the fastest predicted to fit each
   budget, then their neighbours one step along an axis;
3. promotes, rung after rung (more windows, more timing repeats), only the fastest candidates
   that still meet a budget (successive halving), the best single methods among them;

and picks, per budget, the fastest candidate that meets it on the highest rung it reached. Speed
is the ratio of decode tokens/s (an encoder: sentences/s) to the dense model's, timed interleaved
with a copy of the dense model in the same process. Quality: perplexity or top-1 agreement with
the dense model on calibration windows (a causal LM), or accuracy on the task's calibration rows (a
:class:`~lazyneuron.tasks.TextClassifier`). :func:`verify` then measures the choice, the best
single method and the dense model on the **test** split with the benchmark harness.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import re
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import get_adapter
from .api import applied, calibrate, check_compose
from .config import MethodConfig, registry
from .errors import ConfigError, LazyNeuronError
from .surgery import quiet_applies

log = logging.getLogger(__name__)

METRICS = {"ppl": "perplexity increase, % (ppl:+5%)", "agree": "top-1 agreement with the dense model, at least (agree:0.95)",
           "acc": "accuracy drop, points (acc:-0.5; a lazyneuron.tasks.TextClassifier)"}


class PlanError(LazyNeuronError):
    """The planner found no setting that meets a budget, or cannot plan this model."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """A quality budget: ``ppl`` (largest perplexity increase, %), ``acc`` (largest accuracy drop,
    points) or ``agree`` (smallest top-1 agreement with the dense model). Each is read as a loss
    ≥ 0 against a ``limit``: the % increase, the points dropped, the % of tokens that disagree."""

    metric: str
    limit: float
    text: str

    @classmethod
    def parse(cls, text: str) -> "Budget":
        name, _, raw = text.strip().partition(":")
        name = name.strip().lower()
        if name not in METRICS:
            raise ConfigError(f"unknown budget metric {name!r} in {text!r}; use one of: " + "; ".join(f"{k}: {v}" for k, v in METRICS.items()))
        m = re.fullmatch(r"\s*([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*(%?)\s*", raw)
        if not m:
            raise ConfigError(f"cannot read the value of budget {text!r}; write e.g. ppl:+5%, acc:-0.5 or agree:0.95")
        v = float(m.group(1))
        if name == "ppl":
            limit = v  # % increase
        elif name == "acc":
            limit = -v if v < 0 else v  # points dropped; "acc:-0.5" and "acc:0.5" both mean at most 0.5 points lost
        else:
            frac = v / 100 if m.group(2) else v
            if not 0 < frac <= 1:
                raise ConfigError(f"agreement budget {text!r} must be a fraction in (0, 1] (agree:0.95) or a percentage (agree:95%)")
            limit = 100 * (1 - frac)
        if limit < 0:
            raise ConfigError(f"budget {text!r} asks for better quality than the dense model's; no method can meet it (use e.g. ppl:+5%)")
        return cls(name, limit, f"{name}:{raw.strip()}")

    def loss(self, q: dict[str, float], dense: dict[str, float]) -> float:
        if self.metric == "ppl":
            return 100 * (math.exp(q["nll"] - dense["nll"]) - 1)
        if self.metric == "acc":
            return 100 * (dense["acc"] - q["acc"])
        return 100 * (1 - q["agree"])

    def combine(self, losses: Sequence[float]) -> float:
        """Predicted loss of a combination from its parts' losses (perplexity ratios multiply)."""
        if self.metric == "ppl":
            return 100 * (math.prod(1 + max(x, 0.0) / 100 for x in losses) - 1)
        return sum(max(x, 0.0) for x in losses)


@dataclasses.dataclass
class Candidate:
    points: tuple[tuple[int, int], ...]  # (axis, level), the runtime axis included
    configs: list[MethodConfig]
    quality: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # rung -> quality
    speed: list[float] = dataclasses.field(default_factory=list)  # paired speed ratios to dense
    error: str = ""

    @property
    def rung(self) -> int:
        return max(self.quality) if self.quality else -1

    @property
    def speedup(self) -> float:
        return float(torch.tensor(self.speed).median()) if self.speed else float("nan")

    @property
    def methods(self) -> list[str]:
        return [c.name for c in self.configs if c.name != "runtime"]

    @property
    def single(self) -> bool:
        """At most one method (on any runtime format; one method over several targets counts once)."""
        return len(set(self.methods)) <= 1


_SHOWN = {"rule", "sparsity", "experts", "top_k", "dtype", "threshold"}  # written even at their defaults


def spec(configs: Sequence[MethodConfig]) -> str:
    """The configs as the string ``lazyneuron bench --method`` and :func:`parse_spec` read:
    ``method:key=value,... + method:...`` (settings at their defaults left out)."""
    parts = []
    for c in configs:
        d = c.to_dict()
        defaults = {f.name: f.default for f in dataclasses.fields(type(c)) if f.default is not dataclasses.MISSING}
        kv = []
        for k, v in d.items():
            if k == "method" or (k in defaults and (tuple(v) if isinstance(v, list) else v) == defaults[k] and k not in _SHOWN):
                continue
            if isinstance(v, float) and math.isnan(v):
                continue
            kv.append(f"{k}={'|'.join(map(str, v)) if isinstance(v, list) else v}")
        parts.append(c.name + (":" + ",".join(kv) if kv else ""))
    return " + ".join(parts)


def split_spec(text: str) -> list[str]:
    """The parts of a combination written ``a:k=v,... + b:k=v`` (one part without ``+``)."""
    parts = [p.strip() for p in re.split(r"\s*\+\s*(?=[A-Za-z_]+(?::|\s*$|\s*\+))", text.strip()) if p.strip()]
    if not parts:
        raise ConfigError(f"empty method combination {text!r}; write e.g. 'activation_sparsity:sparsity=0.3 + runtime:dtype=bf16'")
    return parts


def parse_spec(text: str) -> list[MethodConfig]:
    """Read a combination written ``a:k=v,... + b:k=v`` (what :func:`spec` writes)."""
    return [MethodConfig.parse(p) for p in split_spec(text)]


@dataclasses.dataclass
class Settings:
    """What the search measures with. ``rungs``: calibration windows (causal LM, ``length``
    tokens each) or rows (classifier) per rung, and timing repeats per rung."""

    corpus: str = "news"
    task: str | None = None  # a classifier's labelled corpus (mr, rt, tweets)
    length: int = 256
    windows: tuple[int, ...] = (3, 8, 16)
    rows: tuple[int, ...] = (300, 700, 2000)
    repeats: tuple[int, ...] = (3, 5, 7)
    new_tokens: int = 12
    prompt_tokens: int = 64
    calib_texts: int = 24
    batch_size: int = 32
    timing_batches: int = 4
    combos_per_budget: int = 4
    promote: tuple[int, ...] = (4, 2)  # candidates promoted per budget to rung 1, 2, ...
    max_axes: int = 3  # method axes in one combination (the runtime's besides)
    tie: float = 0.03  # speeds closer than this are a tie, which the simpler configuration wins
    min_speedup: float = 1.05  # a choice must beat dense by this much in the search's timing (paired ratios on a 2-core host spread by ~5-20%)


def quick_settings(**kw: Any) -> Settings:
    """Small sizes for smoke runs and tests."""
    base = dict(length=64, windows=(2, 3), rows=(64, 128), repeats=(1, 2), new_tokens=4, prompt_tokens=8, calib_texts=4, timing_batches=2,
                combos_per_budget=2, promote=(2,))
    base.update(kw)
    return Settings(**base)


@dataclasses.dataclass
class Choice:
    budget: Budget
    candidate: Candidate | None
    best_single: Candidate | None
    reason: str = ""
    duel: float | None = None  # the best combination's speed over the best single method's, timed head to head in the search
    best_combination: Candidate | None = None  # the fastest of two or more methods that meets the budget

    @property
    def spec(self) -> str:
        return spec(self.candidate.configs) if self.candidate is not None else ""


@dataclasses.dataclass
class PlanResult:
    choices: list[Choice]
    candidates: list[Candidate]
    axes: list[list[MethodConfig]]
    dense: dict[int, dict[str, float]]
    budgets: list[Budget]
    seconds: float
    kind: str  # "lm" | "classifier"
    settings: Settings
    calibration: Any = None
    base: str = "dense"  # what the search's speed ratios are against

    def loss(self, c: Candidate, b: Budget, rung: int | None = None) -> float:
        r = c.rung if rung is None else rung
        return b.loss(c.quality[r], self.dense[r])

    def front(self, b: Budget) -> list[Candidate]:
        """Candidates no other beats on both speed and ``b``'s loss (each at its highest rung)."""
        ok = [c for c in self.candidates if c.quality and c.speed]
        return [c for c in ok if not any(o is not c and o.speedup >= c.speedup and self.loss(o, b) <= self.loss(c, b)
                                         and (o.speedup > c.speedup or self.loss(o, b) < self.loss(c, b)) for o in ok)]


# -- the model kinds ----------------------------------------------------------------------
class _LM:
    """Quality (per-window NLL, top-1 agreement) and decode speed of a causal LM."""

    kind = "lm"

    def __init__(self, model: nn.Module, tok: Any, s: Settings, need_agree: bool) -> None:
        from . import data

        self.model, self.s = model, s
        self.wins = data.windows(tok, s.corpus, "calibration", s.length, max(s.windows), spread=True)
        self.prompt = data.windows(tok, s.corpus, "calibration", s.prompt_tokens, 1)
        self.ref: list[torch.Tensor] | None = None
        if need_agree:
            with torch.inference_mode():
                self.ref = [self._logits(w).argmax(-1) for w in self.wins]

    def calib_data(self, tok: Any) -> Any:
        from . import data

        return list(data.windows(tok, self.s.corpus, "calibration", 2 * self.s.length, self.s.calib_texts).split(1))

    def _logits(self, w: torch.Tensor) -> torch.Tensor:
        from .bench.quality import window_logits

        return window_logits(self.model, w).float()

    @torch.inference_mode()
    def quality(self, rung: int) -> dict[str, float]:
        nll, n, agree = [], 0, 0.0
        for i, w in enumerate(self.wins[: self.s.windows[rung]]):
            lg = self._logits(w)
            nll.append(F.cross_entropy(lg[:-1], w[1:], reduction="sum").item())
            n += w.numel() - 1
            if self.ref is not None:
                agree += (lg.argmax(-1) == self.ref[i]).float().sum().item()
        q = {"nll": sum(nll) / n, "ppl": math.exp(sum(nll) / n)}
        if self.ref is not None:
            q["agree"] = agree / (len(nll) * self.wins.shape[1])
        return q

    def speed(self, model: nn.Module) -> float:
        from .bench.timing import decode_tps

        return decode_tps(model, self.prompt, self.s.new_tokens)


class _Classifier:
    """Accuracy and sentences/s of a :class:`~lazyneuron.tasks.TextClassifier` on a task."""

    kind = "classifier"

    def __init__(self, model: nn.Module, tok: Any, s: Settings) -> None:
        from . import data, tasks

        self.model, self.s = model, s
        rows = tasks.subsample(data.labeled(s.task, "calibration"), max(s.rows), seed=0)
        self.n = [min(r, len(rows)) for r in s.rows]
        self.batches = [tasks.make_batches(tok, rows[:n], s.batch_size, sort=True) for n in self.n]
        self.timing = tasks.make_batches(tok, rows[: s.batch_size * s.timing_batches], s.batch_size, seed=1)
        self.texts = [t for t, _ in rows]

    def calib_data(self, tok: Any) -> list[str]:
        return self.texts[: max(self.s.calib_texts * 8, 64)]

    def quality(self, rung: int) -> dict[str, float]:
        from . import tasks

        return {"acc": tasks.accuracy(self.model, self.batches[rung]), "rows": float(self.n[rung])}

    def speed(self, model: nn.Module) -> float:
        from . import tasks

        return tasks.sentences_per_s(model, self.timing, warmup=1)


# -- the search ---------------------------------------------------------------------------
def plan_axes(model: nn.Module, model_name: str | None = None, methods: Sequence[str] | None = None,
              exclude: Sequence[str] = ()) -> tuple[list[list[MethodConfig]], int]:
    """Every registered method's axes that this model accepts, and the index of the runtime's."""
    reg = registry()
    if methods is not None:
        bad = sorted(set(methods) - set(reg))
        if bad:
            raise ConfigError(f"unknown method(s) {bad}; registered: {sorted(reg)}")
    axes: list[list[MethodConfig]] = []
    rt = -1
    for name, meth in sorted(reg.items()):
        if (methods is not None and name not in methods and meth.stage != 2) or name in exclude:
            continue
        for axis in meth.plan_axes(model, model_name):
            if not axis:
                continue
            try:
                check_compose(model, [axis[-1]])
            except LazyNeuronError as e:
                log.info("planner leaves out %s: %s", name, e)
                continue
            if meth.stage == 2:
                rt = len(axes)
            axes.append(list(axis))
    if rt < 0:
        from .runtime import RuntimeConfig

        rt = len(axes)
        axes.append([RuntimeConfig()])
    return axes, rt


class _Search:
    def __init__(self, model: nn.Module, kind: Any, axes: list[list[MethodConfig]], rt: int, budgets: list[Budget], s: Settings,
                 cal: Any, deadline: float, base_cfgs: list[MethodConfig] | None, progress: bool) -> None:
        self.model, self.kind, self.axes, self.rt, self.budgets, self.s = model, kind, axes, rt, budgets, s
        self.cal, self.deadline, self.progress = cal, deadline, progress
        self.cands: dict[tuple[tuple[int, int], ...], Candidate] = {}
        self.dense: dict[int, dict[str, float]] = {}
        self.base = copy.deepcopy(model)  # the dense model timed beside every candidate
        self.base_cfgs = base_cfgs
        if base_cfgs:
            from .api import apply_

            apply_(self.base, base_cfgs)
        self.bar = None
        self.limit = max(b.limit for b in budgets)
        self.duels: dict[Any, float] = {}
        self.end = deadline  # the search's hard end (plan() sets it past the phases' deadline)

    # -- measuring --
    def dense_quality(self, rung: int) -> dict[str, float]:
        if rung not in self.dense:
            self.dense[rung] = self.kind.quality(rung)
        return self.dense[rung]

    def candidate(self, points: tuple[tuple[int, int], ...]) -> Candidate:
        key = tuple(sorted(points))
        if key not in self.cands:
            self.cands[key] = Candidate(key, [self.axes[a][i] for a, i in key])
        return self.cands[key]

    def evaluate(self, c: Candidate, rung: int) -> bool:
        """Quality at ``rung`` and timing repeats up to that rung's count; False once out of time."""
        if c.error or (rung in c.quality and len(c.speed) >= self.s.repeats[rung]):
            return True
        if time.monotonic() > self.deadline:
            return False
        dq = self.dense_quality(rung)
        try:
            with applied(self.model, c.configs, self.cal):
                c.quality[rung] = self.kind.quality(rung)
                while len(c.speed) < self.s.repeats[rung]:
                    b = self.kind.speed(self.base)
                    x = self.kind.speed(self.model)
                    c.speed.append(x / b)
        except LazyNeuronError as e:  # the combination cannot share this model after all
            c.error = str(e)
            log.info("candidate %s: %s", spec(c.configs), e)
        if self.bar is not None:
            self.bar.update(1)
            if c.quality.get(rung):
                self.bar.set_postfix_str(f"{spec(c.configs)[:60]} {c.speedup:.2f}x " + ", ".join(f"{b.text}={b.loss(c.quality[rung], dq):+.1f}" for b in self.budgets[:2]))
        return True

    def loss(self, c: Candidate, b: Budget, rung: int | None = None) -> float:
        r = c.rung if rung is None else rung
        return b.loss(c.quality[r], self.dense[r]) if r in c.quality else math.inf

    def ok(self, c: Candidate, b: Budget, rung: int | None = None) -> bool:
        return not c.error and bool(c.quality) and self.loss(c, b, rung) <= b.limit

    # -- phases --
    def singles(self) -> None:
        """Each axis alone (on the exact runtime), weakest first, until past every budget; the
        runtime's formats alone."""
        for i in range(len(self.axes[self.rt])):
            if [self.axes[self.rt][i]] == self.base_cfgs:
                continue  # the dense model itself
            if not self.evaluate(self.candidate(((self.rt, i),)), 0):
                return
        active = [a for a in range(len(self.axes)) if a != self.rt]
        for i in range(max(len(ax) for ax in self.axes)):  # breadth first: every axis gets its weak settings measured within the time
            for a in list(active):
                if i >= len(self.axes[a]):
                    active.remove(a)
                    continue
                c = self.candidate(((a, i), (self.rt, 0)))
                if not self.evaluate(c, 0):
                    return
                if c.error or min(self.loss(c, b) - b.limit for b in self.budgets) > 0.5 * self.limit + 1.0:
                    active.remove(a)  # stronger settings only lose more

    def _single(self, a: int, i: int) -> Candidate | None:
        c = self.cands.get(tuple(sorted(((a, i), (self.rt, 0))))) if a != self.rt else self.cands.get(((self.rt, i),))
        return c if c is not None and c.quality and not c.error else None

    def _predict(self, points: tuple[tuple[int, int], ...], b: Budget) -> tuple[float, float] | None:
        """(loss, speed-up) of a combination from its parts measured alone: every method alone ran
        on the exact runtime, so each contributes its time relative to that, and the runtime's
        format its own (the dense model on the exact runtime: the base of a causal LM)."""
        rt0 = self._single(self.rt, 0)
        s0 = rt0.speedup if rt0 is not None else 1.0
        parts = [self._single(a, i) for a, i in points if not (a == self.rt and i == 0)]
        if any(p is None for p in parts):
            return None
        loss = b.combine([self.loss(p, b, 0) for p in parts if p is not None])
        frac = (1 / s0) * math.prod(s0 / p.speedup for p in parts if p is not None)
        return loss, 1 / frac

    def combos(self) -> None:
        """Combinations predicted from the singles; the fastest predicted to fit each budget."""
        useful = {a: [i for i in range(len(ax)) if (p := self._single(a, i)) is not None and any(self.loss(p, b, 0) <= b.limit * 1.2 + 0.5 for b in self.budgets)]
                  for a, ax in enumerate(self.axes)}
        method_axes = [a for a in useful if a != self.rt and useful[a]]
        groups = []
        for n in range(2, self.s.max_axes + 1):
            for g in itertools.combinations(method_axes, n):
                try:
                    check_compose(self.model, [self.axes[a][-1] for a in g])
                    groups.append(g)
                except LazyNeuronError:
                    continue
        preds: list[tuple[tuple[tuple[int, int], ...], dict[str, tuple[float, float]]]] = []
        rt_levels = sorted({0, *useful[self.rt]})
        for g in [(a,) for a in method_axes] + groups:
            for levels in itertools.product(*[useful[a] for a in g]):
                for r in rt_levels:
                    pts = tuple(zip(g, levels)) + ((self.rt, r),)
                    if len(pts) < 3 and r == 0:
                        continue  # a single on the exact runtime: measured already
                    pr = {b.text: self._predict(pts, b) for b in self.budgets}
                    if all(v is not None for v in pr.values()):
                        preds.append((pts, pr))  # type: ignore[arg-type]
        picked: list[tuple[tuple[int, int], ...]] = []
        for b in self.budgets:
            fit = sorted((p for p in preds if p[1][b.text][0] <= b.limit), key=lambda p: -p[1][b.text][1])
            n = 0
            for pts, _ in fit:
                key = tuple(sorted(pts))
                if key in self.cands and self.cands[key].quality:
                    continue
                picked.append(pts)
                n += 1
                if n >= self.s.combos_per_budget:
                    break
        for pts in dict.fromkeys(picked):
            if not self.evaluate(self.candidate(pts), 0):
                return

    def neighbours(self) -> None:
        """One step along each axis (the runtime's formats included) from the best candidate and
        the best combination of methods of each budget: a stronger setting where it has room, a
        weaker one where it is over."""
        todo = []
        for b in self.budgets:
            for best in {id(x): x for x in (self.top(b), self.top(b, "combination")) if x is not None}.values():
                for pts in self._steps(best):
                    todo.append(pts)
        for pts in dict.fromkeys(todo):
            if not self.evaluate(self.candidate(pts), 0):
                return

    def _steps(self, best: Candidate) -> list[tuple[tuple[int, int], ...]]:
        out = []
        if True:
            for k, (a, i) in enumerate(best.points):
                for j in (i - 1, i + 1):
                    if 0 <= j < len(self.axes[a]):
                        pts = best.points[:k] + ((a, j),) + best.points[k + 1:]
                        if tuple(sorted(pts)) not in self.cands and [self.axes[x][y] for x, y in pts] != self.base_cfgs:
                            out.append(pts)
        return out

    def top(self, b: Budget, which: str = "any") -> Candidate | None:
        """The current leader for ``b``: the fastest that meets it at the highest rung it was
        measured on, among the candidates confirmed on a second rung (more windows, more timings)
        where there are any. A candidate that failed on a higher rung is out; speeds are compared
        across rungs, each a median of ratios paired with the dense model."""
        ok = [c for c in self.cands.values() if c.quality and self.ok(c, b) and c.speedup >= self.s.min_speedup
              and (which == "any" or c.single == (which == "single"))]
        confirmed = [c for c in ok if c.rung >= 1]
        ok = confirmed or ok
        if not ok:
            return None
        fast = max(c.speedup for c in ok)  # speeds within `tie` of the fastest are a tie: the simplest configuration wins it
        return min((c for c in ok if c.speedup >= fast / (1 + self.s.tie)), key=lambda c: (len(c.configs), -c.speedup))

    def sharpen(self) -> None:
        """The time left goes to the close calls: per budget the candidates that meet it within
        10% of the leader's speed get more paired timings, two at a time, while time remains (at
        most four rounds)."""
        for _ in range(4):
            close: list[Candidate] = []
            for b in self.budgets:
                lead = self.top(b)
                if lead is None:
                    continue
                close += [c for c in self.cands.values() if c.quality and c.rung >= min(lead.rung, 1) and self.ok(c, b) and c.speedup >= 0.9 * lead.speedup]
            for c in {id(c): c for c in close}.values():
                if time.monotonic() > self.deadline:
                    return
                self.time_more(c, 2)

    def time_more(self, c: Candidate, n: int) -> None:
        with applied(self.model, c.configs, self.cal):
            for _ in range(n):
                b = self.kind.speed(self.base)
                c.speed.append(self.kind.speed(self.model) / b)
        if self.bar is not None:
            self.bar.update(1)

    def refine(self) -> None:
        """While time is left: step from the current best of each budget, promote what is new;
        until a round brings no new candidate."""
        while time.monotonic() < self.deadline:
            n = len(self.cands)
            self.neighbours()
            self.promote()
            if len(self.cands) == n:
                return

    def promote(self) -> None:
        """Successive halving: per budget the fastest that meet it (and the fastest single
        methods) go up a rung: more windows or rows, more timing repeats."""
        for r, m in enumerate(self.s.promote, start=1):
            if r >= len(self.s.repeats):
                break
            up: list[Candidate] = []
            for b in self.budgets:
                for which in ("any", "single", "combination"):
                    ok = sorted((c for c in self.cands.values() if c.rung >= r - 1 and self.ok(c, b) and c.speedup >= self.s.min_speedup
                                 and (which == "any" or c.single == (which == "single"))), key=lambda c: -c.speedup)
                    up += ok[:m]
            for c in dict.fromkeys(map(id, up)):
                cand = next(x for x in up if id(x) == c)
                if not self.evaluate(cand, r):
                    return

    def duel(self, a: Candidate, b: Candidate) -> float:
        key = (a.points, b.points)
        if key not in self.duels:
            self.duels[key] = self._duel(a, b)
        return self.duels[key]

    def _duel(self, a: Candidate, b: Candidate) -> float:
        """Median paired ratio of ``a``'s speed to ``b``'s, timed against each other (a copy of the
        model runs ``b``): the last word between a combination and the best single method,
        whose search timings were each paired with the dense model only."""
        other = copy.deepcopy(self.model)
        from .api import apply_

        apply_(other, b.configs, self.cal)
        xs = []
        with applied(self.model, a.configs, self.cal):
            for _ in range(max(self.s.repeats[-1], 3)):
                xs.append(self.kind.speed(self.model) / self.kind.speed(other))
        del other
        return float(torch.tensor(xs).median())

    def choose(self, b: Budget) -> Choice:
        c, s1, combo = self.top(b), self.top(b, "single"), self.top(b, "combination")
        duel = None
        if combo is not None and s1 is not None:  # the best combination and the best single method, head to head
            if (combo.points, s1.points) in self.duels or time.monotonic() < self.end:
                duel = self.duel(combo, s1)
            c = combo if duel is not None and duel >= 1.0 + self.s.tie else s1  # the plan never does worse than picking one method well:
            # a combination must win clearly, and one that could not be raced in the time is not chosen
        tried = [x for x in self.cands.values() if x.quality and not x.error]
        within = max((x for x in tried if self.ok(x, b)), key=lambda x: x.speedup, default=None)
        fastest = max(tried, key=lambda x: x.speedup, default=None)
        reason = "" if c is not None else (
            f"nothing at least {self.s.min_speedup:g}x as fast as the dense model meets {b.text} on the calibration split among {len(tried)} settings tried"
            + (f"; the fastest within the budget, {spec(within.configs)}, ran at {within.speedup:.2f}x" if within else "")
            + (f"; the fastest of all, {spec(fastest.configs)}, ran at {fastest.speedup:.2f}x and lost {self.loss(fastest, b):.2f} (limit {b.limit:g})"
               if fastest else ""))
        return Choice(b, c, s1, reason, duel, combo)


def plan(model: nn.Module, tokenizer: Any, budget: str | Budget | Sequence[str | Budget], *, model_name: str | None = None, minutes: float = 20.0,
         settings: Settings | None = None, methods: Sequence[str] | None = None, exclude: Sequence[str] = (), calibration: Any = None,
         progress: bool = True, strict: bool = True) -> PlanResult:
    """Search the registered methods' settings and their combinations for the fastest that meets
    each ``budget`` (``"ppl:+5%"``, ``"acc:-0.5"``, ``"agree:0.95"``, or several) on the
    calibration split, within ``minutes``. The model is left unchanged. ``strict``: raise
    :class:`PlanError` when a budget is met by no method setting (otherwise that budget's choice
    is None, with the reason)."""
    t0 = time.monotonic()
    budgets = [b if isinstance(b, Budget) else Budget.parse(b) for b in ([budget] if isinstance(budget, (str, Budget)) else budget)]
    if not budgets:
        raise ConfigError("no budget given; pass e.g. budget='ppl:+5%'")
    if not minutes > 0:
        raise ConfigError(f"minutes={minutes} is invalid; give the search a positive time in minutes (e.g. 20)")
    s = settings or Settings()
    ad = get_adapter(model)
    from .tasks import TextClassifier

    if ad.causal_lm:
        bad = [b.text for b in budgets if b.metric == "acc"]
        if bad:
            raise ConfigError(f"budget {bad[0]} needs a classifier (lazyneuron.tasks.TextClassifier); a causal LM takes ppl:+X% or agree:F")
        kind: Any = _LM(model, tokenizer, s, any(b.metric == "agree" for b in budgets))
        from .runtime import RuntimeConfig

        base_cfgs: list[MethodConfig] | None = [RuntimeConfig()]  # dense on the exact runtime: what every candidate runs on
    elif isinstance(model, TextClassifier):
        bad = [b.text for b in budgets if b.metric != "acc"]
        if bad:
            raise ConfigError(f"budget {bad[0]} is for causal LMs; a classifier takes acc:-X (points of accuracy)")
        if not s.task:
            raise ConfigError("a classifier's accuracy budget needs its task's labelled rows: pass settings=Settings(task='mr') (CLI: --task mr)")
        kind = _Classifier(model, tokenizer, s)
        base_cfgs = None
    else:
        raise ConfigError(f"cannot plan a bare {ad.model_type} encoder: quality budgets need a causal LM (perplexity, agreement) or a "
                          "classifier (lazyneuron.tasks.TextClassifier, accuracy)")
    axes, rt = plan_axes(model, model_name, methods, exclude)
    if all(a == rt for a in range(len(axes))) and len(axes[rt]) <= 1:
        raise PlanError(f"no registered method applies to this {ad.model_type} model" + (f" among {list(methods)}" if methods else ""))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cal = calibration
    need = list({c.name + str(c.targets): c for axis in axes for c in axis[-1:] if registry()[c.name]().wants_calibration(model, registry()[c.name]().resolve(model, ad, c))}.values())
    if need and cal is None:
        cal = calibrate(model, kind.calib_data(tokenizer), need, tokenizer, max_length=512, progress=progress)
    end = t0 + 60.0 * minutes
    deadline = end - min(90.0, 6.0 * minutes)  # the last seconds are kept for the head-to-head races
    quiet = quiet_applies()
    quiet.__enter__()
    search = _Search(model, kind, axes, rt, budgets, s, cal, deadline, base_cfgs, progress)
    search.end = end
    if progress:
        from tqdm.auto import tqdm

        search.bar = tqdm(desc="planning", unit="eval")
    try:
        search.dense_quality(0)
        for phase in (search.singles, search.combos, search.neighbours, search.promote, search.refine, search.sharpen):
            phase()
            if time.monotonic() > deadline:
                log.info("planner: time is up after %s", phase.__name__)
                break
        choices = [search.choose(b) for b in budgets]
    finally:
        if search.bar is not None:
            search.bar.close()
        quiet.__exit__(None, None, None)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "the planner must leave the model unchanged"
    res = PlanResult(choices, [c for c in search.cands.values() if c.quality or c.error], axes, search.dense, budgets, time.monotonic() - t0,
                     kind.kind, s, cal, "dense on the fp32 runtime" if base_cfgs else "dense")
    missing = [c for c in choices if c.candidate is None]
    if strict and missing:
        raise PlanError(f"{missing[0].reason}; loosen the budget, or fit more methods (`lazyneuron fit`) and plan again")
    return res


# -- verification on the test split --------------------------------------------------------
def verify(model_name: str, model: nn.Module, tokenizer: Any, result: PlanResult, *, repeats: int = 5, windows: int = 16,
           progress: bool = True, peers: bool = True) -> list[Any]:
    """Measure each budget's choice and best single method against the dense model on the test
    split, in one run (the benchmark harness: paired decode timing, perplexity, agreement; a
    classifier: accuracy and sentences/s), and, where llama.cpp is installed, its decode speed
    on the same weights. Records carry the budget; ``meets_budget`` says whether the test loss is
    within the budget plus the calibration-to-test noise (two standard errors)."""
    from .bench.records import Record

    recs: list[Record] = []
    variants: dict[str, list[MethodConfig]] = {}
    for ch in result.choices:
        for who, c in _roles(ch):
            if c is not None:
                variants.setdefault(spec(c.configs), c.configs)
    with quiet_applies():
        if result.kind == "lm":
            tests = _verify_lm(model_name, model, tokenizer, result, variants, repeats, windows, progress, peers)
        else:
            tests = _verify_classifier(model_name, model, tokenizer, result, variants, repeats, progress)
    for ch in result.choices:
        b = ch.budget
        for who, c in _roles(ch):
            p = {"budget": b.text, "configs": "" if c is None else spec(c.configs), "search_minutes": round(result.seconds / 60, 2)}
            if c is None:
                recs.append(Record(model_name, who, p, "found", 0.0, "bool"))
                continue
            t = tests[spec(c.configs)]
            cal_loss = result.loss(c, b)
            test_loss, se = t["loss"](b)
            if who == "best_combination" and ch.duel is not None:
                recs.append(Record(model_name, who, {**p, "best_single": spec(ch.best_single.configs) if ch.best_single else ""}, "search_duel_vs_best_single",
                                   ch.duel, "x best single method (search timing, head to head)"))
            recs += [Record(model_name, who, p, "found", 1.0, "bool"),
                     Record(model_name, who, p, "cal_loss", cal_loss, _unit(b)),
                     Record(model_name, who, p, "cal_speedup", c.speedup, "x dense (search timing)", repeats=len(c.speed)),
                     Record(model_name, who, p, "test_loss", test_loss, _unit(b)),
                     Record(model_name, who, p, "test_loss_se", se, _unit(b)),
                     Record(model_name, who, p, "meets_budget", float(test_loss <= b.limit + 2 * se), "bool"),
                     Record(model_name, who, p, "budget_limit", b.limit, _unit(b))]
            recs += [Record(model_name, who, p, k, v, u, spread=sp, repeats=n) for k, (v, u, sp, n) in t["speed"].items()]
        for who, c, metric in (("plan", ch.candidate, "speedup_over_best_single"), ("best_combination", ch.best_combination, "speedup_over_best_single")):
            if c is None or ch.best_single is None:
                continue
            xa, xb = tests[spec(c.configs)]["samples"], tests[spec(ch.best_single.configs)]["samples"]
            ratio = float(torch.tensor([u / v for u, v in zip(xa, xb)]).median())  # paired repeats of one interleaved run
            p = {"budget": b.text, "configs": spec(c.configs), "best_single": spec(ch.best_single.configs)}
            recs.append(Record(model_name, who, p, metric, ratio, "x best single method (paired, test run)", repeats=len(xa)))
    recs += [Record(model_name, "search", {"budgets": [b.text for b in result.budgets]}, "search_seconds", result.seconds, "s"),
             Record(model_name, "search", {"budgets": [b.text for b in result.budgets]}, "candidates", float(len(result.candidates)), "count")]
    return recs


def _roles(ch: Choice) -> list[tuple[str, Candidate | None]]:
    """What verification measures per budget: the plan, the best single method and the best
    combination of two or more methods (the search's; either may be the plan itself)."""
    return [("plan", ch.candidate), ("best_single", ch.best_single), ("best_combination", ch.best_combination)]


def _unit(b: Budget) -> str:
    return {"ppl": "% perplexity increase", "acc": "accuracy points lost", "agree": "% tokens disagreeing with dense"}[b.metric]


def _verify_lm(model_name: str, model: nn.Module, tok: Any, result: PlanResult, variants: dict[str, list[MethodConfig]], repeats: int,
               windows: int, progress: bool, peers: bool) -> dict[str, dict[str, Any]]:
    from . import data
    from .bench.quality import window_logits
    from .bench.timing import Variant, decode_tps, interleave, summary
    from .runtime import RuntimeConfig

    s = result.settings
    wins = data.windows(tok, s.corpus, "test", s.length, windows, spread=True)
    prompt = data.windows(tok, s.corpus, "test", s.prompt_tokens, 1)
    new = max(2 * s.new_tokens, 16)
    vs = [Variant("dense"), Variant("runtime", [RuntimeConfig()])] + [Variant(k, v, result.calibration) for k, v in variants.items()]
    measures: dict[str, Callable[[nn.Module], float]] = {"decode_tps_b1": lambda m: decode_tps(m, prompt, new)}
    times = interleave(model, vs, measures, repeats=repeats, progress=progress)
    peer = _peer_tps(model_name, prompt, new, repeats) if peers else {}

    @torch.inference_mode()
    def per_window(v: Variant) -> tuple[list[float], list[torch.Tensor]]:
        with applied(model, v.configs, v.calibration):
            out, top = [], []
            for w in wins:
                lg = window_logits(model, w).float()
                out.append(F.cross_entropy(lg[:-1], w[1:], reduction="sum").item() / (w.numel() - 1))
                top.append(lg.argmax(-1))
            return out, top

    dn, dtop = per_window(vs[0])
    tests: dict[str, dict[str, Any]] = {}
    for v in vs[2:]:
        nll, top = per_window(v)
        diff = torch.tensor(nll) - torch.tensor(dn)
        agree = torch.stack([(a == b).float().mean() for a, b in zip(top, dtop)])

        def loss(b: Budget, diff: torch.Tensor = diff, agree: torch.Tensor = agree) -> tuple[float, float]:
            se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
            if b.metric == "ppl":
                m = float(diff.mean())
                return 100 * (math.exp(m) - 1), 100 * math.exp(m) * se
            dis = 100 * (1 - agree)
            return float(dis.mean()), float(dis.std() / math.sqrt(len(dis))) if len(dis) > 1 else 0.0

        sp: dict[str, tuple[float, str, float | None, int | None]] = {}
        for key, base in (("decode_speedup_b1", "dense"), ("decode_vs_runtime_b1", "runtime")):
            r = [a / b for a, b in zip(times[v.name]["decode_tps_b1"], times[base]["decode_tps_b1"])]
            med, iqr = summary(r)
            sp[key] = (med, f"x {base}", iqr, len(r))
        med, iqr = summary(times[v.name]["decode_tps_b1"])
        sp["decode_tps_b1"] = (med, "tokens/s", iqr, len(times[v.name]["decode_tps_b1"]))
        sp["test_ppl"] = (math.exp(sum(nll) / len(nll)), "perplexity", None, None)
        sp["dense_test_ppl"] = (math.exp(sum(dn) / len(dn)), "perplexity", None, None)
        sp["dense_tps_b1"] = (summary(times["dense"]["decode_tps_b1"])[0], "tokens/s", None, None)
        for fmt, (tps, n) in peer.items():
            sp[f"vs_llama_cpp_{fmt}"] = (med / tps, f"x llama.cpp {fmt}", None, n)
        tests[v.name] = {"loss": loss, "speed": sp, "samples": times[v.name]["decode_tps_b1"]}
    return tests


def _peer_tps(model_name: str, prompt: torch.Tensor, new: int, repeats: int) -> dict[str, tuple[float, int]]:
    """llama.cpp's decode tokens/s on the same weights (f32 and q8_0), when it is installed."""
    from .bench import peers

    if not peers.available():
        log.info("llama.cpp is not installed; %s", peers.INSTALL)
        return {}
    from .models import gguf_source

    src = gguf_source(model_name)
    if src is None:
        log.info("%s is not a GGUF model; no llama.cpp peer", model_name)
        return {}
    out = {}
    for fmt in ("f32", "q8_0"):
        dec = peers.LlamaCppDecoder(peers.llama_cpp_gguf(src, fmt), torch.get_num_threads(), n_ctx=512)
        xs = []
        for _ in range(repeats):
            _, (_, td) = dec.generate(prompt, new)
            xs.append((new - 1) / td)
        out[fmt] = (float(torch.tensor(xs).median()), len(xs))
    return out


def _verify_classifier(model_name: str, model: nn.Module, tok: Any, result: PlanResult, variants: dict[str, list[MethodConfig]],
                       repeats: int, progress: bool) -> dict[str, dict[str, Any]]:
    from . import data, tasks
    from .bench.timing import Variant, interleave, summary

    s = result.settings
    rows = data.labeled(s.task, "test")
    batches = tasks.make_batches(tok, rows, s.batch_size, sort=True)
    timing = tasks.make_batches(tok, rows[: s.batch_size * s.timing_batches], s.batch_size, seed=1)
    labels = torch.cat([b.labels for b in batches])
    vs = [Variant("dense")] + [Variant(k, v, result.calibration) for k, v in variants.items()]
    times = interleave(model, vs, {"sentences_per_s": lambda m: tasks.sentences_per_s(m, timing, warmup=1)}, repeats=repeats, progress=progress)

    def right(v: Variant) -> torch.Tensor:
        with applied(model, v.configs, v.calibration):
            return (tasks.predict(model, batches).argmax(-1) == labels).float()

    dense = right(vs[0])
    tests: dict[str, dict[str, Any]] = {}
    for v in vs[1:]:
        r = right(v)

        def loss(b: Budget, r: torch.Tensor = r) -> tuple[float, float]:
            d = dense - r  # paired per sentence
            return 100 * float(d.mean()), 100 * float(d.std() / math.sqrt(len(d)))

        ratios = [a / b for a, b in zip(times[v.name]["sentences_per_s"], times["dense"]["sentences_per_s"])]
        med, iqr = summary(ratios)
        tps, tiqr = summary(times[v.name]["sentences_per_s"])
        tests[v.name] = {"loss": loss, "speed": {"speedup": (med, "x dense", iqr, len(ratios)), "sentences_per_s": (tps, "sentences/s", tiqr, len(ratios)),
                                                 "test_accuracy": (float(r.mean()), "fraction", None, None),
                                                 "dense_test_accuracy": (float(dense.mean()), "fraction", None, None)},
                         "samples": times[v.name]["sentences_per_s"]}
    return tests


def candidate_records(model_name: str, result: PlanResult) -> list[Any]:
    """Every candidate the search measured (its highest rung), for the plot and the record."""
    from .bench.records import Record

    out = []
    for c in result.candidates:
        if c.error or not c.quality:
            continue
        p = {"configs": spec(c.configs), "rung": c.rung, "methods": c.methods, "base": result.base}
        out.append(Record(model_name, "candidate", p, "cal_speedup", c.speedup, "x dense (search timing)", repeats=len(c.speed)))
        for b in result.budgets:
            out.append(Record(model_name, "candidate", {**p, "budget": b.text}, "cal_loss", result.loss(c, b), _unit(b)))
    return out


def table(result: PlanResult, records: Sequence[Any] = ()) -> str:
    """Per budget: the choice as a config string, its loss on calibration and test text, its speed
    against dense, and the best single method's (from :func:`verify`'s records where given)."""
    got: dict[tuple[str, str, str], float] = {}
    se: dict[tuple[str, str], float] = {}
    for r in records:
        d = r.to_dict() if hasattr(r, "to_dict") else r
        b = d["params"].get("budget")
        if b is not None:
            got[(d["method"], str(b), d["metric"])] = d["value"]
    lines = [f"searched {len(result.candidates)} settings in {result.seconds / 60:.1f} min"]
    for ch in result.choices:
        b = ch.budget
        lines.append("")
        if ch.candidate is None:
            lines.append(f"{b.text}: nothing found — {ch.reason}")
            continue
        speed = "speed" if result.kind == "classifier" else "decode"
        for key, c in _roles(ch):
            if c is None:
                continue
            who = key.replace("_", " ")
            lines.append(f"{b.text:<12} {who:<12} {spec(c.configs)}")
            parts = [f"calibration {result.loss(c, b):+.2f} at {c.speedup:.2f}x"]
            if (key, b.text, "test_loss") in got:
                parts.append(f"test {got[(key, b.text, 'test_loss')]:+.2f} ± {got[(key, b.text, 'test_loss_se')]:.2f}"
                             f" ({'meets' if got[(key, b.text, 'meets_budget')] else 'misses'} {b.limit:g})")
            for m, what in (("decode_speedup_b1", "x dense"), ("decode_vs_runtime_b1", "x dense on the runtime"), ("speedup", "x dense"),
                            ("vs_llama_cpp_f32", "x llama.cpp f32"), ("vs_llama_cpp_q8_0", "x llama.cpp q8_0")):
                if (key, b.text, m) in got:
                    parts.append(f"{speed} {got[(key, b.text, m)]:.2f} {what}")
            lines.append(" " * 26 + "; ".join(parts))
        for key in ("plan", "best_combination"):
            if (key, b.text, "speedup_over_best_single") in got:
                lines.append(" " * 26 + f"{key.replace('_', ' ')} / best single method: {got[(key, b.text, 'speedup_over_best_single')]:.2f}x (test run)")
    return "\n".join(lines)
