"""Speech models: Whisper checkpoints shipped as CTranslate2 files, loaded into transformers, and a
lean greedy transcription loop (see :mod:`.whisper`)."""

from __future__ import annotations

from .whisper import (
    BUILTIN_WHISPER,
    Ct2Model,
    DecodeTimings,
    ct2_to_hf,
    greedy_transcribe,
    load_whisper,
    prompt_tokens,
    read_ct2_model,
    resample,
    transcribe,
    write_ct2_model,
)

__all__ = [
    "BUILTIN_WHISPER",
    "Ct2Model",
    "DecodeTimings",
    "ct2_to_hf",
    "greedy_transcribe",
    "load_whisper",
    "prompt_tokens",
    "read_ct2_model",
    "resample",
    "transcribe",
    "write_ct2_model",
]
