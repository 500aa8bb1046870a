"""Reading lazyneuron's safetensors files (calibrations, trained trees and heads, classifiers,
training checkpoints): one place for the checks every loader needs. Never unpickles."""

from __future__ import annotations

import os
from typing import Any

from .errors import ConfigError


def read(path: str | os.PathLike, fmt: str, what: str, fix: str, error: type[Exception] = ConfigError) -> tuple[dict[str, str], dict[str, Any]]:
    """(metadata header, tensors) of the safetensors file at ``path`` whose ``format`` metadata is
    ``fmt``. Raises ``error`` naming ``what`` the file should be and ``fix`` (how to make one) when
    it is missing, unreadable (corrupt, truncated, not safetensors) or of another format."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise error(f"{what} {path!r} does not exist; {fix}")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers / truncation
        raise error(f"{path!r} is not a readable safetensors {what} ({type(e).__name__}: {e}); {fix}") from None
    if header.get("format") != fmt:
        raise error(f"{path!r} is a safetensors file but not a lazyneuron {what} (format={header.get('format')!r}, expected {fmt!r})")
    return header, tensors
