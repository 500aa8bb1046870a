"""Measurement harness: timing (prefill / decode, interleaved with dense), quality, accounting,
records (JSON lines) and plots."""

from .decode import hf_generate, lean_generate
from .records import Record, read, write
from .runner import BenchSettings, run, table
from .timing import Variant, interleave

__all__ = ["BenchSettings", "Record", "Variant", "hf_generate", "interleave", "lean_generate", "read", "run", "table", "write"]
