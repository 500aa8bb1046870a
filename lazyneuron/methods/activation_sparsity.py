"""Training-free activation sparsity: SCAP, TEAL and CATS rules on one calibration.

- **SCAP** (Chua, Pan & Jain, 2024, "Post-Training Statistical Calibration for Higher Activation
  Sparsity"): prune the *inputs* of linear layers by a calibrated threshold on ``|x - m|`` where
  ``m`` is a per-channel mode estimate (zero, the median or a density peak, picked per layer by
  the expected output error); ``W @ m`` is folded into the bias, so nothing changes at zero
  sparsity and the centred distribution is more prunable.
- **TEAL** (Liu et al., 2024): threshold on ``|x|``, the ``s`` quantile of the calibrated
  magnitude distribution of each layer's input (uniform allocation across layers).
- **CATS** (Lee et al., 2024): threshold only the activated gate ``|act(gate_proj(x))|`` of a
  gated MLP; the up and down rows of inactive neurons are never read.

Calibration records per-channel input histograms (:class:`ChannelHistogram`), not thresholds:
thresholds are derived at ``apply_`` time for the requested sparsity, so one file serves all.
Inference reads only the weight rows of active input channels (``kernels.sparse_gemv``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import weakref
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters import ModelAdapter, is_linear
from ..calibration import ChannelHistogram
from ..config import MethodConfig, register
from ..errors import ConfigError
from ..kernels import gemv as G
from ..kernels import sparse_gemv as K
from ..surgery import LazyModule, filter_paths
from .base import DEMO_MODEL, Method

RULES = ("scap", "teal", "cats")


@dataclasses.dataclass(frozen=True)
class ActivationSparsityConfig(MethodConfig):
    """``sparsity``: target fraction of input channels skipped per layer; ``rule``: scap | teal |
    cats; ``overrides``: ``(pattern, sparsity)`` pairs on module paths, the last match wins;
    ``decode_only``: keep prefill (sequence length > 1) dense, as TEAL evaluates;
    ``allocation``: ``uniform`` (every layer at its target), ``greedy`` (TEAL's allocation: per
    transformer block, reach the block's target by raising, step by step, the sparsity of the
    input group whose estimated output error grows least per skipped weight; scap / teal) or
    ``auto`` (greedy for scap / teal, uniform for cats);
    ``backend``: ``auto`` (C++ kernel when it built) or ``reference`` (pure torch)."""

    name: ClassVar[str] = "activation_sparsity"
    targets: tuple[str, ...] = ("attn_in", "attn_out", "mlp_in", "mlp_out")
    sparsity: float = 0.5
    rule: str = "scap"
    overrides: tuple[tuple[str, float], ...] = ()
    decode_only: bool = False
    allocation: str = "auto"
    backend: str = "auto"

    def validate(self) -> None:
        super().validate()
        self._check_range("sparsity", 0.0, 1.0, hi_open=True)
        self._check_choice("rule", RULES)
        self._check_choice("backend", ("auto", "reference"))
        self._check_choice("allocation", ("auto", "uniform", "greedy"))
        if self.allocation == "greedy" and self.rule == "cats":
            raise ConfigError("allocation='greedy' distributes sparsity across the linear layers of a block; rule='cats' has one gate per block. Use allocation='uniform' with cats")
        for item in self.overrides:
            if len(item) != 2 or not isinstance(item[0], str) or not 0.0 <= float(item[1]) < 1.0:
                raise ConfigError(f"ActivationSparsityConfig.overrides entry {item!r} is invalid; use (pattern, sparsity) with sparsity in [0, 1), e.g. ('*.layers.0.*', 0.2)")

    def at_zero_strength(self) -> "ActivationSparsityConfig":
        return dataclasses.replace(self, sparsity=0.0, overrides=())

    def sparsity_for(self, path: str) -> float:
        s = self.sparsity
        for pat, v in self.overrides:
            if fnmatch.fnmatchcase(path, pat):
                s = float(v)
        return s


# -- thresholds from histograms ---------------------------------------------------------------
def _frac_within(hist: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, t: float) -> float:
    """Fraction of samples with |x - m_c| <= t; x uniform inside each bin [a, b)."""
    lo, hi = m[:, None] - t, m[:, None] + t  # (C, 1)
    ov = (torch.minimum(b, hi) - torch.maximum(a, lo)).clamp_(min=0) / (b - a)  # (C, NB)
    return float((hist * ov).sum() / hist.sum())


def threshold_for(hist: torch.Tensor, edges: torch.Tensor, centre: torch.Tensor | None, sparsity: float) -> float:
    """Threshold t on |x - centre| that leaves a fraction ``sparsity`` of calibrated values below it."""
    if sparsity <= 0:
        return float("-inf")
    h = hist.double()
    a, b = edges[:-1].double(), edges[1:].double()
    m = torch.zeros(h.shape[0], dtype=torch.float64) if centre is None else centre.double()
    lo, hi = -14.0, 8.0  # log10 bounds of t
    for _ in range(36):
        mid = (lo + hi) / 2
        if _frac_within(h, a, b, m, 10.0**mid) < sparsity:
            lo = mid
        else:
            hi = mid
    return 10.0 ** ((lo + hi) / 2)


def _median(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cum = h.cumsum(1)  # (C, NB)
    half = cum[:, -1:] / 2
    k = torch.searchsorted(cum, half).clamp(max=h.shape[1] - 1)  # (C, 1)
    prev = torch.where(k > 0, cum.gather(1, (k - 1).clamp(min=0)), torch.zeros_like(half))
    cnt = h.gather(1, k).clamp(min=1)
    frac = ((half - prev) / cnt).clamp(0, 1)
    return (a[k] + frac * (b[k] - a[k])).squeeze(1)


def _peak(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, nbins: int = 48) -> torch.Tensor:
    """Per-channel density peak: re-bin onto a uniform grid over the central 90%, smooth, argmax."""
    cum = h.cumsum(1) / h.sum(1, keepdim=True).clamp(min=1)
    k05 = torch.searchsorted(cum, torch.full((h.shape[0], 1), 0.05, dtype=h.dtype)).clamp(max=h.shape[1] - 1)
    k95 = torch.searchsorted(cum, torch.full((h.shape[0], 1), 0.95, dtype=h.dtype)).clamp(max=h.shape[1] - 1)
    lo, hi = a[k05], b[k95]  # (C, 1)
    grid = lo + (hi - lo) * torch.linspace(0, 1, nbins + 1, dtype=h.dtype)  # (C, nbins + 1)
    g0, g1 = grid[:, :-1, None], grid[:, 1:, None]  # (C, nbins, 1)
    ov = (torch.minimum(b, g1) - torch.maximum(a, g0)).clamp(min=0) / (b - a)  # (C, nbins, NB)
    mass = (ov * h[:, None, :]).sum(-1)  # (C, nbins)
    mass = torch.nn.functional.avg_pool1d(mass[:, None], 3, 1, 1, count_include_pad=False)[:, 0]
    j = mass.argmax(1, keepdim=True)
    return ((grid.gather(1, j) + grid.gather(1, j + 1)) / 2).squeeze(1)


def dropped_mean(hist: torch.Tensor, edges: torch.Tensor, m: torch.Tensor, t: float) -> torch.Tensor:
    """Per channel: E[(x - m) ; |x - m| <= t], the mean of what the threshold drops, (C,)."""
    h = hist.double()
    a, b = edges[:-1].double(), edges[1:].double()
    lo, hi = m.double()[:, None] - t, m.double()[:, None] + t
    l2, h2 = torch.maximum(a, lo), torch.minimum(b, hi)
    ov = (h2 - l2).clamp(min=0) / (b - a)
    mid = (l2 + h2) / 2  # centre of the dropped part of each bin
    return ((h * ov * (mid - m.double()[:, None])).sum(1) / h.sum(1).clamp(min=1)).float()


def _dropped_energy(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, t: float) -> torch.Tensor:
    """Per channel: expected sum of (x - m)^2 over the values the threshold drops, (C,)."""
    xc = (a + b) / 2
    lo, hi = m[:, None] - t, m[:, None] + t
    ov = (torch.minimum(b, hi) - torch.maximum(a, lo)).clamp(min=0) / (b - a)
    return (h * ov * (xc - m[:, None]) ** 2).sum(1)


# A centre must cut the expected output error by this factor to replace zero: on SmolLM2 the
# near-zero-mode inputs of q/k/v and gate/up gained ~1% in layer error from centring yet lost
# perplexity end to end, while o_proj / down_proj inputs gain 30-60% (see benchmarks/README.md).
CENTRE_MIN_GAIN = 0.8


def _candidates(hist: torch.Tensor, edges: torch.Tensor) -> dict[str, torch.Tensor]:
    h = hist.double()
    a, b = edges[:-1].double(), edges[1:].double()
    return {"zero": torch.zeros(h.shape[0], dtype=torch.float64), "median": _median(h, a, b), "peak": _peak(h, a, b)}


def scap_centre(hist: torch.Tensor, edges: torch.Tensor, col_norm2: torch.Tensor, sparsity: float,
                cache: dict[str, Any] | None = None) -> tuple[torch.Tensor, str, float]:
    """Pick the centre (zero / median / peak) with the least expected output error at ``sparsity``.

    Output error proxy: sum_c ||W[:, c]||^2 * E[(x_c - m_c)^2 ; dropped]; a non-zero centre must
    beat zero by ``CENTRE_MIN_GAIN``. ``cache`` (per histogram) keeps the candidates and their
    thresholds for modules that share an input. Returns (centre, kind, threshold).
    """
    cache = {} if cache is None else cache
    if "cands" not in cache:
        cache["cands"] = _candidates(hist, edges)
    h = hist.double()
    a, b = edges[:-1].double(), edges[1:].double()
    errs = {}
    for kind, m in cache["cands"].items():
        key = ("t", kind, sparsity)
        if key not in cache:
            cache[key] = threshold_for(hist, edges, m, sparsity)
        if ("e", kind, sparsity) not in cache:
            cache[("e", kind, sparsity)] = _dropped_energy(h, a, b, m, cache[key])
        errs[kind] = float((col_norm2.double() * cache[("e", kind, sparsity)]).sum())
    kind = min(errs, key=errs.__getitem__)
    if kind != "zero" and errs[kind] > CENTRE_MIN_GAIN * errs["zero"]:
        kind = "zero"
    return cache["cands"][kind].float(), kind, cache[("t", kind, sparsity)]


# -- greedy per-block allocation (TEAL) --------------------------------------------------------
GREEDY_STEP = 0.025
GREEDY_MAX = 0.95


def error_curve(hist: torch.Tensor, edges: torch.Tensor, col_norm2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sparsity, relative output error) of thresholding |x| at each bin edge of the histogram.

    Relative error: sum_c ||W[:, c]||^2 E[x_c^2 ; |x_c| <= t] / sum_c ||W[:, c]||^2 E[x_c^2], the
    expected squared output error of dropping the small inputs over the output's energy (inputs
    treated as uncorrelated). Both curves are non-decreasing; index 0 is (0, 0)."""
    h = hist.double()
    half = h.shape[1] // 2
    e = edges.double()
    ah = h[:, half:] + h[:, :half].flip(1)  # (C, half): counts of |x| bins (the bins are symmetric about 0)
    mid2 = ((e[half:-1] + e[half + 1:]) / 2) ** 2  # (half,)
    n = h.sum(1).clamp(min=1)  # (C,)
    frac = ah.sum(0).cumsum(0) / n.sum()
    err = (col_norm2.double()[:, None] * ah * mid2 / n[:, None]).sum(0).cumsum(0)
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, frac]), torch.cat([zero, err / err[-1].clamp(min=1e-30)])


def _interp(x: float, xs: torch.Tensor, ys: torch.Tensor) -> float:
    k = int(torch.searchsorted(xs, torch.tensor([x], dtype=xs.dtype), right=True).clamp(1, len(xs) - 1))
    x0, x1, y0, y1 = float(xs[k - 1]), float(xs[k]), float(ys[k - 1]), float(ys[k])
    return y1 if x1 <= x0 else y0 + (y1 - y0) * min(max((x - x0) / (x1 - x0), 0.0), 1.0)


def greedy_allocation(units: dict[Any, tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]], target: float,
                      step: float = GREEDY_STEP, cap: float = GREEDY_MAX) -> dict[Any, float]:
    """TEAL's greedy allocation inside one block.

    ``units``: key -> (weight elements, error curves of its modules); modules that read one input
    form one unit and share its sparsity. Raises the sparsity of the unit with the least error
    increase per skipped weight element until the weight-averaged sparsity reaches ``target``
    (the last step is cut to land on it exactly)."""
    s = {k: 0.0 for k in units}
    total = sum(w for w, _ in units.values())
    if target <= 0 or total == 0:
        return s

    def err(k: Any, x: float) -> float:
        return sum(_interp(x, fr, er) for fr, er in units[k][1])

    done = 0.0
    while done < target * total - 1e-9:
        best, best_cost = None, float("inf")
        for k, (w, _) in units.items():
            if s[k] + 1e-9 >= cap:
                continue
            nxt = min(s[k] + step, cap)
            cost = (err(k, nxt) - err(k, s[k])) / (w * (nxt - s[k]))
            if cost < best_cost:
                best, best_cost = k, cost
        if best is None:  # every unit at the cap: the target is out of reach
            break
        w = units[best][0]
        inc = min(step, cap - s[best], (target * total - done) / w)
        s[best] += inc
        done += w * inc
    return s


_BLOCK = re.compile(r"^(.*?\.\d+)\.")


# -- modules ---------------------------------------------------------------------------------
def _to_input_major(base: nn.Module) -> torch.Tensor:
    """(in, out) contiguous weight sharing storage with ``base`` (no copy is kept).

    ``nn.Linear`` keeps (out, in): its weight becomes a transposed view of the new (in, out)
    storage; :meth:`SparseLinear.restore_base` makes it contiguous again. GPT-2's Conv1D already
    stores (in, out)."""
    w = base.weight
    if isinstance(base, nn.Linear):
        wt = w.detach().t().contiguous()
        base.weight.data = wt.t()
        return wt
    return w.detach().contiguous()


class SparseLinear(LazyModule):
    """A linear layer that skips input channels below a calibrated threshold."""

    method_name = "activation_sparsity"
    track = False

    def __init__(self, base: nn.Module, threshold: float, centre: torch.Tensor | None, rule: str, sparsity: float, decode_only: bool, backend: str,
                 correction: torch.Tensor | None = None) -> None:
        super().__init__(base)
        self.wt = _to_input_major(base)  # (in, out), shares storage with base.weight
        self.in_features, self.out_features = self.wt.shape
        bias = base.bias.detach().float() if getattr(base, "bias", None) is not None else None
        if centre is not None and bool(centre.abs().max() > 0):
            shift = centre.float() if correction is None else centre.float() + correction.float()
            fold = shift @ self.wt  # (out,): W @ (m + E[dropped]) folded into the bias
            bias = fold if bias is None else bias + fold
        else:
            centre = None
        self.bias_eff, self.centre = bias, None if centre is None else centre.float().contiguous()
        self.threshold = torch.tensor([threshold], dtype=torch.float32)
        self.rule, self.sparsity, self.decode_only, self.backend = rule, sparsity, decode_only, backend
        self.tokens_seen = self.weights_skipped = 0
        self.scale: torch.Tensor | None = None  # per-output scale of int8 rows
        self.weight_dtype = "fp32"

    def set_weight_dtype(self, dtype: str) -> None:
        """Store the rows in ``dtype`` (fp32, bf16 or int8 with per-output scales): the runtime's
        weight format. ``base`` keeps its fp32 weight; revert restores it bit for bit."""
        if dtype == self.weight_dtype:
            return
        fp32 = self.base.weight.detach().float()
        fp32 = fp32 if isinstance(self.base, nn.Linear) else fp32.t()  # (out, in)
        self.wt, self.scale = G.prepare_weight(fp32, dtype)
        self.weight_dtype = dtype
        self._ln_fused = None  # a new buffer: no longer a view of any side-by-side group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_only and x.dim() >= 2 and x.shape[-2] > 1:  # prefill stays dense
            return self.base(x)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (tokens, in)
        rows = None
        if self.backend == "auto" and x2.shape[0] <= K.MAX_BATCH:
            y, rows = K.sparse_gemv(x2, self.wt, self.bias_eff, self.centre, self.threshold, self.scale)
        elif self.backend == "auto":  # a long input: sparsified in one pass, then a dense GEMM
            y = K.masked_matmul(x2, self.wt, self.bias_eff, self.centre, self.threshold, self.scale)
        else:
            y = K.reference(x2, self.wt, self.bias_eff, self.centre, self.threshold, self.scale)
        if self.track:
            d = x2.float() - (self.centre if self.centre is not None else 0.0)
            self.tokens_seen += x2.shape[0]
            if not (x2.shape[0] == 1 and rows == self.in_features and G.available() and x2.is_cpu and self.wt.is_cpu):
                self.weights_skipped += int((d.abs() <= self.threshold).sum()) * self.out_features
            # else: the kernel read every row (too few skipped to pay, gemv.set_dense_below): none saved
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def restore_base(self) -> nn.Module:
        if isinstance(self.base, nn.Linear):
            self.base.weight.data = self.base.weight.data.contiguous()
        return self.base

    def extra_repr(self) -> str:
        return (f"method={self.method_name}, rule={self.rule}, dtype={self.weight_dtype}, sparsity={self.sparsity}, threshold={self.threshold.item():.4g}, "
                f"centred={self.centre is not None}, in={self.in_features}, out={self.out_features}")


class CatsMLP(LazyModule):
    """Gated MLP with the CATS rule: neurons whose |act(gate)| is below the threshold are skipped."""

    method_name = "activation_sparsity"
    track = False

    def __init__(self, base: nn.Module, threshold: float, sparsity: float, decode_only: bool, backend: str) -> None:
        super().__init__(base)
        self.up_w = base.up_proj.weight.detach()  # (F, d): rows of neurons, already contiguous
        self.down_wt = _to_input_major(base.down_proj)  # (F, d_out)
        self.gate_wt = _to_input_major(base.gate_proj)  # (d, F): the dense gate on the GEMV kernel
        gb = getattr(base.gate_proj, "bias", None)
        self.gate_bias = gb.detach().float().contiguous() if gb is not None else None
        self.threshold, self.sparsity, self.decode_only, self.backend = float(threshold), sparsity, decode_only, backend
        self.rule = "cats"
        self.tokens_seen = self.weights_skipped = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_only and x.dim() >= 2 and x.shape[-2] > 1:
            return self.base(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (tokens, d)
        short = self.backend == "auto" and x2.shape[0] <= K.MAX_BATCH
        on_gemm = (self.backend == "auto" and not short and x2.is_cpu and x2.dtype == torch.float32  # long inputs: gate and down on
                   and self.gate_wt.dtype == self.up_w.dtype == self.down_wt.dtype == torch.float32)  # the runtime's GEMM (fp32 models)
        if short:  # (tokens, F): the gate stays dense
            g = self.base.act_fn(G.gemv(x2, self.gate_wt, None, self.gate_bias)[0])
        elif on_gemm:
            g = self.base.act_fn(G.gemm(x2, self.gate_wt, None, self.gate_bias))
        else:
            g = self.base.act_fn(self.base.gate_proj(x2))
        if self.track:
            self.tokens_seen += x2.shape[0]
            self.weights_skipped += int((g.abs() <= self.threshold).sum()) * (self.up_w.shape[1] + self.down_wt.shape[1])
        if short:
            y, _ = K.cats_mlp(x2, g, self.up_w, self.down_wt, self.threshold)
        elif on_gemm:  # a long input's tokens together need nearly every neuron: the dense products, masked
            h = torch.where(g.abs() > self.threshold, g * (x2 @ self.up_w.t()), torch.zeros((), dtype=g.dtype))
            y = G.gemm(h, self.down_wt)
        else:
            y = K.cats_reference(x2, g, self.up_w, self.down_wt, self.threshold)
        return y.to(x.dtype).view(*shape[:-1], -1)

    def weight_elements(self) -> int:
        return self.up_w.numel() + self.down_wt.numel()

    def restore_base(self) -> nn.Module:
        self.base.down_proj.weight.data = self.base.down_proj.weight.data.contiguous()
        self.base.gate_proj.weight.data = self.base.gate_proj.weight.data.contiguous()
        return self.base

    def extra_repr(self) -> str:
        return f"method={self.method_name}, rule=cats, sparsity={self.sparsity}, threshold={self.threshold:.4g}"


# Derived per histogram tensor (centre candidates, thresholds per sparsity), so that modules
# sharing an input and repeated apply_ / revert_ cycles (interleaved timing) derive them once.
_DERIVED: dict[int, dict[Any, Any]] = {}


def _cache_for(hist: torch.Tensor) -> dict[Any, Any]:
    key = id(hist)
    if key not in _DERIVED:
        _DERIVED[key] = {}
        weakref.finalize(hist, _DERIVED.pop, key, None)  # dropped with the calibration tensor
    return _DERIVED[key]


class _GateObserver:
    """Histogram of |act(gate_proj(x))| for the CATS rule (the observer sees the MLP input)."""

    def __init__(self, mlp: nn.Module) -> None:
        self.mlp = mlp
        self.hist = ChannelHistogram(mlp.gate_proj.out_features)

    def update(self, x: torch.Tensor) -> None:
        self.hist.update(self.mlp.act_fn(self.mlp.gate_proj(x)))

    def state(self) -> dict[str, torch.Tensor]:
        return self.hist.state()


@register
class ActivationSparsity(Method):
    config_cls = ActivationSparsityConfig
    needs_calibration = True


    def resolve(self, model: nn.Module, adapter: ModelAdapter, cfg: MethodConfig) -> list[str]:
        assert isinstance(cfg, ActivationSparsityConfig)
        if cfg.rule == "cats":
            paths = filter_paths(adapter.paths("mlp"), cfg.include, cfg.exclude)
            if not paths and not adapter.paths("mlp"):
                raise ConfigError(f"rule='cats' needs gated MLPs (gate_proj, up_proj, down_proj); this {adapter.model_type} model has none. Use rule='scap' or 'teal'")
            for p in paths:
                m = model.get_submodule(p)
                if not all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                    raise ConfigError(f"rule='cats' needs a gated MLP (gate_proj, up_proj, down_proj, act_fn); {p!r} is a {type(m).__name__}. Use rule='scap' or 'teal'")
            return paths
        paths = super().resolve(model, adapter, cfg)
        bad = [p for p in paths if not is_linear(model.get_submodule(p))]
        if bad and type(model.get_submodule(bad[0])).__name__ == "FastLinear":
            raise ConfigError(f"{bad[0]!r} is already on the runtime; apply the runtime last: apply_(model, [ActivationSparsityConfig(...), RuntimeConfig(...)]) (revert_ first)")
        if bad:
            raise ConfigError(f"activation_sparsity wraps linear layers, but {bad[0]!r} is a {type(model.get_submodule(bad[0])).__name__}; target attn_in / attn_out / mlp_in / mlp_out")
        return paths

    def group_key(self, path: str, adapter: ModelAdapter) -> str:
        parent, _, leaf = path.rpartition(".")
        # q/k/v (and gate/up) read one tensor: one histogram serves them all
        shared = {"q_proj", "k_proj", "v_proj", "query", "key", "value", "gate_proj", "up_proj"}
        return f"{parent}.<input>" if leaf in shared else path

    def observer(self, path: str, module: nn.Module, cfg: MethodConfig) -> Any:
        assert isinstance(cfg, ActivationSparsityConfig)
        if cfg.rule == "cats":
            return _GateObserver(module)
        in_f = module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]
        return ChannelHistogram(in_f)

    def plan(self, model: nn.Module, cfg: MethodConfig, paths: list[str], stats: dict[str, dict[str, torch.Tensor]] | None) -> MethodConfig:
        assert isinstance(cfg, ActivationSparsityConfig)
        if cfg.allocation == "uniform" or cfg.rule == "cats" or stats is None:
            return cfg
        blocks: dict[str, list[str]] = {}
        for p in paths:
            m = _BLOCK.match(p)
            blocks.setdefault(m.group(1) if m else "", []).append(p)
        alloc: list[tuple[str, float]] = []
        for members in blocks.values():
            units: dict[int, tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = {}
            unit_of: dict[str, int] = {}
            tgt = wsum = 0.0
            for p in members:
                mod = model.get_submodule(p)
                w = mod.weight.detach().float()
                cn2 = (w**2).sum(0) if isinstance(mod, nn.Linear) else (w**2).sum(1)
                st = stats[p]
                if st["hist"].shape[0] != cn2.shape[0]:
                    raise ConfigError(f"calibration for {p!r} has {st['hist'].shape[0]} channels, the module reads {cn2.shape[0]}; recalibrate for this model")
                key = id(st["hist"])  # modules reading one input share its histogram, and its sparsity
                n, curves = units.get(key, (0, []))
                units[key] = (n + w.numel(), curves + [error_curve(st["hist"], st["edges"], cn2)])
                unit_of[p] = key
                tgt += cfg.sparsity_for(p) * w.numel()
                wsum += w.numel()
            s = greedy_allocation(units, tgt / wsum if wsum else 0.0)
            alloc += [(p, round(s[unit_of[p]], 6)) for p in members]
        return dataclasses.replace(cfg, overrides=cfg.overrides + tuple(alloc))

    def convert(self, path: str, module: nn.Module, cfg: MethodConfig, stats: dict[str, torch.Tensor] | None) -> nn.Module:
        assert isinstance(cfg, ActivationSparsityConfig) and stats is not None
        s = cfg.sparsity_for(path)
        hist, edges = stats["hist"], stats["edges"]
        if cfg.rule == "cats":
            if hist.shape[0] != module.gate_proj.out_features:
                raise ConfigError(f"calibration for {path!r} has {hist.shape[0]} channels, the module has {module.gate_proj.out_features}; recalibrate")
            cache = _cache_for(hist)
            if ("t", "zero", s) not in cache:
                cache[("t", "zero", s)] = threshold_for(hist, edges, None, s)
            return CatsMLP(module, cache[("t", "zero", s)], s, cfg.decode_only, cfg.backend)
        w = module.weight.detach()
        col_norm2 = (w.float() ** 2).sum(0) if isinstance(module, nn.Linear) else (w.float() ** 2).sum(1)  # (in,)
        if hist.shape[0] != col_norm2.shape[0]:
            raise ConfigError(f"calibration for {path!r} has {hist.shape[0]} channels, the module reads {col_norm2.shape[0]}; recalibrate for this model")
        correction = None
        if cfg.rule == "scap" and s > 0:
            centre, kind, t = scap_centre(hist, edges, col_norm2, s, _cache_for(hist))
            if kind != "zero":  # pruning around a mode drops a skewed mass: fold its mean into the bias too
                correction = dropped_mean(hist, edges, centre, t)
        else:
            cache = _cache_for(hist)
            if ("t", "zero", s) not in cache:
                cache[("t", "zero", s)] = threshold_for(hist, edges, None, s)
            centre, t = None, cache[("t", "zero", s)]
        return SparseLinear(module, t, centre, cfg.rule, s, cfg.decode_only, cfg.backend, correction)

    def summarize(self, model: nn.Module, cfg: MethodConfig, paths: list[str]) -> dict[str, Any]:
        from ..bench.accounting import linear_weight_elements

        total = linear_weight_elements(model)
        expect = 0.0
        for p in paths:
            m = model.get_submodule(p)
            expect += m.sparsity * m.weight_elements()
        return {"modules": len(paths), "expected_weights_skipped": expect / total if total else 0.0}

    @classmethod
    def plan_axes(cls, model: nn.Module, model_name: str | None = None) -> list[list[MethodConfig]]:
        """TEAL (the best quality per byte skipped in benchmarks/results/activation_sparsity.jsonl)
        over every projection, over attention alone and over the MLP alone (those two compose)."""
        groups = (ActivationSparsityConfig.targets, ("attn_in", "attn_out"), ("mlp_in", "mlp_out"))
        return [[ActivationSparsityConfig(rule="teal", sparsity=s, targets=t) for s in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)] for t in groups]

    @classmethod
    def demo_configs(cls, model_name: str = DEMO_MODEL) -> list[MethodConfig]:
        # 25%: the level that costs SmolLM2 under 10% perplexity (benchmarks/results/activation_sparsity.jsonl), beside 50%
        return [ActivationSparsityConfig(rule="teal", sparsity=0.25), ActivationSparsityConfig(rule="teal", sparsity=0.5),
                ActivationSparsityConfig(rule="cats", sparsity=0.5)]
