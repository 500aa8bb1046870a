"""Fast feedforward (FFF) layers: neurons on a binary tree, one root-to-leaf path per token.

UltraFastBERT (Belcak & Wattenhofer, 2023) replaces each feed-forward block of BERT by a
depth-``D`` tree of ``2**(D+1) - 1`` neurons. Node ``n`` is one neuron (an input row, an output
row); a token evaluates the ``D + 1`` nodes of one path, choosing the child by the sign of each
node's pre-activation. Inference is conditional matrix multiplication (``kernels.cmm``).

Training (:class:`FFFLayer` in ``train()`` mode) computes every node. ``routing="soft"`` weighs
each node by the probability of reaching it, the product of ``sigmoid(a / temperature)`` (right)
or ``1 - sigmoid(...)`` (left) along its path, so every node that can be reached gets a gradient;
lowering the temperature hardens the routing towards the inference path (the hardening
schedule lives in :mod:`lazyneuron.train`). ``routing="hard"`` trains on the inference path
(UltraFastBERT's own training), computed densely with a mask.

:class:`FastFeedForward` is the method: it swaps the feed-forward block of every layer for an
FFF initialised from the dense neurons (:meth:`FFFLayer.from_dense`) or loaded from a
checkpoint. For BERT-style blocks (``intermediate`` + ``output.dense``, residual and LayerNorm
inside ``output``) the FFF takes the place of ``intermediate`` and ``output.dense`` becomes a
pass-through, so the residual and LayerNorm still run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters import ModelAdapter, model_type_of
from ..config import MethodConfig, register
from ..errors import ConfigError
from ..kernels import cmm as K
from ..surgery import LazyModule, filter_paths
from .base import DEMO_MODEL, Method

CHECKPOINT_FORMAT = "lazyneuron.fff/1"


class FFFLayer(nn.Module):
    """A fast feedforward layer: ``d_in -> d_out`` through a depth-``depth`` neuron tree."""

    def __init__(self, d_in: int, d_out: int, depth: int, activation: str = "gelu", bias: bool = True, routing: str = "soft",
                 temperature: float = 1.0) -> None:
        super().__init__()
        if depth < 0 or depth > 20:
            raise ConfigError(f"FFF depth {depth} is out of range; use 0..20 (depth 11 = 4095 neurons, 12 evaluated per token)")
        if activation not in K.ACTIVATIONS:
            raise ConfigError(f"FFF activation {activation!r} is not supported; use one of {sorted(K.ACTIVATIONS)}")
        if routing not in ("soft", "hard"):
            raise ConfigError(f"FFF routing {routing!r} is invalid; use 'soft' or 'hard'")
        n = (2 << depth) - 1
        self.d_in, self.d_out, self.depth, self.activation, self.routing = d_in, d_out, depth, activation, routing
        self.temperature = float(temperature)
        self.w_in = nn.Parameter(torch.randn(n, d_in) / d_in**0.5)
        self.b_in = nn.Parameter(torch.zeros(n)) if bias else None
        self.w_out = nn.Parameter(torch.randn(n, d_out) / n**0.5 * 0.1)
        self.b_out = nn.Parameter(torch.zeros(d_out)) if bias else None
        self.nodes_touched = 0  # counted while ``track`` is on (rows of w_in / w_out read)
        self.track = False

    @property
    def n_nodes(self) -> int:
        return self.w_in.shape[0]

    @classmethod
    def from_dense(cls, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None, depth: int,
                   activation: str = "gelu", **kw: Any) -> "FFFLayer":
        """Initialise from a dense FFN ``y = w2 @ act(w1 @ x + b1) + b2`` (w1: (F, d_in), w2: (d_out, F)).

        Neurons are placed on the tree top-down: each node takes, from the neurons its subtree
        was given, the one most aligned with the rest (the most "central" input row); the
        others are split in half by their alignment with it: neurons that fire with it go to
        the right (pre-activation > 0) subtree. Nodes left without a neuron reuse their
        parent's neuron with a zero output row. Distillation then fits the tree (``train``)."""
        # placed on the CPU (a one-time search); FastFeedForward moves the layer to the model's device
        w1, w2 = w1.detach().float().cpu(), w2.detach().float().cpu()
        b1 = None if b1 is None else b1.detach().cpu()
        b2 = None if b2 is None else b2.detach().cpu()
        F_, d_in = w1.shape
        layer = cls(d_in, w2.shape[0], depth, activation, bias=b1 is not None or b2 is not None, **kw)
        n = layer.n_nodes
        unit = w1 / w1.norm(dim=1, keepdim=True).clamp(min=1e-12)
        assign = torch.full((n,), -1, dtype=torch.long)
        zero_out = torch.zeros(n, dtype=torch.bool)
        stack: list[tuple[int, torch.Tensor, int]] = [(0, torch.arange(F_), -1)]
        while stack:
            node, members, parent_neuron = stack.pop()
            if node >= n:
                continue
            if len(members) == 0:
                assign[node], zero_out[node] = max(parent_neuron, 0), True
                stack += [(2 * node + 1, members, parent_neuron), (2 * node + 2, members, parent_neuron)]
                continue
            u = unit[members]
            centrality = u @ u.sum(0)
            pick = int(members[int(centrality.argmax())])
            rest = members[members != pick]
            sim = unit[rest] @ unit[pick]
            order = torch.argsort(sim)
            half = len(rest) // 2
            assign[node] = pick
            stack += [(2 * node + 1, rest[order[:half]], pick), (2 * node + 2, rest[order[half:]], pick)]
        with torch.no_grad():
            layer.w_in.copy_(w1[assign])
            if layer.b_in is not None:
                layer.b_in.copy_(b1.detach().float()[assign] if b1 is not None else 0.0)
            out = w2.t()[assign].clone()
            out[zero_out] = 0.0
            layer.w_out.copy_(out)
            if layer.b_out is not None:
                layer.b_out.copy_(b2.detach().float() if b2 is not None else 0.0)
        return layer

    # -- forward ------------------------------------------------------------------------------
    def reach_probability(self, a: torch.Tensor) -> torch.Tensor:
        """(T, N) pre-activations -> (T, N) probability of reaching each node under soft routing."""
        t = max(self.temperature, 1e-6)
        p = a.new_ones(a.shape[0], 1)
        levels = [p]
        for lvl in range(self.depth):
            lo = (1 << lvl) - 1
            r = torch.sigmoid(a[:, lo : lo + (1 << lvl)] / t)  # (T, 2^lvl): probability of going right
            p = torch.stack([p * (1 - r), p * r], -1).flatten(1)  # children in node order
            levels.append(p)
        return torch.cat(levels, 1)

    def forward_train(self, x2: torch.Tensor) -> torch.Tensor:
        a = x2 @ self.w_in.to(x2.dtype).t()  # trees stored in bf16 for inference train in the input's dtype
        if self.b_in is not None:
            a = a + self.b_in
        weight = self.reach_probability(a) if self.routing == "soft" else K.path_mask(a.detach())
        y = (K.act_fn(self.activation)(a) * weight) @ self.w_out.to(x2.dtype)
        return y + self.b_out if self.b_out is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.d_in)
        if self.training and torch.is_grad_enabled():
            y = self.forward_train(x2)
        else:
            y, nodes = K.cmm(x2.detach(), self.w_in.detach(), None if self.b_in is None else self.b_in.detach(), self.w_out.detach(),
                             None if self.b_out is None else self.b_out.detach(), self.activation, return_nodes=self.track)
            if self.track and nodes is not None:
                self.nodes_touched += int(nodes.numel())
            y = y.to(x.dtype)
        return y.view(*shape[:-1], self.d_out)

    def set_tree_dtype(self, dtype: torch.dtype) -> FFFLayer:
        """Store the two trees (``w_in``, ``w_out``) in ``dtype`` (``torch.float32`` or
        ``torch.bfloat16``); the biases stay fp32 and the walk computes in fp32 either way. bf16
        halves the trees' memory and the bytes a walk reads. Re-packs if the trees were packed."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"FFF tree dtype {dtype} is not supported; use torch.float32 or torch.bfloat16")
        if self.w_in.dtype == dtype and self.w_out.dtype == dtype:
            return self
        packed = self.w_in.device.type == "cpu" and self.w_in.stride(0) == self.d_in + self.d_out
        with torch.no_grad():
            self.w_in.data = self.w_in.data.to(dtype).contiguous()
            self.w_out.data = self.w_out.data.to(dtype).contiguous()
        return self.pack_for_inference() if packed else self

    def pack_for_inference(self) -> FFFLayer:
        """Lay the trees out for the CMM walk: each node's input row and output row side by side in
        one buffer (a walk reads both rows of every node it visits) on 2 MiB pages
        (:func:`lazyneuron.kernels.cmm.hugepage_copy`), so a walk's scattered reads rarely miss the
        TLB. ``w_in`` and ``w_out`` become strided views of that buffer: values, shapes and
        parameters are unchanged and training still works. Done by ``FastFeedForward`` and
        :func:`load_fff`; CPU trees of one dtype only (otherwise nothing changes)."""
        if self.w_in.device.type != "cpu" or self.w_in.dtype != self.w_out.dtype:
            return self
        with torch.no_grad():
            buf = K.hugepage_copy(torch.cat([self.w_in.data, self.w_out.data], 1))
            self.w_in.data = buf[:, : self.d_in]
            self.w_out.data = buf[:, self.d_in :]
        return self

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, depth={self.depth}, nodes={self.n_nodes}, activation={self.activation}, routing={self.routing}"


# -- the method -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FastFeedForwardConfig(MethodConfig):
    """``depth``: tree depth (``2**(depth+1) - 1`` neurons, ``depth + 1`` evaluated per token);
    ``checkpoint``: safetensors file of trained FFF layers (from :func:`save_fff`); without it the
    layers are initialised from the dense neurons and need training (``lazyneuron.train``);
    ``activation``: ``auto`` takes the model's own FFN activation; ``tree_dtype``: how the trees
    are stored for inference, ``float32`` or ``bfloat16`` (half the memory and half the bytes a
    walk reads; the walk still computes in fp32, and the rest of the model is untouched)."""

    name: ClassVar[str] = "fast_feedforward"
    targets: tuple[str, ...] = ("mlp",)
    depth: int = 10
    activation: str = "auto"
    checkpoint: str = ""
    routing: str = "soft"
    tree_dtype: str = "float32"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.depth, int) or not 0 <= self.depth <= 20:
            raise ConfigError(f"FastFeedForwardConfig.depth={self.depth!r} is invalid; use an integer in 0..20")
        self._check_choice("activation", ("auto",) + tuple(K.ACTIVATIONS))
        self._check_choice("routing", ("soft", "hard"))
        self._check_choice("tree_dtype", ("float32", "bfloat16"))
        if self.targets != ("mlp",):
            raise ConfigError(f"fast_feedforward replaces whole feed-forward blocks; targets must be ('mlp',), got {self.targets}")

    def at_zero_strength(self) -> None:  # type: ignore[override]
        return None  # a tree of neurons is never the dense FFN: there is no zero-strength setting


class FFFBlock(LazyModule):
    """Replaces a feed-forward block (input -> output) by an :class:`FFFLayer`."""

    method_name = "fast_feedforward"

    def __init__(self, base: nn.Module, fff: FFFLayer) -> None:
        super().__init__(base)
        self.fff = fff

    def forward(self, x: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        return self.fff(x)

    def weight_elements(self) -> int:
        return self.fff.w_in.numel() + self.fff.w_out.numel()

    @property
    def track(self) -> bool:
        return self.fff.track

    @track.setter
    def track(self, v: bool) -> None:
        self.fff.track = v

    @property
    def tokens_seen(self) -> int:
        return self.fff.nodes_touched // (self.fff.depth + 1)

    @tokens_seen.setter
    def tokens_seen(self, v: int) -> None:
        self.fff.nodes_touched = 0

    @property
    def weights_skipped(self) -> int:
        """Dense FFN weight reads avoided (per-token accounting against the replaced block)."""
        dense = sum(p.numel() for n, p in self.base.named_parameters() if n.endswith("weight") and p.dim() == 2)
        per_token = (self.fff.d_in + self.fff.d_out) * (self.fff.depth + 1)
        return self.tokens_seen * max(dense - per_token, 0)

    @weights_skipped.setter
    def weights_skipped(self, v: int) -> None:
        pass


class Passthrough(LazyModule):
    """Stands in for a module whose work the FFF already did (BERT's ``output.dense``)."""

    method_name = "fast_feedforward"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def weight_elements(self) -> int:
        return 0


def _act_name(module: nn.Module) -> str:
    cfg_act = None
    for m in module.modules():
        name = type(m).__name__.lower()
        if "gelu" in name:
            cfg_act = "gelu_tanh" if getattr(m, "approximate", "none") == "tanh" or "tanh" in name or "new" in name else "gelu"
        elif "silu" in name or "swish" in name:
            cfg_act = "silu"
        elif name == "relu":
            cfg_act = "relu"
    fn = getattr(module, "intermediate_act_fn", None) or getattr(module, "act_fn", None) or getattr(module, "act", None)
    if fn is not None:
        n = getattr(fn, "__name__", type(fn).__name__).lower()
        cfg_act = "gelu" if n in ("gelu", "geluactivation") else "gelu_tanh" if "tanh" in n or "new" in n else "silu" if "silu" in n else "relu" if "relu" in n else cfg_act
    return cfg_act or "gelu"


@register
class FastFeedForward(Method):
    config_cls = FastFeedForwardConfig

    def resolve(self, model: nn.Module, adapter: ModelAdapter, cfg: MethodConfig) -> list[str]:
        mlp = adapter.paths("mlp")
        if not mlp:  # BERT-style: intermediate (dense + act) and output.dense are siblings
            ins = [p.rpartition(".")[0] for p in adapter.paths("mlp_in")]
            outs = adapter.paths("mlp_out")
            if not ins or len(ins) != len(outs):
                raise ConfigError(f"fast_feedforward found no feed-forward blocks in this {adapter.model_type} model; run `lazyneuron inspect`")
            mlp = [p for pair in zip(ins, outs) for p in pair]
        return filter_paths(mlp, cfg.include, cfg.exclude)

    @staticmethod
    def dense_parts(model: nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, str]:
        """(w1, b1, w2, b2, activation) of the dense FFN at ``path`` (a gated MLP is not supported)."""
        m = model.get_submodule(path)
        if hasattr(m, "gate_proj"):
            raise ConfigError(f"{path!r} is a gated (SwiGLU) MLP; fast_feedforward converts plain two-layer FFNs (BERT, GPT-2). Use activation_sparsity for gated MLPs")
        if path.endswith(".intermediate"):
            first, second = m.dense, model.get_submodule(path.rpartition(".")[0] + ".output.dense")
        else:
            lin = [c for c in m.children() if isinstance(c, nn.Linear) or type(c).__name__ == "Conv1D"]
            if len(lin) != 2:
                raise ConfigError(f"{path!r} is not a two-layer FFN (found {len(lin)} linear children)")
            first, second = lin

        def wb(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
            w = lin.weight.detach() if isinstance(lin, nn.Linear) else lin.weight.detach().t()  # Conv1D stores (in, out)
            return w, None if lin.bias is None else lin.bias.detach()

        (w1, b1), (w2, b2) = wb(first), wb(second)
        return w1, b1, w2, b2, _act_name(m)

    def plan(self, model: nn.Module, cfg: MethodConfig, paths: list[str], stats: Any) -> MethodConfig:
        assert isinstance(cfg, FastFeedForwardConfig)
        saved = load_fff(cfg.checkpoint, model) if cfg.checkpoint else {}
        self._layers: dict[str, FFFLayer] = {}
        for p in paths:
            if p.endswith(".output.dense"):
                continue
            if cfg.checkpoint:
                if p not in saved:
                    raise ConfigError(f"checkpoint {cfg.checkpoint!r} holds no FFF for {p!r} (it has {sorted(saved)[:3]}...); it was made for another model or other include/exclude")
                self._layers[p] = saved[p]
            else:
                w1, b1, w2, b2, act = self.dense_parts(model, p)
                self._layers[p] = FFFLayer.from_dense(w1, b1, w2, b2, cfg.depth, act if cfg.activation == "auto" else cfg.activation,
                                                      routing=cfg.routing)
        return cfg

    def convert(self, path: str, module: nn.Module, cfg: MethodConfig, stats: Any) -> nn.Module:
        if path.endswith(".output.dense"):
            return Passthrough(module)
        fff = self._layers[path]
        fff.eval()
        p = next(module.parameters(), None)
        if p is not None:  # a model on a GPU gets its trees there (the Triton walk)
            fff.to(device=p.device)
        assert isinstance(cfg, FastFeedForwardConfig)
        fff.set_tree_dtype(getattr(torch, cfg.tree_dtype))
        fff.pack_for_inference()
        return FFFBlock(module, fff)

    def summarize(self, model: nn.Module, cfg: MethodConfig, paths: list[str]) -> dict[str, Any]:
        blocks = [model.get_submodule(p) for p in paths if isinstance(model.get_submodule(p), FFFBlock)]
        if not blocks:
            return {"modules": 0}
        f = blocks[0].fff
        dense = sum(q.numel() for n, q in blocks[0].base.named_parameters() if q.dim() == 2)
        if blocks[0].base.__class__.__name__.endswith("Intermediate"):
            dense *= 2  # output.dense has as many weights as intermediate.dense
        per_token = (f.d_in + f.d_out) * (f.depth + 1)
        return {"modules": len(blocks), "depth": f.depth, "nodes": f.n_nodes, "evaluated_per_token": f.depth + 1,
                "ffn_weight_reads_per_token": f"{per_token} of {dense} ({100 * per_token / dense:.2f}%)",
                "tree_dtype": str(f.w_in.dtype).removeprefix("torch.")}

    @classmethod
    def demo_configs(cls, model_name: str = DEMO_MODEL, *, quick: bool = False) -> list[MethodConfig]:
        """``quick``: ``demo --quick``, which also takes the trees a quick demo fitted."""
        from ..fitting import fitted_checkpoint

        found = fitted_checkpoint("fast_feedforward", model_name, quick=quick)  # untrained trees lose the model's quality: a trained checkpoint only
        return [FastFeedForwardConfig(checkpoint=found["checkpoint"])] if found else []

    @classmethod
    def demo_notes(cls, model_name: str = DEMO_MODEL, *, quick: bool = False) -> list[str]:
        from ..fitting import fitted_checkpoint

        if fitted_checkpoint("fast_feedforward", model_name, quick=quick):
            return []
        if model_name == DEMO_MODEL:
            return [f"fast_feedforward: converts plain two-layer FFNs (BERT, GPT-2), and {DEMO_MODEL}'s are gated, so it has no row here; "
                    "`lazyneuron demo --model minilm-l6` fits FFF trees for the MiniLM-L6 encoder and shows them."]
        return [f"fast_feedforward: no fitted FFF trees for {model_name}; `lazyneuron fit fff --model {model_name}` fits them "
                "(plain two-layer FFNs: BERT, GPT-2)."]


def default_fff_path(model_name: str) -> Any:
    """Where the demo looks for trained FFF trees of a built-in model (``save_fff`` format)."""
    from ..paths import cache_dir

    from ..models import checkpoint_key

    return cache_dir("checkpoints") / f"{checkpoint_key(model_name)}.fff.safetensors"


# -- checkpoints --------------------------------------------------------------------------------
def fff_layers(model: nn.Module) -> dict[str, FFFLayer]:
    """Module path (of the replaced block) -> its FFFLayer, for a model with FFF blocks applied."""
    from ..surgery import lazy_modules

    return {p: m.fff for p, m in lazy_modules(model) if isinstance(m, FFFBlock)}


def save_fff(model: nn.Module, path: str | os.PathLike, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Save the FFF layers of ``model`` (and optional ``extra`` tensors, e.g. a task head) as safetensors."""
    import json

    from safetensors.torch import save_file

    layers = fff_layers(model)
    if not layers:
        raise ConfigError("the model has no FFF layers to save; apply_ a fast_feedforward config first")
    flat: dict[str, torch.Tensor] = {}
    meta = {}
    for p, f in layers.items():
        meta[p] = {"d_in": f.d_in, "d_out": f.d_out, "depth": f.depth, "activation": f.activation, "bias": f.b_in is not None}
        for n, t in f.state_dict().items():
            flat[f"fff::{p}::{n}"] = t.detach().contiguous()
    for k, t in (extra or {}).items():
        flat[f"extra::{k}"] = t.detach().contiguous()
    save_file(flat, os.fspath(path), metadata={"format": CHECKPOINT_FORMAT, "model_type": model_type_of(model), "layers": json.dumps(meta)})


def load_fff(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, FFFLayer]:
    """FFF layers from a :func:`save_fff` file, checked against ``model`` (type and widths)."""
    import json

    from ..checkpoints import read

    path = os.fspath(path)
    header, tensors = read(path, CHECKPOINT_FORMAT, "FFF checkpoint", "train one with `python benchmarks/fff.py` or lazyneuron.methods.fff.distill_layers")
    if model is not None and header.get("model_type") != model_type_of(model):
        raise ConfigError(f"FFF checkpoint {path!r} was made for a {header.get('model_type')!r} model, not {model_type_of(model)!r}")
    meta = json.loads(header["layers"])
    out = {}
    for p, m in meta.items():
        layer = FFFLayer(m["d_in"], m["d_out"], m["depth"], m["activation"], m["bias"])
        sd = {n.split("::")[2]: t for n, t in tensors.items() if n.startswith(f"fff::{p}::")}
        try:
            layer.load_state_dict(sd)
        except RuntimeError as e:
            raise ConfigError(f"{path!r}: the FFF for {p!r} does not match its own metadata ({str(e)[:200]})") from None
        if model is not None:
            try:
                dims = FastFeedForward.dense_parts(model, p)
            except AttributeError:
                raise ConfigError(f"FFF checkpoint {path!r} names {p!r}, which this model does not have; it was made for another model") from None
            if dims[0].shape[1] != layer.d_in or dims[2].shape[0] != layer.d_out:
                raise ConfigError(f"FFF checkpoint {path!r}: {p!r} is {layer.d_in}->{layer.d_out} but the model's FFN is {dims[0].shape[1]}->{dims[2].shape[0]}")
        out[p] = layer.pack_for_inference()
    return out


def load_extra(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k[len("extra::"):]: t for k, t in load_file(os.fspath(path)).items() if k.startswith("extra::")}


# -- layer-wise distillation ------------------------------------------------------------------
def _ffn_io_paths(path: str) -> tuple[str, str]:
    """(module whose input is the FFN input, module whose output is the FFN output)."""
    if path.endswith(".intermediate"):
        return path, path.rpartition(".")[0] + ".output.dense"
    return path, path


@torch.no_grad()
def collect_ffn_io(model: nn.Module, paths: list[str], inputs: list[torch.Tensor], max_tokens: int = 40_000) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inputs and outputs of the dense FFN at each path over ``inputs`` (token-id tensors, (1, L))."""
    got: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {p: ([], []) for p in paths}
    handles = []
    for p in paths:
        src, dst = _ffn_io_paths(p)
        handles.append(model.get_submodule(src).register_forward_pre_hook(lambda m, a, p=p: got[p][0].append(a[0].detach().reshape(-1, a[0].shape[-1]).float())))
        handles.append(model.get_submodule(dst).register_forward_hook(lambda m, a, out, p=p: got[p][1].append(out.detach().reshape(-1, out.shape[-1]).float())))
    was = model.training
    model.eval()
    n = 0
    try:
        for ids in inputs:
            model(ids)
            n += ids.numel()
            if n >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {p: (torch.cat(x)[:max_tokens], torch.cat(y)[:max_tokens]) for p, (x, y) in got.items()}


def distill_layers(model: nn.Module, cfg: FastFeedForwardConfig, inputs: list[torch.Tensor], *, steps: int = 300, batch_tokens: int = 512,
                   lr: float = 2e-3, temperature: tuple[float, float] = (1.0, 0.05), hard_fraction: float = 0.25, max_tokens: int = 40_000,
                   progress: bool = True) -> dict[str, float]:
    """Apply ``cfg`` to ``model`` and fit each FFF to its dense FFN's outputs on ``inputs``.

    Routing is soft with the temperature lowered geometrically from ``temperature[0]`` to
    ``temperature[1]``, then hard (the inference path) for the last ``hard_fraction`` of the
    steps. Returns, per path, the relative squared error of the FFF (inference path) on the data."""
    from ..api import apply_
    from ..train import fit

    meth = FastFeedForward()
    from ..adapters import get_adapter

    paths = [p for p in meth.resolve(model, get_adapter(model), cfg) if not p.endswith(".output.dense")]
    io = collect_ffn_io(model, paths, inputs, max_tokens)
    apply_(model, cfg)
    errors = {}
    gen = torch.Generator().manual_seed(0)
    for p in paths:
        fff = model.get_submodule(p).fff
        x, y = io[p]
        scale = float(y.var()) or 1.0
        batches = [torch.randint(0, x.shape[0], (batch_tokens,), generator=gen) for _ in range(steps)]
        soft_steps = int(steps * (1 - hard_fraction))

        def schedule(step: int, total: int, fff: FFFLayer = fff) -> None:
            if step < soft_steps:
                t0, t1 = temperature
                fff.routing, fff.temperature = "soft", t0 * (t1 / t0) ** (step / max(1, soft_steps - 1))
            else:
                fff.routing = "hard"

        def loss(_: nn.Module, idx: torch.Tensor, fff: FFFLayer = fff, x: torch.Tensor = x, y: torch.Tensor = y, scale: float = scale) -> torch.Tensor:
            return ((fff(x[idx]) - y[idx]) ** 2).mean() / scale

        fit(fff, loss, batches, lr=lr, weight_decay=0.0, on_step=schedule, progress=progress, desc=f"distil {p}")
        fff.routing = "hard"
        fff.eval()
        with torch.no_grad():
            errors[p] = float(((fff(x) - y) ** 2).mean() / scale)
    return errors
