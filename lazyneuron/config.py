"""`MethodConfig` (one frozen dataclass per technique) and the method registry."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, ClassVar

from .errors import ConfigError

ROLES = ("attn", "attn_in", "attn_out", "mlp", "mlp_in", "mlp_out", "layer", "final_norm", "head",
         # encoder-decoder models (Whisper): the decoder's cross-attention and the encoder's blocks
         "cross_attn", "cross_attn_in", "cross_attn_out", "enc_attn", "enc_attn_in", "enc_attn_out", "enc_mlp_in", "enc_mlp_out")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method config.

    ``targets`` are adapter roles (see :data:`ROLES`); ``include`` / ``exclude`` are ``fnmatch``
    patterns on module paths (``model.layers.0.mlp.*``), applied after the roles are resolved.
    Subclasses add their knobs and extend :meth:`validate`.
    """

    name: ClassVar[str] = "base"
    targets: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # accept lists from JSON / users, store tuples
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
            elif isinstance(v, dict):
                object.__setattr__(self, f.name, tuple(sorted(v.items())))
        self.validate()

    # -- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        bad = [r for r in self.targets if r not in ROLES]
        if bad:
            raise ConfigError(f"{type(self).__name__}.targets has unknown role(s) {bad}; choose from {list(ROLES)}")

    def _check_range(self, field: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
        v = getattr(self, field)
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
            raise ConfigError(f"{type(self).__name__}.{field}={v!r} is out of range; use a value in {lb}{lo}, {hi}{rb}")

    def _check_choice(self, field: str, choices: tuple[str, ...]) -> None:
        v = getattr(self, field)
        if v not in choices:
            raise ConfigError(f"{type(self).__name__}.{field}={v!r} is not supported; choose one of {list(choices)}")

    def at_zero_strength(self) -> "MethodConfig":
        """The same config with its strength knob at zero (must reproduce the dense model)."""
        raise NotImplementedError

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        d = dict(d)
        name = d.pop("method", cls.name)
        target = config_class(name) if cls is MethodConfig else cls
        if target.name != name:
            raise ConfigError(f"config dict is for method {name!r}, not {target.name!r}")
        known = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{target.__name__} has no field(s) {unknown}; known fields: {sorted(known)}")
        hints = typing.get_type_hints(target)
        for k, v in list(d.items()):
            if isinstance(v, list) and _is_pair_tuple(hints[k]):
                d[k] = tuple(tuple(x) for x in v)
        return target(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> "MethodConfig":
        """Parse the CLI form ``method:key=value,key=value`` (lists separated by ``|``).

        Example: ``activation_sparsity:sparsity=0.5,rule=scap,exclude=*.layers.0.*``.
        """
        name, _, rest = text.partition(":")
        target = config_class(name.strip())
        hints = typing.get_type_hints(target)
        fields = {f.name for f in dataclasses.fields(target)}
        kw: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq:
                raise ConfigError(f"cannot parse {item!r} in {text!r}; write key=value, e.g. sparsity=0.5")
            if key not in fields:
                raise ConfigError(f"{target.__name__} has no field {key!r}; known fields: {sorted(fields)}")
            kw[key] = _coerce(raw.strip(), hints[key], key)
        return target(**kw)


def _is_pair_tuple(tp: Any) -> bool:
    args = typing.get_args(tp)
    return bool(args) and typing.get_origin(args[0]) is tuple


def _coerce(raw: str, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if origin is tuple:
            parts = [p for p in raw.split("|") if p]
            if _is_pair_tuple(tp):  # (pattern, value) pairs written pattern:value|pattern:value
                out = []
                for p in parts:
                    pat, _, val = p.rpartition(":")
                    out.append((pat, float(val)))
                return tuple(out)
            return tuple(parts)
        if typing.get_origin(tp) is typing.Union:  # Optional[...]
            if raw.lower() in ("none", ""):
                return None
            return _coerce(raw, [a for a in typing.get_args(tp) if a is not type(None)][0], key)
        return raw
    except ValueError:
        raise ConfigError(f"cannot read {key}={raw!r} as {getattr(tp, '__name__', tp)}") from None


# -- registry -----------------------------------------------------------------------------
_REGISTRY: dict[str, Any] = {}


def register(method_cls: Any) -> Any:
    """Class decorator: register a :class:`~lazyneuron.methods.base.Method` by its config's name."""
    name = method_cls.config_cls.name
    _REGISTRY[name] = method_cls
    return method_cls


def registry() -> dict[str, Any]:
    from . import methods, runtime  # noqa: F401  (importing registers the built-in methods and the runtime)

    return dict(_REGISTRY)


def method_for(cfg: MethodConfig) -> Any:
    reg = registry()
    if cfg.name not in reg:
        raise ConfigError(f"no method registered for config {cfg.name!r}; registered: {sorted(reg)}")
    return reg[cfg.name]()


def config_class(name: str) -> type[MethodConfig]:
    reg = registry()
    if name not in reg:
        raise ConfigError(f"unknown method {name!r}; registered methods: {sorted(reg)}")
    return reg[name].config_cls
