"""Public flow: ``inspect`` -> ``calibrate`` -> ``apply_`` -> (bench) -> ``revert_``."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from .adapters import ROLE_ORDER, get_adapter, is_linear, linear_dims
from .calibration import Calibration, new_meta
from .config import MethodConfig, method_for
from .errors import CalibrationError, ConfigError, NoMatchError
from .surgery import LazyModule, get_module, replace_modules, revert_ as _revert_all, set_module

log = logging.getLogger(__name__)

MIN_CALIBRATION_TOKENS = 64


def inspect(model: nn.Module) -> dict[str, Any]:
    """Dry run: the adapter's family and, per role, the module paths it matches (with shapes)."""
    ad = get_adapter(model)
    roles: dict[str, list[dict[str, Any]]] = {}
    for role in ROLE_ORDER:
        entries = []
        for p in ad.paths(role):
            m = get_module(model, p)
            e: dict[str, Any] = {"path": p, "type": type(m).__name__}
            if is_linear(m):
                e["in"], e["out"] = linear_dims(m)
            entries.append(e)
        if entries:
            roles[role] = entries
    return {"family": ad.family, "model_type": ad.model_type, "layers_path": ad.layers_path, "num_layers": ad.num_layers,
            "discovered": ad.discovered, "roles": roles}


def _as_list(configs: MethodConfig | Sequence[MethodConfig]) -> list[MethodConfig]:
    cfgs = [configs] if isinstance(configs, MethodConfig) else list(configs)
    if not cfgs:
        raise ConfigError("no method config given; pass one config or a list, e.g. ActivationSparsityConfig(sparsity=0.5)")
    for c in cfgs:
        if not isinstance(c, MethodConfig):
            raise ConfigError(f"expected a MethodConfig, got {type(c).__name__}; build one with MethodConfig.parse('method:key=value')")
    return cfgs


def _batches(data: Iterable[Any], tokenizer: Any, max_length: int) -> Iterator[torch.Tensor]:
    for item in data:
        if isinstance(item, str):
            if tokenizer is None:
                raise CalibrationError("calibration data are strings but no tokenizer was given; pass tokenizer=... or token-id tensors")
            ids = tokenizer(item, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
        elif isinstance(item, torch.Tensor):
            ids = item if item.dim() == 2 else item.unsqueeze(0)
        else:
            raise CalibrationError(f"calibration items must be strings or token-id tensors, got {type(item).__name__}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise CalibrationError(f"token ids must be int32/int64, got {ids.dtype}; pass the tokenizer's input_ids")
        yield ids


@torch.inference_mode()
def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    configs: MethodConfig | Sequence[MethodConfig],
    tokenizer: Any = None,
    *,
    max_length: int = 512,
    min_tokens: int = MIN_CALIBRATION_TOKENS,
    progress: bool = False,
) -> Calibration:
    """Run ``data`` (strings or token-id tensors) through ``model`` and record what each method observes.

    Hooks are removed on exit, even on error. Raises :class:`CalibrationError` on empty or too
    short data and on non-finite activations.
    """
    cfgs = _as_list(configs)
    ad = get_adapter(model)
    observers: dict[tuple[str, str], Any] = {}  # (method, group) -> observer
    hook_paths: dict[tuple[str, str], str] = {}  # (method, group) -> the module whose input it reads
    groups: dict[str, dict[str, str]] = {c.name: {} for c in cfgs}  # method -> path -> group
    for cfg in cfgs:
        meth = method_for(cfg)
        for p in meth.resolve(model, ad, cfg):
            key = meth.group_key(p, ad)  # modules that read the same input share one observer
            if (cfg.name, key) not in observers:
                ob = meth.observer(p, get_module(model, p), cfg)
                if ob is None:
                    continue
                observers[(cfg.name, key)] = ob
                hook_paths[(cfg.name, key)] = p
            groups[cfg.name][p] = key
    items = list(data)
    if not items:
        raise CalibrationError("the calibration set is empty; pass a list of texts or token-id tensors (e.g. lazyneuron.data.calibration_texts('news'))")
    handles = []
    for k, ob in observers.items():
        handles.append(get_module(model, hook_paths[k]).register_forward_pre_hook(lambda mod, args, ob=ob: ob.update(args[0])))
    tokens = seqs = 0
    was_training = model.training
    model.eval()
    try:
        it: Iterable[Any] = items
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(items, desc="calibrating", unit="seq")
        for ids in _batches(it, tokenizer, max_length):
            model(input_ids=ids)
            tokens += ids.numel()
            seqs += ids.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens < min_tokens:
        raise CalibrationError(f"the calibration set holds {tokens} tokens, fewer than the {min_tokens} needed for stable statistics; pass more text (a few thousand tokens is typical)")
    stats: dict[str, dict[str, dict[str, torch.Tensor]]] = {c.name: {} for c in cfgs}
    for (name, key), ob in observers.items():
        stats[name][key] = ob.state()
    meta = new_meta(model, cfgs, tokens, seqs)
    meta["groups"] = groups
    return Calibration(stats, meta)


@dataclasses.dataclass
class ApplyReport:
    method: str
    config: dict[str, Any]
    paths: list[str]
    summary: dict[str, Any]


def apply_(
    model: nn.Module,
    configs: MethodConfig | Sequence[MethodConfig],
    calibration: Calibration | None = None,
) -> list[ApplyReport]:
    """Convert ``model`` in place, one config after another. All or nothing: on any error the
    modules replaced by this call are put back and the error is re-raised."""
    cfgs = ordered(configs)
    ad = get_adapter(model)
    plans = []
    for cfg, meth, paths in _resolved(model, ad, cfgs):  # validate everything before touching the model
        stats = None
        if meth.wants_calibration(model, paths):
            if calibration is None:
                raise CalibrationError(f"{cfg.name} needs a calibration; run lazyneuron.calibrate(model, texts, config) first and pass calibration=...")
            stats = calibration.for_method(cfg.name)
            missing = [p for p in paths if p not in stats]
            if missing:
                raise CalibrationError(f"the calibration has no statistics for {len(missing)} target module(s), e.g. {missing[0]!r}; it was made for another model or other targets: recalibrate with this config")
        plans.append((cfg, meth, paths, stats))
    reports: list[ApplyReport] = []
    done: list[list[str]] = []
    try:
        for cfg, meth, paths, stats in plans:
            if getattr(meth, "resolve_late", False):  # targets what the configs before it left unconverted, where
                paths = meth.resolve(model, get_adapter(model), cfg)  # they now are (a method may have wrapped the layer stack)
            run_cfg = meth.plan(model, cfg, paths, stats)
            if not paths and getattr(meth, "resolve_late", False):  # the configs before it took every target (the runtime gave them its format)
                replaced: list[str] = []
            else:
                replaced = replace_modules(
                    model, paths, lambda p, m, meth=meth, cfg=run_cfg, stats=stats: meth.convert(p, m, cfg, None if stats is None else stats[p]), cfg.name
                )
            done.append(replaced)
            meth.finish(model, run_cfg, replaced)
            reports.append(ApplyReport(cfg.name, cfg.to_dict(), replaced, meth.summarize(model, cfg, replaced)))
    except BaseException:
        for replaced in reversed(done):
            for p in replaced:
                m = get_module(model, p)
                if isinstance(m, LazyModule):
                    set_module(model, p, m.restore_base())
        raise
    return reports


def ordered(configs: MethodConfig | Sequence[MethodConfig]) -> list[MethodConfig]:
    """The order ``apply_`` converts in: methods that convert modules inside the layers first,
    then one that runs the layer stack (early exit, module gating), then the runtime (each
    method's ``stage``); the given order is kept within a stage."""
    cfgs = _as_list(configs)
    return sorted(cfgs, key=lambda c: method_for(c).stage)


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _resolved(model: nn.Module, ad: Any, cfgs: list[MethodConfig]) -> list[tuple[MethodConfig, Any, list[str]]]:
    """Each config with its method and target paths, after checking that they can share the
    model: at most one method runs the layer stack, and no module is taken by two configs (one
    module, one replacement; a module inside another's target counts)."""
    out = []
    stack: MethodConfig | None = None
    owner: dict[str, MethodConfig] = {}
    for cfg in cfgs:
        meth = method_for(cfg)
        paths = meth.resolve(model, ad, cfg)
        if not paths and not getattr(meth, "resolve_late", False):
            raise NoMatchError(f"{cfg.name}: targets {list(cfg.targets)} with include={list(cfg.include)} exclude={list(cfg.exclude)} matched no module of this {ad.model_type} model; run `lazyneuron inspect` to see the paths of each role")
        if meth.stage == 1:
            if stack is not None:
                raise ConfigError(f"{stack.name} and {cfg.name} both run the whole layer stack and cannot be combined; apply one of them "
                                  "(either composes with activation_sparsity, expert_routing, fast_feedforward and the runtime)")
            stack = cfg
        elif meth.stage == 0:
            for p in paths:
                hit = next((q for q in owner if _overlap(p, q)), None)
                if hit is not None:
                    other = owner[hit]
                    where = repr(p) if p == hit else f"{p!r} and {hit!r} (one inside the other)"
                    names = {other.name, cfg.name}
                    fix = (f"e.g. activation_sparsity:targets=attn_in|attn_out with {(names - {'activation_sparsity'}).pop()} on the MLP"
                           if len(names) == 2 and "activation_sparsity" in names else "or include= / exclude= patterns on one of them")
                    raise ConfigError(f"{other.name} and {cfg.name} both convert {where}; a module takes one method: give them disjoint targets, {fix}")
            for p in paths:
                owner[p] = cfg
        out.append((cfg, meth, paths))
    return out


def check_compose(model: nn.Module, configs: MethodConfig | Sequence[MethodConfig]) -> list[MethodConfig]:
    """Raise the error ``apply_`` would raise before touching the model when ``configs`` cannot
    share ``model`` (overlapping targets, two methods running the layer stack, no matching
    module); return the configs in the order ``apply_`` converts them."""
    cfgs = ordered(configs)
    _resolved(model, get_adapter(model), cfgs)
    return cfgs


def revert_(model: nn.Module) -> nn.Module:
    """Undo every conversion; the state dict and outputs are exactly the dense model's again."""
    n = _revert_all(model)
    log.info("reverted %d modules", n)
    return model


@contextlib.contextmanager
def applied(model: nn.Module, configs: MethodConfig | Sequence[MethodConfig] | None, calibration: Calibration | None = None) -> Iterator[list[ApplyReport]]:
    """``with applied(model, cfg, cal):`` converts on entry and reverts on exit (``None``: dense)."""
    reports = [] if configs is None else apply_(model, configs, calibration)
    try:
        yield reports
    finally:
        if configs is not None:
            revert_(model)
