"""Speech models: Whisper checkpoints shipped as CTranslate2 files, loaded into transformers, and a
lean greedy transcription loop (see :mod:`.whisper`)."""

from __future__ import annotations

from .evaluate import TimedTranscriber, gating_batches
from .whisper import (
    BUILTIN_WHISPER,
    Ct2Model,
    DecodeTimings,
    ct2_to_hf,
    features,
    greedy_transcribe,
    load_whisper,
    prompt_tokens,
    read_ct2_model,
    resample,
    transcribe,
    write_ct2_model,
)

__all__ = [
    "TimedTranscriber",
    "gating_batches",
    "BUILTIN_WHISPER",
    "Ct2Model",
    "DecodeTimings",
    "ct2_to_hf",
    "features",
    "greedy_transcribe",
    "load_whisper",
    "prompt_tokens",
    "read_ct2_model",
    "resample",
    "transcribe",
    "write_ct2_model",
]
