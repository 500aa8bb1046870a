"""Early exit: stop the layer loop once the prediction is confident enough.

Encoders (a :class:`lazyneuron.tasks.TextClassifier`): a classifier head after chosen layers
(DeeBERT "highway" heads, trained with the backbone frozen on labels, or by self-distillation from
the final layer as FastBERT, or jointly as PABEE); exit criteria ``entropy`` (exit when the
entropy of the head's softmax is at most the threshold), ``max_prob`` (top probability at least
the threshold), ``patience`` (the head's prediction has stayed the same for ``threshold``
consecutive exits, PABEE) and ``learned`` (a score head's predicted probability that this exit is
already right is at least the threshold, as BERxiT). A batch is **compacted** at every exit: the
samples that exit leave it, the rest continue, so a batch costs the work of its unexited samples.

Causal LMs (Llama family): per-token exit in decoding (one token, batch 1) with CALM's state
propagation: once a token exits at layer ``i``, its hidden state stands in for the skipped
layers' inputs, and for each skipped layer only the key / value projections of that state are
computed and written to the KV cache, so later tokens attend to keys and values that exist. The
final norm and LM head are reused; the default criterion is ``learned`` (a linear score per exit
layer on the hidden state; ``max_prob`` / ``entropy`` / ``patience`` read the LM head at every
exit check, which costs a sizeable share of a small model's step). Prefill, batched calls and the
first ``dense_prefix`` tokens of a sequence (its attention sink) run every layer. Optionally a
per-exit affine "tuned lens" (``train_lm_exits(lens=True)``) maps the exited state to the final
normalised state before the LM head. :meth:`ExitingDecoder.window_logits` gives what the decode
loop gives, over whole windows at the cost of one forward, for measuring quality and for
:func:`calibrate_lm_threshold`.

Exit heads live in a safetensors checkpoint (:func:`train_classifier_exits`,
:func:`train_lm_exits`); :func:`thresholds_for` picks a threshold for a quality budget on a
calibration split.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, ClassVar, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import ModelAdapter, model_type_of
from ..config import MethodConfig, register
from ..errors import ConfigError
from ..paths import cache_dir
from ..surgery import LazyModule, quiet_applies
from .base import DEMO_MODEL, Method, stack_path

CRITERIA = ("entropy", "max_prob", "patience", "learned")
CHECKPOINT_FORMAT = "lazyneuron.exits/1"
NEVER = {"entropy": -1.0, "max_prob": 2.0, "patience": 1e9, "learned": 2.0}  # thresholds that never exit


# -- exit heads ---------------------------------------------------------------------------------
class ExitHeads(nn.Module):
    """Per exit layer (0-based index of the layer after which it reads): a classifier head
    (classifiers only) and a score head (``learned`` criterion)."""

    def __init__(self, kind: str, layers: Sequence[int], hidden: int, num_labels: int = 0, model_type: str = "", lens: bool = False) -> None:
        super().__init__()
        if kind not in ("classifier", "causal_lm"):
            raise ConfigError(f"exit heads kind {kind!r} is invalid; use 'classifier' or 'causal_lm'")
        if lens and kind != "causal_lm":
            raise ConfigError("a lens (exit adapter before the LM head) is for causal_lm exit heads only")
        self.kind, self.layers, self.hidden, self.num_labels, self.model_type = kind, sorted(int(x) for x in layers), hidden, num_labels, model_type
        self.heads = nn.ModuleDict({str(i): nn.Linear(hidden, num_labels) for i in self.layers} if kind == "classifier" else {})
        self.scores = nn.ModuleDict({str(i): nn.Linear(hidden, 1) for i in self.layers})
        # causal LMs, optional: per exit layer an affine map from the RMS-normalised exit state to
        # a stand-in for the final normalised state, read by the LM head (a "tuned lens")
        self.lens = nn.ModuleDict({str(i): nn.Linear(hidden, hidden) for i in self.layers} if lens else {})

    def exit_hidden(self, layer: int, h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """What the LM head reads for a token leaving after ``layer``: the lens's map of the
        state, or without a lens the model's final norm of it (the logit lens)."""
        if not len(self.lens):
            return norm(h)
        return self.lens[str(layer)](_rms(h))

    def save(self, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
        from safetensors.torch import save_file

        info = {"kind": self.kind, "layers": self.layers, "hidden": self.hidden, "num_labels": self.num_labels, "model_type": self.model_type,
                "lens": bool(len(self.lens)), **(meta or {})}
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, os.fspath(path),
                  metadata={"format": CHECKPOINT_FORMAT, "meta": json.dumps(info)})

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "ExitHeads":
        from ..checkpoints import read

        path = os.fspath(path)
        header, sd = read(path, CHECKPOINT_FORMAT, "exit-head checkpoint", "train one with lazyneuron.methods.early_exit.train_classifier_exits "
                          "/ train_lm_exits (or `python benchmarks/early_exit.py`)")
        info = json.loads(header["meta"])
        heads = cls(info["kind"], info["layers"], info["hidden"], info["num_labels"], info.get("model_type", ""), bool(info.get("lens", False)))
        if model is not None:
            hidden = getattr(model.config, "hidden_size", None)
            if info.get("model_type") != model_type_of(model) or info["hidden"] != hidden:
                raise ConfigError(f"exit heads {path!r} were trained for a {info.get('model_type')!r} model of width {info['hidden']}, "
                                  f"not this {model_type_of(model)!r} of width {hidden}; train heads for this model")
        try:
            heads.load_state_dict(sd)
        except RuntimeError as e:
            raise ConfigError(f"{path!r}: tensors do not match the checkpoint's own metadata ({str(e)[:200]})") from None
        return heads.eval()


def _rms(h: torch.Tensor) -> torch.Tensor:
    hf = h.float()
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


# -- config ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EarlyExitConfig(MethodConfig):
    """``criterion``: entropy | max_prob | patience | learned; ``threshold``: exit when entropy <=
    t, top probability >= t, the prediction unchanged for t consecutive exits, or the learned
    score >= t; ``checkpoint``: the exit heads (safetensors); ``min_layer``: no exit before this
    layer (0-based); ``dense_prefix`` (causal LMs): the first tokens of a sequence run every layer
    (the prompt's prefill always does; this covers evaluation from an empty cache and one-token
    prompts)."""

    name: ClassVar[str] = "early_exit"
    targets: tuple[str, ...] = ("layer",)
    criterion: str = "learned"
    threshold: float = 0.9
    checkpoint: str = ""
    min_layer: int = 0
    dense_prefix: int = 1

    def validate(self) -> None:
        super().validate()
        self._check_choice("criterion", CRITERIA)
        if not isinstance(self.threshold, (int, float)) or math.isnan(float(self.threshold)):
            raise ConfigError(f"EarlyExitConfig.threshold={self.threshold!r} is invalid; pass a number (see thresholds_for)")
        if not isinstance(self.dense_prefix, int) or self.dense_prefix < 0:
            raise ConfigError(f"EarlyExitConfig.dense_prefix={self.dense_prefix!r} must be a count of tokens >= 0 (1 = the first token)")
        if self.criterion == "patience" and self.threshold < 1:
            raise ConfigError(f"criterion='patience' needs threshold >= 1 (consecutive agreeing exits), got {self.threshold}")
        if self.targets != ("layer",):
            raise ConfigError(f"early_exit works on the whole layer stack; targets must be ('layer',), got {self.targets}")
        if not self.checkpoint:
            raise ConfigError("early_exit needs trained exit heads: pass checkpoint=PATH (train them with train_classifier_exits / train_lm_exits)")

    def at_zero_strength(self) -> "EarlyExitConfig":
        return dataclasses.replace(self, threshold=NEVER[self.criterion])


@dataclasses.dataclass
class ExitInfo:
    layers: torch.Tensor  # (B,) number of layers each sample ran
    logits: torch.Tensor  # (B, C) exit logits (valid where exited)
    exited: torch.Tensor  # (B,) bool


class _Decider:
    """The exit test for one set of active samples at one exit layer."""

    def __init__(self, cfg: EarlyExitConfig) -> None:
        self.criterion, self.t = cfg.criterion, float(cfg.threshold)

    def __call__(self, logits: torch.Tensor | None, score: torch.Tensor | None, streak: torch.Tensor | None) -> torch.Tensor:
        if self.criterion == "entropy":
            return _entropy(logits) <= self.t
        if self.criterion == "max_prob":
            return F.softmax(logits.float(), -1).amax(-1) >= self.t
        if self.criterion == "patience":
            return streak >= self.t
        return torch.sigmoid(score.float()).squeeze(-1) >= self.t


class ExitingEncoder(LazyModule):
    """Runs a BERT encoder's layers with exits and batch compaction (replaces ``bert.encoder``)."""

    method_name = "early_exit"

    def __init__(self, base: nn.Module, heads: ExitHeads, cfg: EarlyExitConfig) -> None:
        super().__init__(base)
        self.exits = heads
        self.decide = _Decider(cfg)
        self.min_layer = cfg.min_layer
        self.last_exit: ExitInfo | None = None
        self.layers_run: list[int] = []  # per sample, while tracking
        self.track = False

    @staticmethod
    def _key_mask(mask: torch.Tensor | None, b: int, n: int) -> torch.Tensor:
        if mask is None:
            return torch.ones(b, n, dtype=torch.bool)
        row = mask[:, 0, 0, :] if mask.dim() == 4 else mask
        return row if row.dtype == torch.bool else row == 0  # additive float masks: 0 where attended

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, encoder_hidden_states: Any = None,
                encoder_attention_mask: Any = None, past_key_values: Any = None, use_cache: bool | None = None, **kw: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        layers = self.base.layer
        n = len(layers)
        b = hidden_states.shape[0]
        h, mask = hidden_states, attention_mask
        keym = self._key_mask(mask, b, h.shape[1]).expand(b, h.shape[1])
        out = torch.empty_like(h)
        active = torch.arange(b)
        ran = torch.full((b,), n, dtype=torch.long)
        exit_logits = torch.zeros(b, max(self.exits.num_labels, 1))
        exited = torch.zeros(b, dtype=torch.bool)
        streak = torch.zeros(b, dtype=torch.long)
        prev = torch.full((b,), -1, dtype=torch.long)
        for j, layer in enumerate(layers):
            h = layer(h, mask, **kw)  # an encoder: no cross-attention, no cache
            if j == n - 1 or str(j) not in self.exits.heads or j < self.min_layer:
                continue
            m = keym.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
            logits = self.exits.heads[str(j)](pooled)
            pred = logits.argmax(-1)
            streak = torch.where(pred == prev, streak + 1, torch.ones_like(streak))
            prev = pred
            score = self.exits.scores[str(j)](pooled) if self.decide.criterion == "learned" else None
            done = self.decide(logits, score, streak)
            if bool(done.any()):
                idx = active[done]
                out[idx], exit_logits[idx], ran[idx], exited[idx] = h[done], logits[done].float(), j + 1, True
                keep = ~done
                if not bool(keep.any()):
                    active = active[keep]
                    break
                active, h, keym, streak, prev = active[keep], h[keep], keym[keep], streak[keep], prev[keep]
                if mask is not None and mask.shape[0] > 1:
                    mask = mask[keep]
        if len(active):
            out[active] = h
        self.last_exit = ExitInfo(ran, exit_logits, exited)
        if self.track:
            self.layers_run += ran.tolist()
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out, past_key_values=None)

    def weight_elements(self) -> int:
        return 0

    def restore_base(self) -> nn.Module:
        self.last_exit = None
        return self.base


class ExitingDecoder(LazyModule):
    """Runs a Llama-family decoder stack with per-token exits and CALM state propagation
    (replaces ``model.model``)."""

    method_name = "early_exit"
    stepwise_eval = True  # quality must be measured token by token (bench.quality.window_logits)

    def __init__(self, base: nn.Module, heads: ExitHeads, cfg: EarlyExitConfig, lm_head: nn.Module) -> None:
        super().__init__(base)
        self.exits = heads
        self.decide = _Decider(cfg)
        self.min_layer = cfg.min_layer
        self.__dict__["lm_head"] = lm_head  # not a submodule: the model owns it
        self.layers_run: list[int] = []  # per token (prefill included), while tracking
        self.kv_filled = 0  # (layer, token) key/value pairs written from a propagated state
        # the first tokens of a sequence never exit: later tokens attend to them heavily (an
        # attention sink), and a sink's keys / values propagated from an early layer wreck them
        self.dense_prefix = cfg.dense_prefix
        # compute accounting: the linear weights a token leaving after layer j does not read
        # (every later layer's, less the key / value projections CALM still computes)
        from ..adapters import is_linear

        def elems(mod: nn.Module) -> int:  # dense linear weights under ``mod`` (another method's lazy module keeps them as its base)
            return sum(m.weight.numel() for m in mod.modules() if is_linear(m))

        saved = [elems(layer) - elems(layer.self_attn.k_proj) - elems(layer.self_attn.v_proj) for layer in base.layers]
        self._skip_after = torch.tensor([sum(saved[j:]) for j in range(len(saved) + 1)], dtype=torch.float64)
        self._stack_weights = sum(m.weight.numel() for m in base.layers.modules() if is_linear(m))
        self.tokens_seen, self.weights_skipped = 0, 0.0
        self.track = False

    def _check(self, j: int, hl: torch.Tensor, streak: torch.Tensor, prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The exit test after layer ``j`` for states ``hl`` (N, d), with the patience criterion's
        streak / previous prediction (N,): (exit (N,) bool, streak, prev)."""
        logits = score = None
        if self.decide.criterion == "learned":
            score = self.exits.scores[str(j)](hl)
        else:
            logits = self.lm_head(self.exits.exit_hidden(j, hl, self.base.norm))
            pred = logits.argmax(-1)
            streak = torch.where(pred == prev, streak + 1, torch.ones_like(streak))
            prev = pred
        return self.decide(logits, score, streak), streak, prev

    def _fill_kv(self, layer: nn.Module, h: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor], cache: Any, j: int) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        at = layer.self_attn
        x = layer.input_layernorm(h)
        shape = (*x.shape[:-1], -1, at.head_dim)
        k = at.k_proj(x).view(shape).transpose(1, 2)
        v = at.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = pe
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        cache.update(k, v, j)
        self.kv_filled += 1

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values: Any = None, inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None, **kw: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        base = self.base
        if inputs_embeds is None:
            inputs_embeds = base.embed_tokens(input_ids)
        b, n_tok = inputs_embeds.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if n_tok > 1 or b > 1 or past_key_values is None or not use_cache or past < self.dense_prefix:  # prefill, batches, no cache, the first tokens: every layer
            if self.track:
                self.layers_run += [len(base.layers)] * (b * n_tok)
                self.tokens_seen += b * n_tok
            return base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                        use_cache=use_cache, **kw)
        if position_ids is None:
            position_ids = torch.tensor([[past]])
        h = inputs_embeds
        pe = base.rotary_emb(h, position_ids=position_ids)
        layers = base.layers
        n = len(layers)
        ran = n
        streak, prev = torch.zeros(1, dtype=torch.long), torch.full((1,), -1, dtype=torch.long)
        for j, layer in enumerate(layers):
            h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=position_ids, past_key_values=past_key_values, use_cache=True)
            if j == n - 1 or str(j) not in self.exits.scores or j < self.min_layer:
                continue
            done, streak, prev = self._check(j, h[:, -1], streak, prev)
            if bool(done[0]):
                ran = j + 1
                for k in range(j + 1, n):  # CALM: skipped layers get K/V from the exited state
                    self._fill_kv(layers[k], h, pe, past_key_values, k)
                break
        if self.track:
            self.layers_run.append(ran)
            self.tokens_seen += 1
            self.weights_skipped += float(self._skip_after[ran])
        out = base.norm(h) if ran == n else self.exits.exit_hidden(ran - 1, h, base.norm)
        return BaseModelOutputWithPast(last_hidden_state=out, past_key_values=past_key_values)

    @torch.no_grad()
    def window_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The logits (B, T, vocab) that decoding ``input_ids`` token by token from an empty cache
        with exits would give, computed layer by layer over whole windows (teacher forcing).

        Exact, not an estimate: at layer ``j`` every token attends to the keys / values of the
        states its predecessors hold there (their exited state where they left earlier, which is
        what CALM propagation writes to the cache), and a token that has exited keeps its state.
        The work is that of a dense forward (exited tokens are still pushed through the layers and
        their results discarded), so this is for measuring quality and calibrating thresholds on a
        lot of text, not for serving; the decode loop is :meth:`forward`."""
        base = self.base
        ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
        b, t = ids.shape
        h = base.embed_tokens(ids)
        pos = torch.arange(t).unsqueeze(0).expand(b, t)
        pe = base.rotary_emb(h, position_ids=pos)
        mask = torch.full((t, t), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1).view(1, 1, t, t).expand(b, 1, t, t)
        layers = base.layers
        n = len(layers)
        exited = torch.zeros(b, t, dtype=torch.bool)
        ran = torch.full((b, t), n, dtype=torch.long)
        streak, prev = torch.zeros(b, t, dtype=torch.long), torch.full((b, t), -1, dtype=torch.long)
        final = torch.empty_like(h)  # what the LM head reads: the exit's view of the state, or the final norm
        for j, layer in enumerate(layers):
            out = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos, past_key_values=None, use_cache=False)
            h = torch.where(exited.unsqueeze(-1), h, out)
            if j == n - 1 or str(j) not in self.exits.scores or j < self.min_layer:
                continue
            live = ~exited
            live[:, : self.dense_prefix] = False
            done = live.clone()
            done[live], streak[live], prev[live] = self._check(j, h[live], streak[live], prev[live])
            if bool(done.any()):
                final[done] = self.exits.exit_hidden(j, h[done], base.norm)
            ran[done] = j + 1
            exited |= done
            if bool(exited.all()):
                break
        if not bool(exited.all()):
            final[~exited] = base.norm(h[~exited])
        if self.track:
            self.layers_run += ran.flatten().tolist()
            self.tokens_seen += ran.numel()
            self.weights_skipped += float(self._skip_after[ran.flatten()].sum())
        return self.lm_head(final)

    def weight_elements(self) -> int:
        return self._stack_weights


@register
class EarlyExit(Method):
    config_cls = EarlyExitConfig
    stage = 1

    def resolve(self, model: nn.Module, adapter: ModelAdapter, cfg: MethodConfig) -> list[str]:
        return [stack_path(model, adapter, "early_exit")]

    def plan(self, model: nn.Module, cfg: MethodConfig, paths: list[str], stats: Any) -> MethodConfig:
        assert isinstance(cfg, EarlyExitConfig)
        self._heads = ExitHeads.load(cfg.checkpoint, model)
        from ..adapters import get_adapter

        ad = get_adapter(model)
        want = "classifier" if ad.family == "bert" else "causal_lm"
        if self._heads.kind != want:
            raise ConfigError(f"exit heads {cfg.checkpoint!r} are for a {self._heads.kind}, this model needs {want} heads")
        if self._heads.kind == "classifier" and self._heads.num_labels != model.num_labels:
            raise ConfigError(f"exit heads {cfg.checkpoint!r} predict {self._heads.num_labels} labels, the classifier {model.num_labels}")
        if max(self._heads.layers, default=0) >= ad.num_layers:
            raise ConfigError(f"exit heads {cfg.checkpoint!r} read layer {max(self._heads.layers)}, the model has {ad.num_layers} layers")
        self._lm_head = model.get_submodule(ad.model_roles["head"]) if want == "causal_lm" else None
        return cfg

    def convert(self, path: str, module: nn.Module, cfg: MethodConfig, stats: Any) -> nn.Module:
        assert isinstance(cfg, EarlyExitConfig)
        if self._heads.kind == "classifier":
            return ExitingEncoder(module, self._heads, cfg)
        return ExitingDecoder(module, self._heads, cfg, self._lm_head)

    def summarize(self, model: nn.Module, cfg: MethodConfig, paths: list[str]) -> dict[str, Any]:
        assert isinstance(cfg, EarlyExitConfig)
        return {"exits_after_layers": self._heads.layers, "criterion": cfg.criterion, "threshold": cfg.threshold}

    @classmethod
    def demo_configs(cls, model_name: str = DEMO_MODEL, *, quick: bool = False) -> list[MethodConfig]:
        """``quick``: ``demo --quick``, which also takes the exit heads a quick demo fitted."""
        from ..fitting import fitted_checkpoint

        found = fitted_checkpoint("early_exit", model_name, quick=quick)
        if not found:
            return []
        return [EarlyExitConfig(criterion="learned", threshold=float(found.get("threshold", 0.9)), checkpoint=found["checkpoint"])]

    @classmethod
    def plan_axes(cls, model: nn.Module, model_name: str | None = None) -> list[list[MethodConfig]]:
        """With this model's fitted exit heads (``lazyneuron fit exits``): the learned score's
        threshold from cautious to eager."""
        from ..tasks import TextClassifier

        if isinstance(model, TextClassifier):  # exit heads fitted for this classifier (lazyneuron.fitting.fit_classifier_exits)
            path = default_lm_exits_path(model_name) if model_name else None
            if path is None or not path.exists():
                return []
            return [[EarlyExitConfig(criterion="max_prob", threshold=t, checkpoint=str(path)) for t in (0.99, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8)]]
        found = cls.demo_configs(model_name) if model_name else []
        if not found:
            return []
        return [[dataclasses.replace(found[0], threshold=t) for t in (0.99, 0.97, 0.95, 0.93, 0.91, 0.88, 0.85, 0.8, 0.7)]]

    @classmethod
    def demo_notes(cls, model_name: str = DEMO_MODEL, *, quick: bool = False) -> list[str]:
        from ..fitting import fitted_checkpoint

        if fitted_checkpoint("early_exit", model_name, quick=quick):
            return []
        if model_name == "minilm-l6":
            return ["early_exit: on encoders it runs on a task classifier (lazyneuron.tasks.TextClassifier), and the demo's MiniLM-L6 is a bare "
                    "sentence encoder; see docs/early_exit.md for the classifier results."]
        return [f"early_exit: no fitted exit heads for {model_name}; `lazyneuron fit exits --model {model_name}` fits them "
                "(Llama-family causal LMs; encoder classifiers: lazyneuron.methods.early_exit.train_classifier_exits)."]


def default_lm_exits_path(model_name: str) -> "os.PathLike[str] | Any":
    from ..models import checkpoint_key

    return cache_dir("checkpoints") / f"{checkpoint_key(model_name)}.exits.safetensors"


# -- exit statistics, simulation and thresholds ------------------------------------------------------
@dataclasses.dataclass
class ExitStats:
    """Per exit layer (rows, in ``layers`` order) and sample / token (columns): the exit's
    prediction, its entropy and top probability, and the learned score; plus the full model's
    prediction and, for labelled data, the labels."""

    layers: list[int]
    n_layers: int
    pred: torch.Tensor  # (E, N) long
    entropy: torch.Tensor  # (E, N)
    maxp: torch.Tensor  # (E, N)
    score: torch.Tensor  # (E, N) probability
    final_pred: torch.Tensor  # (N,)
    labels: torch.Tensor | None = None

    def cat(self, other: "ExitStats") -> "ExitStats":
        lab = None if self.labels is None or other.labels is None else torch.cat([self.labels, other.labels])
        return ExitStats(self.layers, self.n_layers, *(torch.cat([a, b], 1) for a, b in ((self.pred, other.pred), (self.entropy, other.entropy),
                         (self.maxp, other.maxp), (self.score, other.score))), torch.cat([self.final_pred, other.final_pred]), lab)


def _stats_from_logits(layers: list[int], n_layers: int, logits: list[torch.Tensor], scores: list[torch.Tensor], final_pred: torch.Tensor,
                       labels: torch.Tensor | None) -> ExitStats:
    lg = torch.stack([x.float() for x in logits])  # (E, N, C)
    p = F.softmax(lg, -1)
    return ExitStats(layers, n_layers, lg.argmax(-1), _entropy(lg), p.amax(-1), torch.stack([torch.sigmoid(s.float().squeeze(-1)) for s in scores]),
                     final_pred, labels)


def simulate(stats: ExitStats, criterion: str, threshold: float, min_layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, layers run) per sample when exiting by ``criterion`` at ``threshold``.

    Exact for encoders (an exit does not change the states of later layers); for decoders it is
    the teacher-forced estimate (CALM's propagated key/values change later tokens slightly)."""
    e, n = stats.pred.shape
    if criterion == "entropy":
        ok = stats.entropy <= threshold
    elif criterion == "max_prob":
        ok = stats.maxp >= threshold
    elif criterion == "learned":
        ok = stats.score >= threshold
    elif criterion == "patience":
        streak = torch.ones_like(stats.pred)
        for i in range(1, e):
            streak[i] = torch.where(stats.pred[i] == stats.pred[i - 1], streak[i - 1] + 1, torch.ones_like(streak[i]))
        ok = streak >= threshold
    else:
        raise ConfigError(f"unknown exit criterion {criterion!r}; use one of {CRITERIA}")
    allowed = torch.tensor([lay >= min_layer and lay < stats.n_layers - 1 for lay in stats.layers])[:, None]
    ok = ok & allowed
    first = torch.where(ok.any(0), ok.float().argmax(0), torch.full((n,), e))
    pred = stats.final_pred.clone()
    ran = torch.full((n,), stats.n_layers, dtype=torch.long)
    hit = first < e
    idx = first[hit]
    pred[hit] = stats.pred[idx, torch.arange(n)[hit]]
    ran[hit] = torch.tensor(stats.layers)[idx] + 1
    return pred, ran


def quality(stats: ExitStats, pred: torch.Tensor) -> float:
    """Accuracy against the labels when there are labels, else agreement with the full model."""
    ref = stats.labels if stats.labels is not None else stats.final_pred
    return float((pred == ref).float().mean())


def candidate_thresholds(stats: ExitStats, criterion: str) -> list[float]:
    if criterion == "patience":
        return [float(k) for k in range(1, len(stats.layers) + 1)]
    vals = {"entropy": stats.entropy, "max_prob": stats.maxp, "learned": stats.score}[criterion].flatten()
    qs = torch.quantile(vals[torch.randperm(len(vals), generator=torch.Generator().manual_seed(0))[:100_000]].double(), torch.linspace(0, 1, 201, dtype=torch.float64))
    return sorted({float(x) for x in qs})


def thresholds_for(stats: ExitStats, criterion: str, max_quality_loss: float, min_layer: int = 0) -> dict[str, float]:
    """The threshold with the fewest layers run whose quality loss on ``stats`` (a calibration
    split) is at most ``max_quality_loss`` (a fraction: 0.01 = one accuracy / agreement point).

    Returns ``threshold`` (never-exit when no threshold fits), ``quality``, ``dense_quality``,
    ``mean_layers`` and ``n_layers``."""
    if not 0 <= max_quality_loss <= 1:
        raise ConfigError(f"max_quality_loss={max_quality_loss} must be a fraction in [0, 1] (0.01 = one point)")
    dense_q = quality(stats, stats.final_pred)
    best = {"threshold": NEVER[criterion], "quality": dense_q, "dense_quality": dense_q, "mean_layers": float(stats.n_layers), "n_layers": float(stats.n_layers)}
    for t in candidate_thresholds(stats, criterion):
        pred, ran = simulate(stats, criterion, t, min_layer)
        q = quality(stats, pred)
        if dense_q - q <= max_quality_loss + 1e-12 and float(ran.float().mean()) < best["mean_layers"]:
            best = {"threshold": t, "quality": q, "dense_quality": dense_q, "mean_layers": float(ran.float().mean()), "n_layers": float(stats.n_layers)}
    return best


# -- encoders: training and statistics --------------------------------------------------------
@torch.no_grad()
def collect_classifier_states(clf: nn.Module, batches: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled states after every layer (L, N, d), the final logits (N, C) and the labels (N,)."""
    was = clf.training
    clf.eval()
    try:
        outs = [clf.pooled_states(b.input_ids, b.attention_mask) for b in batches]
    finally:
        clf.train(was)
    return torch.cat([p for p, _ in outs], 1), torch.cat([lg for _, lg in outs]), torch.cat([b.labels for b in batches])


def classifier_stats(heads: ExitHeads, pooled: torch.Tensor, final_logits: torch.Tensor, labels: torch.Tensor | None) -> ExitStats:
    with torch.no_grad():
        logits = [heads.heads[str(i)](pooled[i]) for i in heads.layers]
        scores = [heads.scores[str(i)](pooled[i]) for i in heads.layers]
    return _stats_from_logits(heads.layers, pooled.shape[0], logits, scores, final_logits.argmax(-1), labels)


def train_classifier_exits(clf: nn.Module, batches: Sequence[Any], *, layers: Sequence[int] | None = None, mode: str = "labels", epochs: int = 40,
                           lr: float = 2e-3, batch_size: int = 256, progress: bool = True,
                           states: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> ExitHeads:
    """Exit heads for a :class:`~lazyneuron.tasks.TextClassifier` with the backbone frozen.

    ``mode``: ``labels`` (DeeBERT: cross-entropy on the labels), ``distill`` (FastBERT
    self-distillation: KL to the final layer's prediction, no labels needed) or ``both``. The
    score heads (``learned`` criterion) then learn whether each exit's prediction is right
    (matches the label, or the final prediction under ``distill``). Pooled states are computed
    once, so this costs one forward pass over ``batches``."""
    from ..train import fit

    if mode not in ("labels", "distill", "both"):
        raise ConfigError(f"mode={mode!r} is invalid; use 'labels' (DeeBERT), 'distill' (FastBERT) or 'both'")
    pooled, final, labels = states if states is not None else collect_classifier_states(clf, batches)
    n_layers = pooled.shape[0]
    layers = list(range(n_layers - 1)) if layers is None else sorted(layers)
    bad = [x for x in layers if not 0 <= x < n_layers - 1]
    if bad:
        raise ConfigError(f"exit layers {bad} are out of range: the model has {n_layers} layers, exits go after layers 0..{n_layers - 2}")
    heads = ExitHeads("classifier", layers, pooled.shape[-1], final.shape[-1], model_type_of(clf))
    g = torch.Generator().manual_seed(0)
    idx = [c for c in torch.randperm(pooled.shape[1], generator=g).split(batch_size)]
    soft = F.log_softmax(final, -1)

    def head_loss(_: nn.Module, ix: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(())
        for i in layers:
            lg = heads.heads[str(i)](pooled[i, ix])
            if mode in ("labels", "both"):
                total = total + F.cross_entropy(lg, labels[ix])
            if mode in ("distill", "both"):
                total = total + F.kl_div(F.log_softmax(lg, -1), soft[ix], log_target=True, reduction="batchmean")
        return total / len(layers)

    fit(heads.heads, head_loss, idx, epochs=epochs, lr=lr, weight_decay=1e-4, progress=progress, desc="exit heads")
    with torch.no_grad():
        ref = labels if mode != "distill" else final.argmax(-1)
        right = {i: (heads.heads[str(i)](pooled[i]).argmax(-1) == ref).float() for i in layers}

    def score_loss(_: nn.Module, ix: torch.Tensor) -> torch.Tensor:
        return sum(F.binary_cross_entropy_with_logits(heads.scores[str(i)](pooled[i, ix]).squeeze(-1), right[i][ix]) for i in layers) / len(layers)

    fit(heads.scores, score_loss, idx, epochs=epochs, lr=lr, weight_decay=1e-4, progress=progress, desc="exit scores")
    return heads.eval()


def train_classifier_exits_joint(clf: nn.Module, heads: ExitHeads, batches: Sequence[Any], *, epochs: int = 1, lr: float = 3e-5,
                                 progress: bool = True, checkpoint: str | None = None) -> None:
    """PABEE's joint training: backbone, final head and exit heads together, the loss of exit
    ``i`` weighted by ``i + 1`` (deeper exits count more). Under ``torchrun`` like :func:`fit`."""
    from ..train import fit

    class Joint(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clf, self.heads = clf, heads

    joint = Joint()
    n = len(clf.bert.encoder.layer)

    def loss(m: nn.Module, b: Any) -> torch.Tensor:
        inner = m.module if hasattr(m, "module") else m
        pooled, final = inner.clf.pooled_states(b.input_ids, b.attention_mask)
        w = [(i + 1, F.cross_entropy(inner.heads.heads[str(i)](pooled[i]), b.labels)) for i in inner.heads.layers]
        w.append((n, F.cross_entropy(final, b.labels)))
        return sum(a * x for a, x in w) / sum(a for a, _ in w)

    fit(joint, loss, batches, epochs=epochs, lr=lr, progress=progress, desc="joint exits", checkpoint=checkpoint)
    heads.eval()


# -- decoders: training and statistics -------------------------------------------------------------
class LMStates(NamedTuple):
    hidden: dict[int, torch.Tensor]  # per exit layer: the state after it, token-major (N, d)
    final_pred: torch.Tensor  # (N,) the full model's top-1
    preds: dict[int, torch.Tensor]  # per exit layer: top-1 through the final norm and LM head (logit lens)
    final_hidden: torch.Tensor  # (N, d) the final normalised state the LM head reads


@torch.no_grad()
def collect_lm_states(model: nn.Module, windows: torch.Tensor, layers: Sequence[int]) -> LMStates:
    """Teacher-forced hidden states after each exit layer, the final normalised state and the
    full model's top-1, and each exit's top-1 through the final norm and LM head."""
    from ..adapters import get_adapter

    ad = get_adapter(model)
    stack = model.get_submodule(ad.layers_path)
    norm = model.get_submodule(ad.model_roles["final_norm"])
    head = model.get_submodule(ad.model_roles["head"])
    hidden: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    normed: list[torch.Tensor] = []

    def flat(out: Any) -> torch.Tensor:
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(-1, out.shape[-1])

    hooks = [stack[i].register_forward_hook(lambda m, a, out, i=i: hidden[i].append(flat(out))) for i in layers]
    hooks.append(norm.register_forward_hook(lambda m, a, out: normed.append(flat(out))))
    finals = []
    try:
        for w in windows:
            finals.append(model(input_ids=w.view(1, -1)).logits[0].argmax(-1))
    finally:
        for h in hooks:
            h.remove()
    hs = {i: torch.cat(v) for i, v in hidden.items()}
    preds = {i: torch.cat([head(norm(c)).argmax(-1) for c in hs[i].split(512)]) for i in layers}
    return LMStates(hs, torch.cat(finals), preds, torch.cat(normed))


def fit_lens(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> nn.Linear:
    """Least-squares affine map from RMS-normalised states ``x`` (N, d) to final normalised
    states ``y`` (N, d), with a ridge of ``ridge`` × the mean feature energy. The LM head is
    linear after the final norm, so the least-squares map is also the best one under the head's
    own metric on the residual."""
    xs = torch.cat([_rms(x).double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    g = xs.T @ xs
    g += ridge * g.diagonal().mean() * torch.eye(len(g), dtype=torch.float64)
    sol = torch.linalg.solve(g, xs.T @ y.double())  # (d + 1, d)
    lin = nn.Linear(x.shape[1], y.shape[1])
    with torch.no_grad():
        lin.weight.copy_(sol[:-1].T)
        lin.bias.copy_(sol[-1])
    return lin


def lm_stats(heads: ExitHeads, model: nn.Module, hs: dict[int, torch.Tensor], final_pred: torch.Tensor, with_logits: bool = True) -> ExitStats:
    """Exit statistics for a causal LM; ``with_logits`` also computes entropy / top probability
    through the LM head (needed by the entropy / max_prob / patience criteria)."""
    from ..adapters import get_adapter

    ad = get_adapter(model)
    norm = model.get_submodule(ad.model_roles["final_norm"])
    head = model.get_submodule(ad.model_roles["head"])
    n_layers = ad.num_layers
    preds, ents, maxps, scores = [], [], [], []
    with torch.no_grad():
        for i in heads.layers:
            h = hs[i]
            scores.append(torch.sigmoid(heads.scores[str(i)](h).squeeze(-1)))
            if with_logits:
                p_, e_, m_ = [], [], []
                for c in h.split(512):
                    lg = head(heads.exit_hidden(i, c, norm)).float()
                    p_.append(lg.argmax(-1))
                    e_.append(_entropy(lg))
                    m_.append(F.softmax(lg, -1).amax(-1))
                preds.append(torch.cat(p_))
                ents.append(torch.cat(e_))
                maxps.append(torch.cat(m_))
            else:
                preds.append(torch.zeros(h.shape[0], dtype=torch.long))
                ents.append(torch.zeros(h.shape[0]))
                maxps.append(torch.zeros(h.shape[0]))
    return ExitStats(heads.layers, n_layers, torch.stack(preds), torch.stack(ents), torch.stack(maxps), torch.stack(scores), final_pred, None)


def train_lm_exits(model: nn.Module, windows: torch.Tensor, layers: Sequence[int], *, epochs: int = 30, lr: float = 3e-3, batch_size: int = 512,
                   lens: bool = False, progress: bool = True, states: LMStates | None = None, deadline: float | None = None) -> ExitHeads:
    """Score heads for per-token exit in a causal LM: at each exit layer a linear score on the
    hidden state learns whether the LM head's top-1 there already equals the full model's.

    With ``lens`` each exit first gets an affine map to the final normalised state (fitted in
    closed form, :func:`fit_lens`; a "tuned lens"), the LM head reads that instead of the final
    norm of the raw state, and the score heads learn when the lens's top-1 is right."""
    from ..adapters import get_adapter
    from ..train import fit

    ad = get_adapter(model)
    bad = [x for x in layers if not 0 <= x < ad.num_layers - 1]
    if bad:
        raise ConfigError(f"exit layers {bad} are out of range for {ad.num_layers} layers (0..{ad.num_layers - 2})")
    st = states if states is not None else collect_lm_states(model, windows, layers)
    hs, final, preds = st.hidden, st.final_pred, st.preds
    heads = ExitHeads("causal_lm", layers, hs[layers[0]].shape[-1], 0, model_type_of(model), lens=lens)
    if lens:
        head = model.get_submodule(ad.model_roles["head"])
        with torch.no_grad():
            for i in layers:
                heads.lens[str(i)] = fit_lens(hs[i], st.final_hidden)
            preds = {i: torch.cat([head(heads.lens[str(i)](_rms(c))).argmax(-1) for c in hs[i].split(512)]) for i in layers}
    right = {i: (preds[i] == final).float() for i in layers}
    idx = list(torch.randperm(len(final), generator=torch.Generator().manual_seed(0)).split(batch_size))

    def loss(_: nn.Module, ix: torch.Tensor) -> torch.Tensor:
        return sum(F.binary_cross_entropy_with_logits(heads.scores[str(i)](hs[i][ix]).squeeze(-1), right[i][ix]) for i in layers) / len(layers)

    fit(heads.scores, loss, idx, epochs=epochs, lr=lr, weight_decay=1e-4, progress=progress, desc="exit scores", deadline=deadline)
    return heads.eval()


def calibrate_lm_threshold(model: nn.Module, checkpoint: str, windows: torch.Tensor, max_quality_loss: float | Sequence[float], *,
                           steps: int = 10, delta: float | None = None, min_layer: int = 0, dense_prefix: int = 1, progress: bool = True,
                           deadline: float | None = None) -> Any:
    """Learned-score threshold for a causal LM that keeps top-1 agreement with the dense model
    within ``max_quality_loss`` on ``windows`` (calibration text), as the model decodes.

    Bisection over the threshold; each candidate is measured with exits and CALM key / value
    propagation (the exact teacher-forced equivalent of the decode loop,
    :meth:`ExitingDecoder.window_logits`), so the effect of propagated keys / values on later
    tokens is included, which the per-layer statistics of :func:`thresholds_for` cannot see.
    With ``delta`` the loss must hold with confidence ``1 - delta``: the one-sided normal upper
    bound of the mean loss, from the spread of the per-window losses (tokens of one window are
    not independent), must be within the budget (the Learn-then-Test idea of CALM, in its
    simplest form). Returns the lowest threshold found (``threshold``, ``quality`` = agreement,
    ``loss_upper`` = the bound used, ``mean_layers``, ``n_layers``, ``tokens``); for a list of
    budgets, one such dict per budget (thresholds measured once are reused across budgets).
    ``deadline`` (a ``time.monotonic()`` value): no new bisection step after it, once some
    threshold has met the budget (the best so far stands)."""
    import time

    import statistics

    from ..api import applied

    budgets = [max_quality_loss] if isinstance(max_quality_loss, (int, float)) else list(max_quality_loss)
    bad = [b for b in budgets if not 0 <= b <= 1]
    if bad or not budgets:
        raise ConfigError(f"max_quality_loss={max_quality_loss} must be a fraction in [0, 1] (0.05 = five points of top-1 agreement) or a list of them")
    if delta is not None and not 0 < delta < 0.5:
        raise ConfigError(f"delta={delta} must be in (0, 0.5) (0.1 = the budget holds with 90% confidence), or None")
    if windows.dim() != 2 or windows.numel() == 0:
        raise ConfigError(f"calibration windows must be a non-empty (count, length) tensor of token ids, got shape {tuple(windows.shape)}")
    if delta is not None and len(windows) < 2:
        raise ConfigError(f"delta={delta} needs at least 2 calibration windows (the bound comes from their spread), got {len(windows)}")
    z = statistics.NormalDist().inv_cdf(1 - delta) if delta is not None else 0.0
    with torch.inference_mode():
        dense = [model(input_ids=w.unsqueeze(0)).logits[0].argmax(-1) for w in windows]
    n_layers = float(len(model.get_submodule(_layers_path(model))))
    seen: dict[float, tuple[list[float], float]] = {}

    def measure(t: float) -> tuple[list[float], float]:
        if t not in seen:
            with quiet_applies(), applied(model, EarlyExitConfig(criterion="learned", threshold=t, checkpoint=checkpoint, min_layer=min_layer,
                                                         dense_prefix=dense_prefix)):
                dec = next(m for m in model.modules() if isinstance(m, ExitingDecoder))
                dec.track, dec.layers_run = True, []
                with torch.inference_mode():
                    losses = [1 - (dec.window_logits(w.unsqueeze(0))[0].argmax(-1) == d).float().mean().item() for w, d in zip(windows, dense)]
                seen[t] = losses, sum(dec.layers_run) / max(len(dec.layers_run), 1)
        return seen[t]

    out = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps * len(budgets), desc="exit thresholds", unit="try")
    for budget in budgets:
        best = {"threshold": NEVER["learned"], "quality": 1.0, "loss_upper": 0.0, "mean_layers": n_layers, "n_layers": n_layers,
                "tokens": float(windows.numel()), "max_quality_loss": budget}
        lo, hi = 0.0, 1.0  # a higher threshold exits less
        for _ in range(steps):
            if deadline is not None and time.monotonic() >= deadline and best["threshold"] <= 1:
                break
            mid = (lo + hi) / 2
            losses, layers = measure(mid)
            loss = sum(losses) / len(losses)
            upper = loss + (z * statistics.stdev(losses) / math.sqrt(len(losses)) if z else 0.0)
            if upper <= budget:
                best, hi = {**best, "threshold": mid, "quality": 1 - loss, "loss_upper": upper, "mean_layers": layers}, mid
            else:
                lo = mid
            if bar is not None:
                bar.update()
        out.append(best)
    if bar is not None:
        bar.close()
    return out[0] if isinstance(max_quality_loss, (int, float)) else out


def _layers_path(model: nn.Module) -> str:
    from ..adapters import get_adapter

    return get_adapter(model).layers_path
