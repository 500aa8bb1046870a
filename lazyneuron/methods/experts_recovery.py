"""Low-rank recovery of a model whose dense FFNs were split into experts (MoEfication's fine-tune).

Splitting an FFN and running only the routed experts drops the skipped neurons' contribution.
:func:`recover` trains a rank-``rank`` update ``W + (alpha / rank) * B @ A`` of each split FFN's
gate, up and down weights by distillation: the student is the routed model (each token runs the
neurons of the experts its router picks, computed as a masked dense product so that gradients
flow), the teacher the same model with every FFN dense and no update (no second copy of the model
is kept). Only the adapters train, through the project's loop (:func:`lazyneuron.train.fit`:
progress bar, safetensors checkpoints, ``torchrun``). When training ends each FFN's expert blocks
are rebuilt from the updated weights, in the format they were stored in (the runtime's bf16 / int8
included), so inference costs exactly what it did before: the update lives in the blocks the
experts kernel reads, and the model's own weights are never changed (``revert_`` is exact).

:func:`save_recovery` writes the adapters (safetensors); ``expert_routing:...,recovery=PATH``
loads them at apply time. They fit the split they were trained on (same experts, shared, router,
probes and model); another top-k or share may use them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..kernels import experts as X

FORMAT = "lazyneuron-expert-recovery-1"
PARTS = ("gate", "up", "down")


class FFNAdapters(nn.Module):
    """Rank-``rank`` updates of one FFN's gate (if gated), up and down weights: ``delta = scale * B @ A``."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, alpha: float = 16.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.rank, self.scale = rank, alpha / rank
        self.names = tuple(shapes)
        for n, (out, inp) in shapes.items():
            self.register_parameter(f"{n}_a", nn.Parameter(torch.randn(rank, inp, generator=g) / inp ** 0.5))
            self.register_parameter(f"{n}_b", nn.Parameter(torch.zeros(out, rank)))

    def delta(self, name: str) -> torch.Tensor:
        return self.scale * (getattr(self, f"{name}_b") @ getattr(self, f"{name}_a"))


def _experts(model: nn.Module) -> list[tuple[str, Any]]:
    from .experts import ExpertMLP

    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertMLP)]


def install(mod: Any, rank: int, alpha: float = 16.0, seed: int = 0) -> FFNAdapters:
    """Give an :class:`~lazyneuron.methods.experts.ExpertMLP` zero-initialised adapters (the model
    is unchanged until they train)."""
    from .experts import ffn_parts

    p = ffn_parts(mod.base)
    shapes = {n: tuple(p[n].shape) for n in PARTS if p[n] is not None}
    mod.recovery = FFNAdapters(shapes, rank, alpha, seed)
    return mod.recovery


def rebuild(mod: Any) -> None:
    """Re-derive the expert blocks from the (updated) weights, in the format they are stored in."""
    dtype = mod.weight_dtype
    mod.weight_dtype = ""
    with torch.no_grad():
        mod.set_weight_dtype(dtype)


def _lm_batches(batches: Sequence[Any]) -> list[torch.Tensor]:
    out = []
    for b in batches:
        ids = b["input_ids"] if isinstance(b, dict) else b
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
            raise ConfigError(f"recover() takes token id windows of shape (batch, length >= 2); got {type(ids).__name__} "
                              f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else ''}: use lazyneuron.data.windows(...)")
        out.append(ids)
    return out


def recover(model: nn.Module, batches: Sequence[Any], *, rank: int = 8, alpha: float = 16.0, epochs: int = 1, lr: float = 1e-3,
            checkpoint: str | os.PathLike | None = None, progress: bool = True, deadline: float | None = None, seed: int = 0) -> Any:
    """Train low-rank updates of every split FFN of ``model`` (an ``expert_routing`` model) to
    match the dense model's next-token distribution on ``batches`` (token id windows (B, T)); then
    rebuild the expert blocks from the updated weights. Returns :class:`lazyneuron.train.FitResult`."""
    from ..train import fit

    mods = _experts(model)
    if not mods:
        raise ConfigError("recover() found no split FFN: apply expert_routing (on a dense model, not a native MoE) first")
    if rank < 1:
        raise ConfigError(f"recover(rank={rank}): use a rank of at least 1 (e.g. 8)")
    data = _lm_batches(batches)
    if not data:
        raise ConfigError("recover() got no batches; pass token windows, e.g. lazyneuron.data.windows(tok, 'news', 'calibration', 256, 32)")
    params: list[nn.Parameter] = []
    for _, m in mods:  # existing updates (an earlier recover(), or loaded) train on
        ad = m.recovery if isinstance(getattr(m, "recovery", None), FFNAdapters) else install(m, rank, alpha, seed)
        for p in ad.parameters():
            p.requires_grad_(True)
        params += list(ad.parameters())
    frozen = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)

    def set_mode(mode: str) -> None:
        for _, m in mods:
            m.mode = mode

    def loss_fn(mdl: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        mdl.eval()  # no dropout: teacher and student see the same network (only the adapters train)
        with torch.no_grad():
            set_mode("teacher")
            t = mdl(input_ids=ids).logits.float()
        set_mode("recovery")
        s = mdl(input_ids=ids).logits.float()
        return F.kl_div(F.log_softmax(s, -1).flatten(0, 1), F.log_softmax(t, -1).flatten(0, 1), log_target=True, reduction="batchmean")

    try:
        res = fit(model, loss_fn, data, epochs=epochs, lr=lr, weight_decay=0.0, params=params, checkpoint=checkpoint, progress=progress,
                  desc=f"expert recovery (rank {rank})", seed=seed, deadline=deadline)
    finally:  # even when training stops with an error, the blocks hold what the adapters hold
        set_mode("routed")
        for p in frozen:
            p.requires_grad_(True)
        for _, m in mods:
            for p in m.recovery.parameters():
                p.requires_grad_(False)
            rebuild(m)
    return res


def save_recovery(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every split FFN's adapters to ``path`` (safetensors), with the split's settings."""
    from safetensors.torch import save_file

    mods = [(n, m) for n, m in _experts(model) if isinstance(getattr(m, "recovery", None), FFNAdapters)]
    if not mods:
        raise ConfigError("save_recovery(): no split FFN has recovery adapters; run recover(model, batches) first")
    m0 = mods[0][1]
    flat = {f"{n}::{k}": v.detach().contiguous() for n, m in mods for k, v in m.recovery.named_parameters()}
    meta = {"format": FORMAT, "config": json.dumps(split_key(m0)), "rank": str(m0.recovery.rank), "scale": repr(m0.recovery.scale),
            "paths": json.dumps([n for n, _ in mods])}
    path = os.fspath(path)
    tmp = path + ".tmp"
    save_file(flat, tmp, metadata=meta)
    os.replace(tmp, path)


def split_key(m: Any) -> dict[str, Any]:
    return {"experts": m.E, "shared": m.shared, "router": m.router, "probes": m.probes, "F": m.F, "d": m.d}


def load_recovery(path: str) -> tuple[dict[str, str], dict[str, dict[str, torch.Tensor]]]:
    """(metadata, {ffn path: {parameter name: tensor}}) of a recovery file; a clear error when the
    file is missing, corrupt or of another kind."""
    from ..checkpoints import read

    header, tensors = read(path, FORMAT, "expert recovery file", "train one with lazyneuron.methods.experts_recovery.recover and save_recovery", ConfigError)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        p, _, n = k.rpartition("::")
        out.setdefault(p, {})[n] = t
    return header, out


def apply_recovery(path: str, header: dict[str, str], tensors: dict[str, torch.Tensor], mod: Any, where: str) -> None:
    """Install the adapters saved for the FFN at ``where`` into ``mod`` and rebuild its blocks."""
    want = split_key(mod)
    got = json.loads(header.get("config", "{}"))
    if got != want:
        raise ConfigError(f"expert recovery file {path!r} was trained on experts {got}, this FFN ({where!r}) is split as {want}; "
                          "use the experts / shared / router / probes it was trained with, or train another")
    try:
        rank, scale = int(header.get("rank", "0")), float(header.get("scale", "nan"))
    except ValueError:
        rank, scale = 0, float("nan")
    if rank < 1 or not scale == scale:
        raise ConfigError(f"expert recovery file {path!r} has a bad rank / scale in its metadata ({header.get('rank')!r}, {header.get('scale')!r}); "
                          "save it again with save_recovery")
    ad = install(mod, rank)
    ad.scale = scale
    names = dict(ad.named_parameters())
    if set(tensors) != set(names):
        raise ConfigError(f"expert recovery file {path!r} holds {sorted(tensors)} for {where!r}, expected {sorted(names)}")
    with torch.no_grad():
        for n, p in names.items():
            if tensors[n].shape != p.shape:
                raise ConfigError(f"expert recovery file {path!r}: {where}::{n} has shape {tuple(tensors[n].shape)}, this model needs {tuple(p.shape)}")
            p.copy_(tensors[n])
            p.requires_grad_(False)
    rebuild(mod)


def dense_forward(mod: Any, x: torch.Tensor, coef: torch.Tensor | None, with_update: bool) -> torch.Tensor:
    """The FFN as one masked dense product (differentiable): every neuron of the experts in
    ``coef`` (N, E) weighted by its expert's coefficient (None: every neuron), weights updated by
    the adapters when ``with_update``. x: (N, d) -> (N, out) float32."""
    from .experts import ffn_parts

    p = mod._train_parts if getattr(mod, "_train_parts", None) is not None else ffn_parts(mod.base)
    ad = mod.recovery if with_update else None

    def w(n: str) -> torch.Tensor:
        return p[n] + ad.delta(n) if ad is not None else p[n]

    x = x.float()
    a = x @ w("up").t()
    if p["up_bias"] is not None:
        a = a + p["up_bias"]
    if p["gate"] is not None:
        g = x @ w("gate").t()
        if p["gate_bias"] is not None:
            g = g + p["gate_bias"]
        h = X.act(p["act"], g) * a
    else:
        h = X.act(p["act"], a)
    if coef is not None:
        h = h * coef[:, mod._expert_of]
    y = h @ w("down").t()
    return y + p["down_bias"] if p["down_bias"] is not None else y
