"""Flat measurement records (JSON lines): model, method, params, metric, value, unit, and context."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable


@functools.lru_cache(maxsize=None)
def environment() -> dict[str, Any]:
    import torch
    import transformers

    from .. import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {
        "device": f"cpu: {cpu} x{os.cpu_count()} (torch threads {torch.get_num_threads()})",
        "versions": {"lazyneuron": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "git_sha": sha or "unknown",
    }


@dataclasses.dataclass
class Record:
    model: str
    method: str
    params: dict[str, Any]
    metric: str
    value: float
    unit: str
    dtype: str = "float32"
    spread: float | None = None  # (p75 - p25) of the repeats, when timed
    repeats: int | None = None
    device: str = ""
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    git_sha: str = ""

    def __post_init__(self) -> None:
        env = environment()
        self.device = self.device or env["device"]
        self.versions = self.versions or env["versions"]
        self.git_sha = self.git_sha or env["git_sha"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write(records: Iterable[Record | dict[str, Any]], path: str | os.PathLike, append: bool = True) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a" if append else "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict() if isinstance(r, Record) else r, sort_keys=True) + "\n")
    return p


def read(path: str | os.PathLike) -> list[dict[str, Any]]:
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1} is not a JSON record ({e})") from None
    return out
