"""Context-aware module gating on speech encoder-decoders (Whisper): the seeds' own setting.

One :class:`~lazyneuron.methods.gating.GatePredictor` row per gated module ("slot"): the encoder's
self-attention and feed-forward of every layer, and the decoder's self-attention, cross-attention
and feed-forward of every layer. The predictor reads the time-pooled output of the convolution
front end (over the frames that hold speech when the feature extractor's attention mask is given)
plus the context embeddings (``language``, ``task``), once per utterance, before the first encoder
layer runs; the decision holds for the whole transcription.

:class:`GatedWhisperEncoder` and :class:`GatedWhisperDecoder` replace ``model.model.encoder`` and
``model.model.decoder`` (both keep the original as ``.base``; ``revert_`` puts them back) and run
the layers themselves from the layers' own submodules: a skipped module is **not called**, its
residual branch adds nothing. In the decoder a skipped self-attention neither writes nor reads its
KV cache and a skipped cross-attention never projects the encoder output. The decoder keeps its
own position counter, so skipped cache writes do not shift positions. At batch > 1, feed-forward
modules run on the samples that keep them; attention with a cache runs for the batch and is zeroed
for the samples that skip it.

Training (:func:`train_speech_gates`) distils the dense model's decoder logits (teacher forcing on
the dense model's own transcripts) with Gumbel-sigmoid gates and separate encoder and decoder
sparsity losses (absolute + squared term). The static baseline (:func:`static_speech_order`)
removes the same modules for every input, chosen greedily on the calibration loss.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..surgery import DelegatingLazyModule, LazyModule

log = logging.getLogger(__name__)
ENC_MODULES = ("attn", "mlp")
DEC_MODULES = ("attn", "cross", "mlp")


def speech_slots(model: nn.Module) -> list[tuple[str, int, str]]:
    """The gated modules of an encoder-decoder speech model, in predictor order:
    ``("encoder", layer, "attn" | "mlp")`` then ``("decoder", layer, "attn" | "cross" | "mlp")``."""
    cfg = model.config
    enc = [("encoder", j, m) for j in range(int(cfg.encoder_layers)) for m in ENC_MODULES]
    dec = [("decoder", j, m) for j in range(int(cfg.decoder_layers)) for m in DEC_MODULES]
    return enc + dec


def slot_costs(model: nn.Module) -> torch.Tensor:
    """Weight elements each slot reads per frame (encoder) or per token (decoder; cross-attention:
    the query and output projections, its key / value projections run once per utterance)."""
    wh = _whisper(model)
    out = []
    for stack, j, name in speech_slots(model):
        layer = (wh.encoder if stack == "encoder" else wh.decoder).layers[j]
        if name == "attn":
            mods = [layer.self_attn]
        elif name == "cross":
            mods = [layer.encoder_attn.q_proj, layer.encoder_attn.out_proj]
        else:
            mods = [layer.fc1, layer.fc2]
        out.append(sum(p.numel() for m in mods for n, p in m.named_parameters() if n.endswith("weight") and p.dim() == 2))
    return torch.tensor(out, dtype=torch.float64)


def _whisper(model: nn.Module) -> nn.Module:
    """The WhisperModel inside (``model.model`` of WhisperForConditionalGeneration)."""
    inner = getattr(model, "model", model)
    if not (hasattr(inner, "encoder") and hasattr(inner, "decoder")):
        raise ConfigError(f"expected a Whisper encoder-decoder (WhisperForConditionalGeneration), got {type(model).__name__}")
    return inner


def _unwrap(m: nn.Module) -> nn.Module:
    return m.base if isinstance(m, LazyModule) else m


class SpeechGates:
    """State shared by the encoder and decoder wrappers: the predictor, the context, the mode and
    the gates of the current utterances (decided by the encoder, read by the decoder)."""

    def __init__(self, predictor: nn.Module, slots: list[tuple[str, int, str]]) -> None:
        self.predictor = predictor
        self.slots = slots
        self.n_enc = sum(1 for s in slots if s[0] == "encoder")
        self.context: dict[str, Any] = {}
        self.mode = "hard"  # hard (inference) | gumbel (training) | dense (teacher: every module)
        self.estimator = "straight_through"
        self.tau = 1.0
        self.force: torch.Tensor | None = None  # (slots,) or (B, slots) keep mask overriding the predictor
        self.gates: torch.Tensor | None = None  # (B, slots) of the current utterances
        self.track = False
        self.history: list[torch.Tensor] = []
        self.stats = {"enc_cost": 0.0, "enc_skipped": 0.0, "dec_cost": 0.0, "dec_skipped": 0.0}
        self._costs: torch.Tensor | None = None

    def decide(self, pooled: torch.Tensor) -> torch.Tensor:
        """Keep mask (B, slots), float {0, 1} (straight-through or relaxed in ``gumbel`` mode)."""
        b, s = pooled.shape[0], len(self.slots)
        if self.mode == "dense":
            g = torch.ones(b, s)
        elif self.force is not None:
            f = self.force.float()
            g = (f.unsqueeze(0) if f.dim() == 1 else f).expand(b, -1).clone()
        else:
            logits = self.predictor(pooled, self.predictor.context_ids(self.context, b)).reshape(b, s)
            if self.mode == "gumbel":
                u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
                soft = torch.sigmoid((logits - self.predictor.threshold + torch.log(u) - torch.log1p(-u)) / self.tau)
                g = soft if self.estimator == "relaxed" else (soft > 0.5).float() + soft - soft.detach()
            else:
                g = (logits > self.predictor.threshold).float()
        self.gates = g
        if self.track:
            self.history.append(g.detach().clone())
        return g

    def keep_probability(self, pooled: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.predictor(pooled, self.predictor.context_ids(self.context, pooled.shape[0])).reshape(pooled.shape[0], -1)
            return torch.sigmoid(logits - self.predictor.threshold)

    def encoder_gates(self) -> torch.Tensor:
        return self._current()[:, : self.n_enc].reshape(-1, self.n_enc // len(ENC_MODULES), len(ENC_MODULES))

    def decoder_gates(self, batch: int) -> torch.Tensor:
        g = self._current()[:, self.n_enc:]
        if g.shape[0] != batch:
            if batch % g.shape[0]:
                raise ConfigError(f"the decoder got a batch of {batch} but the encoder decided gates for {g.shape[0]} utterances; "
                                  "run the encoder on the same batch first")
            g = g.repeat_interleave(batch // g.shape[0], 0)  # beams / repeated samples share their utterance's mask
        return g.reshape(batch, -1, len(DEC_MODULES))

    def _current(self) -> torch.Tensor:
        if self.gates is None:
            raise ConfigError("module gating on Whisper decides its masks in the encoder: run model.model.encoder (or generate / "
                              "lazyneuron.speech.transcribe) before calling the decoder on its own")
        return self.gates

    def account(self, stack: str, g: torch.Tensor, positions: int) -> None:
        if not self.track:
            return
        if self._costs is None:
            raise ConfigError("accounting needs slot costs; set them with SpeechGates._costs = slot_costs(model)")
        c = self._costs[: self.n_enc] if stack == "enc" else self._costs[self.n_enc:]
        keep = (g.detach() > 0.5).reshape(g.shape[0], -1).double()
        self.stats[f"{stack}_cost"] += float(c.sum()) * g.shape[0] * positions
        self.stats[f"{stack}_skipped"] += float(((1 - keep) * c).sum()) * positions

    def skipped(self) -> dict[str, float]:
        """Fractions of the encoder's (per frame) and decoder's (per token) gated weights skipped so far."""
        s = self.stats
        return {"encoder": s["enc_skipped"] / s["enc_cost"] if s["enc_cost"] else 0.0,
                "decoder": s["dec_skipped"] / s["dec_cost"] if s["dec_cost"] else 0.0}


class _Delegating(DelegatingLazyModule):
    """Attributes the wrapper does not have come from the wrapped module (``conv1``, ``config``,
    ``layers``...), so code that inspects ``model.model.encoder`` (generate) keeps working."""


def _plan(g: torch.Tensor) -> list[tuple[int, int, torch.Tensor | None]]:
    """(layer, module, rows that keep it or None for all) of the modules that run; g (B, L, M)."""
    keep = g.detach() > 0.5
    b = keep.shape[0]
    out = []
    for j, row in enumerate(keep.sum(0).tolist()):
        for mi, nk in enumerate(row):
            if nk:
                out.append((j, mi, None if nk == b else keep[:, j, mi].nonzero().squeeze(1)))
    return out


class GatedWhisperEncoder(_Delegating):
    """Whisper's encoder with per-utterance keep / skip masks over (self-attention, feed-forward)."""

    method_name = "module_gating"

    def __init__(self, base: nn.Module, gates: SpeechGates) -> None:
        super().__init__(base)
        self.predictor = gates.predictor  # registered here (parameters, state dict); the decoder shares it
        self.__dict__["shared"] = gates

    # the gating API of text stacks (set_context, keep probabilities)
    @property
    def context(self) -> dict[str, Any]:
        return self.shared.context

    @context.setter
    def context(self, ctx: dict[str, Any]) -> None:
        self.shared.context = ctx

    def weight_elements(self) -> int:
        return 0

    def front_end(self, input_features: torch.Tensor) -> torch.Tensor:
        base = self.base
        x = F.gelu(base.conv1(input_features))
        x = F.gelu(base.conv2(x))
        return x.permute(0, 2, 1)  # (B, frames, d_model)

    def pooled(self, frames: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Mean of the front end's output over the frames that hold speech (all frames without a mask)."""
        if attention_mask is None:
            if not self.predictor.static and not getattr(self, "_warned", False):
                self._warned = True
                log.warning("the gated Whisper encoder got no attention_mask: its gate input pools all 3000 frames, padding included, "
                            "while gates are trained and calibrated on the audio frames; pass the feature extractor's mask "
                            "(lazyneuron.speech.features / transcribe do)")
            return frames.mean(1)
        m = attention_mask[:, :: max(1, attention_mask.shape[1] // frames.shape[1])][:, : frames.shape[1]].to(frames.dtype)
        return (frames * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        base = self.base
        want = base.config.max_source_positions * base.conv1.stride[0] * base.conv2.stride[0]
        if input_features.shape[-1] != want:
            raise ConfigError(f"Whisper expects mel features of length {want}, got {input_features.shape[-1]}; pad with the feature extractor")
        x = self.front_end(input_features)
        b, t = x.shape[:2]
        self.shared.decide(self.pooled(x, attention_mask))
        g = self.shared.encoder_gates()  # (B, layers, 2)
        h = x + base.embed_positions.weight[:t]
        layers = base.layers
        if g.requires_grad:  # training: every module runs, its branch scaled by the sampled gate
            for j, layer in enumerate(layers):
                for mi, name in enumerate(ENC_MODULES):
                    h = h + g[:, j, mi].view(b, 1, 1).to(h.dtype) * self._branch(layer, name, h)
        else:
            for j, mi, idx in _plan(g):
                layer, name = layers[j], ENC_MODULES[mi]
                if idx is None:
                    h = h + self._branch(layer, name, h)
                else:
                    h = h.index_add(0, idx, self._branch(layer, name, h[idx]))
        self.shared.account("enc", g, t)
        return BaseModelOutput(last_hidden_state=base.layer_norm(h))

    @staticmethod
    def _branch(layer: nn.Module, name: str, h: torch.Tensor) -> torch.Tensor:
        if name == "attn":
            return layer.self_attn(hidden_states=layer.self_attn_layer_norm(h), attention_mask=None)[0]
        return layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(h))))


LORA_DECODER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "encoder_attn.q_proj",
                "encoder_attn.out_proj", "fc1", "fc2")  # not the cross-attention keys / values: they stay the encoder output's


class GatedWhisperDecoder(_Delegating):
    """Whisper's decoder with the utterance's keep / skip masks over (self-attention,
    cross-attention, feed-forward); positions from its own counter on the cache. ``lora_rank`` /
    ``lora_state``: low-rank adapters on the decoder's linears, trained jointly with the gates
    (merged into weight copies at inference; the dense teacher runs without them)."""

    method_name = "module_gating"

    def __init__(self, base: nn.Module, gates: SpeechGates, lora_rank: int = 0, lora_state: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(base)
        self.__dict__["shared"] = gates
        self.lora_paths: list[str] = []
        if lora_state:
            lora_rank = next(iter(lora_state.values())).shape[0] if lora_rank == 0 else lora_rank
        if lora_rank:
            self._install_lora(lora_rank, lora_state)

    def _install_lora(self, rank: int, state: dict[str, torch.Tensor] | None) -> None:
        from .gating import install_lora

        layers = self.base.layers
        self.lora_paths = [f"{i}.{n}" for i in range(len(layers)) for n in LORA_DECODER]
        install_lora(layers, self.lora_paths, rank, state)

    def lora_modules(self) -> list[nn.Module]:
        return [self.base.layers.get_submodule(p) for p in self.lora_paths]

    @torch.no_grad()
    def merge(self) -> None:
        """Merge the adapters into their weight copies now (otherwise the first inference call does)."""
        for m in self.lora_modules():
            m._merged = m.base.weight + m.scale * (m.b @ m.a)
            m.__dict__["_fast"] = None  # the runtime's copy, if any, is rebuilt from the new merge

    def lora_state(self) -> dict[str, torch.Tensor]:
        from .gating import lora_state

        return lora_state(self.base.layers, self.lora_paths)

    def restore_base(self) -> nn.Module:
        from .gating import remove_lora

        remove_lora(self.base.layers, self.lora_paths)
        self.lora_paths = []
        return self.base

    def weight_elements(self) -> int:
        return 0

    def forward(self, *args: Any, **kw: Any) -> Any:
        if self.shared.mode != "dense" or not self.lora_paths:
            return self._forward(*args, **kw)
        mods = self.lora_modules()
        for m in mods:
            m.enabled = False  # the dense teacher: base weights only
        try:
            return self._forward(*args, **kw)
        finally:
            for m in mods:
                m.enabled = True

    def _forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, past_key_values: Any = None, inputs_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, use_cache: bool | None = None, **kw: Any) -> Any:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        base = self.base
        if encoder_hidden_states is None:
            raise ConfigError("the gated Whisper decoder needs encoder_hidden_states (the encoder's output)")
        h = base.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, q = h.shape[:2]
        g = self.shared.decoder_gates(b)  # (B, layers, 3)
        cache = past_key_values
        if cache is None and use_cache:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        past = int(getattr(cache, "_ln_len", 0)) if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + q).unsqueeze(0).expand(b, -1)
        h = h + base.embed_positions.weight[position_ids]
        mask = None
        if q > 1 or (attention_mask is not None and not bool(attention_mask.bool().all())):
            allowed = torch.ones(q, past + q, dtype=torch.bool).tril(past).unsqueeze(0).unsqueeze(0).expand(b, 1, -1, -1)
            if attention_mask is not None and attention_mask.dim() == 2:
                allowed = allowed & attention_mask.bool()[:, None, None, -(past + q):]
            mask = torch.zeros(allowed.shape, dtype=h.dtype).masked_fill(~allowed, torch.finfo(h.dtype).min)
        enc = encoder_hidden_states
        layers = base.layers
        if g.requires_grad:
            for j, layer in enumerate(layers):
                for mi, name in enumerate(DEC_MODULES):
                    h = h + g[:, j, mi].view(b, 1, 1).to(h.dtype) * self._branch(layer, name, h, enc, mask, cache)
        else:
            ran_all: list[tuple[int, int]] = []
            for j, mi, idx in _plan(g):
                layer, name = layers[j], DEC_MODULES[mi]
                if idx is None:
                    h = h + self._branch(layer, name, h, enc, mask, cache)
                elif name != "mlp" and cache is not None:  # the cache holds every row: run the batch, zero the skippers
                    h = h + g[:, j, mi].view(b, 1, 1).to(h.dtype) * self._branch(layer, name, h, enc, mask, cache)
                    ran_all.append((j, mi))
                else:
                    sub = None if mask is None else mask[idx]
                    h = h.index_add(0, idx, self._branch(layer, name, h[idx], enc[idx] if enc.shape[0] == b else enc, sub, None))
        if not g.requires_grad and ran_all:  # accounting: those modules ran for every row
            g = g.clone()
            for j, mi in ran_all:
                g[:, j, mi] = 1.0
        self.shared.account("dec", g, q)
        if cache is not None:
            cache._ln_len = past + q
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=base.layer_norm(h), past_key_values=cache)

    @staticmethod
    def _branch(layer: nn.Module, name: str, h: torch.Tensor, enc: torch.Tensor, mask: Any, cache: Any) -> torch.Tensor:
        if name == "attn":
            return layer.self_attn(layer.self_attn_layer_norm(h), past_key_values=cache, attention_mask=mask)[0]
        if name == "cross":
            return layer.encoder_attn(layer.encoder_attn_layer_norm(h), key_value_states=enc, past_key_values=cache)[0]
        return layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(h))))


def speech_gates(model: nn.Module) -> SpeechGates:
    """The shared gate state of a gated Whisper model."""
    enc = _whisper(model).encoder
    if not isinstance(enc, GatedWhisperEncoder):
        raise ConfigError("this Whisper model has no module gating applied; apply_(model, ModuleGatingConfig(checkpoint=...)) first")
    return enc.shared


def install(model: nn.Module, predictor: nn.Module, lora_rank: int = 0, lora_state: dict[str, torch.Tensor] | None = None) -> SpeechGates:
    """Wrap the encoder and decoder of ``model`` in place around one shared gate state."""
    wh = _whisper(model)
    if isinstance(wh.encoder, GatedWhisperEncoder):
        raise ConfigError("module gating is already applied to this model; revert_ it first")
    gates = SpeechGates(predictor, speech_slots(model))
    gates._costs = slot_costs(model)
    wh.encoder = GatedWhisperEncoder(wh.encoder, gates)
    wh.decoder = GatedWhisperDecoder(wh.decoder, gates, lora_rank, lora_state)
    return gates


def uninstall(model: nn.Module) -> None:
    wh = _whisper(model)
    if isinstance(wh.decoder, GatedWhisperDecoder):
        wh.decoder.restore_base()
    wh.encoder, wh.decoder = _unwrap(wh.encoder), _unwrap(wh.decoder)


def new_predictor(model: nn.Module, contexts: dict[str, Sequence[str]], *, init_keep: float = 0.9, static: bool = False) -> nn.Module:
    from .gating import GatePredictor

    return GatePredictor(int(model.config.d_model), len(speech_slots(model)), contexts, model_type="whisper", init_keep=init_keep,
                         static=static, modules=1, gate_tokens=0)


def static_speech_predictor(model: nn.Module, skip: Sequence[tuple[str, int, str]]) -> nn.Module:
    """A predictor that skips the same ``(stack, layer, module)`` slots for every utterance."""
    slots = speech_slots(model)
    pred = new_predictor(model, {}, static=True)
    with torch.no_grad():
        pred.logits.fill_(4.0)
        for s in skip:
            s = (s[0], int(s[1]), s[2])
            if s not in slots:
                raise ConfigError(f"cannot skip {s}: slots are (encoder, 0..{model.config.encoder_layers - 1}, {ENC_MODULES}) and "
                                  f"(decoder, 0..{model.config.decoder_layers - 1}, {DEC_MODULES})")
            pred.logits[slots.index(s), 0] = -4.0
    return pred


# -- teacher-forced calibration loss ------------------------------------------------------------------
@dataclasses.dataclass
class SpeechBatch:
    """Utterances prepared once: mel features, the speech mask, the prompt + the dense model's
    transcript (teacher forcing), its contexts, and (filled lazily) the dense encoder output."""

    features: torch.Tensor  # (B, mels, 3000)
    feature_mask: torch.Tensor | None  # (B, 3000)
    tokens: torch.Tensor  # (B, T) prompt + transcript, padded with the last token
    token_mask: torch.Tensor  # (B, T) 1 on real tokens
    start: int  # first position whose next-token prediction is scored (the end of the prompt)
    context: dict[str, list[str]]
    encoder_out: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    cross: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per decoder layer: cross-attention keys, values (B, heads, frames, hd)

    def cache(self) -> Any:
        """A fresh decoder cache whose cross-attention part holds this batch's precomputed keys and
        values (they depend on the encoder output only, not on the gates), or None."""
        if self.cross is None:
            return None
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        cross = DynamicCache()
        for j, (k, v) in enumerate(self.cross):
            cross.update(k, v, j)
        c = EncoderDecoderCache(DynamicCache(), cross)
        for j in range(len(self.cross)):
            c.is_updated[j] = True
        return c


def decoder_logits(model: nn.Module, batch: SpeechBatch, *, reuse_encoder: bool) -> torch.Tensor:
    """Teacher-forced decoder logits (B, T, vocab) of the current gates; ``reuse_encoder``: take the
    batch's cached dense encoder output (the encoder gates must then keep every module)."""
    wh = _whisper(model)
    gates = speech_gates(model)
    old = gates.context
    gates.context = batch.context
    try:
        return _decoder_logits(model, wh, gates, batch, reuse_encoder)
    finally:
        gates.context = old


def _decoder_logits(model: nn.Module, wh: nn.Module, gates: SpeechGates, batch: SpeechBatch, reuse_encoder: bool) -> torch.Tensor:
    if reuse_encoder and batch.encoder_out is not None:
        g = gates.decide(batch.pooled)
        gates.gates = torch.cat([torch.ones_like(g[:, : gates.n_enc]), g[:, gates.n_enc:]], 1)  # the cached encoder output is the dense one
        enc = batch.encoder_out
    else:
        enc = wh.encoder(batch.features, attention_mask=batch.feature_mask).last_hidden_state
    cache = batch.cache() if reuse_encoder else None
    out = wh.decoder(input_ids=batch.tokens, encoder_hidden_states=enc, past_key_values=cache, use_cache=cache is not None).last_hidden_state
    return model.proj_out(out)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, batch: SpeechBatch) -> torch.Tensor:
    """KL(dense || gated) per scored token (the positions from the end of the prompt on)."""
    s = F.log_softmax(student[:, batch.start - 1: -1].float(), -1)
    t = F.log_softmax(teacher[:, batch.start - 1: -1].float(), -1)
    m = batch.token_mask[:, batch.start:].float()
    kl = (t.exp() * (t - s)).sum(-1)
    return (kl * m).sum() / m.sum().clamp(min=1)


@torch.no_grad()
def prepare(model: nn.Module, batches: Sequence[SpeechBatch], *, cross: bool = False) -> None:
    """Fill each batch's dense encoder output and pooled front-end vector (the model must be gated);
    ``cross``: also the decoder's cross-attention keys and values (memory: layers x 2 x frames x
    d_model floats per utterance; teacher-forced losses then skip those projections)."""
    gates = speech_gates(model)
    wh = _whisper(model)
    old = gates.mode
    gates.mode = "dense"
    try:
        for bt in batches:
            enc = wh.encoder
            bt.pooled = enc.pooled(enc.front_end(bt.features), bt.feature_mask)
            if bt.encoder_out is None:
                bt.encoder_out = enc(bt.features, attention_mask=bt.feature_mask).last_hidden_state
            if cross and bt.cross is None:
                b, t, _ = bt.encoder_out.shape
                bt.cross = []
                for layer in wh.decoder.base.layers:
                    att = layer.encoder_attn
                    shape = (b, t, att.num_heads, att.head_dim)
                    bt.cross.append((att.k_proj(bt.encoder_out).view(shape).transpose(1, 2).contiguous(),
                                     att.v_proj(bt.encoder_out).view(shape).transpose(1, 2).contiguous()))
    finally:
        gates.mode = old


@torch.no_grad()
def teacher_logits(model: nn.Module, batches: Sequence[SpeechBatch]) -> list[torch.Tensor]:
    gates = speech_gates(model)
    old = gates.mode
    gates.mode = "dense"
    try:
        return [decoder_logits(model, bt, reuse_encoder=True) for bt in batches]
    finally:
        gates.mode = old


# -- training ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class SpeechGateTraining:
    decoder_target: float  # fraction of decoder modules skipped
    encoder_target: float = 0.0  # fraction of encoder modules skipped (> 0: the encoder runs in every step, much slower)
    alpha: float = 4.0
    tau: tuple[float, float] = (2.0, 0.3)
    lr: float = 1e-2
    epochs: int = 3
    context_dropout: float = 0.2
    lora_rank: int = 0  # > 0: low-rank adapters on the decoder's linears, trained jointly with the gates
    lora_lr: float = 1e-3
    train_gates: bool = True  # False: the predictor stays as given (e.g. a static mask) and only the adapters train
    estimator: str = "straight_through"  # or "relaxed": binary Concrete gates in the forward pass

    def validate(self) -> None:
        for k in ("decoder_target", "encoder_target"):
            v = getattr(self, k)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"SpeechGateTraining.{k}={v} is invalid; use a fraction of modules in [0, 1)")


def train_speech_gates(model: nn.Module, batches: Sequence[SpeechBatch], contexts: dict[str, Sequence[str]], cfg: SpeechGateTraining, *,
                       out: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None, progress: bool = True, seed: int = 0,
                       init: nn.Module | None = None, deadline: float | None = None) -> nn.Module:
    """Train a gate predictor for a Whisper model (installed in place; returned). Loss: KL to the
    dense decoder's logits + alpha * (encoder and decoder sparsity losses)."""
    from ..train import fit, is_main
    from .gating import sparsity_loss

    cfg.validate()
    if not batches:
        raise ConfigError("train_speech_gates got no batches; build them with lazyneuron.speech.gating_batches(...) from the train split")
    torch.manual_seed(seed)
    try:
        gates = speech_gates(model)
    except ConfigError:
        keep = min(0.97, max(0.6, 1 - max(cfg.decoder_target, cfg.encoder_target) + 0.35))
        gates = install(model, init or new_predictor(model, contexts, init_keep=keep), cfg.lora_rank)
    if cfg.estimator not in ("straight_through", "relaxed"):
        raise ConfigError(f"SpeechGateTraining.estimator={cfg.estimator!r} is not supported; use 'straight_through' or 'relaxed'")
    gates.estimator = cfg.estimator
    reuse = cfg.encoder_target == 0.0
    prepare(model, batches, cross=reuse)
    teachers = teacher_logits(model, batches)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(gates.predictor.parameters()) if cfg.train_gates else []
    for p in params:
        p.requires_grad_(True)
    dec = _whisper(model).decoder
    if not params and not dec.lora_paths:
        raise ConfigError("SpeechGateTraining(train_gates=False) trains nothing without low-rank adapters; set lora_rank > 0")
    scale = {}
    for m in dec.lora_modules():
        m.a.requires_grad_(True)
        m.b.requires_grad_(True)
        params += [m.a, m.b]
        scale[id(m.a)] = scale[id(m.b)] = cfg.lora_lr / cfg.lr
    gen = torch.Generator().manual_seed(seed)
    items = list(range(len(batches)))
    total = max(1, len(items) * cfg.epochs)

    def on_step(step: int, _total: int) -> None:
        f = min(1.0, step / max(1, total - 1))
        gates.tau = cfg.tau[0] + (cfg.tau[1] - cfg.tau[0]) * f

    def loss_fn(m: nn.Module, i: int) -> torch.Tensor:
        m.eval()
        bt = batches[i]
        b = bt.tokens.shape[0]
        drop = torch.rand(b, generator=gen) < cfg.context_dropout
        ctx = {k: [None if d else v for v, d in zip(vals, drop.tolist())] for k, vals in bt.context.items()}
        gates.mode = "gumbel" if cfg.train_gates else "hard"
        try:
            logits = decoder_logits(m, dataclasses.replace(bt, context=ctx), reuse_encoder=reuse)
        finally:
            gates.mode = "hard"
        g = gates.gates
        loss = distill_loss(logits, teachers[i], bt) + cfg.alpha * sparsity_loss(g[:, gates.n_enc:], cfg.decoder_target)
        if not reuse:
            loss = loss + cfg.alpha * sparsity_loss(g[:, : gates.n_enc], cfg.encoder_target)
        return loss

    try:
        fit(model, loss_fn, items, epochs=cfg.epochs, lr=cfg.lr, params=params, on_step=on_step, checkpoint=checkpoint, progress=progress,
            desc=f"speech gates (decoder {cfg.decoder_target:.0%}, encoder {cfg.encoder_target:.0%})", seed=seed, deadline=deadline,
            lr_scale=scale)
    finally:
        model.eval()
        for p in params:
            p.requires_grad_(False)
    if reuse and cfg.train_gates and not gates.predictor.static:  # no encoder target: the encoder's modules always run
        with torch.no_grad():
            gates.predictor.mlp[2].bias[: gates.n_enc] = 1e4
    gates.predictor.meta.update({"decoder_target": cfg.decoder_target, "encoder_target": cfg.encoder_target, "alpha": cfg.alpha,
                                 "target_sparsity": cfg.decoder_target, "lora_rank": cfg.lora_rank})
    if out is not None and is_main():
        gates.predictor.save(out, dec.lora_state() if dec.lora_paths else None)
    return gates.predictor


@torch.no_grad()
def calibrate_speech_threshold(model: nn.Module, batches: Sequence[SpeechBatch], decoder_target: float,
                               encoder_target: float | None = None) -> float:
    """Set the threshold so the mean skip rate of the decoder slots over ``batches`` equals
    ``decoder_target`` (or of the encoder slots, when only ``encoder_target`` is given)."""
    gates = speech_gates(model)
    logits = []
    for bt in batches:
        if bt.pooled is None:
            prepare(model, [bt])
        lg = gates.predictor(bt.pooled, gates.predictor.context_ids(bt.context, bt.pooled.shape[0])).reshape(bt.pooled.shape[0], -1)
        logits.append((lg[:, gates.n_enc:] if encoder_target is None else lg[:, : gates.n_enc]).flatten())
    if not logits:
        raise ConfigError("calibrate_speech_threshold got no batches; pass the calibration split")
    target = decoder_target if encoder_target is None else encoder_target
    v = torch.cat(logits).sort().values
    k = int(round(target * v.numel()))
    t = float(v[0]) - 1.0 if k <= 0 else float(v[-1]) + 1.0 if k >= v.numel() else float((v[k - 1] + v[k]) / 2)
    gates.predictor.threshold = t
    return t


# -- static baseline ----------------------------------------------------------------------------------
@torch.no_grad()
def static_speech_order(model: nn.Module, batches: Sequence[SpeechBatch], count: int, *, stack: str = "decoder", progress: bool = True,
                        teachers: Sequence[torch.Tensor] | None = None) -> list[tuple[str, int, str]]:
    """Greedy: remove, one at a time, the ``stack`` module whose removal raises the calibration
    distillation loss least; the first ``count`` removals (the same for every input)."""
    from tqdm.auto import tqdm

    gates = speech_gates(model)
    slots = gates.slots
    allowed = [i for i, s in enumerate(slots) if s[0] == stack]
    if not 0 <= count <= len(allowed):
        raise ConfigError(f"static_speech_order: count={count} is outside 0..{len(allowed)} ({stack} modules)")
    if any(bt.encoder_out is None or stack == "decoder" and bt.cross is None for bt in batches):
        prepare(model, batches, cross=stack == "decoder")
    teachers = list(teachers) if teachers is not None else teacher_logits(model, batches)
    reuse = stack == "decoder"
    keep = torch.ones(len(slots), dtype=torch.bool)
    old = gates.force
    removed: list[tuple[str, int, str]] = []
    bar = tqdm(total=count, desc=f"static {stack} order", disable=not progress)
    try:
        for _ in range(count):
            best, best_loss = None, math.inf
            for i in allowed:
                if not keep[i]:
                    continue
                trial = keep.clone()
                trial[i] = False
                gates.force = trial
                loss = sum(float(distill_loss(decoder_logits(model, bt, reuse_encoder=reuse), t, bt)) for bt, t in zip(batches, teachers))
                if loss < best_loss:
                    best, best_loss = i, loss
            assert best is not None
            keep[best] = False
            removed.append(slots[best])
            bar.update(1)
            bar.set_postfix(loss=f"{best_loss / max(1, len(batches)):.3f}")
    finally:
        gates.force = old
        bar.close()
    return removed


def keep_table(model: nn.Module, batches: Sequence[SpeechBatch], by: Callable[[SpeechBatch], str]) -> dict[str, torch.Tensor]:
    """Mean keep probability per slot for each group of utterances (``by(batch)`` names the group)."""
    gates = speech_gates(model)
    sums: dict[str, list[torch.Tensor]] = {}
    old = gates.context
    try:
        for bt in batches:
            if bt.pooled is None:
                prepare(model, [bt])
            gates.context = bt.context
            sums.setdefault(by(bt), []).append(gates.keep_probability(bt.pooled))
    finally:
        gates.context = old
    return {k: torch.cat(v).mean(0) for k, v in sums.items()}


@torch.no_grad()
def keep_by_language(model: nn.Module, processor: Any, checkpoint: str | os.PathLike, utterances: int = 4) -> dict[str, list[float]]:
    """Mean keep probability per slot for every language of a Whisper gate checkpoint (on espeak-ng
    test utterances of that language; one ``all`` entry for a static mask). For ``lazyneuron plot gates``."""
    from ..api import applied
    from ..data import speech as sd
    from ..speech import features
    from .gating import GatePredictor, ModuleGatingConfig

    pred, _ = GatePredictor.load(checkpoint, model)
    langs = [lang for lang in pred.contexts.get("language", []) if lang in sd.LANGUAGES] or ["en"]
    out = {}
    with applied(model, ModuleGatingConfig(checkpoint=os.fspath(checkpoint))):
        gates = speech_gates(model)
        enc = _whisper(model).encoder
        for lang in langs:
            utts = sd.utterances("espeak", lang, "test", utterances)
            feats, mask = features(processor, [u.audio for u in utts])
            ctx = {"language": lang} if "language" in pred.contexts else {}
            if "task" in pred.contexts:
                ctx["task"] = "transcribe"
            gates.context = ctx
            out["all" if pred.static else lang] = gates.keep_probability(enc.pooled(enc.front_end(feats), mask)).mean(0).tolist()
            if pred.static:
                break
    return out
