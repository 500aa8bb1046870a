"""Model surgery: the `LazyModule` convention, and replace / revert done once for every method."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from typing import Any, Callable, Iterable, Iterator

from torch import nn

from .errors import NoMatchError

log = logging.getLogger(__name__)


class LazyModule(nn.Module):
    """A replacement module that keeps the module it replaced as ``.base``.

    Parameters are shared with ``base`` (never copied); :func:`revert_` puts ``base`` back.
    Subclasses implement ``from_module(base, cfg, stats)`` and ``forward``, and may override
    :meth:`restore_base` to undo any layout change made to ``base``'s tensors at convert time.
    """

    method_name = "lazy"

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    @classmethod
    def from_module(cls, base: nn.Module, cfg: Any, stats: Any) -> "LazyModule":
        raise NotImplementedError

    def restore_base(self) -> nn.Module:
        """Return ``base`` exactly as it was before conversion."""
        return self.base

    def weight_elements(self) -> int:
        """Weight elements this module reads per token when nothing is skipped (for accounting)."""
        w = getattr(self.base, "weight", None)
        return int(w.numel()) if w is not None else 0

    def extra_repr(self) -> str:
        return f"method={self.method_name}"


class DelegatingLazyModule(LazyModule):
    """A wrapper through which the wrapped module's attributes and submodules stay reachable, and
    replaceable, at their old paths (``...self_attn.q_proj``, ``model.decoder.layers``): reads of
    names the wrapper lacks go to ``base``, and assigning one of ``base``'s submodules replaces it
    there, so that paths resolved before the wrapping still hold."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base")
            if base is None:
                raise
            return getattr(base, name)

    def __setattr__(self, name: str, value: Any) -> None:
        base = self.__dict__.get("_modules", {}).get("base")
        if base is not None and name in base._modules:
            setattr(base, name, value)
        else:
            super().__setattr__(name, value)


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = get_module(root, parent_path)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def filter_paths(paths: Iterable[str], include: Iterable[str], exclude: Iterable[str]) -> list[str]:
    include, exclude = list(include), list(exclude)
    out = []
    for p in paths:
        if include and not any(fnmatch.fnmatchcase(p, pat) for pat in include):
            continue
        if any(fnmatch.fnmatchcase(p, pat) for pat in exclude):
            continue
        out.append(p)
    return out


def replace_modules(
    model: nn.Module, paths: list[str], factory: Callable[[str, nn.Module], nn.Module], what: str
) -> list[str]:
    """Build every replacement first, then swap them in: a failure leaves ``model`` untouched."""
    if not paths:
        raise NoMatchError(f"{what}: no module of {type(model).__name__} matched; run `lazyneuron inspect` to see the roles and paths, then adjust targets / include / exclude")
    new = {}
    try:
        for p in paths:
            new[p] = factory(p, get_module(model, p))
    except BaseException:
        for m in new.values():  # undo layout changes made while building the replacements
            if isinstance(m, LazyModule):
                m.restore_base()
        raise
    for p, m in new.items():
        set_module(model, p, m)
    log.info("%s: replaced %d modules", what, len(new))
    return list(new)


def lazy_modules(model: nn.Module) -> list[tuple[str, LazyModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LazyModule)]


def revert_(model: nn.Module) -> int:
    """Unwrap every :class:`LazyModule` in ``model`` (outermost first); return how many."""
    count = 0
    while True:
        found = lazy_modules(model)
        if not found:
            return count
        # outermost first: a path that is not inside another lazy module's subtree
        outer = [(n, m) for n, m in found if not any(n != o and n.startswith(o + ".") for o, _ in found)]
        for n, m in outer:
            if n == "":
                raise ValueError("the root module itself is a LazyModule; call .restore_base() on it instead")
            set_module(model, n, m.restore_base())
            count += 1


@contextlib.contextmanager
def quiet_applies() -> Iterator[None]:
    """No per-call "replaced / reverted" log lines while a search applies and reverts many times."""
    loggers = [logging.getLogger(n) for n in ("lazyneuron.surgery", "lazyneuron.api")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)
