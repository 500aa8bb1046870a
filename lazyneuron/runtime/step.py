"""A lean decode step for Llama-family decoders: a static KV cache and fused small ops.

The Hugging Face model stays the model. :class:`DecodeStep` reads its configuration, its rotary
embedding tables (from the model's own ``rotary_emb``) and its norm weights, and *calls its
modules* for everything that holds weights: the q / k / v / o projections, the MLP and the LM head
(so whatever a method or the runtime put there runs: :class:`~lazyneuron.runtime.FastLinear`,
sparse linears, FFF layers). What it replaces is the glue between them, per layer: one fused
RMSNorm + residual add before attention and one before the MLP, and one call for the rotary
embedding, the cache write and attention (``kernels.decode_ops``). Prefill runs the model's own
forward and copies its keys and values into the static cache.

Module gating is covered: the per-sequence keep masks its gate predictor decides in prefill are
held for the decode, a skipped attention or feed-forward module is not called (and a skipped
attention neither writes nor reads its cache), and where the masks of a batch differ the union
runs with the skipping rows' branches zeroed, as the gated model's own forward does. So is early
exit (batch 1, as its own decode loop): after an exit layer the step asks the exit's test, and a
token that leaves writes the key and value of its state to every later layer's cache (CALM) and
reads the LM head through the exit's lens. Models or conversions it does not cover (another
architecture, a method that wraps a layer or the attention) decode through the model's own forward
(:func:`lazyneuron.bench.decode.lean_generate`), with the same results.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from ..kernels import decode_ops as D
from ..kernels import gemv as G
from ..kernels._build import extension
from ..surgery import LazyModule

log = logging.getLogger(__name__)

STEP_MODEL_TYPES = ("llama", "mistral", "qwen2")


def supports_step(model: nn.Module) -> bool:
    """Whether :class:`DecodeStep` reproduces this model's forward (a Llama-family causal LM with
    plain RMSNorm, rotary attention without sliding windows or q / k norms, and no method that
    wraps the layer stack, a layer or the attention)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in STEP_MODEL_TYPES:
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and cfg.model_type != "llama":
        return False
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    inner = _inner(model)
    if inner is None or isinstance(inner, LazyModule) or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return False
    if not all(hasattr(inner, a) for a in ("embed_tokens", "norm", "rotary_emb")):
        return False
    for layer in inner.layers:
        if isinstance(layer, LazyModule) or isinstance(getattr(layer, "self_attn", None), LazyModule):
            return False
        att = layer.self_attn
        if not all(hasattr(att, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")) or hasattr(att, "q_norm"):
            return False
        for n in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(n, "variance_epsilon") or n.weight.dtype != torch.float32:
                return False
    return True


def _exiting(model: nn.Module) -> Any:
    """The model's early-exit decoder, or None."""
    st = getattr(model, "model", None)
    return st if type(st).__name__ == "ExitingDecoder" else None


def _gated(model: nn.Module) -> Any:
    """The model's module-gating stack in inference mode, or None."""
    st = getattr(model, "model", None)
    if type(st).__name__ == "GatedStack" and getattr(st, "family", "") == "llama" and st.mode == "hard":
        return st
    return None


def _inner(model: nn.Module) -> Any:
    """The decoder body (embeddings, layers, norm, rotary tables): ``model.model``, or the model a
    gating stack wraps."""
    st = _gated(model) or _exiting(model)
    return st.base if st is not None else getattr(model, "model", None)


class DecodeStep:
    """Greedy decoding state for ``batch`` sequences of at most ``max_len`` tokens."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, kv_cache: str | None = None) -> None:
        if not supports_step(model):
            raise ValueError(f"DecodeStep does not cover this {type(model).__name__}; use lazyneuron.runtime.generate, which falls back to the model's forward")
        cfg = model.config
        inner = _inner(model)
        self.gated = _gated(model) is not None
        self.exiting = _exiting(model)  # early exit: per token, batch 1, after the first dense_prefix positions
        self.keep: torch.Tensor | None = None  # (B, layers, 2) float {0, 1} of a gated model, set in prefill
        self.model, self.layers, self.embed, self.head = model, list(inner.layers), inner.embed_tokens, model.lm_head
        att = self.layers[0].self_attn
        self.head_dim = int(getattr(att, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        kv = int(cfg.num_key_value_heads)
        self.scale = float(getattr(att, "scaling", self.head_dim ** -0.5))
        self.batch, self.max_len = batch, max_len
        from .linear import KV_CACHES

        self.kv_cache = kv_cache or _kv_cache_of(model)
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache={self.kv_cache!r}: use 'fp32' (exact) or 'bf16' (half the bytes per position)")
        cdt = torch.bfloat16 if self.kv_cache == "bf16" else torch.float32
        self.kc = [torch.zeros(batch, kv, max_len, self.head_dim, dtype=cdt) for _ in self.layers]  # (B, KV, L, D) per layer
        self.vc = [torch.zeros(batch, kv, max_len, self.head_dim, dtype=cdt) for _ in self.layers]
        pos = torch.arange(max_len).unsqueeze(0)
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)  # (1, L, D): the model's own tables
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        norms = [(lay.input_layernorm, lay.post_attention_layernorm) for lay in self.layers]
        self.norm_w = [(a.weight.detach(), float(a.variance_epsilon), b.weight.detach(), float(b.variance_epsilon)) for a, b in norms]
        fn = inner.norm
        self.final = (fn.weight.detach(), float(getattr(fn, "variance_epsilon", getattr(fn, "eps", 1e-6))))
        self._ext = extension("decode")
        self._gemv = extension("gemv")
        # per layer: the direct kernel arguments of each projection that is a FastLinear (None: call the module)
        self._fast = [self._kernel_args(lay) for lay in self.layers]
        if batch > G.MAX_BATCH:  # the experts kernel takes at most MAX_BATCH tokens: the module falls back
            self._fast = [f[:6] + (None,) for f in self._fast]
        self._head = _direct(self.head)
        self._none = torch.empty(0)

    @staticmethod
    def _kernel_args(lay: nn.Module) -> tuple[Any, ...]:
        """Per layer: the direct kernel arguments of q, k, v, o (None: call the module), of q / k / v
        in one call when the runtime stored them side by side (None: three calls), and of a plain
        SiLU-gated MLP on the kernels ((gate, up, down), or (gate and up in one call, widths, down))."""
        from .linear import fused_args

        att, mlp = lay.self_attn, lay.mlp
        names = ("q_proj", "k_proj", "v_proj")
        proj = tuple(_direct(getattr(att, n)) for n in (*names, "o_proj"))
        qkv = fused_args([getattr(att, n) for n in names], list(proj[:3]))
        gated = None
        if not isinstance(mlp, LazyModule) and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) and \
                type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
            parts = tuple(_direct(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
            if all(p is not None for p in parts):
                gu = fused_args([mlp.gate_proj, mlp.up_proj], list(parts[:2]))
                gated = parts if gu is None or gu[1][0] != gu[1][1] else (gu[0], gu[1], parts[2])
        return proj + (qkv, gated, _expert_args(mlp))

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (batch, n) through the model's own forward; returns last logits (batch, V)."""
        from transformers import DynamicCache

        b, n = input_ids.shape
        if b != self.batch or n >= self.max_len:
            raise ValueError(f"prompt of shape {tuple(input_ids.shape)} does not fit a cache of batch {self.batch} and length {self.max_len}")
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1, position_ids=torch.arange(n).unsqueeze(0))
        if self.gated:  # the masks the gates decided from the prompt, held for the whole decode
            self.keep = (cache._ln_gates > 0.5).float()
            self._plan_cache = None
        for i in range(len(self.layers)):
            if self.keep is not None and not bool(self.keep[:, i, 0].any()):
                continue  # an attention no sequence runs: nothing cached, nothing ever read
            k, v = _layer_kv(cache, i)  # (B, KV, n, D)
            self.kc[i][:, :, :n] = k
            self.vc[i][:, :, :n] = v
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """One new token per sequence (tokens: (batch,)) at position ``pos``; returns logits (batch, V)."""
        ext = self._ext
        if ext is None or self._gemv is None:  # no compiled kernels here: the same step in pure torch
            return self._step_reference(tokens, pos)
        h = self.embed(tokens).float().contiguous()  # (B, d): the residual stream
        cos, sin = self.cos[pos], self.sin[pos]
        w0, e0 = self.norm_w[0][0], self.norm_w[0][1]
        x = ext.rmsnorm(h, w0, e0)
        n = len(self.layers)
        gemv = self._gemv.gemv
        gemv_x = self._gemv.expert_route
        silu = torch.nn.functional.silu
        plan = self._plan()
        ee = self.exiting if self.exiting is not None and self.batch == 1 and pos >= self.exiting.dense_prefix else None
        if ee is not None:
            streak, prev = torch.zeros(1, dtype=torch.long), torch.full((1,), -1, dtype=torch.long)
        for i, lay in enumerate(self.layers):
            att = lay.self_attn
            fq, fk, fv, fo, fqkv, fm, fx = self._fast[i]
            _, _, w2, e2 = self.norm_w[i]
            wn, en = (self.norm_w[i + 1][0], self.norm_w[i + 1][1]) if i + 1 < n else self.final
            ka, km = plan[i]
            if ka is False:  # attention skipped by every sequence: not called, its cache untouched
                x = ext.rmsnorm(h, w2, e2)
            else:
                if fqkv:  # q, k and v stored side by side: one call reads all their rows, attention splits its rows
                    q, k, v = gemv(x, *fqkv[0])[0], self._none, self._none
                else:
                    q = gemv(x, *fq)[0] if fq else att.q_proj(x)
                    k = gemv(x, *fk)[0] if fk else att.k_proj(x)
                    v = gemv(x, *fv)[0] if fv else att.v_proj(x)
                o = ext.attn_decode(q, k, v, cos, sin, self.kc[i], self.vc[i], pos, self.scale)
                if o is None:
                    raise ValueError(f"attn_decode: {D._MESSAGES.get(ext.last_error(), 'bad input')}")
                d = gemv(o, *fo)[0] if fo else att.o_proj(o)
                x = ext.add_rmsnorm(h, d if ka is True else d * ka, w2, e2)
            if km is False:  # feed-forward skipped by every sequence: not called (the exit test below still runs)
                x = ext.rmsnorm(h, wn, en)
            else:
                if fm and isinstance(fm[1], list):  # gate and up side by side: one call, silu(gate) * up fused, then down
                    m = gemv(ext.silu_mul(gemv(x, *fm[0])[0]), *fm[2])[0]
                elif fm:  # a plain SiLU-gated MLP on the runtime: its three kernels, no module calls
                    m = gemv(silu(gemv(x, *fm[0])[0]).mul_(gemv(x, *fm[1])[0]), *fm[2])[0]
                elif fx and fx[0].mode == "routed" and not (fx[0].track or fx[0].oracle):  # experts: router and chosen experts in one call
                    m = gemv_x(x, *fx[1])[0]
                else:
                    m = lay.mlp(x.unsqueeze(1)).reshape(h.shape)
                x = ext.add_rmsnorm(h, m if km is True else m * km, wn, en)
            if ee is not None and i < n - 1 and str(i) in ee.exits.scores and i >= ee.min_layer:
                done, streak, prev = ee._check(i, h, streak, prev)
                if bool(done[0]):
                    return self._exit(ee, i, h, pos)
        if self.exiting is not None and self.exiting.track:
            self.exiting.layers_run += [n] * self.batch
            self.exiting.tokens_seen += self.batch
        return (gemv(x, *self._head)[0] if self._head else self.head(x)).float()

    def _exit(self, ee: Any, j: int, h: torch.Tensor, pos: int) -> torch.Tensor:
        """A token leaving after layer ``j`` (CALM): every later layer gets the key and value of the
        exited state written to its cache (so later tokens attend to entries that exist); the LM
        head reads the exit's lens (or the final norm) of the state."""
        cos, sin = self.cos[pos], self.sin[pos]
        kv = self.kc[0].shape[1]
        for k in range(j + 1, len(self.layers)):
            att = self.layers[k].self_attn
            w, e = self.norm_w[k][0], self.norm_w[k][1]
            xk = D.rmsnorm(h, w, e)
            key = att.k_proj(xk).view(self.batch, kv, self.head_dim)
            self.kc[k][:, :, pos] = key * cos + D._rotate_half(key) * sin
            self.vc[k][:, :, pos] = att.v_proj(xk).view(self.batch, kv, self.head_dim)
        if ee.track:
            ee.layers_run.append(j + 1)
            ee.tokens_seen += 1
            ee.kv_filled += len(self.layers) - j - 1
            ee.weights_skipped += float(ee._skip_after[j + 1])
        out = ee.exits.exit_hidden(j, h, self.model.model.base.norm)
        return (_gemv_or(self._gemv, self._head, self.head, out)).float()

    def _plan(self) -> list[tuple[Any, Any]]:
        """Per layer, for attention and the MLP: True (every sequence runs it), False (none does:
        not called) or a (B, 1) column of 0 / 1 (the union runs, skipping rows' branches zeroed)."""
        if self.keep is None:
            return [(True, True)] * len(self.layers)
        if getattr(self, "_plan_cache", None) is None:
            out = []
            for i in range(len(self.layers)):
                row = []
                for mi in range(2):
                    col = self.keep[:, i, mi]
                    row.append(True if bool(col.all()) else False if not bool(col.any()) else col.view(-1, 1).contiguous())
                out.append(tuple(row))
            self._plan_cache = out
        return self._plan_cache

    def _step_reference(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        h = self.embed(tokens).float()
        cos, sin = self.cos[pos], self.sin[pos]
        x = D.rmsnorm_reference(h, self.norm_w[0][0], self.norm_w[0][1])
        n = len(self.layers)
        plan = self._plan()
        ee = self.exiting if self.exiting is not None and self.batch == 1 and pos >= self.exiting.dense_prefix else None
        if ee is not None:
            streak, prev = torch.zeros(1, dtype=torch.long), torch.full((1,), -1, dtype=torch.long)
        for i, lay in enumerate(self.layers):
            att = lay.self_attn
            ka, km = plan[i]
            if ka is not False:
                o = D.attn_decode_reference(att.q_proj(x), att.k_proj(x), att.v_proj(x), cos, sin, self.kc[i], self.vc[i], pos, self.scale)
                d = att.o_proj(o)
                h = h + (d if ka is True else d * ka)
            x = D.rmsnorm_reference(h, self.norm_w[i][2], self.norm_w[i][3])
            if km is not False:
                m = lay.mlp(x.unsqueeze(1)).reshape(h.shape)
                h = h + (m if km is True else m * km)
            wn, en = (self.norm_w[i + 1][0], self.norm_w[i + 1][1]) if i + 1 < n else self.final
            x = D.rmsnorm_reference(h, wn, en)
            if ee is not None and i < n - 1 and str(i) in ee.exits.scores and i >= ee.min_layer:
                done, streak, prev = ee._check(i, h, streak, prev)
                if bool(done[0]):
                    return self._exit(ee, i, h, pos)
        return self.head(x).float()


def _kv_cache_of(model: nn.Module) -> str:
    """The cache format the runtime was applied with (``RuntimeConfig.kv_cache``, held by the
    modules it converted: its linears, or sparse linears whose rows it stored), fp32 without it."""
    for m in model.modules():
        if isinstance(m, LazyModule) and isinstance(getattr(m, "kv_cache", None), str):
            return m.kv_cache
    return "fp32"


def _gemv_or(gemv: Any, direct: tuple[Any, ...] | None, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return gemv.gemv(x, *direct)[0] if direct is not None and gemv is not None else mod(x)


def _expert_args(mlp: nn.Module) -> tuple[Any, tuple[Any, ...]] | None:
    """(module, the arguments after x of the compiled ``expert_route``) of an FFN run as experts
    on the kernel (None: call the module). The module is kept to check, per step, that it still
    routes for inference (not tracking, an oracle or recovery training)."""
    from ..methods.experts import ExpertMLP

    if type(mlp) is not ExpertMLP or mlp.backend != "auto" or mlp._out or extension("gemv") is None:
        return None
    from ..kernels import experts as X

    return mlp, X.route_args(mlp.router_spec, mlp.blocks, mlp.down_bias, mlp.act, mlp.gated)


def _direct(mod: nn.Module) -> tuple[Any, ...] | None:
    """(wt, scale, bias, centre, threshold) for calling the GEMV kernel directly on a runtime
    :class:`~lazyneuron.runtime.FastLinear` (None: call the module)."""
    from .linear import FastLinear

    if type(mod) is FastLinear and mod._ext is not None:
        return (mod.wt, *mod._args)
    if type(mod).__name__ == "SparseLinear" and mod.backend == "auto" and not mod.track and extension("gemv") is not None:
        e = torch.empty(0)  # activation sparsity: the same kernel with its threshold (and centre, for SCAP)
        return (mod.wt, e if mod.scale is None else mod.scale, e if mod.bias_eff is None else mod.bias_eff, e if mod.centre is None else mod.centre,
                mod.threshold)
    return None


def _layer_kv(cache: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, return_timing: bool = False) -> Any:
    """Greedy decoding on the lean step (the model's own forward where the step does not cover
    it); returns ids (batch, max_new_tokens) and optionally ``(prefill_seconds, decode_seconds)``,
    decode covering tokens 2..max_new_tokens, as :func:`lazyneuron.bench.decode.lean_generate`."""
    if not supports_step(model):
        from ..bench.decode import lean_generate

        return lean_generate(model, input_ids, max_new_tokens, return_timing=return_timing)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    b, n = input_ids.shape
    st = DecodeStep(model, b, n + max_new_tokens)
    t0 = time.perf_counter()
    nxt = st.prefill(input_ids).argmax(-1)  # (batch,)
    t1 = time.perf_counter()
    toks = [nxt]
    for i in range(max_new_tokens - 1):
        nxt = st.step(nxt, n + i).argmax(-1)
        toks.append(nxt)
    t2 = time.perf_counter()
    ids = torch.stack(toks, 1)
    return (ids, (t1 - t0, t2 - t1)) if return_timing else ids


@torch.inference_mode()
def step_profile(model: nn.Module, input_ids: torch.Tensor, steps: int = 16, repeats: int = 5) -> dict[str, float]:
    """How a decode step's time splits (batch of ``input_ids``): the median step time, and the
    time of the same GEMV kernel calls replayed back to back (recorded from one step: the same
    weights, shapes and inputs). ``non_gemv`` is the rest: small ops, attention, Python."""
    import statistics

    st = DecodeStep(model, input_ids.shape[0], input_ids.shape[1] + steps + 2)
    nxt = st.prefill(input_ids).argmax(-1)
    calls: list[tuple[Any, torch.Tensor, tuple[Any, ...]]] = []
    real = st._gemv

    class _Recorder:  # the weight-reading kernels: the GEMV, and the experts' router and blocks
        def gemv(self, x: torch.Tensor, *args: Any) -> Any:
            calls.append((real.gemv, x.clone(), args))
            return real.gemv(x, *args)

        def expert_route(self, x: torch.Tensor, *args: Any) -> Any:
            calls.append((real.expert_route, x.clone(), args))
            return real.expert_route(x, *args)

    n = input_ids.shape[1]
    st._gemv = _Recorder()
    st.step(nxt, n)
    st._gemv = real
    if not calls:
        raise ValueError("the step ran no runtime kernel: apply RuntimeConfig(...) first")
    ts, gs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            st.step(nxt, n + 1 + i)
        ts.append((time.perf_counter() - t0) / steps)
        t0 = time.perf_counter()
        for _ in range(steps):
            for fn, x, args in calls:
                fn(x, *args)
        gs.append((time.perf_counter() - t0) / steps)
    step_s, gemv_s = statistics.median(ts), statistics.median(gs)
    return {"step_s": step_s, "gemv_s": gemv_s, "non_gemv_share": max(0.0, step_s - gemv_s) / step_s, "kernel_calls": len(calls)}
