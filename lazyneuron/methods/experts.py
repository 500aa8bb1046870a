"""Expert routing: run only the feed-forward experts a token is routed to.

- **MoEfication** (Zhang et al., 2022) on dense FFNs (gated SwiGLU: Llama, Qwen, Gemma; plain
  GELU: GPT-2): each FFN's neurons are split into ``experts`` equal groups by balanced k-means on
  their co-activation over calibration tokens (each neuron described by its contribution
  ``|h_j| * ||down_j||`` per token, as CMoE marks neurons), ``shared`` groups of the most
  active neurons are always run (CMoE's shared expert), and a router picks ``top_k`` of the others
  per token before the FFN runs, so the gate projection of skipped experts is not computed either.
  Routers: ``analytic`` (training-free: per expert, the activations of the ``probes`` neurons
  nearest its centroid, computed exactly) or ``learned`` (a two-layer MLP fit on the calibration
  tokens to predict each expert's share of the FFN's output mass, MoEfication's router).
- **Native MoE** (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the model's own router and experts on the
  same kernel, with training-free adaptive top-k.

``share`` < 1 makes top-k adaptive: per token, the smallest set of experts (at most ``top_k``)
whose predicted mass reaches ``share`` of the total (native MoE: of the model's top-k routing
mass; ``share=1`` reproduces the model exactly).

Experts are stored expert by expert (``kernels.experts``): a token reads only its experts'
contiguous blocks; at batch > 1 tokens are grouped by expert and each chosen expert is read once.
One calibration (a sample of each FFN's input tokens) serves every ``experts``, ``shared``,
``top_k``, ``router`` and ``share``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters import ModelAdapter
from ..config import MethodConfig, register
from ..errors import ConfigError
from ..kernels import experts as X
from ..kernels import gemv as G
from ..surgery import LazyModule, filter_paths
from .base import DEMO_MODEL, Method

ROUTERS = ("analytic", "learned")
SAMPLE_TOKENS = 4096  # calibration tokens kept per FFN (reservoir sample)
NATIVE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@dataclasses.dataclass(frozen=True)
class ExpertRoutingConfig(MethodConfig):
    """``experts``: equal groups each dense FFN is split into (MoEfication; a native MoE keeps its
    own); ``shared``: groups always run; ``top_k``: routed experts per token (native MoE: 0 keeps
    the model's k); ``share``: adaptive top-k below 1 (see the module docstring); ``router``:
    analytic | learned; ``probes``: neurons per expert the analytic router computes;
    ``checkpoint``: a safetensors file holding the experts' split and routers: loaded when it
    exists, written after building otherwise; ``recovery``: a safetensors file of low-rank updates
    of the split FFNs trained by :func:`lazyneuron.methods.experts_recovery.recover` (loaded into
    the expert blocks); ``backend``: auto | reference."""

    name: ClassVar[str] = "expert_routing"
    targets: tuple[str, ...] = ("mlp",)
    experts: int = 16
    shared: int = 0
    top_k: int = 8
    share: float = 1.0
    router: str = "analytic"
    probes: int = 4
    checkpoint: str = ""
    recovery: str = ""
    backend: str = "auto"

    def validate(self) -> None:
        super().validate()
        self._check_choice("router", ROUTERS)
        self._check_choice("backend", ("auto", "reference"))
        self._check_range("share", 0.0, 1.0, lo_open=True)
        if self.experts < 1:
            raise ConfigError(f"ExpertRoutingConfig.experts={self.experts}: use at least 1 (e.g. 16)")
        if not 0 <= self.shared < self.experts:
            raise ConfigError(f"ExpertRoutingConfig.shared={self.shared} must be in [0, experts={self.experts}); shared experts are always run, the rest routed")
        if self.top_k < 0 or self.top_k > self.experts - self.shared:
            raise ConfigError(f"ExpertRoutingConfig.top_k={self.top_k} must be in [0, experts - shared = {self.experts - self.shared}] "
                              f"(0 keeps a native MoE's own k); e.g. experts={self.experts}, shared={self.shared}, top_k={max(1, (self.experts - self.shared) // 2)}")
        if self.probes < 1:
            raise ConfigError(f"ExpertRoutingConfig.probes={self.probes}: use at least 1")

    def at_zero_strength(self) -> "ExpertRoutingConfig":
        return dataclasses.replace(self, top_k=self.experts - self.shared, share=1.0) if self.experts > 1 else self

    def active_fraction(self) -> float:
        """Fraction of a dense FFN's neurons a token runs at fixed top-k (MoEfication)."""
        return (self.shared + self.top_k) / self.experts


# -- calibration: a sample of each FFN's input ------------------------------------------------
class TokenSample:
    """Reservoir sample of up to ``capacity`` input tokens (float16), seeded."""

    def __init__(self, capacity: int = SAMPLE_TOKENS, seed: int = 0) -> None:
        self.capacity, self.seen, self.buf = capacity, 0, None
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.buf is None:
            self.buf = torch.empty(0, x.shape[1])
        take = min(self.capacity - self.buf.shape[0], x.shape[0])
        if take > 0:
            self.buf = torch.cat([self.buf, x[:take]])
        rest = x[take:]
        if rest.shape[0]:
            pos = self.seen + take + torch.arange(rest.shape[0])  # global index of each remaining token
            j = (torch.rand(rest.shape[0], generator=self.gen) * (pos + 1)).long()
            keep = j < self.capacity
            self.buf[j[keep]] = rest[keep]
        self.seen += x.shape[0]

    def state(self) -> dict[str, torch.Tensor]:
        if self.buf is None:
            raise ConfigError("expert_routing calibration saw no tokens; pass non-empty calibration text")
        return {"x": self.buf.half().contiguous()}


# -- FFN anatomy ------------------------------------------------------------------------------
def _act_name(mod: nn.Module, fn: Any) -> str:
    name = type(fn).__name__.lower()
    if "silu" in name or fn is torch.nn.functional.silu:
        return "silu"
    if "tanh" in name or "new" in name or "fast" in name or getattr(fn, "approximate", "") == "tanh":
        return "gelu_tanh"
    if "gelu" in name or fn is torch.nn.functional.gelu:
        return "gelu"
    if "relu" in name:
        return "relu"
    raise ConfigError(f"expert_routing: unsupported activation {type(fn).__name__} in {type(mod).__name__}; supported: silu, gelu, gelu_tanh, relu")


def _weight(lin: nn.Module) -> torch.Tensor:
    """(out, in) fp32 weight of nn.Linear or GPT-2's Conv1D."""
    w = lin.weight.detach().float()
    return w if isinstance(lin, nn.Linear) else w.t()


def _bias(lin: nn.Module) -> torch.Tensor | None:
    b = getattr(lin, "bias", None)
    return None if b is None else b.detach().float()


# BERT keeps its FFN as two sibling modules (``intermediate``: dense + activation; ``output``:
# dense, dropout, LayerNorm with the residual): the experts replace ``intermediate`` and compute
# the whole FFN, ``output.dense`` is passed through (:class:`FFNDone`). Intermediate -> its layer's output.
_SIBLING: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def ffn_parts(mod: nn.Module) -> dict[str, Any]:
    """gate (F, d) or None, up (F, d), down (out, F), biases and activation of a dense FFN."""
    if all(hasattr(mod, a) for a in ("dense", "intermediate_act_fn")) and mod in _SIBLING:  # BERT
        down = _SIBLING[mod].dense
        down = down.base if isinstance(down, FFNDone) else down
        return {"gate": None, "up": _weight(mod.dense), "down": _weight(down), "gate_bias": None, "up_bias": _bias(mod.dense),
                "down_bias": _bias(down), "act": _act_name(mod, mod.intermediate_act_fn)}
    if all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return {"gate": _weight(mod.gate_proj), "up": _weight(mod.up_proj), "down": _weight(mod.down_proj), "gate_bias": _bias(mod.gate_proj),
                "up_bias": _bias(mod.up_proj), "down_bias": _bias(mod.down_proj), "act": _act_name(mod, mod.act_fn)}
    if all(hasattr(mod, a) for a in ("c_fc", "c_proj", "act")):  # GPT-2
        return {"gate": None, "up": _weight(mod.c_fc), "down": _weight(mod.c_proj), "gate_bias": None, "up_bias": _bias(mod.c_fc),
                "down_bias": _bias(mod.c_proj), "act": _act_name(mod, mod.act)}
    raise ConfigError(f"expert_routing splits feed-forward blocks with gate_proj / up_proj / down_proj (Llama family) or c_fc / c_proj (GPT-2); "
                      f"got a {type(mod).__name__}")


def is_native_moe(mod: nn.Module) -> bool:
    return hasattr(mod, "gate") and hasattr(mod, "experts") and hasattr(getattr(mod, "experts"), "gate_up_proj")


def _activations(x: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    """(N, F) FFN hidden activations of x (N, d)."""
    a = x @ p["up"].t() + (p["up_bias"] if p["up_bias"] is not None else 0)
    if p["gate"] is None:
        return X.act(p["act"], a)
    g = x @ p["gate"].t() + (p["gate_bias"] if p["gate_bias"] is not None else 0)
    return X.act(p["act"], g) * a


# -- splitting neurons into experts ----------------------------------------------------------
def balanced_assign(sim: torch.Tensor, cap: int) -> torch.Tensor:
    """Assign each of n rows to one of k clusters (at most ``cap`` each, n <= k * cap), by rounds:
    every unassigned row proposes to its best cluster not yet tried; a cluster accepts its most
    similar proposers up to its remaining capacity."""
    n, k = sim.shape
    order = sim.argsort(1, descending=True)
    ptr = torch.zeros(n, dtype=torch.long)
    assign = torch.full((n,), -1, dtype=torch.long)
    load = torch.zeros(k, dtype=torch.long)
    while True:
        free = (assign < 0).nonzero().flatten()
        if free.numel() == 0:
            return assign
        choice = order[free, ptr[free]]
        s = sim[free, choice]
        o = s.argsort(descending=True)
        o = o[choice[o].argsort(stable=True)]  # grouped by cluster, most similar first
        c_sorted = choice[o]
        first = torch.searchsorted(c_sorted, c_sorted, right=False)
        rank = torch.arange(o.numel()) - first
        ok = rank < (cap - load)[c_sorted]
        acc = free[o[ok]]
        assign[acc] = c_sorted[ok]
        load += torch.bincount(c_sorted[ok], minlength=k)
        ptr[free[o[~ok]]] += 1


def split_experts(contrib: torch.Tensor, experts: int, shared: int, iters: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm (F,), centroid similarity (F,)) from per-token neuron contributions (N, F): neurons
    ``perm[e * Fe:(e + 1) * Fe]`` form expert e; the first ``shared`` experts hold the neurons with
    the largest mean contribution, the rest are balanced k-means clusters of the neurons'
    normalised contribution patterns."""
    n_tok, F = contrib.shape
    fe = F // experts
    mean = contrib.mean(0)
    order = mean.argsort(descending=True)
    shared_idx, rest = order[: shared * fe], order[shared * fe:]
    feats = contrib[:, rest].t()  # (F', N)
    feats = feats / feats.norm(dim=1, keepdim=True).clamp(min=1e-12)
    k = experts - shared
    g = torch.Generator().manual_seed(seed)
    cent = feats[torch.randperm(feats.shape[0], generator=g)[:k]].clone()
    assign = torch.zeros(feats.shape[0], dtype=torch.long)
    for _ in range(iters):
        assign = balanced_assign(feats @ cent.t(), fe)
        new = torch.zeros_like(cent).index_add_(0, assign, feats)
        new = new / new.norm(dim=1, keepdim=True).clamp(min=1e-12)
        if torch.allclose(new, cent):
            break
        cent = new
    sim = (feats * cent[assign]).sum(1)
    perm, simil = [shared_idx], [torch.ones(shared_idx.numel())]
    for c in range(k):
        members = (assign == c).nonzero().flatten()
        members = members[sim[members].argsort(descending=True)]  # nearest the centroid first: the analytic router's probes
        perm.append(rest[members])
        simil.append(sim[members])
    return torch.cat(perm), torch.cat(simil)


def train_router(x: torch.Tensor, target: torch.Tensor, hidden: int, steps: int = 300, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two-layer MLP router (d -> hidden -> E) fit by soft cross-entropy to the experts' mass
    shares ``target`` (N, E) on the calibration tokens x (N, d)."""
    with torch.inference_mode(False), torch.enable_grad():  # callers may hold inference mode (bench, demo)
        return _train_router(x.clone(), target.clone(), hidden, steps, seed)


def _train_router(x: torch.Tensor, target: torch.Tensor, hidden: int, steps: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n, d = x.shape
    E = target.shape[1]
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    xs = (x - mu) / sd
    w1 = (torch.randn(d, hidden, generator=g) / d**0.5).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(hidden, E, generator=g) / hidden**0.5).requires_grad_()
    b2 = torch.zeros(E, requires_grad=True)
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=3e-3, weight_decay=1e-4)
    bs = min(1024, n)
    for _ in range(steps):
        i = torch.randint(0, n, (bs,), generator=g)
        logits = torch.relu(xs[i] @ w1 + b1) @ w2 + b2
        loss = -(target[i] * torch.log_softmax(logits, -1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # fold the input normalisation into the first layer: relu(x @ w1' + b1')
    w1f = (w1.detach() / sd[:, None]).contiguous()
    b1f = (b1.detach() - (mu / sd) @ w1.detach()).contiguous()
    return {"w1": w1f, "b1": b1f, "w2": w2.detach().contiguous(), "b2": b2.detach().contiguous()}


def build_layer(x: torch.Tensor, parts: dict[str, Any], cfg: ExpertRoutingConfig) -> dict[str, torch.Tensor]:
    """Split and router of one FFN from its calibration sample x (N, d)."""
    F = parts["up"].shape[0]
    if F % cfg.experts:
        divisors = [e for e in range(2, 129) if F % e == 0]
        raise ConfigError(f"expert_routing: {cfg.experts} experts do not divide this FFN's {F} neurons; use one of {divisors[:12]}")
    x = x.float()
    h = _activations(x, parts)  # (N, F)
    contrib = h.abs() * parts["down"].norm(dim=0)  # (N, F): each neuron's contribution to the output norm
    perm, _ = split_experts(contrib, cfg.experts, cfg.shared)
    fe = F // cfg.experts
    out = {"perm": perm.to(torch.int32)}
    k = cfg.experts - cfg.shared
    routed = perm[cfg.shared * fe:].view(k, fe)
    if cfg.router == "analytic":
        out["probes"] = routed[:, : min(cfg.probes, fe)].reshape(-1).to(torch.int32)  # (k * probes,)
    else:
        mass = contrib[:, routed.reshape(-1)].view(-1, k, fe).sum(-1)  # (N, k)
        target = mass / mass.sum(-1, keepdim=True).clamp(min=1e-12)
        out.update(train_router(x, target, hidden=max(64, 4 * k)))
    return out


# -- the modules ------------------------------------------------------------------------------
class FFNDone(LazyModule):
    """BERT's ``output.dense`` while the experts in ``intermediate`` compute the whole FFN: its
    input already is the FFN's output (down projection and bias included)."""

    method_name = "expert_routing"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def weight_elements(self) -> int:
        return 0


class ExpertMLP(LazyModule):
    """A dense FFN run as experts (MoEfication): a router picks experts per token; only they run."""

    method_name = "expert_routing"
    track = False

    def __init__(self, base: nn.Module, built: dict[str, torch.Tensor], cfg: ExpertRoutingConfig) -> None:
        super().__init__(base)
        p = ffn_parts(base)
        self._out = [_SIBLING[base]] if base in _SIBLING else []  # BERT: the layer's output module (a list: not a submodule)
        self.act, self.gated = p["act"], p["gate"] is not None
        self.F, self.d = p["up"].shape
        self.out_features = p["down"].shape[0]
        self.E, self.shared, self.top_k, self.share, self.router = cfg.experts, cfg.shared, cfg.top_k, cfg.share, cfg.router
        self.probes = cfg.probes
        self.fe = self.F // self.E
        self.backend = cfg.backend
        self.built = built
        perm = built["perm"].long()
        self.down_bias = p["down_bias"]
        self._parts, self._perm = p, perm
        self._expert_of = torch.empty(self.F, dtype=torch.long)  # expert of each neuron (the FFN's own order)
        self._expert_of[perm] = torch.arange(self.F) // self.fe
        self.recovery: nn.Module | None = None  # low-rank updates (experts_recovery), merged into the blocks
        self.mode = "routed"  # routed (inference) | teacher (the dense FFN) | recovery (routed, differentiable, with the updates)
        self.weight_dtype = ""
        self.set_weight_dtype("fp32")
        common = dict(top_k=cfg.top_k, share=cfg.share, shared=cfg.shared)
        if cfg.router == "analytic":
            pr = built["probes"].long()
            rows = [p["up"][pr]] if p["gate"] is None else [p["gate"][pr], p["up"][pr]]
            zeros = torch.zeros(len(pr))
            bias = [p["up_bias"][pr] if p["up_bias"] is not None else zeros]
            if p["gate"] is not None:
                bias = [p["gate_bias"][pr] if p["gate_bias"] is not None else zeros] + bias
            self.router_spec = X.Router("analytic", torch.cat(rows).t().contiguous(), torch.cat(bias).contiguous(), norm=p["down"][:, pr].norm(dim=0).contiguous(),
                                        probes=len(pr) // (self.E - self.shared), **common)
        else:
            self.router_spec = X.Router("learned", built["w1"].float().contiguous(), built["b1"].float().contiguous(), built["w2"].float().contiguous(),
                                        built["b2"].float().contiguous(), **common)
        self._router_fp32 = self.router_spec  # set_weight_dtype stores its first layer in the runtime's format
        self.tokens_seen = self.weights_skipped = self.experts_read = 0
        self._parts = None  # fp32 copies are only needed while building

    def set_weight_dtype(self, dtype: str) -> None:
        """Store the expert blocks and the router's first layer in ``dtype`` (fp32, bf16, int8): the
        runtime's weight format."""
        if dtype == self.weight_dtype:
            return
        p = self._parts if self._parts is not None else ffn_parts(self.base)
        if self.recovery is not None:  # the weights with their trained low-rank updates
            with torch.no_grad():
                p = {**p, **{n: p[n] + self.recovery.delta(n) for n in self.recovery.names}}
        perm = self._perm
        self.blocks = X.prepare_experts(None if p["gate"] is None else p["gate"][perm], p["up"][perm], p["down"][:, perm].contiguous(), self.E, dtype,
                                        None if p["gate_bias"] is None else p["gate_bias"][perm], None if p["up_bias"] is None else p["up_bias"][perm])
        if getattr(self, "_router_fp32", None) is not None:  # (at construction the router is built after the blocks)
            self.router_spec = self._router_fp32.in_format(dtype)
        self.weight_dtype = dtype

    oracle = False  # analysis only: route by each expert's true output mass (computes every expert)

    def oracle_coef(self, x: torch.Tensor) -> torch.Tensor:
        """(N, E) choice of the experts with the largest true contribution ``sum |h_j| ||down_j||``:
        the best any router could do with this split (computes the dense FFN)."""
        b = self.blocks
        a = torch.einsum("nd,edc->nec", x.float(), G.dequantize(b["gu"], None) if b["gu_scale"] is None else b["gu"].float() * b["gu_scale"][:, None, :])
        if b["gu_bias"] is not None:
            a = a + b["gu_bias"]
        h = X.act(self.act, a[..., : self.fe]) * a[..., self.fe:] if self.gated else X.act(self.act, a)
        dn = b["down"].float().view(self.E, self.fe, -1).norm(dim=-1)  # (E, fe); int8 scales are per output: a common factor per column
        mass = (h.abs() * dn).sum(-1)[:, self.shared:]
        coef = torch.zeros(x.shape[0], self.E)
        coef[:, : self.shared] = 1.0
        coef[:, self.shared:] = torch.zeros_like(mass).scatter_(1, mass.topk(self.top_k, -1).indices, 1.0)
        return coef

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.mode != "routed":  # recovery training: the dense teacher, or the routed student as a differentiable masked product
            from .experts_recovery import dense_forward

            coef = None if self.mode == "teacher" else X.route_reference(x2.detach(), self.router_spec, self.E, self.act, self.gated)
            return dense_forward(self, x2, coef, self.mode == "recovery").to(x.dtype).view(*shape[:-1], self.out_features)
        if self.oracle:
            coef = self.oracle_coef(x2)
            b = self.blocks
            y = X.reference(x2, b["gu"], b["gu_scale"], b["gu_bias"], b["down"], b["down_scale"], self.down_bias, coef, self.act, self.gated)
        else:
            y, coef = X.routed_mlp(x2, self.router_spec, self.blocks, self.down_bias, self.act, self.gated, self.backend)
        if self.track:
            used = int((coef != 0).sum())
            per = self.fe * (self.d * (2 if self.gated else 1) + self.out_features)
            self.tokens_seen += x2.shape[0]
            self.experts_read += used
            self.weights_skipped += (x2.shape[0] * self.E - used) * per - x2.shape[0] * self.router_spec.elements()
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def attach(self) -> None:
        """BERT: pass ``output.dense`` through, since this module computes the whole FFN."""
        if self._out and not isinstance(self._out[0].dense, FFNDone):
            self._out[0].dense = FFNDone(self._out[0].dense)

    def restore_base(self) -> nn.Module:
        if self._out and isinstance(self._out[0].dense, FFNDone):
            self._out[0].dense = self._out[0].dense.base
        return self.base

    def weight_elements(self) -> int:
        return self.F * (self.d * (2 if self.gated else 1) + self.out_features)

    def extra_repr(self) -> str:
        return (f"method={self.method_name}, experts={self.E}, shared={self.shared}, top_k={self.top_k}, share={self.share}, router={self.router}, "
                f"dtype={self.weight_dtype}, act={self.act}")


class NativeMoE(LazyModule):
    """A native sparse MoE block (Mixtral, Qwen2/3-MoE, OLMoE) on the experts kernel, with
    adaptive top-k: per token, the fewest of the router's top-k experts whose routing probability
    reaches ``share`` of the top-k mass (``share=1``: the model's own routing)."""

    method_name = "expert_routing"
    track = False

    def __init__(self, base: nn.Module, cfg: ExpertRoutingConfig, model_cfg: Any) -> None:
        super().__init__(base)
        gu = base.experts.gate_up_proj.detach()
        self.E, two_f, self.d = gu.shape
        self.fe = two_f // 2
        self.k = int(getattr(base.gate, "top_k", 0) or getattr(model_cfg, "num_experts_per_tok", 2))
        if cfg.top_k:
            self.k = min(self.k, cfg.top_k)
        self.share = cfg.share
        norm = model_cfg.model_type == "mixtral" or bool(getattr(base.gate, "norm_topk_prob", getattr(model_cfg, "norm_topk_prob", False)))
        self.router_spec = X.Router("native", base.gate.weight.detach().float().t().contiguous(), top_k=self.k, share=cfg.share, renorm=norm)
        self.act = _act_name(base, base.experts.act_fn)
        self.backend = cfg.backend
        self.weight_dtype = ""
        self.set_weight_dtype("fp32")
        self.tokens_seen = self.weights_skipped = self.experts_read = 0

    def set_weight_dtype(self, dtype: str) -> None:
        if dtype == self.weight_dtype:
            return
        gu = self.base.experts.gate_up_proj.detach().float()  # (E, 2F, d): gate rows, then up rows
        dn = self.base.experts.down_proj.detach().float()  # (E, d, F)
        blocks, scales = zip(*(G.prepare_weight(gu[e], dtype) for e in range(self.E)))
        dw, ds = G.prepare_weight(torch.cat(list(dn), 1), dtype)  # (E * F, d)
        self.blocks = {"gu": torch.stack(blocks).contiguous(), "gu_scale": None if scales[0] is None else torch.stack(scales).contiguous(),
                       "gu_bias": None, "down": dw, "down_scale": ds}
        self.weight_dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y, coef = X.routed_mlp(x2, self.router_spec, self.blocks, None, self.act, True, self.backend)
        if hasattr(self.base, "shared_expert"):  # Qwen2-MoE: a gated shared expert
            y = y + torch.sigmoid(self.base.shared_expert_gate(x2)).float() * self.base.shared_expert(x2).float()
        if self.track:
            used = int((coef != 0).sum())
            self.tokens_seen += x2.shape[0]
            self.experts_read += used
            self.weights_skipped += (x2.shape[0] * self.E - used) * self.fe * 3 * self.d
        return y.to(x.dtype).view(shape)

    def weight_elements(self) -> int:
        return self.E * self.fe * 3 * self.d

    def extra_repr(self) -> str:
        return f"method={self.method_name}, native experts={self.E}, top_k={self.k}, share={self.share}, dtype={self.weight_dtype}"


# -- checkpoints of splits and routers --------------------------------------------------------
def _save(path: str, built: dict[str, dict[str, torch.Tensor]], cfg: ExpertRoutingConfig, shapes: dict[str, list[int]]) -> None:
    from safetensors.torch import save_file

    flat = {f"{p}::{k}": t.contiguous() for p, d in built.items() for k, t in d.items()}
    meta = {"format": "lazyneuron-experts-1", "config": json.dumps({k: getattr(cfg, k) for k in ("experts", "shared", "router", "probes")}),
            "shapes": json.dumps(shapes)}
    tmp = path + ".tmp"
    save_file(flat, tmp, metadata=meta)
    os.replace(tmp, path)


def _load(path: str, cfg: ExpertRoutingConfig, shapes: dict[str, list[int]]) -> dict[str, dict[str, torch.Tensor]]:
    from ..checkpoints import read

    header, tensors = read(path, "lazyneuron-experts-1", "expert routing checkpoint", "delete it to rebuild the experts from the calibration", ConfigError)
    want = {k: getattr(cfg, k) for k in ("experts", "shared", "router", "probes")}
    got = json.loads(header.get("config", "{}"))
    if got != want:
        raise ConfigError(f"expert checkpoint {path!r} holds experts built with {got}, the config asks for {want}; use another checkpoint path or matching settings")
    saved = json.loads(header.get("shapes", "{}"))
    if saved != shapes:
        diff = next((p for p in set(saved) | set(shapes) if saved.get(p) != shapes.get(p)), "?")
        raise ConfigError(f"expert checkpoint {path!r} was made for another model (module {diff!r}: saved {saved.get(diff)}, this model {shapes.get(diff)}); "
                          "use a checkpoint made for this model or another path")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        p, _, n = k.rpartition("::")
        out.setdefault(p, {})[n] = t
    return out


_BUILT: dict[int, dict[Any, Any]] = {}


def _cache_for(t: torch.Tensor) -> dict[Any, Any]:
    key = id(t)
    if key not in _BUILT:
        _BUILT[key] = {}
        weakref.finalize(t, _BUILT.pop, key, None)
    return _BUILT[key]


@register
class ExpertRouting(Method):
    config_cls = ExpertRoutingConfig
    needs_calibration = True

    def wants_calibration(self, model: nn.Module, paths: list[str]) -> bool:
        return not all(is_native_moe(model.get_submodule(p)) for p in paths)

    def resolve(self, model: nn.Module, adapter: ModelAdapter, cfg: MethodConfig) -> list[str]:
        assert isinstance(cfg, ExpertRoutingConfig)
        if adapter.family == "bert":  # the FFN as two siblings: experts replace `intermediate`
            paths = filter_paths([f"{p}.intermediate" for p in adapter.paths("layer")], cfg.include, cfg.exclude)
            for p in paths:
                layer = model.get_submodule(p.rpartition(".")[0])
                if isinstance(layer.intermediate, LazyModule):
                    continue  # reported below
                if not (hasattr(layer, "output") and hasattr(layer.output, "dense") and hasattr(layer.intermediate, "intermediate_act_fn")):
                    raise ConfigError(f"expert_routing: {p!r} is not a BERT intermediate / output pair")
                _SIBLING[layer.intermediate] = layer.output
        elif not adapter.paths("mlp"):
            raise ConfigError(f"expert_routing needs feed-forward blocks under the 'mlp' role; this {adapter.model_type} model has none; "
                              "run `lazyneuron inspect` to see its roles")
        else:
            paths = filter_paths(adapter.paths("mlp"), cfg.include, cfg.exclude)
        for p in paths:
            m = model.get_submodule(p)
            if isinstance(m, LazyModule):
                raise ConfigError(f"{p!r} is already converted by {m.method_name}; apply expert_routing before other methods on the FFN (revert_ first)")
            on_rt = [n for n, c in m.named_modules() if isinstance(c, LazyModule) and c.method_name == "runtime"]
            if on_rt:
                raise ConfigError(f"{p + '.' + on_rt[0]!r} is already on the runtime; apply the runtime last: "
                                  "apply_(model, [ExpertRoutingConfig(...), RuntimeConfig(...)]) or runtime.prepare(model, dtype, configs=[...]) (revert_ first)")
            if not is_native_moe(m):
                parts = ffn_parts(m)
                if parts["up"].shape[0] % cfg.experts:
                    F = parts["up"].shape[0]
                    divisors = [e for e in range(2, 129) if F % e == 0]
                    raise ConfigError(f"expert_routing: experts={cfg.experts} does not divide the {F} neurons of {p!r}; use one of {divisors[:12]}")
        return paths

    def observer(self, path: str, module: nn.Module, cfg: MethodConfig) -> Any:
        return None if is_native_moe(module) else TokenSample()

    def plan(self, model: nn.Module, cfg: MethodConfig, paths: list[str], stats: dict[str, dict[str, torch.Tensor]] | None) -> MethodConfig:
        assert isinstance(cfg, ExpertRoutingConfig)
        dense = [p for p in paths if not is_native_moe(model.get_submodule(p))]
        if not dense:
            return cfg
        if stats is None:
            raise ConfigError("expert_routing on dense FFNs needs a calibration: lazyneuron.calibrate(model, texts, config)")
        shapes = {p: list(ffn_parts(model.get_submodule(p))["up"].shape) for p in dense}
        key = (cfg.experts, cfg.shared, cfg.router, cfg.probes)
        if cfg.recovery:  # read (and checked) before any module changes
            from .experts_recovery import load_recovery

            self._recovery = load_recovery(cfg.recovery)
        if cfg.checkpoint and os.path.exists(cfg.checkpoint):
            loaded = _load(cfg.checkpoint, cfg, shapes)
            for p in dense:
                _cache_for(stats[p]["x"])[key] = loaded[p]
            return cfg
        todo = [p for p in dense if key not in _cache_for(stats[p]["x"])]
        if todo:
            from tqdm.auto import tqdm

            for p in tqdm(todo, desc=f"experts ({cfg.experts}, {cfg.router} router)", unit="ffn", disable=len(todo) < 4):
                _cache_for(stats[p]["x"])[key] = build_layer(stats[p]["x"], ffn_parts(model.get_submodule(p)), cfg)
        if cfg.checkpoint:
            _save(cfg.checkpoint, {p: _cache_for(stats[p]["x"])[key] for p in dense}, cfg, shapes)
        return cfg

    def convert(self, path: str, module: nn.Module, cfg: MethodConfig, stats: dict[str, torch.Tensor] | None) -> nn.Module:
        assert isinstance(cfg, ExpertRoutingConfig)
        if is_native_moe(module):
            mc = getattr(module.experts, "config", None) or getattr(module, "config", None)
            return NativeMoE(module, cfg, mc if mc is not None else _ModelCfg(module))
        assert stats is not None
        built = _cache_for(stats["x"])[(cfg.experts, cfg.shared, cfg.router, cfg.probes)]
        mod = ExpertMLP(module, built, cfg)
        if cfg.recovery:
            from .experts_recovery import apply_recovery

            header, saved = self._recovery
            if path not in saved:
                raise ConfigError(f"expert recovery file {cfg.recovery!r} has no adapters for {path!r} (it holds {len(saved)} FFNs, e.g. {next(iter(saved), '?')!r}); "
                                  "it was trained on another model or other targets")
            apply_recovery(cfg.recovery, header, saved[path], mod, path)
        mod.attach()
        return mod

    def summarize(self, model: nn.Module, cfg: MethodConfig, paths: list[str]) -> dict[str, Any]:
        assert isinstance(cfg, ExpertRoutingConfig)
        mods = [model.get_submodule(p) for p in paths]
        native = any(isinstance(m, NativeMoE) for m in mods)
        out: dict[str, Any] = {"modules": len(paths), "native": native}
        if not native:
            out["active_neurons"] = cfg.active_fraction()
        return out

    @classmethod
    def plan_axes(cls, model: nn.Module, model_name: str | None = None) -> list[list[MethodConfig]]:
        """A native MoE: fewer experts where the router is confident (``share`` from 0.95 down);
        a dense FFN: 16 experts (or the most up to 16 that divide it), two shared, learned routers,
        from all but three routed experts down to a quarter of the neurons."""
        from ..adapters import get_adapter

        ad = get_adapter(model)
        paths = ad.paths("mlp")
        if paths and is_native_moe(model.get_submodule(paths[0])):
            return [[ExpertRoutingConfig(share=s) for s in (0.95, 0.9, 0.8, 0.7, 0.6, 0.5)]]
        c = getattr(model, "config", None) or getattr(getattr(model, "bert", None), "config", None)
        f = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * getattr(c, "n_embd", 0)
        e = next((e for e in (16, 8, 4) if f and f % e == 0), 0)
        if not e:
            return []
        sh = 2 if e >= 8 else 0
        ks = sorted({max(1, round((e - sh) * x)) for x in (0.8, 0.65, 0.5, 0.35, 0.2)}, reverse=True)
        return [[ExpertRoutingConfig(experts=e, shared=sh, top_k=k, router="learned") for k in ks]]

    @classmethod
    def demo_configs(cls, model_name: str = DEMO_MODEL) -> list[MethodConfig]:
        return [ExpertRoutingConfig(experts=16, shared=2, top_k=10, router="learned")]


class _ModelCfg:
    """Routing settings read from a native MoE block when its config is not reachable."""

    def __init__(self, module: nn.Module) -> None:
        self.model_type = "mixtral" if type(module).__name__.startswith("Mixtral") else ""  # Mixtral always renormalises its top-k
        self.num_experts_per_tok = int(getattr(module.gate, "top_k", 2))
        self.norm_topk_prob = bool(getattr(module.gate, "norm_topk_prob", False))
