"""Training loop shared by the methods that learn something (FFF trees, classifier heads, gates).

:func:`fit` runs AdamW with linear warm-up and decay over a list of batches, with a progress bar,
safetensors checkpoints that resume (parameters, AdamW moments and the step counter; no pickle),
and DistributedDataParallel when launched with ``torchrun --nproc_per_node N`` (gloo on CPU,
NCCL on GPU): each rank takes every N-th batch of one shared shuffled order, gradients are
averaged, rank 0 writes checkpoints.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import os
import random
import sys
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "lazyneuron.train/1"


def world() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun, and tears it
    down at exit (see :func:`shutdown`)."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n > 1 and not dist.is_initialized():
        nccl = torch.cuda.is_available()
        if nccl:  # one GPU per rank: the tensors NCCL moves (see _past) live on this rank's
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if nccl else "gloo")
        atexit.register(_shutdown_at_exit)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shutdown() -> None:
    """End the process group cleanly: wait until every rank is here, then destroy it.

    A rank that leaves while another still holds open connections (rank 0 writing the checkpoint,
    say) can abort in the communication library's teardown; waiting for all of them first closes
    that window. :func:`world` registers this to run at exit; safe to call more than once. The
    wait is bounded by the process group's timeout."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()


def _shutdown_at_exit() -> None:
    if getattr(sys, "last_value", None) is not None:
        # leaving on an uncaught exception: the peers may be inside a gradient all-reduce, which a
        # barrier from this rank would be paired with; leave as before and let the launcher stop them
        return
    try:
        shutdown()
    except Exception as e:  # a peer is gone: nothing left to end cleanly
        log.warning("process group teardown at exit: %s", e)


def is_main() -> bool:
    return world()[0] == 0


@dataclasses.dataclass
class FitResult:
    steps: int
    last_loss: float
    mean_loss: float
    resumed_from: int = 0
    stopped_early: bool = False


def _named_trainable(model: nn.Module, params: Sequence[nn.Parameter] | None) -> list[tuple[str, nn.Parameter]]:
    keep = None if params is None else {id(p) for p in params}
    out, seen = [], set()
    for n, p in model.named_parameters():
        if p.requires_grad and (keep is None or id(p) in keep) and id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    return out


def save_checkpoint(path: str | os.PathLike, named: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer, step: int, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    flat = {f"param::{n}": p.detach().contiguous() for n, p in named}
    for n, p in named:
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                flat[f"adam::{n}::{k}"] = st[k].contiguous()
    tmp = os.fspath(path) + ".tmp"
    save_file(flat, tmp, metadata={"format": CHECKPOINT_FORMAT, "step": str(step), "meta": json.dumps(meta)})
    os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint


def load_checkpoint(path: str | os.PathLike, named: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer | None) -> int:
    """Load parameters (and AdamW moments) in place; returns the step to resume from."""
    from .checkpoints import read

    header, tensors = read(path, CHECKPOINT_FORMAT, "training checkpoint", "delete it to start over")
    names = {n for n, _ in named}
    saved = {k.split("::", 1)[1] for k in tensors if k.startswith("param::")}
    if saved != names:
        diff = sorted(saved ^ names)[:3]
        raise ConfigError(f"training checkpoint {os.fspath(path)!r} holds other parameters than this model trains (e.g. {diff}); it belongs to another run: delete it or pass another path")
    with torch.no_grad():
        for n, p in named:
            t = tensors[f"param::{n}"]
            if t.shape != p.shape:
                raise ConfigError(f"training checkpoint {os.fspath(path)!r}: {n} is {tuple(t.shape)}, the model's is {tuple(p.shape)}")
            p.copy_(t)
    step = int(header.get("step", "0"))
    if opt is not None:
        for n, p in named:
            if f"adam::{n}::exp_avg" in tensors:
                opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": tensors[f"adam::{n}::exp_avg"].clone(),
                                "exp_avg_sq": tensors[f"adam::{n}::exp_avg_sq"].clone()}
    return step


def fit(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Sequence[Any],
    *,
    epochs: int = 1,
    lr: float = 5e-5,
    weight_decay: float = 0.01,
    warmup: float = 0.06,
    params: Sequence[nn.Parameter] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    save_every: int = 200,
    progress: bool = True,
    desc: str = "training",
    seed: int = 0,
    clip: float = 1.0,
    lr_scale: dict[int, float] | None = None,
    deadline: float | None = None,
) -> FitResult:
    """Train ``params`` (default: every parameter with ``requires_grad``) to minimise
    ``loss_fn(model, batch)`` over ``epochs`` passes of ``batches``.

    ``on_step(step, total)`` runs before each step (schedules such as temperature annealing).
    ``checkpoint``: resume from it when it exists, write it every ``save_every`` steps and at the end.
    ``lr_scale``: ``{id(param): factor}``, a learning rate of ``factor * lr`` for those parameters.
    ``deadline`` (a ``time.monotonic()`` value): stop after the step that passes it, keeping the
    parameters trained so far (and the checkpoint, written then); ``FitResult.stopped_early`` says so.
    """
    if not batches:
        raise ConfigError("fit() got no batches; pass a non-empty list (check the dataset split and batch size)")
    rank, n_ranks = world()
    named = _named_trainable(model, params)
    if not named:
        raise ConfigError("nothing to train: no parameter has requires_grad=True (or none of `params` is in the model)")
    scale = lr_scale or {}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for n, p in named:
        groups.setdefault((p.dim() >= 2, float(scale.get(id(p), 1.0))), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": weight_decay if dec else 0.0, "lr_scale": f} for (dec, f), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))], lr=lr)
    per_epoch = len(batches) // n_ranks
    if per_epoch == 0:
        raise ConfigError(f"{len(batches)} batches cannot be shared by {n_ranks} processes; use more data or fewer processes")
    total = per_epoch * epochs
    warm = max(1, int(warmup * total))

    def lr_at(step: int) -> float:
        return lr * (step + 1) / warm if step < warm else lr * max(0.0, (total - step) / max(1, total - warm))

    start = 0
    if checkpoint is not None and os.path.exists(checkpoint):
        start = load_checkpoint(checkpoint, named, opt)
        log.info("resuming %s from step %d of %d (%s)", desc, start, total, checkpoint)
    wrapped: nn.Module = model
    if n_ranks > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, find_unused_parameters=True)
    was_training = model.training
    model.train()
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc=desc, unit="step")
    losses: list[float] = []
    step = 0
    stopped = False
    try:
        for epoch in range(epochs):
            if stopped:
                break
            order = list(range(len(batches)))
            random.Random(seed + epoch).shuffle(order)
            mine = order[rank::n_ranks][:per_epoch]
            for i in mine:
                if step < start:
                    step += 1
                    continue
                if on_step is not None:
                    on_step(step, total)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step) * g["lr_scale"]
                loss = loss_fn(wrapped, batches[i])
                if not torch.isfinite(loss):
                    raise ConfigError(f"{desc}: the loss became {float(loss.detach())} at step {step}; lower lr (now {lr}) or check the data")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_([p for _, p in named], clip)
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
                if checkpoint is not None and rank == 0 and step % save_every == 0:
                    save_checkpoint(checkpoint, named, opt, step, {"desc": desc, "total": total})
                if deadline is not None and _past(deadline, n_ranks):
                    stopped = True
                    log.info("%s: time budget reached at step %d of %d; keeping what is trained so far", desc, step, total)
                    break
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if checkpoint is not None and rank == 0:
        save_checkpoint(checkpoint, named, opt, step, {"desc": desc, "total": total})
    return FitResult(step, losses[-1] if losses else math.nan, sum(losses) / len(losses) if losses else math.nan, start, stopped)


def _past(deadline: float, n_ranks: int) -> bool:
    """Whether ``deadline`` has passed; with several processes, rank 0's clock decides for all of
    them (every rank must stop at the same step, or the next gradient all-reduce would hang)."""
    import time

    late = time.monotonic() >= deadline
    if n_ranks > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")  # NCCL moves GPU tensors only
        flag = torch.tensor([float(late)], device=device)
        dist.broadcast(flag, 0)
        late = bool(flag.item())
    return late
