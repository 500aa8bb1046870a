"""The runtime's linear layer and its conversion: every remaining dense linear on the GEMV kernels.

``RuntimeConfig(dtype=...)`` (CLI: ``runtime:dtype=bf16``) wraps each plain ``nn.Linear`` of the
target roles (all linears of a transformer, the LM head included) in a :class:`FastLinear`, whose
weight is laid out input-channel-major once, in ``fp32``, ``bf16`` or ``int8`` (weight-only,
per-output-channel scales). Linears that another method already converted keep that method and
take the runtime's weight format where they support it (activation sparsity stores its rows in
the runtime's dtype). Apply the runtime last: ``apply_(model, [method_cfg, RuntimeConfig(...)])``.

At most ``MAX_BATCH`` (16) tokens per call run the GEMV (decode); longer inputs (prefill, encoder
forwards) run the blocked GEMM of the same extension over the same weight values (bf16 / int8
widened panel by panel, never into a full fp32 copy), which keeps them at or above dense torch.
Sibling projections of one input (``q_proj`` / ``k_proj`` / ``v_proj``, ``gate_proj`` / ``up_proj``)
are stored side by side in one ``(in, sum of outs)`` buffer, each module's weight a column block
of it (:func:`fuse_siblings`): alone, each reads its block; the lean decode step reads all of a
group's rows in one kernel call (:func:`fused_args`), one stream instead of three.
``revert_`` restores the original modules and weights bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters import ModelAdapter
from ..config import MethodConfig, register
from ..errors import ConfigError
from ..kernels import gemv as G
from ..kernels._build import extension
from ..methods.base import DEMO_MODEL, Method
from ..surgery import DelegatingLazyModule, LazyModule, filter_paths

_EMPTY = torch.empty(0)
log = logging.getLogger(__name__)


KV_CACHES = ("fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig(MethodConfig):
    """``dtype``: the weight format of the converted linears: ``fp32`` (exact), ``bf16`` or ``int8``
    (weight-only, one scale per output channel); ``backend``: ``auto`` (the C++ kernels when they
    built) or ``reference`` (pure torch, for checking); ``hugepages``: keep the converted weights
    on 2 MiB pages where the OS offers them (Linux THP; see :mod:`lazyneuron.runtime.memory`);
    ``kv_cache``: the format of the decode step's key / value cache, ``fp32`` (exact: greedy tokens
    equal the eager model's) or ``bf16`` (half the bytes attention reads per position, as llama.cpp's
    default f16 cache; keys and values rounded as they are written)."""

    name: ClassVar[str] = "runtime"
    targets: tuple[str, ...] = ("attn_in", "attn_out", "mlp_in", "mlp_out", "head",  # + an encoder-decoder's (Whisper's) other linears:
                                "cross_attn_in", "cross_attn_out", "enc_attn_in", "enc_attn_out", "enc_mlp_in", "enc_mlp_out")
    dtype: str = "fp32"
    backend: str = "auto"
    hugepages: bool = True
    kv_cache: str = "fp32"

    def validate(self) -> None:
        super().validate()
        self._check_choice("dtype", G.DTYPES)
        self._check_choice("backend", ("auto", "reference"))
        self._check_choice("kv_cache", KV_CACHES)

    def at_zero_strength(self) -> "RuntimeConfig":
        return dataclasses.replace(self, dtype="fp32", kv_cache="fp32")


class FastLinear(LazyModule):
    """``nn.Linear`` on the runtime's GEMV kernel. In fp32 the input-major weight shares storage
    with ``base.weight`` (which becomes a transposed view, made contiguous again on revert); in
    bf16 / int8 it is a converted copy and ``base`` is untouched."""

    method_name = "runtime"

    def __init__(self, base: nn.Linear, dtype: str, backend: str = "auto") -> None:
        super().__init__(base)
        self.dtype, self.backend = dtype, backend
        self.in_features, self.out_features = base.in_features, base.out_features
        if dtype == "fp32" and base.weight.dtype == torch.float32 and not _is_shared(base):
            wt = base.weight.detach().t().contiguous()  # (in, out)
            base.weight.data = wt.t()
            self.wt, self.scale = wt, None
        else:
            self.wt, self.scale = G.prepare_weight(base.weight, dtype)
        self.bias = base.bias.detach().float().contiguous() if base.bias is not None else None
        self._ext = extension("gemv") if backend == "auto" else None
        self._args = (_EMPTY if self.scale is None else self.scale, _EMPTY if self.bias is None else self.bias, _EMPTY, _EMPTY)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (tokens, in)
        n = x2.shape[0]
        if self._ext is not None and n > 0 and x2.is_cpu and not (x2.requires_grad and torch.is_grad_enabled()):
            xs = x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.float().contiguous()
            if n <= G.MAX_BATCH:  # decode: the GEMV, every weight byte read once
                y, _ = self._ext.gemv(xs, self.wt, *self._args)
            else:  # prefill, encoder forwards: the blocked GEMM, widening panel by panel in L2
                y = self._ext.gemm(xs, self.wt, self._args[0], self._args[1], True)
            if y is None:
                raise ValueError(f"FastLinear: {G.kernel_error(self._ext.last_error(), x2, self.wt)}")
        else:  # no extension, another device, or a backward pass to come: the reference on the kernel's weight values
            y = G.reference(x2, self.wt, self.scale, self.bias)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        return self.wt.numel() * self.wt.element_size() + (0 if self.scale is None else self.scale.numel() * 4)

    def restore_base(self) -> nn.Module:
        if self.base.weight.data.data_ptr() == self.wt.data_ptr():
            self.base.weight.data = self.base.weight.data.contiguous()
        return self.base

    def extra_repr(self) -> str:
        return f"method=runtime, dtype={self.dtype}, in={self.in_features}, out={self.out_features}"


class FastEncoderAttention(DelegatingLazyModule):
    """An encoder's self-attention (Whisper's) on the runtime's attention kernel: its own q / k / v
    projections (runtime linears), then :func:`gemv.attention` on their (B, T, heads, head_dim)
    outputs as they are, then its output projection. Installed for bf16 / int8 runtimes where the
    CPU has bf16 dot products; any other call (a mask, a cache, cross-attention, gradients, bf16
    dot products switched off) runs the wrapped module."""

    method_name = "runtime"

    def weight_elements(self) -> int:
        return 0  # its linears count themselves

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kw: Any) -> Any:
        a = self.base
        plain = (not args and kw.get("attention_mask") is None and kw.get("key_value_states") is None and kw.get("past_key_values") is None
                 and not kw.get("output_attentions") and hidden_states.dim() == 3 and hidden_states.shape[1] > G.MAX_BATCH)
        if not plain or not G.bf16_dot() or (hidden_states.requires_grad and torch.is_grad_enabled()):
            return a(hidden_states, *args, **kw)
        b, t, d = hidden_states.shape
        shape = (b, t, -1, a.head_dim)
        o = G.attention(a.q_proj(hidden_states).view(shape), a.k_proj(hidden_states).view(shape), a.v_proj(hidden_states).view(shape), a.scaling)
        return a.out_proj(o.view(b, t, d)), None


def _encoder_attentions(model: nn.Module) -> list[str]:
    """Paths of an encoder-decoder's (Whisper's) encoder self-attention modules."""
    layers = _find(model, "model.encoder.layers")
    if layers is None or getattr(getattr(model, "config", None), "model_type", None) != "whisper":
        return []
    return [f"model.encoder.layers.{i}.self_attn" for i, layer in enumerate(layers)
            if all(hasattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj", "head_dim", "scaling"))]


def _is_shared(base: nn.Linear) -> bool:
    """A weight tied to another module (an LM head tied to the embedding) keeps its layout: the
    embedding lookup reads its rows."""
    return bool(getattr(base, "_ln_tied", False))


@register
class Runtime(Method):
    config_cls = RuntimeConfig
    stage = 2
    resolve_late = True  # apply_ resolves its targets after the configs before it have converted theirs

    def resolve(self, model: nn.Module, adapter: ModelAdapter, cfg: MethodConfig) -> list[str]:
        assert isinstance(cfg, RuntimeConfig)
        paths: list[str] = []
        for role in cfg.targets:
            paths += adapter.paths(role)
        paths = filter_paths(paths, cfg.include, cfg.exclude)
        mods = {p: _find(model, p) for p in paths}  # a path inside another method's module may be gone
        plain = [p for p, m in mods.items() if type(m) is nn.Linear]
        if any(isinstance(m, FastLinear) for m in mods.values()):
            raise ConfigError("the model is already on the runtime; revert_ it first, then apply the runtime once, last in the config list")
        if not plain and not _sparse_modules(model):
            raise ConfigError(f"runtime found no plain nn.Linear under the roles {list(cfg.targets)} of this {adapter.model_type} model; "
                              "run `lazyneuron inspect` to see what each role matches")
        return plain

    def plan(self, model: nn.Module, cfg: MethodConfig, paths: list[str], stats: Any) -> MethodConfig:
        assert isinstance(cfg, RuntimeConfig)
        # a weight shared with an embedding keeps its (out, in) layout; found by identity, since
        # another method may have wrapped the module that get_input_embeddings() would look in
        embedded = {id(e.weight) for e in model.modules() if isinstance(e, nn.Embedding)}
        for p in paths:
            m = model.get_submodule(p)
            if id(m.weight) in embedded:
                m._ln_tied = True
        for m in _sparse_modules(model):  # activation sparsity stores its rows in the runtime's dtype
            m.set_weight_dtype(cfg.dtype)
        return cfg

    def convert(self, path: str, module: nn.Module, cfg: MethodConfig, stats: Any) -> nn.Module:
        assert isinstance(cfg, RuntimeConfig)
        return FastLinear(module, cfg.dtype, cfg.backend)

    @classmethod
    def demo_configs(cls, model_name: str = DEMO_MODEL) -> list[MethodConfig]:
        return [RuntimeConfig(dtype="bf16"), RuntimeConfig(dtype="int8")]

    @classmethod
    def plan_axes(cls, model: nn.Module, model_name: str | None = None) -> list[list[MethodConfig]]:
        """The weight format every planned combination runs on, from exact to smallest."""
        return [[RuntimeConfig(dtype=d) for d in ("fp32", "bf16", "int8")]]

    def finish(self, model: nn.Module, cfg: MethodConfig, paths: list[str]) -> None:
        # only the lean decode step of a decoder-only model reads a group in one call; an
        # encoder-decoder's cross-attention projects two inputs (q the decoder's, k / v the encoder's)
        if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            fuse_siblings(model)
        if cfg.dtype != "fp32" and G.bf16_dot():  # bf16 / int8: the encoder's attention on bf16 dot products too (fp32 stays exact)
            from ..surgery import set_module

            for p in _encoder_attentions(model):
                set_module(model, p, FastEncoderAttention(model.get_submodule(p)))
                paths.append(p)  # reported, and undone with the rest if apply_ fails after this
        for p in paths:  # the decode step reads its cache format off the modules the runtime converted
            mod = model.get_submodule(p)
            if isinstance(mod, LazyModule):
                mod.kv_cache = cfg.kv_cache
        self._hugepages = {"tensors": 0, "bytes": 0}
        if cfg.hugepages and cfg.backend == "auto":  # last: every method's weights are in their final buffers
            from .memory import to_hugepages

            try:
                self._hugepages = to_hugepages(model)
            except (RuntimeError, MemoryError) as e:  # huge pages only speed things up: go on without them
                log.warning("runtime: the weights stay on ordinary pages (%s: %s); RuntimeConfig(hugepages=False) skips trying", type(e).__name__, e)

    def summarize(self, model: nn.Module, cfg: MethodConfig, paths: list[str]) -> dict[str, Any]:
        mods = [m for m in (model.get_submodule(p) for p in paths) if isinstance(m, FastLinear)]
        return {"dtype": getattr(cfg, "dtype", "fp32"), "linears": len(mods), "weight_bytes": sum(m.weight_bytes() for m in mods),
                "attention_kernels": sum(isinstance(model.get_submodule(p), FastEncoderAttention) for p in paths),
                "hugepage_bytes": getattr(self, "_hugepages", {}).get("bytes", 0)}


def _find(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _sparse_modules(model: nn.Module) -> list[Any]:
    return [m for m in model.modules() if hasattr(m, "set_weight_dtype")]


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # projections of one input, by name


@dataclasses.dataclass
class FusedGroup:
    """Sibling projections stored side by side: ``wt`` (in, sum of outs) in the runtime's format,
    ``scale`` (sum of outs) for int8, and each member's first column."""

    wt: torch.Tensor
    scale: torch.Tensor | None
    offsets: tuple[int, ...]


def _fusable(m: Any) -> bool:
    if type(m) is FastLinear:
        return m.backend == "auto" and not _is_shared(m.base)
    return type(m).__name__ == "SparseLinear" and isinstance(m.base, nn.Linear) and m.backend == "auto"


def fuse_siblings(model: nn.Module) -> int:
    """Store each group of :data:`SIBLINGS` that are all runtime or sparse linears of one weight
    format in one buffer, each member's ``wt`` (and int8 ``scale``) a view of its columns; an fp32
    weight that shared storage with its ``nn.Linear`` keeps sharing it (the linear's weight
    becomes a view of the buffer, made contiguous again on revert). Returns the groups fused."""
    fused = 0
    for parent in model.modules():
        for names in SIBLINGS:
            mods = [getattr(parent, n, None) for n in names]
            if not all(_fusable(m) for m in mods) or any(getattr(m, "_ln_fused", None) is not None for m in mods):
                continue
            if len({m.wt.dtype for m in mods}) != 1 or len({m.wt.shape[0] for m in mods}) != 1:
                continue
            shares = [m.base.weight.data_ptr() == m.wt.data_ptr() for m in mods]
            wt = torch.cat([m.wt for m in mods], 1)  # (in, sum of outs)
            scale = torch.cat([m.scale for m in mods]) if mods[0].scale is not None else None
            offsets, off = [], 0
            for m, shared in zip(mods, shares):
                n = m.wt.shape[1]
                m.wt = wt[:, off : off + n]
                if shared:
                    m.base.weight.data = m.wt.t()
                if scale is not None:
                    m.scale = scale[off : off + n]
                if type(m) is FastLinear:
                    m._args = (_EMPTY if m.scale is None else m.scale, *m._args[1:])
                offsets.append(off)
                off += n
            group = FusedGroup(wt, scale, tuple(offsets))
            for i, m in enumerate(mods):
                m._ln_fused = (group, i)
            fused += 1
    return fused


def fused_args(mods: list[Any], direct: list[tuple[Any, ...] | None]) -> tuple[tuple[Any, ...], list[int]] | None:
    """The GEMV arguments (wt, scale, bias, centre, threshold) that compute the sibling
    projections ``mods`` in one call, and each one's width; None unless they still are the views
    of one :class:`FusedGroup`, in its order, and select the same input rows (dense, or activation
    sparsity with equal centres and thresholds). ``direct``: each member's own arguments."""
    if any(d is None for d in direct):
        return None
    tags = [getattr(m, "_ln_fused", None) for m in mods]
    if any(t is None for t in tags) or any(t[0] is not tags[0][0] or t[1] != i for i, t in enumerate(tags)):
        return None
    group = tags[0][0]
    if len(mods) != len(group.offsets):
        return None
    es = group.wt.element_size()
    for m, off in zip(mods, group.offsets):
        if m.wt.data_ptr() != group.wt.data_ptr() + off * es or m.wt.stride() != group.wt.stride():
            return None
    d0 = direct[0]
    for d in direct[1:]:  # (wt, scale, bias, centre, threshold)
        for a, b in ((d[3], d0[3]), (d[4], d0[4])):
            if a.shape != b.shape or not torch.equal(a, b):
                return None
    widths = [m.wt.shape[1] for m in mods]
    biases = [d[2] for d in direct]
    if all(b.numel() == 0 for b in biases):
        bias = _EMPTY
    else:
        bias = torch.cat([b if b.numel() else torch.zeros(w) for b, w in zip(biases, widths)]).contiguous()
    scale = _EMPTY if group.scale is None else group.scale
    return (group.wt, scale, bias, d0[3], d0[4]), widths
