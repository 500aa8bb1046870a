"""Feed-forward experts: a token runs only the experts it was routed to (``csrc/gemv.cpp``).

Layout, prepared once at convert time (:func:`prepare_experts`): each expert's gate and up rows
are one contiguous input-major block ``gu[e]`` of shape (d, C) (C = 2 Fe: its Fe gate columns,
then its Fe up columns; C = Fe for a plain FFN), and the down projection is input-major
(E * Fe, out) with expert ``e``'s rows at ``e * Fe : (e + 1) * Fe``. Weights in fp32, bf16 or int8
(per-output-channel scales, fp32 accumulation), as the dense GEMV.

``coef`` (B, E): token ``b`` runs expert ``e`` when ``coef[b, e] != 0`` and scales its output by it
(1 for MoEfication, the router weight for a native MoE). Tokens are grouped by expert, so at
batch > 1 each chosen expert's blocks are read once for all its tokens, and experts no token
chose are never read. Longer inputs (prefill, encoder forwards): :func:`long_input_path`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.nn import functional as F

from . import gemv as G
from ._build import extension

ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
_EMPTY = torch.empty(0)


def act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.relu(x)


def prepare_experts(gate: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor, experts: int, dtype: str = "fp32",
                    gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
    """Blocks for :func:`expert_mlp` from weights already ordered expert by expert.

    gate / up: (E * Fe, d) (``nn.Linear`` layout; gate None for a plain FFN); down: (out, E * Fe).
    Returns gu (E, d, C), gu_scale (E, C) or None, gu_bias (E, C) or None, down (E * Fe, out),
    down_scale (out) or None."""
    n, d = up.shape
    if n % experts:
        raise ValueError(f"{n} neurons do not split into {experts} equal experts")
    fe = n // experts
    blocks, scales = [], []
    for e in range(experts):
        rows = [up[e * fe:(e + 1) * fe]] if gate is None else [gate[e * fe:(e + 1) * fe], up[e * fe:(e + 1) * fe]]
        wt, sc = G.prepare_weight(torch.cat(rows), dtype)  # (d, C)
        blocks.append(wt)
        scales.append(sc)
    gu = torch.stack(blocks).contiguous()
    gu_scale = torch.stack(scales).contiguous() if scales[0] is not None else None
    gu_bias = None
    if up_bias is not None or gate_bias is not None:
        ub = up_bias if up_bias is not None else torch.zeros(n)
        parts = [ub.view(experts, fe)] if gate is None else [(gate_bias if gate_bias is not None else torch.zeros(n)).view(experts, fe), ub.view(experts, fe)]
        gu_bias = torch.cat(parts, 1).float().contiguous()
    dw, ds = G.prepare_weight(down, dtype)  # (E * Fe, out)
    return {"gu": gu, "gu_scale": gu_scale, "gu_bias": gu_bias, "down": dw, "down_scale": ds}


def reference(x: torch.Tensor, gu: torch.Tensor, gu_scale: torch.Tensor | None, gu_bias: torch.Tensor | None, down: torch.Tensor,
              down_scale: torch.Tensor | None, down_bias: torch.Tensor | None, coef: torch.Tensor, act_name: str, gated: bool) -> torch.Tensor:
    """Pure-torch ground truth, any number of tokens: x (N, d) -> (N, out) float32."""
    E, _, C = gu.shape
    fe = C // 2 if gated else C
    x = x.float()
    acc = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32)
    hit = (coef != 0).any(0).nonzero().flatten().tolist()
    for e in hit:
        t = (coef[:, e] != 0).nonzero().flatten()
        a = x[t] @ gu[e].float()  # (n, C)
        if gu_scale is not None:
            a = a * gu_scale[e]
        if gu_bias is not None:
            a = a + gu_bias[e]
        h = act(act_name, a[:, :fe])
        if gated:
            h = h * a[:, fe:]
        h = h * coef[t, e, None]
        acc.index_add_(0, t, h @ down[e * fe:(e + 1) * fe].float())
    if down_scale is not None:
        acc = acc * down_scale
    return acc + down_bias if down_bias is not None else acc


def masked_reference(x: torch.Tensor, gu: torch.Tensor, gu_scale: torch.Tensor | None, gu_bias: torch.Tensor | None, down: torch.Tensor,
                     down_scale: torch.Tensor | None, down_bias: torch.Tensor | None, coef: torch.Tensor, act_name: str, gated: bool) -> torch.Tensor:
    """:func:`reference`'s result computed as dense products (every expert, then weighted by
    ``coef``): for inputs too short for grouping by expert to pay (a sentence through an encoder),
    where it costs what the dense FFN costs."""
    E, d, C = gu.shape
    fe = C // 2 if gated else C
    x = x.float()
    w = gu if gu.dtype == torch.float32 else gu.float()
    a = torch.bmm(x.unsqueeze(0).expand(E, -1, -1), w)  # (E, N, C)
    if gu_scale is not None:
        a = a * gu_scale[:, None, :]
    if gu_bias is not None:
        a = a + gu_bias[:, None, :]
    h = act(act_name, a[..., :fe])
    if gated:
        h = h * a[..., fe:]
    h = h * coef.t()[:, :, None]  # (E, N, fe)
    dw = down if down.dtype == torch.float32 else down.float()
    y = h.permute(1, 0, 2).reshape(x.shape[0], E * fe) @ dw
    if down_scale is not None:
        y = y * down_scale
    return y + down_bias if down_bias is not None else y


def grouped_gemm(x: torch.Tensor, gu: torch.Tensor, gu_scale: torch.Tensor | None, gu_bias: torch.Tensor | None, down: torch.Tensor,
                 down_scale: torch.Tensor | None, down_bias: torch.Tensor | None, coef: torch.Tensor, act_name: str, gated: bool) -> torch.Tensor:
    """:func:`reference`'s result for long inputs (prefill, encoder forwards) on the runtime's GEMM
    (the blocks' own format; bf16 / int8 on the bf16 dot products where :func:`~lazyneuron.kernels.gemv.gemm`
    takes them), one C++ call per FFN: each hit expert's tokens are gathered, its gate / up block
    and down rows multiply them, act(gate) * up and the coefficient applied in between, and its
    output is added into its tokens' rows. Experts no token chose are never read. Falls back to
    :func:`reference` without the extension or off the CPU."""
    ext = extension("gemv")
    if ext is None or not (x.is_cpu and gu.is_cpu and down.is_cpu) or x.shape[0] == 0:
        return reference(x, gu, gu_scale, gu_bias, down, down_scale, down_bias, coef, act_name, gated)
    x = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    c = coef if coef.dtype == torch.float32 and coef.is_contiguous() else coef.float().contiguous()
    y, _ = ext.expert_gemm(x, gu, _EMPTY if gu_scale is None else gu_scale, _EMPTY if gu_bias is None else gu_bias, down,
                           _EMPTY if down_scale is None else down_scale, _EMPTY if down_bias is None else down_bias, c, ACTS[act_name], gated, True)
    if y is None:
        raise ValueError(f"expert_gemm: {G.kernel_error(ext.last_error(), x, gu)}")
    return y


def long_input_path(x: torch.Tensor, coef: torch.Tensor, backend: str, ext: Any) -> Any:
    """The function that runs more tokens than the decode kernel takes: on the CPU with the
    extension :func:`grouped_gemm`; otherwise one of torch's products, :func:`reference` where
    grouping pays, else :func:`masked_reference`; ``backend='reference'``: :func:`reference`.
    Measured against torch's products (16 experts, one FFN, 2 threads, SmolLM2 and MiniLM shapes,
    16-96 tokens): 1.5-5x at 25-75% of the experts; against the dense FFN on the runtime's GEMM
    (``benchmarks/experts.py --kernel``), 2.4 / 1.8 / 1.4x at 64 tokens and 3.8 / 2.1 / 1.5x at
    256, at 25 / 50 / 75% of the neurons."""
    if backend == "reference":
        return reference
    if ext is not None and x.is_cpu:
        return grouped_gemm
    return reference if grouping_pays(coef) else masked_reference


GROUP_OVERHEAD = 36  # token-expert products one grouped expert's gather / scatter costs (measured on MiniLM / SmolLM2 shapes)


def grouping_pays(coef: torch.Tensor) -> bool:
    """Whether grouping a long input by expert beats the dense products: twice the (token, expert)
    pairs run plus a fixed cost per hit expert, against every pair."""
    n, E = coef.shape
    nz = coef != 0
    return 2 * int(nz.sum()) + GROUP_OVERHEAD * int(nz.any(0).sum()) < n * E


def expert_mlp(x: torch.Tensor, blocks: dict[str, torch.Tensor | None], down_bias: torch.Tensor | None, coef: torch.Tensor, act_name: str,
               gated: bool, backend: str = "auto") -> tuple[torch.Tensor, int]:
    """(y (N, out) float32, experts read) for x (N, d). Batches up to ``G.MAX_BATCH`` run the
    C++ kernel; larger ones (prefill) and ``backend='reference'`` :func:`long_input_path`'s
    choice (its grouped paths, too, never read experts no token chose)."""
    ext = extension("gemv")
    gu, down = blocks["gu"], blocks["down"]
    if backend == "reference" or ext is None or x.shape[0] > G.MAX_BATCH or x.shape[0] == 0 or not x.is_cpu:
        run = long_input_path(x, coef, backend, ext)
        y = run(x, gu, blocks["gu_scale"], blocks["gu_bias"], down, blocks["down_scale"], down_bias, coef, act_name, gated)
        return y, int((coef != 0).any(0).sum())
    y, nh = ext.expert_mlp(
        x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous(),
        gu,
        _EMPTY if blocks["gu_scale"] is None else blocks["gu_scale"],
        _EMPTY if blocks["gu_bias"] is None else blocks["gu_bias"],
        down,
        _EMPTY if blocks["down_scale"] is None else blocks["down_scale"],
        _EMPTY if down_bias is None else down_bias,
        coef if coef.dtype == torch.float32 and coef.is_contiguous() else coef.float().contiguous(),
        ACTS[act_name],
        gated,
    )
    if y is None:
        raise ValueError(f"expert_mlp: {G.kernel_error(ext.last_error(), x, gu)}")
    return y, nh


ROUTER_KINDS = {"learned": 0, "analytic": 1, "native": 2}


@dataclasses.dataclass
class Router:
    """How tokens pick experts (see ``route`` in ``csrc/gemv.cpp``).

    ``kind`` learned: ``logits = relu(x @ w1 + b1) @ w2 + b2``, probabilities their softmax;
    analytic: ``a = x @ w1 + b1`` over ``probes`` neurons per routed expert (gate columns, then up
    columns when gated), score = sum of ``|act(gate) * up| * norm`` over its probes, probabilities
    the scores normalised; native: ``logits = x @ w1``, softmax over all experts. The ``top_k``
    highest scores run; ``share`` < 1 keeps the fewest of them whose probabilities reach ``share``
    of the total (native: of the top-k mass). Experts ``[0, shared)`` always run with coefficient
    1; a routed expert's coefficient is 1, or (native) its probability, renormalised over the
    experts run when ``renorm``."""

    kind: str
    w1: torch.Tensor
    b1: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    norm: torch.Tensor | None = None
    probes: int = 1
    top_k: int = 1
    share: float = 1.0
    shared: int = 0
    renorm: bool = False
    w1_scale: torch.Tensor | None = None  # per-column scales of an int8 ``w1``

    def elements(self) -> int:
        return sum(int(t.numel()) for t in (self.w1, self.w2) if t is not None)

    def in_format(self, dtype: str) -> "Router":
        """This router with its first layer ``w1`` (the only one of a size that counts: d x hidden)
        stored in ``dtype`` (fp32, bf16, int8 with per-column scales), the runtime's weight format;
        from an fp32 router. The rest stays fp32."""
        if self.w1.dtype != torch.float32:
            raise ValueError("Router.in_format converts an fp32 router; keep the fp32 one and convert it")
        if dtype == "fp32":
            return self
        wt, scale = G.prepare_weight(self.w1.t(), dtype)
        return dataclasses.replace(self, w1=wt, w1_scale=scale)

    def first_layer(self) -> torch.Tensor:
        """``w1`` as fp32 (d, cols), its stored rounding included."""
        return self.w1 if self.w1.dtype == torch.float32 else G.dequantize(self.w1, self.w1_scale)


def route_reference(x: torch.Tensor, r: Router, E: int, act_name: str, gated: bool) -> torch.Tensor:
    """Pure-torch ground truth of the router: coef (N, E) for x (N, d)."""
    K = E - r.shared
    x = x.float()
    a = x @ r.first_layer() + (r.b1 if r.b1 is not None else 0)
    if r.kind == "learned":
        sc = torch.relu(a) @ r.w2 + r.b2
        pr = torch.softmax(sc, -1)
    elif r.kind == "analytic":
        P = K * r.probes
        h = act(act_name, a[:, :P]) * a[:, P:] if gated else act(act_name, a[:, :P])
        sc = (h.abs() * r.norm).view(-1, K, r.probes).sum(-1)
        pr = sc / sc.sum(-1, keepdim=True).clamp(min=1e-30)
    else:
        sc = a
        pr = torch.softmax(sc, -1)
    n = min(r.top_k, K)
    _, idx = sc.topk(n, -1)
    pk = pr.gather(1, idx)
    keep = torch.ones_like(pk, dtype=torch.bool)
    if r.share < 1.0:
        ref = pk.sum(-1, keepdim=True) if r.kind == "native" else torch.ones_like(pk[:, :1])
        keep = (pk.cumsum(-1) - pk) < r.share * ref
    if r.kind == "native":
        val = pk * keep
        if r.renorm:
            val = val / val.sum(-1, keepdim=True)
    else:
        val = keep.float()
    coef = torch.zeros(x.shape[0], E)
    coef[:, :r.shared] = 1.0
    coef[:, r.shared:] = torch.zeros(x.shape[0], K).scatter_(1, idx, val)
    return coef


def route_args(r: Router, blocks: dict[str, torch.Tensor | None], down_bias: torch.Tensor | None, act_name: str, gated: bool) -> tuple:
    """The arguments after ``x`` of the compiled ``expert_route`` call (the decode step builds
    them once per FFN and calls the kernel directly)."""
    opt = lambda t: _EMPTY if t is None else t  # noqa: E731
    return (r.w1, opt(r.b1), opt(r.w2), opt(r.b2), opt(r.norm), ROUTER_KINDS[r.kind], r.probes, r.top_k, float(r.share), r.shared, r.renorm,
            blocks["gu"], opt(blocks["gu_scale"]), opt(blocks["gu_bias"]), blocks["down"], opt(blocks["down_scale"]), opt(down_bias),
            ACTS[act_name], gated, opt(r.w1_scale))


def routed_mlp(x: torch.Tensor, r: Router, blocks: dict[str, torch.Tensor | None], down_bias: torch.Tensor | None, act_name: str, gated: bool,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Route x (N, d) and run its experts: (y (N, out) float32, coef (N, E)). Batches up to
    ``G.MAX_BATCH`` run router and experts in one C++ call; larger ones (prefill) the same router
    in C++ (``route_tokens``) and :func:`long_input_path`'s choice; ``backend='reference'``
    :func:`route_reference` and :func:`reference`."""
    ext = extension("gemv")
    E = blocks["gu"].shape[0]
    x = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    if backend == "reference" or ext is None or x.shape[0] > G.MAX_BATCH or x.shape[0] == 0 or not x.is_cpu:
        if backend == "reference" or ext is None or x.shape[0] == 0 or not (x.is_cpu and r.w1.is_cpu):
            coef = route_reference(x, r, E, act_name, gated)
        else:  # the router in C++ (the decode kernel's, for every token at once), then the long-input path
            opt = lambda t: _EMPTY if t is None else t  # noqa: E731
            coef = ext.route_tokens(x, r.w1, opt(r.b1), opt(r.w2), opt(r.b2), opt(r.norm), ROUTER_KINDS[r.kind], r.probes, r.top_k,
                                    float(r.share), r.shared, r.renorm, E, ACTS[act_name], gated, opt(r.w1_scale))
            if coef is None:
                raise ValueError(f"route_tokens: {G.kernel_error(ext.last_error(), x, r.w1)}")
        run = long_input_path(x, coef, backend, ext)
        return run(x, blocks["gu"], blocks["gu_scale"], blocks["gu_bias"], blocks["down"], blocks["down_scale"], down_bias, coef, act_name, gated), coef
    y, _, coef, _ = ext.expert_route(x, *route_args(r, blocks, down_bias, act_name, gated))
    if y is None:
        raise ValueError(f"expert_route: {G.kernel_error(ext.last_error(), x, blocks['gu'])}")
    return y, coef
