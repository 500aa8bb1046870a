"""Compile the C++ kernels at first use (torch.utils.cpp_extension + ninja), cached per source hash.

If the build fails (no compiler, no ninja), one warning is logged and callers fall back to the
pure-torch references. ``LAZYNEURON_NO_EXT=1`` forces the fallback. ``LAZYNEURON_KERNEL_FLAGS``
adds compiler flags (and keys the cache by them): ``-mno-avx512f`` builds the AVX2 code path on an
AVX-512 host, which is how the tests cover both.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"


@functools.lru_cache(maxsize=None)
def extension(name: str) -> Any | None:
    if os.environ.get("LAZYNEURON_NO_EXT"):
        return None
    src = CSRC / f"{name}.cpp"
    try:
        import torch
        from torch.utils import cpp_extension

        from ..paths import cache_dir

        headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))  # included by the sources
        extra = os.environ.get("LAZYNEURON_KERNEL_FLAGS", "").split()  # e.g. -mno-avx512f: build the AVX2 path on an AVX-512 host
        tag = hashlib.sha1(src.read_bytes() + headers + torch.__version__.encode() + " ".join(extra).encode()).hexdigest()[:12]
        build = cache_dir("kernels", f"{name}-{tag}")
        return cpp_extension.load(
            name=f"lazyneuron_{name}_{tag}",
            sources=[str(src)],
            build_directory=str(build),
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", *extra],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # compiler / ninja missing, or a build error: fall back, once, loudly
        log.warning("could not build the C++ kernel %r (%s: %s); using the pure-torch reference, which is slower. "
                    "Install a C++ compiler and `pip install ninja` to get the fast path.", name, type(e).__name__, str(e)[:300])
        return None
