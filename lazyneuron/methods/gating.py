"""Context-aware dynamic module gating: skip whole attention / feed-forward modules per input.

A small :class:`GatePredictor` reads the context (named keys such as ``domain``, ``task`` or
``language``, each a learned embedding) and the mean of the input embeddings over the first
``gate_tokens`` tokens (the prompt), and emits one keep / skip decision per (layer, module).
The logits are an MLP of (pooled input, context embeddings) plus a per-context table (the direct
context -> mask path; ``init_masks`` starts it from given masks, e.g. per-context greedy orders).
Training (:func:`train_gates`) samples Gumbel-sigmoid gates (the two-class Gumbel-Softmax), either
straight-through (hard forward, as the paper) or relaxed (binary Concrete in the forward pass), with
a sparsity loss with an absolute and a squared term pulling the mean skip rate to a target; at
inference the decision is ``logit > threshold``, made once per sequence and held for its decode.

:class:`GatedStack` replaces the module that holds the layer list (``model.model`` of a
Llama-family causal LM, ``bert.encoder`` of a :class:`lazyneuron.tasks.TextClassifier`) and runs
the layers itself: a skipped module is **not called**; its residual branch adds nothing, and a
skipped attention module of a decoder neither writes nor reads its KV cache for that sequence.
Within a batch, samples with different masks are handled per module: the feed-forward (and the
attention of encoders and of calls without a cache) runs on the samples that keep it only;
attention with a KV cache at batch > 1 runs for the union of the batch and is zeroed for the
samples that skip it (their cache rows are written but never read).

Contexts: ``set_context(model, domain="news")`` or ``with context(model, domain=[...per sample])``.
A key the predictor was not trained with is an error; a value it never saw falls back to the
input-only path (the "no context" embedding, trained by context dropout) with a warning, or is an
error with ``unknown="error"``. A **static** predictor (one fixed mask for every input, e.g. the
greedy baseline of :func:`static_greedy_order`) uses the same checkpoint format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable, ClassVar, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import ModelAdapter, model_type_of
from ..config import MethodConfig, register
from ..errors import ConfigError
from ..surgery import LazyModule
from .base import DEMO_MODEL, Method, stack_path

log = logging.getLogger(__name__)
MODULES = ("attn", "mlp")
CHECKPOINT_FORMAT = "lazyneuron.gates/1"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "query", "key", "value", "dense")


# -- the predictor --------------------------------------------------------------------------------
class GatePredictor(nn.Module):
    """(pooled input, contexts) -> logits (B, layers, 2); keep where logit > ``threshold``."""

    def __init__(self, hidden: int, num_layers: int, contexts: dict[str, Sequence[str]] | None = None, *, ctx_dim: int = 16,
                 units: int = 64, static: bool = False, gate_tokens: int = 32, model_type: str = "", init_keep: float = 0.9,
                 modules: int = len(MODULES)) -> None:
        super().__init__()
        self.modules_per_layer = modules  # 2: (attention, feed-forward) per layer; 1: one slot per entry (speech layouts)
        self.hidden, self.num_layers, self.ctx_dim, self.units, self.static = hidden, num_layers, ctx_dim, units, static
        self.gate_tokens, self.model_type = gate_tokens, model_type
        self.contexts = {k: list(v) for k, v in (contexts or {}).items()}
        for k, vals in self.contexts.items():
            if not vals or len(set(vals)) != len(vals):
                raise ConfigError(f"context {k!r} needs distinct values, got {vals}")
        self.threshold = 0.0
        self.unknown = "fallback"
        self.meta: dict[str, Any] = {}
        bias0 = math.log(init_keep / (1 - init_keep))
        if static:
            self.logits = nn.Parameter(torch.full((num_layers, self.modules_per_layer), bias0))
        else:
            self.embed = nn.ModuleDict({k: nn.Embedding(len(v) + 1, ctx_dim) for k, v in self.contexts.items()})  # row 0: no context
            # a per-context logit offset for every (layer, module): the direct context -> mask path
            self.table = nn.ParameterDict({k: nn.Parameter(torch.zeros(len(v) + 1, num_layers, self.modules_per_layer)) for k, v in self.contexts.items()})
            self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
            self.mlp = nn.Sequential(nn.Linear(hidden + ctx_dim * len(self.contexts), units), nn.GELU(), nn.Linear(units, num_layers * self.modules_per_layer))
            with torch.no_grad():
                for e in self.embed.values():
                    e.weight.normal_(0, 0.1)
                self.mlp[2].weight.mul_(0.1)
                self.mlp[2].bias.fill_(bias0)

    # contexts -> indices
    def context_ids(self, ctx: dict[str, Any] | None, batch: int) -> dict[str, torch.Tensor]:
        ctx = ctx or {}
        if self.static:
            return {}  # one mask for every input: contexts are accepted and ignored
        bad = [k for k in ctx if k not in self.contexts]
        if bad:
            raise ConfigError(f"context key {bad[0]!r} is not one this gate predictor was trained with ({sorted(self.contexts) or 'none'}); "
                              "drop it or train gates with that key")
        out = {}
        for k, vals in self.contexts.items():
            v = ctx.get(k)
            seq = [v] * batch if v is None or isinstance(v, str) else list(v)
            if len(seq) != batch:
                raise ConfigError(f"context {k!r} has {len(seq)} values for a batch of {batch}; pass one string or one per sample")
            ids = []
            for s in seq:
                if s is None:
                    ids.append(0)
                elif s in vals:
                    ids.append(vals.index(s) + 1)
                elif self.unknown == "error":
                    raise ConfigError(f"context {k}={s!r} was never seen in training (known: {vals}); pass one of those, or "
                                      "unknown='fallback' to use the input-only path")
                else:
                    log.warning("context %s=%r was never seen in training (known: %s); using the input-only gate path", k, s, vals)
                    ids.append(0)
            out[k] = torch.tensor(ids, dtype=torch.long)
        return out

    def forward(self, pooled: torch.Tensor, ctx_ids: dict[str, torch.Tensor]) -> torch.Tensor:
        b = pooled.shape[0]
        if self.static:
            return self.logits.unsqueeze(0).expand(b, -1, -1)
        parts = [self.norm(pooled.float())] + [self.embed[k](ctx_ids[k]) for k in self.contexts]
        out = self.mlp(torch.cat(parts, -1)).view(b, self.num_layers, self.modules_per_layer)
        for k in self.contexts:
            out = out + self.table[k][ctx_ids[k]]
        return out

    def init_masks(self, masks: dict[str, dict[str | None, torch.Tensor]], margin: float = 3.0) -> None:
        """Start from given keep masks: ``{key: {value (None = no context): (layers, 2) bool}}``;
        logits become +-``margin`` through the context table, the input path starts at zero."""
        with torch.no_grad():
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.zero_()
            for k, per in masks.items():
                n = max(1, len(self.contexts))
                for v, keep in per.items():
                    row = 0 if v is None else self.contexts[k].index(v) + 1
                    self.table[k][row] = (keep.float() * 2 - 1) * margin / n

    # checkpoints
    def info(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "num_layers": self.num_layers, "contexts": self.contexts, "ctx_dim": self.ctx_dim, "units": self.units,
                "static": self.static, "gate_tokens": self.gate_tokens, "model_type": self.model_type, "threshold": self.threshold,
                "modules": self.modules_per_layer, **self.meta}

    def save(self, path: str | os.PathLike, lora: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save_file

        flat = {f"gate.{k}": v.detach().contiguous() for k, v in self.state_dict().items()}
        flat.update({f"lora.{k}": v.detach().contiguous() for k, v in (lora or {}).items()})
        save_file(flat, os.fspath(path), metadata={"format": CHECKPOINT_FORMAT, "meta": json.dumps(self.info())})

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> tuple["GatePredictor", dict[str, torch.Tensor]]:
        from ..checkpoints import read

        path = os.fspath(path)
        header, sd = read(path, CHECKPOINT_FORMAT, "gate checkpoint", "train one with lazyneuron.methods.gating.train_gates "
                          "(or `python benchmarks/gating.py`), or make a static one with static_predictor")
        info = json.loads(header["meta"])
        pred = cls(info["hidden"], info["num_layers"], info["contexts"], ctx_dim=info["ctx_dim"], units=info["units"], static=info["static"],
                   gate_tokens=info["gate_tokens"], model_type=info.get("model_type", ""), modules=int(info.get("modules", len(MODULES))))
        pred.threshold = float(info.get("threshold", 0.0))
        pred.meta = {k: v for k, v in info.items() if k not in pred.info()}
        if model is not None:
            hidden, n = gate_layout(model)
            if info.get("model_type") != model_type_of(model) or info["hidden"] != hidden or info["num_layers"] != n:
                raise ConfigError(f"gate checkpoint {path!r} was trained for a {info.get('model_type')!r} model with {info['num_layers']} layers of "
                                  f"width {info['hidden']}, not this {model_type_of(model)!r} with {n} layers of width {hidden}; train gates for this model")
        try:
            pred.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("gate.")})
        except RuntimeError as e:
            raise ConfigError(f"{path!r}: tensors do not match the checkpoint's own metadata ({str(e)[:200]})") from None
        return pred.eval(), {k[5:]: v for k, v in sd.items() if k.startswith("lora.")}


def gate_layout(model: nn.Module) -> tuple[int, int]:
    """(width the predictor reads, number of gate rows) of a model: layers for text stacks, one row
    per gated module for encoder-decoder speech models (see :mod:`.gating_speech`)."""
    from ..adapters import get_adapter

    ad = get_adapter(model)
    if ad.encoder_decoder:
        from .gating_speech import speech_slots

        return int(model.config.d_model), len(speech_slots(model))
    return int(getattr(model.config, "hidden_size", 0)), ad.num_layers


def static_predictor(model: nn.Module, skip: Sequence[tuple[int, str]]) -> GatePredictor:
    """A predictor that skips the same ``(layer, module)`` pairs for every input."""
    from ..adapters import get_adapter

    n = get_adapter(model).num_layers
    pred = GatePredictor(model.config.hidden_size, n, static=True, model_type=model_type_of(model))
    with torch.no_grad():
        pred.logits.fill_(4.0)
        for layer, mod in skip:
            if mod not in MODULES or not 0 <= layer < n:
                raise ConfigError(f"cannot skip ({layer}, {mod!r}): layers are 0..{n - 1}, modules {MODULES}")
            pred.logits[layer, MODULES.index(mod)] = -4.0
    return pred


# -- low-rank adapters (joint fine-tuning of the base) ----------------------------------------------
class LowRankLinear(LazyModule):
    """``base(x) + scale * B(A(x))``; ``enabled=False`` gives the base alone (the dense teacher).
    At inference the update is merged once into a copy of the weight (one extra copy of each
    adapted weight in memory, no extra work per token); the base weight itself is never changed."""

    method_name = "module_gating.lora"

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 16.0) -> None:
        super().__init__(base)
        self.rank, self.scale = rank, alpha / rank
        self.a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.enabled = True
        self._merged: torch.Tensor | None = None

    weight_dtype: str | None = None  # set by the runtime: inference runs the merged weight on its kernels in this format

    def set_weight_dtype(self, dtype: str) -> None:
        """Run inference on the runtime's kernels, the merged weight stored in ``dtype`` (the runtime
        applied after gating calls this); training and the dense teacher (``enabled=False``) are
        unchanged, and ``base`` is never touched."""
        self.weight_dtype = dtype
        self.__dict__["_fast"] = None  # built from the merged weight at the first inference call

    def _runtime_linear(self) -> nn.Module:
        fast = self.__dict__.get("_fast")
        if fast is None:
            from ..runtime.linear import FastLinear

            lin = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(self._merged)
                if self.base.bias is not None:
                    lin.bias.copy_(self.base.bias)
            fast = self.__dict__["_fast"] = FastLinear(lin, self.weight_dtype)  # held outside the module tree: not a parameter
        return fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged is not None and self.enabled and not torch.is_grad_enabled():  # inference: one product
            return self._runtime_linear()(x) if self.weight_dtype else F.linear(x, self._merged, self.base.bias)
        if not self.enabled:
            return self.base(x)
        if torch.is_grad_enabled() and (self.a.requires_grad or self.b.requires_grad):
            self._merged = None  # the adapters are changing
            self.__dict__["_fast"] = None
            return self.base(x) + F.linear(F.linear(x, self.a), self.b) * self.scale
        if self._merged is None:
            with torch.no_grad():
                self._merged = self.base.weight + self.scale * (self.b @ self.a)
        return self._runtime_linear()(x) if self.weight_dtype else F.linear(x, self._merged, self.base.bias)


def install_lora(layers: nn.Module, paths: list[str], rank: int, state: dict[str, torch.Tensor] | None) -> list[LowRankLinear]:
    """Wrap the linears at ``paths`` (relative to ``layers``) in rank-``rank`` adapters, loaded from
    ``state`` (``{path.a, path.b}``) when given; returns the wrappers."""
    from ..surgery import set_module

    wrapped = {p: LowRankLinear(layers.get_submodule(p), rank) for p in paths}
    if state:
        want = {f"{p}.{w}" for p in paths for w in ("a", "b")}
        if set(state) != want:
            raise ConfigError(f"the gate checkpoint's low-rank adapters ({len(state)} tensors) do not fit this model's layers ({len(want)} expected)")
        with torch.no_grad():
            for p, m in wrapped.items():
                if state[f"{p}.a"].shape != m.a.shape or state[f"{p}.b"].shape != m.b.shape:
                    raise ConfigError(f"low-rank adapter {p} has shape {tuple(state[p + '.a'].shape)}, expected {tuple(m.a.shape)}")
                m.a.copy_(state[f"{p}.a"])
                m.b.copy_(state[f"{p}.b"])
    for p, m in wrapped.items():
        set_module(layers, p, m)
    return list(wrapped.values())


def lora_state(layers: nn.Module, paths: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for p in paths:
        m = layers.get_submodule(p)
        out[f"{p}.a"], out[f"{p}.b"] = m.a, m.b
    return out


def remove_lora(layers: nn.Module, paths: list[str]) -> None:
    from ..surgery import set_module

    for p in paths:
        set_module(layers, p, layers.get_submodule(p).restore_base())


def _lora_paths(layers: nn.ModuleList) -> list[str]:
    out = []
    for i, layer in enumerate(layers):
        for n, m in layer.named_modules():
            if isinstance(m, nn.Linear) and n.rpartition(".")[2] in LORA_TARGETS:
                out.append(f"{i}.{n}")
    return out


# -- the gated layer stack --------------------------------------------------------------------------
def _family(base: nn.Module) -> str:
    if hasattr(base, "layers") and hasattr(base, "embed_tokens") and hasattr(base, "rotary_emb"):
        layer = base.layers[0]
        if not (hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm") and hasattr(layer, "self_attn") and hasattr(layer, "mlp")) \
                or hasattr(layer, "pre_feedforward_layernorm") or hasattr(layer, "post_feedforward_layernorm"):
            raise ConfigError(f"module_gating runs Llama-style blocks (input_layernorm -> self_attn, post_attention_layernorm -> mlp); "
                              f"{type(layer).__name__} has another layout")
        return "llama"
    if hasattr(base, "layer") and hasattr(base.layer[0], "attention") and hasattr(base.layer[0], "intermediate"):
        return "bert"
    raise ConfigError(f"module_gating cannot run the layers of {type(base).__name__}")


class GatedStack(LazyModule):
    """Runs the layers with per-sequence keep / skip masks over (attention, feed-forward)."""

    method_name = "module_gating"

    def __init__(self, base: nn.Module, predictor: GatePredictor, lora: dict[str, torch.Tensor] | None = None,
                 lora_rank: int = 0, embed: nn.Module | None = None) -> None:
        super().__init__(base)
        self.family = _family(base)
        self.predictor = predictor
        self.__dict__["layers"] = base.layers if self.family == "llama" else base.layer  # a view into base, not a second registration
        self.__dict__["embed"] = embed if embed is not None else getattr(base, "embed_tokens", None)  # not a submodule
        self.context: dict[str, Any] = {}
        self.mode = "hard"  # hard (inference) | gumbel (training) | dense (teacher: every module, no adapters)
        self.estimator = "straight_through"  # training gates: straight_through (hard forward) | relaxed (soft forward)
        self.tau = 1.0
        self.force: torch.Tensor | None = None  # (layers, 2) or (B, layers, 2) keep mask overriding the predictor
        self.last_gates: torch.Tensor | None = None  # (B, layers, 2) of the last call (straight-through in training)
        self.track = False
        self.history: list[torch.Tensor] = []  # masks of tracked sequences
        self.lora_paths: list[str] = []
        self._lora_mods: list[LowRankLinear] = []
        if lora:
            lora_rank = next(iter(lora.values())).shape[0] if lora_rank == 0 else lora_rank
        if lora_rank:
            self._install_lora(lora_rank, lora)

    # LoRA wrappers live inside the base's layers; revert_ unwraps them (they are LazyModules)
    def _install_lora(self, rank: int, state: dict[str, torch.Tensor] | None) -> None:
        self.lora_paths = _lora_paths(self.layers)
        self._lora_mods = install_lora(self.layers, self.lora_paths, rank, state)

    def lora_state(self) -> dict[str, torch.Tensor]:
        return lora_state(self.layers, self.lora_paths)

    def lora_modules(self) -> list[LowRankLinear]:
        return list(self._lora_mods)

    def restore_base(self) -> nn.Module:
        remove_lora(self.layers, self.lora_paths)
        self.lora_paths, self._lora_mods = [], []
        return self.base

    def weight_elements(self) -> int:
        return 0

    # gates
    def _pooled(self, h0: torch.Tensor, keym: torch.Tensor | None) -> torch.Tensor:
        k = self.predictor.gate_tokens
        x = h0[:, :k]
        m = torch.ones(x.shape[:2], dtype=x.dtype) if keym is None else keym[:, :k].to(x.dtype)
        return (x * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)

    def gates(self, h0: torch.Tensor, keym: torch.Tensor | None = None) -> torch.Tensor:
        """Keep mask (B, layers, 2): float {0, 1} (straight-through in ``gumbel`` mode)."""
        b = h0.shape[0]
        n = len(self.layers)
        if self.mode == "dense":
            return torch.ones(b, n, len(MODULES))
        if self.force is not None:
            f = self.force.float()
            return (f.unsqueeze(0) if f.dim() == 2 else f).expand(b, -1, -1)
        logits = self.predictor(self._pooled(h0, keym), self.predictor.context_ids(self.context, b))
        if self.mode == "gumbel":
            u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            soft = torch.sigmoid((logits - self.predictor.threshold + torch.log(u) - torch.log1p(-u)) / self.tau)
            if self.estimator == "relaxed":
                return soft  # binary Concrete: near 0 / 1 at low temperature, exact gradients of the relaxed model
            hard = (soft > 0.5).float()
            return hard + soft - soft.detach()
        return (logits > self.predictor.threshold).float()

    def keep_probability(self, h0: torch.Tensor, keym: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            logits = self.predictor(self._pooled(h0, keym), self.predictor.context_ids(self.context, h0.shape[0]))
            return torch.sigmoid(logits - self.predictor.threshold)

    def _set_lora(self, on: bool) -> None:
        for m in self.lora_modules():
            m.enabled = on

    # forward
    def forward(self, *args: Any, **kw: Any) -> Any:
        run = self._forward_llama if self.family == "llama" else self._forward_bert
        if self.mode != "dense" or not self._lora_mods:  # adapters stay on (no per-call loop over them)
            return run(*args, **kw)
        self._set_lora(False)  # the dense teacher: base weights only
        try:
            return run(*args, **kw)
        finally:
            self._set_lora(True)

    def _record(self, g: torch.Tensor) -> None:
        self.last_gates = g
        if self.track:
            self.history.append(g.detach().clone())

    @staticmethod
    def _plan(g: torch.Tensor) -> list[tuple[int, int, torch.Tensor | None]]:
        """The modules that run, decided once per sequence (not per token): (layer, module, rows)
        with ``rows`` the indices of the samples that keep it, or None for the whole batch."""
        keep = g.detach() > 0.5
        counts = keep.sum(0).tolist()  # (layers, modules)
        b = keep.shape[0]
        plan = []
        for j, row in enumerate(counts):
            for mi, nk in enumerate(row):
                if nk:  # skipped modules are not in the plan: never called, no KV read or written
                    plan.append((j, mi, None if nk == b else keep[:, j, mi].nonzero().squeeze(1)))
        return plan

    def _account(self, g: torch.Tensor, tokens_per_sample: int) -> None:
        """Compute accounting for :mod:`lazyneuron.bench.accounting` (weight reads not done)."""
        if not self.track:
            return
        if getattr(self, "_costs", None) is None:
            self._costs = _layer_costs(self.layers)
        skip = 1 - (g.detach() > 0.5).float()
        self.tokens_seen = getattr(self, "tokens_seen", 0) + g.shape[0] * tokens_per_sample
        self.weights_skipped = getattr(self, "weights_skipped", 0) + float((skip * self._costs).sum()) * tokens_per_sample

    def _forward_llama(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                       past_key_values: Any = None, inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None, **kw: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        base = self.base
        h = base.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, q = h.shape[:2]
        cache = past_key_values
        if cache is None and use_cache:
            from transformers import DynamicCache

            cache = DynamicCache(config=base.config)
        past = int(getattr(cache, "_ln_len", 0)) if cache is not None else 0
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ConfigError("module_gating takes a 2-D (batch, seq) attention mask")
        keym = None if attention_mask is None else attention_mask.bool()
        g = getattr(cache, "_ln_gates", None) if cache is not None and past > 0 else None
        plan = getattr(cache, "_ln_plan", None)
        if g is None or g.shape[0] != b:
            g = self.gates(h, None if keym is None else keym[:, past:past + q])
            plan = None if g.requires_grad else self._plan(g)
            if cache is not None:
                cache._ln_gates, cache._ln_plan = g.detach(), plan
            self._record(g)
        if position_ids is None:
            position_ids = torch.arange(past, past + q).unsqueeze(0).expand(b, -1)
        pe = base.rotary_emb(h, position_ids=position_ids)
        mask = None
        if q > 1 or (keym is not None and not bool(keym.all())):
            allowed = torch.ones(q, past + q, dtype=torch.bool).tril(past)
            mask = allowed.unsqueeze(0).unsqueeze(0).expand(b, 1, -1, -1)
            if keym is not None:
                mask = mask & keym[:, None, None, : past + q].bool()
        if plan is None:  # training: every module runs, its branch scaled by the sampled gate
            for j, layer in enumerate(self.layers):
                for mi, name in enumerate(MODULES):
                    h = h + g[:, j, mi].view(b, 1, 1).to(h.dtype) * self._llama_branch(layer, name, h, pe, mask, cache)
        for j, mi, idx in plan or ():
            layer, name = self.layers[j], MODULES[mi]
            if idx is None:
                h = h + self._llama_branch(layer, name, h, pe, mask, cache)
            elif name == "attn" and cache is not None:  # the cache holds every row: run the union, zero the skippers
                h = h + g[:, j, mi].view(b, 1, 1).to(h.dtype) * self._llama_branch(layer, name, h, pe, mask, cache)
            else:
                sub_pe = (pe[0][idx] if pe[0].shape[0] == b else pe[0], pe[1][idx] if pe[1].shape[0] == b else pe[1])
                h = h.index_add(0, idx, self._llama_branch(layer, name, h[idx], sub_pe, None if mask is None else mask[idx], None))
        self._account(g, q)
        if cache is not None:
            cache._ln_len = past + q
        return BaseModelOutputWithPast(last_hidden_state=base.norm(h), past_key_values=cache if use_cache or past_key_values is not None else None)

    @staticmethod
    def _llama_branch(layer: nn.Module, name: str, h: torch.Tensor, pe: Any, mask: Any, cache: Any) -> torch.Tensor:
        if name == "attn":
            return layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=pe, attention_mask=mask, past_key_values=cache)[0]
        return layer.mlp(layer.post_attention_layernorm(h))

    def _forward_bert(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        h = hidden_states
        b, n = h.shape[:2]
        keym = None
        if attention_mask is not None:
            row = attention_mask[:, 0, 0, :] if attention_mask.dim() == 4 else attention_mask
            keym = (row if row.dtype == torch.bool else row == 0).expand(b, n)
        g = self.gates(h, keym)
        self._record(g)
        if g.requires_grad:  # training: every module runs, blended by the sampled gate
            for j, layer in enumerate(self.layers):
                for mi, name in enumerate(MODULES):
                    gv = g[:, j, mi].view(b, 1, 1).to(h.dtype)
                    h = gv * self._bert_branch(layer, name, h, attention_mask) + (1 - gv) * h
        for j, mi, idx in () if g.requires_grad else self._plan(g):
            layer, name = self.layers[j], MODULES[mi]
            if idx is None:
                h = self._bert_branch(layer, name, h, attention_mask)
            else:
                sub = None if attention_mask is None or attention_mask.shape[0] != b else attention_mask[idx]
                h = h.index_copy(0, idx, self._bert_branch(layer, name, h[idx], sub))
        self._account(g, n)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=h)

    @staticmethod
    def _bert_branch(layer: nn.Module, name: str, h: torch.Tensor, mask: Any) -> torch.Tensor:
        # post-LN blocks: the residual and LayerNorm sit inside each module, so a skipped module leaves h unchanged
        if name == "attn":
            return layer.attention(h, mask)[0]
        return layer.output(layer.intermediate(h), h)


def gated_stacks(model: nn.Module) -> list[Any]:
    """The gated layer stacks of ``model``: GatedStack (text), or the gated Whisper encoder (which
    holds the predictor and the context shared with its decoder)."""
    from .gating_speech import GatedWhisperEncoder

    return [m for m in model.modules() if isinstance(m, (GatedStack, GatedWhisperEncoder))]


def _stack(model: nn.Module) -> GatedStack:
    st = gated_stacks(model)
    if not st:
        raise ConfigError("this model has no module gating applied; run lazyneuron.apply_(model, ModuleGatingConfig(checkpoint=...)) first")
    return st[0]


def set_context(model: nn.Module, **ctx: Any) -> None:
    """Context for the following calls: ``domain="news"`` (whole batch) or a list per sample; no
    keyword = input-only gating. Keys are checked against the predictor now."""
    st = _stack(model)
    lists = [len(v) for v in ctx.values() if v is not None and not isinstance(v, str)]
    st.predictor.context_ids(ctx, lists[0] if lists else 1)  # bad keys / unseen values fail (or warn) now
    st.context = dict(ctx)


@contextlib.contextmanager
def context(model: nn.Module, **ctx: Any) -> Iterator[None]:
    st = _stack(model)
    old = st.context
    set_context(model, **ctx)
    try:
        yield
    finally:
        st.context = old


# -- config and method -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModuleGatingConfig(MethodConfig):
    """``checkpoint``: a gate checkpoint (trained with :func:`train_gates` or a static mask);
    ``threshold``: keep where logit > threshold ("" / nan: the checkpoint's calibrated one);
    ``unknown``: what a context value never seen in training does (fallback | error);
    ``context``: the context every input gets until ``set_context`` says otherwise, written
    ``key=value`` (several: ``key=value|key=value``; CLI ``module_gating:context=domain=news``);
    empty: none (the input-only gate path)."""

    name: ClassVar[str] = "module_gating"
    targets: tuple[str, ...] = ("layer",)
    checkpoint: str = ""
    threshold: float = float("nan")
    unknown: str = "fallback"
    context: str = ""

    def context_dict(self) -> dict[str, str]:
        out = {}
        for item in (x for x in self.context.split("|") if x.strip()):
            k, eq, v = item.partition("=")
            if not eq or not k.strip() or not v.strip():
                raise ConfigError(f"ModuleGatingConfig.context={self.context!r} is invalid; write key=value, several as key=value|key=value")
            out[k.strip()] = v.strip()
        return out

    def validate(self) -> None:
        super().validate()
        self._check_choice("unknown", ("fallback", "error"))
        if self.targets != ("layer",):
            raise ConfigError(f"module_gating works on the whole layer stack; targets must be ('layer',), got {self.targets}")
        if not self.checkpoint:
            raise ConfigError("module_gating needs a gate checkpoint: pass checkpoint=PATH (train_gates, or static_predictor(...).save(PATH))")
        if not isinstance(self.threshold, (int, float)):
            raise ConfigError(f"ModuleGatingConfig.threshold={self.threshold!r} is invalid; pass a number or leave it unset")
        self.context_dict()

    def at_zero_strength(self) -> "ModuleGatingConfig":
        return dataclasses.replace(self, threshold=-math.inf)  # every logit is above: every module kept


@register
class ModuleGating(Method):
    config_cls = ModuleGatingConfig
    stage = 1

    def resolve(self, model: nn.Module, adapter: ModelAdapter, cfg: MethodConfig) -> list[str]:
        if adapter.family == "whisper":  # encoder and decoder, one shared gate state (gating_speech)
            return [adapter.encoder_layers_path.rpartition(".")[0], adapter.layers_path.rpartition(".")[0]]
        path = stack_path(model, adapter, "module_gating")
        _family(model.get_submodule(path))  # refuses block layouts the stack cannot run
        return [path]

    def plan(self, model: nn.Module, cfg: MethodConfig, paths: list[str], stats: Any) -> MethodConfig:
        assert isinstance(cfg, ModuleGatingConfig)
        self._pred, self._lora = GatePredictor.load(cfg.checkpoint, model)
        if not math.isnan(float(cfg.threshold)):
            self._pred.threshold = float(cfg.threshold)
        self._pred.unknown = cfg.unknown
        self._pred.context_ids(cfg.context_dict(), 1)  # a key the gates were not trained with is an error now, not at the first forward
        self._speech = None
        if paths and paths[0].endswith("encoder") and len(paths) == 2:
            from .gating_speech import SpeechGates, slot_costs, speech_slots

            self._speech = SpeechGates(self._pred, speech_slots(model))
            self._speech._costs = slot_costs(model)
            self._speech.context = cfg.context_dict()
        return cfg

    def convert(self, path: str, module: nn.Module, cfg: MethodConfig, stats: Any) -> nn.Module:
        assert isinstance(cfg, ModuleGatingConfig)
        if getattr(self, "_speech", None) is not None:
            from .gating_speech import GatedWhisperDecoder, GatedWhisperEncoder

            if path.endswith("encoder"):
                return GatedWhisperEncoder(module, self._speech)
            return GatedWhisperDecoder(module, self._speech, lora_state=self._lora or None)
        st = GatedStack(module, self._pred, self._lora or None)
        st.context = cfg.context_dict()
        return st

    def summarize(self, model: nn.Module, cfg: MethodConfig, paths: list[str]) -> dict[str, Any]:
        p = self._pred
        return {"contexts": {k: list(v) for k, v in p.contexts.items()}, "static": p.static, "threshold": p.threshold,
                "target_sparsity": p.meta.get("target_sparsity"), "lora": bool(self._lora)}

    @classmethod
    def demo_configs(cls, model_name: str = DEMO_MODEL, *, quick: bool = False) -> list[MethodConfig]:
        """``quick``: ``demo --quick``, which also takes the gates a quick demo fitted."""
        from ..fitting import fitted_checkpoint

        found = fitted_checkpoint("module_gating", model_name, quick=quick)
        if not found:
            return []
        try:  # the bench reads news: the news context where the gates have one
            pred, _ = GatePredictor.load(found["checkpoint"])
        except ConfigError:
            return []
        ctx = next((f"{k}=news" for k, vals in pred.contexts.items() if "news" in vals), "")
        return [ModuleGatingConfig(checkpoint=found["checkpoint"], context=ctx)]

    @classmethod
    def demo_notes(cls, model_name: str = DEMO_MODEL, *, quick: bool = False) -> list[str]:
        from ..fitting import fitted_checkpoint

        if fitted_checkpoint("module_gating", model_name, quick=quick):
            return ["module_gating: the bench's text is news, so the gates run with context domain=news (its searched mask); "
                    "`lazyneuron fit gates --model M --context domain=...` fits gates for your contexts."]
        if model_name == "minilm-l6":
            return ["module_gating: on encoders it runs on a task classifier (lazyneuron.tasks.TextClassifier), and the demo's MiniLM-L6 is a bare "
                    "sentence encoder; see docs/gating.md for the classifier results."]
        return [f"module_gating: no fitted gates for {model_name}; `lazyneuron fit gates --model {model_name} --context domain=news,austen` fits them."]


def default_gates_path(model_name: str, target: float, tag: str = "frozen") -> Any:
    from ..paths import cache_dir

    from ..models import checkpoint_key

    return cache_dir("checkpoints") / f"{checkpoint_key(model_name)}.gates-{tag}-{round(target * 100):02d}.safetensors"


@torch.no_grad()
def keep_by_context(model: nn.Module, tokenizer: Any, checkpoint: str | os.PathLike, windows: int = 8) -> dict[str, list[list[float]]]:
    """Mean keep probability per (layer, module) for every context value of a gate checkpoint
    (plus ``input only``): the prompts are test windows of the built-in corpus of the same name
    when there is one, news test text otherwise. For ``lazyneuron plot gates``."""
    from .. import data
    from ..api import applied

    pred, _ = GatePredictor.load(checkpoint, model)
    ctxs: list[tuple[str, dict[str, str]]] = [("input only", {})]
    ctxs += [(f"{k}={v}", {k: v}) for k, vals in pred.contexts.items() for v in vals]
    out = {}
    with applied(model, ModuleGatingConfig(checkpoint=os.fspath(checkpoint))):
        st = _stack(model)
        for name, ctx in ctxs:
            corpus = next(iter(ctx.values()), "news")
            corpus = corpus if corpus in data.CORPORA else "news"
            w = data.windows(tokenizer, corpus, "test", pred.gate_tokens, windows)
            st.context = ctx
            out[name] = st.keep_probability(st.embed(w)).mean(0).tolist() if st.embed is not None else []
    return out


# -- compute accounting ------------------------------------------------------------------------------
def module_costs(model: nn.Module) -> torch.Tensor:
    """Weight elements read per token by each (layer, module) (attention: q/k/v/o; feed-forward)."""
    from ..adapters import get_adapter

    return _layer_costs(model.get_submodule(get_adapter(model).layers_path))


def _layer_costs(layers: nn.ModuleList) -> torch.Tensor:
    out = torch.zeros(len(layers), len(MODULES))
    for j, layer in enumerate(layers):
        parts = ((layer.self_attn, layer.mlp) if hasattr(layer, "self_attn") else (layer.attention, nn.ModuleList([layer.intermediate, layer.output])))
        for mi, m in enumerate(parts):
            out[j, mi] = sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight") and p.dim() == 2)
    return out


def total_token_cost(model: nn.Module) -> float:
    """Weight elements a dense forward reads per token: layers + LM head (a classifier: layers)."""
    from ..adapters import get_adapter

    ad = get_adapter(model)
    c = float(module_costs(model).sum())
    head = ad.model_roles.get("head") if ad.causal_lm else None
    if head:
        c += float(model.get_submodule(head).weight.numel())
    return c


# -- training -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GateTraining:
    target: float  # fraction of modules skipped
    alpha: float = 4.0  # weight of the sparsity loss
    tau: tuple[float, float] = (2.0, 0.3)  # Gumbel temperature, annealed linearly over training
    lr: float = 3e-3
    lora_rank: int = 0  # > 0: train low-rank adapters on every linear of the blocks jointly with the gates
    lora_lr: float = 5e-4
    full_finetune: bool = False  # train every weight of the model jointly with the gates (the teacher is a frozen copy)
    base_lr: float = 3e-5
    context_dropout: float = 0.2
    epochs: int = 1
    estimator: str = "straight_through"  # or "relaxed": the binary Concrete gate in the forward pass (no straight-through)
    task_loss: Callable[[Any, Any, Any], torch.Tensor] | None = None  # (student logits, batch, teacher logits) -> loss, instead of KL
    teacher: bool = True  # False: no dense teacher forward (a task_loss that ignores it gets None), about a quarter less time per step

    def __post_init__(self) -> None:
        if not self.teacher and self.task_loss is None:
            raise ConfigError("GateTraining(teacher=False) needs a task_loss (the default loss is KL to the dense teacher); "
                              "pass task_loss=lm_loss for causal LMs")


def lm_loss(logits: torch.Tensor, batch: Any, teacher: torch.Tensor | None = None, *, kd: float = 0.0, start: int = 0) -> torch.Tensor:
    """Next-token cross-entropy on the batch's own tokens (positions ``start`` on), plus ``kd`` x
    KL(dense || gated) when a teacher is given: a ``task_loss`` for causal LMs that adapts the
    model to the training text instead of only imitating the dense model."""
    x = batch[0]
    lg = logits[:, start:-1]
    loss = F.cross_entropy(lg.flatten(0, 1), x[:, start + 1:].flatten())
    if kd and teacher is not None:
        loss = loss + kd * F.kl_div(F.log_softmax(lg, -1).flatten(0, 1), F.log_softmax(teacher[:, start:-1], -1).flatten(0, 1),
                                    log_target=True, reduction="batchmean")
    return loss


def sparsity_loss(keep: torch.Tensor, target: float) -> torch.Tensor:
    """|s - t| + (s - t)^2 with s the mean skip rate: the absolute term alone misses the target."""
    d = (1 - keep.mean()) - target
    return d.abs() + d * d


def train_gates(model: nn.Module, batches: Sequence[tuple[torch.Tensor, dict[str, Any]]], contexts: dict[str, Sequence[str]], cfg: GateTraining, *,
                out: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None, gate_tokens: int = 32, progress: bool = True,
                seed: int = 0, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None, init: GatePredictor | None = None,
                deadline: float | None = None) -> GatePredictor:
    """Train a gate predictor (and optional low-rank adapters) on ``model`` in place.

    ``batches``: (input ids (B, T) or a model input, per-sample contexts {key: [values]}).
    The loss is KL(dense || gated) on the logits (or ``cfg.task_loss``) + ``alpha`` * sparsity loss.
    The model is left converted (a :class:`GatedStack`); ``out``: save the result there.
    ``forward(model, batch_input)`` -> logits (default: ``model(input_ids=x).logits``).
    ``deadline`` (a ``time.monotonic()`` value): stop training there, keeping what is trained.
    """
    from ..adapters import get_adapter
    from ..surgery import set_module
    from ..train import fit, is_main

    if not 0.0 <= cfg.target < 1.0:
        raise ConfigError(f"target sparsity {cfg.target} is invalid; use a fraction of modules in [0, 1)")
    ad = get_adapter(model)
    parent = ad.layers_path.rpartition(".")[0]
    torch.manual_seed(seed)
    if cfg.full_finetune and cfg.lora_rank:
        raise ConfigError("GateTraining: choose full_finetune or lora_rank, not both")
    teacher_model = None
    if cfg.full_finetune and cfg.teacher:
        import copy

        teacher_model = copy.deepcopy(model).eval()
        for p in teacher_model.parameters():
            p.requires_grad_(False)
    st = gated_stacks(model)
    if st:
        stack = st[0]
    else:
        pred = init or GatePredictor(model.config.hidden_size, ad.num_layers, contexts, gate_tokens=gate_tokens, model_type=model_type_of(model),
                                     init_keep=min(0.97, max(0.6, 1 - cfg.target + 0.35)))
        stack = GatedStack(model.get_submodule(parent), pred, lora_rank=cfg.lora_rank)
        set_module(model, parent, stack)
    if cfg.estimator not in ("straight_through", "relaxed"):
        raise ConfigError(f"GateTraining.estimator={cfg.estimator!r} is not supported; use 'straight_through' or 'relaxed'")
    stack.estimator = cfg.estimator
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(stack.predictor.parameters())
    for p in params:
        p.requires_grad_(True)
    scale = {}
    for m in stack.lora_modules():
        m.a.requires_grad_(True)
        m.b.requires_grad_(True)
        params += [m.a, m.b]
        scale[id(m.a)] = scale[id(m.b)] = cfg.lora_lr / cfg.lr
    if cfg.full_finetune:
        own = {id(p) for p in params}
        for p in model.parameters():
            if id(p) not in own:
                p.requires_grad_(True)
                params.append(p)
                scale[id(p)] = cfg.base_lr / cfg.lr
    fwd = forward or (lambda m, x: m(input_ids=x).logits)
    gen = torch.Generator().manual_seed(seed)
    total = max(1, len(batches) * cfg.epochs)

    def on_step(step: int, _total: int) -> None:
        f = min(1.0, step / max(1, total - 1))
        stack.tau = cfg.tau[0] + (cfg.tau[1] - cfg.tau[0]) * f

    def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        m.eval()  # no dropout: the teacher and the student see the same network
        x, ctx = batch
        b = len(next(iter(ctx.values()))) if ctx else 1
        drop = torch.rand(b, generator=gen) < cfg.context_dropout
        stack.context = {k: [None if d else v for v, d in zip(vals, drop.tolist())] for k, vals in ctx.items()}
        teacher = None
        if cfg.teacher:
            with torch.no_grad():
                if teacher_model is not None:
                    teacher = fwd(teacher_model, x).float()
                else:
                    stack.mode = "dense"
                    teacher = fwd(m, x).float()
        stack.mode = "gumbel"
        try:
            logits = fwd(m, x).float()
        finally:
            stack.mode = "hard"
        if cfg.task_loss is not None:
            main = cfg.task_loss(logits, batch, teacher)
        else:
            main = F.kl_div(F.log_softmax(logits, -1).flatten(0, -2), F.log_softmax(teacher, -1).flatten(0, -2), log_target=True, reduction="batchmean")
        return main + cfg.alpha * sparsity_loss(stack.last_gates, cfg.target)

    model.train()
    try:
        fit(model, loss_fn, list(batches), epochs=cfg.epochs, lr=cfg.lr, params=params, on_step=on_step, checkpoint=checkpoint,
            progress=progress, desc=f"gates (target {cfg.target:.0%}{', low-rank' if cfg.lora_rank else ''})", seed=seed,
            lr_scale=scale, deadline=deadline)
    finally:
        model.eval()
        for p in params:
            p.requires_grad_(False)
    stack.predictor.meta.update({"target_sparsity": cfg.target, "alpha": cfg.alpha, "lora_rank": cfg.lora_rank, "full_finetune": cfg.full_finetune})
    if out is not None and is_main():
        stack.predictor.save(out, stack.lora_state() if cfg.lora_rank else None)
    return stack.predictor


def calibrate_threshold(model: nn.Module, inputs: Sequence[tuple[Any, dict[str, Any]]], target: float,
                        embed: Callable[[Any], Any] | None = None) -> float:
    """Set the predictor's threshold so the mean skip rate over ``inputs`` equals ``target``
    (only the predictor runs: embeddings, pooling, the MLP). ``inputs``: (token ids, contexts)
    pairs, or whatever ``embed`` takes; ``embed(x)`` -> the stack's input hidden states, or
    (hidden states, key mask) for padded batches. Returns the threshold."""
    stack = _stack(model)
    emb = embed or stack.embed
    if emb is None:
        raise ConfigError("calibrate_threshold needs an embedding function for this model; pass embed=...")
    logits = []
    with torch.no_grad():
        for x, ctx in inputs:
            out = emb(x)
            h0, keym = out if isinstance(out, tuple) else (out, None)
            logits.append(stack.predictor(stack._pooled(h0, keym), stack.predictor.context_ids(ctx, h0.shape[0])).flatten())
    if not logits:
        raise ConfigError("calibrate_threshold got no inputs; pass (ids, contexts) pairs from the calibration split")
    allv = torch.cat(logits).sort().values
    k = int(round(target * allv.numel()))
    if k <= 0:
        t = float(allv[0]) - 1.0
    elif k >= allv.numel():
        t = float(allv[-1]) + 1.0
    else:
        t = float((allv[k - 1] + allv[k]) / 2)
    stack.predictor.threshold = t
    return t


# -- static baseline and mask search ------------------------------------------------------------------
class MaskScorer:
    """Mean next-token loss of a Llama-family causal LM on fixed windows (B, T) under a keep mask
    (layers, 2), scored from position ``score_from`` on. ``loss(keep, start, states)`` reruns only
    the layers from ``start`` on, from the hidden states a full ``loss(keep, fill=states)`` stored."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, score_from: int = 0) -> None:
        from ..adapters import get_adapter

        ad = get_adapter(model)
        self.base = model.get_submodule(ad.layers_path.rpartition(".")[0])
        if _family(self.base) != "llama":
            raise ConfigError("mask search scores causal LMs (Llama family) by next-token loss; this model is not one")
        if windows.dim() != 2 or windows.shape[1] <= score_from + 1:
            raise ConfigError(f"mask search needs token windows (B, T) longer than score_from + 1 = {score_from + 1}, got {tuple(windows.shape)}")
        self.layers, self.n = self.base.layers, len(self.base.layers)
        self.lm_head = model.get_submodule(ad.model_roles["head"])
        b, t = windows.shape
        self.score_from = score_from
        with torch.no_grad():
            self.h0 = self.base.embed_tokens(windows)
            self.pe = self.base.rotary_emb(self.h0, position_ids=torch.arange(t).unsqueeze(0).expand(b, -1))
        self.mask = torch.ones(t, t, dtype=torch.bool).tril().unsqueeze(0).unsqueeze(0).expand(b, 1, -1, -1)
        self.tgt = windows[:, score_from + 1:]

    @torch.no_grad()
    def loss(self, keep: torch.Tensor, start: int = 0, states: list | None = None, fill: list | None = None) -> float:
        """Loss under ``keep``; ``start > 0`` needs ``states`` (hidden states entering each layer
        under a mask equal to ``keep`` before ``start``); ``fill``: a list of ``n`` to store them in."""
        h = self.h0 if start == 0 else states[start]  # type: ignore[index]
        for j in range(start, self.n):
            if fill is not None:
                fill[j] = h
            for mi, name in enumerate(MODULES):
                if keep[j, mi]:
                    h = h + GatedStack._llama_branch(self.layers[j], name, h, self.pe, self.mask, None)
        logits = self.lm_head(self.base.norm(h[:, self.score_from:-1]))
        return float(F.cross_entropy(logits.flatten(0, 1).float(), self.tgt.flatten()))


@torch.no_grad()
def static_greedy_order(model: nn.Module, windows: torch.Tensor, count: int, *, score_from: int = 0, progress: bool = True,
                        shortlist: int = 0, deadline: float | None = None, start: Sequence[tuple[int, str]] = (),
                        stats: dict[str, Any] | None = None) -> list[tuple[int, str]]:
    """Greedy removal order for a causal LM: repeatedly remove the (layer, module) whose removal
    raises the mean next-token loss on ``windows`` (B, T) least. Returns the first ``count``
    removals; the first k of them are the static baseline at k modules removed.

    Each candidate reruns the layers from its own layer on, starting from cached hidden states.
    ``shortlist > 0``: after the first step only the ``shortlist`` modules whose single removal
    cost least are candidates (fewer evaluations; the order can differ from the full greedy).
    ``deadline`` (a ``time.monotonic()`` value): once it passes, the rest of the order is the
    last step's single-removal ranking (one step, not a greedy step per module).
    ``start``: greedy removals already made (the greedy steps of a budget-cut run), continued
    from. ``stats``: a dict that gets ``greedy_steps``, how many of the returned removals are
    greedy steps (``count`` unless the deadline cut the search)."""
    import time

    sc = MaskScorer(model, windows, score_from)
    n = sc.n
    keep = torch.ones(n, len(MODULES), dtype=torch.bool)

    def single_costs(allowed: set[tuple[int, int]] | None) -> dict[tuple[int, int], float]:
        """The loss after removing each kept (allowed) module on top of ``keep``."""
        states: list = [None] * n
        sc.loss(keep, fill=states)
        out: dict[tuple[int, int], float] = {}
        for j in range(n):
            for mi in range(len(MODULES)):
                if keep[j, mi] and (allowed is None or (j, mi) in allowed):
                    kp = keep.clone()
                    kp[j, mi] = False
                    out[(j, mi)] = sc.loss(kp, j, states)
        return out

    allowed: set[tuple[int, int]] | None = None
    if shortlist and start:  # resumed: the shortlist comes from the first step's costs, as in an uninterrupted run
        first = single_costs(None)
        allowed = set(sorted(first, key=first.get)[:shortlist])
    order: list[tuple[int, str]] = []
    for j, m in start[:count]:
        keep[int(j), MODULES.index(str(m))] = False
        order.append((int(j), str(m)))
    greedy = len(order)
    it: Any = range(len(order), count)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="static greedy removal", unit="module", initial=len(order), total=count)
    for _ in it:
        first = single_costs(allowed)
        if not first:
            raise ConfigError(f"static_greedy_order: shortlist={shortlist} is smaller than count={count}")
        best = min(first, key=first.get)
        if shortlist and allowed is None:
            allowed = set(sorted(first, key=first.get)[:shortlist])
        keep[best] = False
        order.append((best[0], MODULES[best[1]]))
        greedy += 1
        if deadline is not None and time.monotonic() >= deadline and len(order) < count:
            rest = [c for c in sorted(first, key=first.get) if c != best][: count - len(order)]
            order += [(j, MODULES[mi]) for j, mi in rest]
            log.info("static greedy order: time budget reached after %d greedy steps; the remaining %d by single-removal cost", greedy, len(rest))
            break
    if stats is not None:
        stats["greedy_steps"] = greedy
    return order


class SwapSearch(NamedTuple):
    keep: torch.Tensor  # the final mask (layers, 2)
    losses: list[float]  # loss on the search windows: the start, then after each accepted swap
    masks: list[torch.Tensor]  # the mask at each of those points (masks[-1] is keep)


@torch.no_grad()
def swap_search(model: nn.Module, windows: torch.Tensor, keep: torch.Tensor, *, score_from: int = 0, rounds: int = 4, shortlist: int = 12,
                top: int = 3, verify: torch.Tensor | None = None, progress: bool = True, desc: str = "mask swap search",
                deadline: float | None = None, stats: dict[str, Any] | None = None) -> SwapSearch:
    """Improve a keep mask (layers, 2) for the text in ``windows`` at a fixed number of skipped
    modules: each round scores restoring every skipped module and removing each of the
    ``shortlist`` kept modules whose single removal cost least (all kept modules are scored in
    the first round), then tries the ``top`` x ``top`` best (restore, remove) pairs and takes the
    best pair if it lowers the loss. Stops after ``rounds`` rounds or when no pair helps.
    Returns the final mask, and the loss and mask at the start and after each accepted swap.

    ``verify`` (more windows of the same text, B', T): the single changes are still ranked on
    ``windows`` (cheap), but the pairs are scored, and accepted, by their loss on ``verify``, and
    the returned losses are ``verify`` losses: a swap must help on more text than the ranking saw.

    Used per context value (for example on each domain's own text) to turn a static mask into
    context-aware ones; every accepted swap lowers the loss on ``windows`` only, so choose among
    ``masks`` on held-out text (the start included) before keeping one. ``deadline`` (a
    ``time.monotonic()`` value): no new round starts after it. ``stats``: a dict that gets
    ``stopped_early``, whether the deadline cut the search with rounds left (a search continued
    from ``keep=masks[-1]`` with the rounds left goes on where it stopped)."""
    import time

    keep = keep.clone().bool()
    if keep.dim() != 2 or keep.shape[1] != len(MODULES):
        raise ConfigError(f"keep mask must be (layers, {len(MODULES)}), got {tuple(keep.shape)}")
    sc = MaskScorer(model, windows, score_from)
    if keep.shape[0] != sc.n:
        raise ConfigError(f"keep mask has {keep.shape[0]} layers, the model {sc.n}")
    states: list = [None] * sc.n
    cur = sc.loss(keep, fill=states)
    judge, jstates = sc, states  # the scorer that accepts pairs
    if verify is not None:
        judge, jstates = MaskScorer(model, verify, score_from), [None] * sc.n
    jcur = judge.loss(keep, fill=jstates) if verify is not None else cur
    history, path = [jcur], [keep.clone()]
    cand: list[tuple[int, int]] | None = None
    it: Any = range(rounds)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, unit="round")
    stopped = False
    for _ in it:
        if deadline is not None and time.monotonic() >= deadline:
            stopped = True
            break
        skipped = [tuple(x) for x in (~keep).nonzero().tolist()]
        if not skipped or bool((~keep).all()):
            break
        kept = [tuple(x) for x in keep.nonzero().tolist()] if cand is None else [c for c in cand if keep[c]]

        def single(pos: tuple[int, int], value: bool) -> float:
            kp = keep.clone()
            kp[pos] = value
            return sc.loss(kp, pos[0], states)

        restore = sorted(skipped, key=lambda p: single(p, True))[:top]
        removal = {p: single(p, False) for p in kept}
        cand = sorted(removal, key=removal.get)[:shortlist]
        best, best_loss = None, jcur
        for r in restore:
            for m in cand[:top]:
                kp = keep.clone()
                kp[r], kp[m] = True, False
                loss = judge.loss(kp, min(r[0], m[0]), jstates)
                if loss < best_loss:
                    best, best_loss = (r, m), loss
        if best is None:
            break
        keep[best[0]], keep[best[1]] = True, False
        cand = [c for c in cand if c != best[1]] + [best[0]]  # the restored module becomes a removal candidate
        cur = sc.loss(keep, fill=states)
        jcur = judge.loss(keep, fill=jstates) if verify is not None else cur
        history.append(jcur)
        path.append(keep.clone())
    if stats is not None:
        stats["stopped_early"] = stopped
    return SwapSearch(keep, history, path)


def search_context_mask(model: nn.Module, search: torch.Tensor, keep: torch.Tensor, heldout: torch.Tensor, *, verify: torch.Tensor | None = None,
                        score_from: int = 0, rounds: int = 4, progress: bool = True, desc: str = "mask swap search",
                        deadline: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """One context's mask: ``swap_search`` from ``keep`` on ``search`` (swaps accepted on
    ``verify`` when given), then, of the start and the mask after each accepted swap, the one with
    the lowest loss on ``heldout``. Returns the mask and its search / held-out losses and step."""
    res = swap_search(model, search, keep, score_from=score_from, rounds=rounds, verify=verify, progress=progress, desc=desc, deadline=deadline)
    sel = MaskScorer(model, heldout, score_from)
    held = [sel.loss(m) for m in res.masks]
    best = min(range(len(held)), key=held.__getitem__)
    return res.masks[best], {"search_loss": res.losses, "heldout_loss": held, "chosen_step": best}


def searched_predictor(model: nn.Module, key: str, texts: dict[str, dict[str, torch.Tensor]], keep: torch.Tensor, *, score_from: int = 0,
                       rounds: int = 4, gate_tokens: int = 32, margin: float = 3.0, progress: bool = True) -> tuple[GatePredictor, dict[str, dict[str, Any]]]:
    """Context-aware gates of a causal LM by search, with the base frozen: one keep mask per
    value of the context ``key``, each with as many skipped modules as ``keep`` (layers, 2).

    ``texts``: ``{value: {"search": (B, T), "heldout": (B', T), "verify": (B'', T) optional}}``
    token windows of that context's own text. For each value, ``swap_search`` starts from ``keep``
    on its ``search`` windows (swaps accepted on ``verify`` when given); of the start and the mask
    after each accepted swap, the one with the lowest loss on ``heldout`` is kept, so a value whose
    search does not generalise keeps ``keep``. The no-context row (the fallback) is ``keep``.
    Returns the predictor (save it and load it with ``ModuleGatingConfig(checkpoint=...)``) and,
    per value, the search and held-out losses and the chosen step."""
    if not texts:
        raise ConfigError(f"no texts given for context key {key!r}: pass {{value: {{'search': windows, 'heldout': windows}}}}")
    for v, t in texts.items():
        missing = [k for k in ("search", "heldout") if k not in t]
        if missing:
            raise ConfigError(f"texts[{v!r}] lacks {missing}: each context value needs 'search' and 'heldout' token windows (B, T)")
    from ..adapters import get_adapter

    n = get_adapter(model).num_layers
    keep = keep.clone().bool()
    masks: dict[str | None, torch.Tensor] = {None: keep}
    info: dict[str, dict[str, Any]] = {}
    for v, t in texts.items():
        masks[v], info[v] = search_context_mask(model, t["search"], keep, t["heldout"], verify=t.get("verify"), score_from=score_from,
                                                rounds=rounds, progress=progress, desc=f"mask search {key}={v}")
    pred = GatePredictor(model.config.hidden_size, n, {key: list(texts)}, gate_tokens=gate_tokens, model_type=model_type_of(model))
    pred.init_masks({key: masks}, margin=margin)
    pred.meta.update({"target_sparsity": float((~keep).float().mean()), "trained_on": "swap search per context value, chosen on held-out text"})
    return pred.eval(), info
