"""Where lazyneuron keeps converted models and corpora (``$LAZYNEURON_CACHE`` or ~/.cache/lazyneuron)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import MissingPackageError


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("LAZYNEURON_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lazyneuron")
    p = root.joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def package_dir(module: str, pip_name: str, what: str, install: str | None = None) -> Path:
    """Directory of an installed package, found without importing it (several have heavy __init__s)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(pip_name, what, install or f"pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])
