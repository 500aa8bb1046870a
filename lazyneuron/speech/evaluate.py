"""Speech evaluation glue: teacher-forcing batches for gate training and search, and timed greedy
transcription of utterances (encoder + decode, feature extraction excluded)."""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .whisper import features, greedy_transcribe, prompt_tokens


def gating_batches(model: Any, processor: Any, utts: Sequence[Any], *, task: str = "transcribe", batch_size: int = 8,
                   max_new_tokens: int = 96) -> list[Any]:
    """:class:`~lazyneuron.methods.gating_speech.SpeechBatch` es of ``utts`` (``.audio``, ``.language``),
    grouped by language: the prompt plus the **dense** model's own greedy transcript as the
    teacher-forced tokens (the model must be dense: not gated, or gated in ``dense`` mode), and the
    contexts ``language`` and ``task``."""
    from ..methods.gating_speech import SpeechBatch

    if not utts:
        raise ConfigError("gating_batches got no utterances; pass the train / calibration split (lazyneuron.data.speech.utterances)")
    eos = int(model.generation_config.eos_token_id if not isinstance(model.generation_config.eos_token_id, list)
              else model.generation_config.eos_token_id[0])
    by_lang: dict[str, list[Any]] = {}
    for u in utts:
        by_lang.setdefault(u.language, []).append(u)
    out = []
    with torch.no_grad():
        for lang, group in by_lang.items():
            for s in range(0, len(group), batch_size):
                chunk = group[s:s + batch_size]
                feats, mask = features(processor, [u.audio for u in chunk])
                prompt = prompt_tokens(model, language=lang, task=task)
                ids = greedy_transcribe(model, feats, language=lang, task=task, max_new_tokens=max_new_tokens, attention_mask=mask)
                rows = [prompt + r + [eos] for r in ids]
                t = max(len(r) for r in rows)
                tokens = torch.tensor([r + [eos] * (t - len(r)) for r in rows], dtype=torch.long)
                tmask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows], dtype=torch.long)
                out.append(SpeechBatch(feats, mask, tokens, tmask, len(prompt), {"language": [lang] * len(chunk), "task": [task] * len(chunk)}))
    return out


class TimedTranscriber:
    """Greedy transcription of one utterance at a time, timed (encoder + decode; features are
    computed once, outside the timing), for interleaved comparisons in one process."""

    def __init__(self, model: Any, processor: Any, max_new_tokens: int = 96) -> None:
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
        self._feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def feats(self, utt: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if utt.id not in self._feats:
            self._feats[utt.id] = features(self.processor, [utt.audio])
        return self._feats[utt.id]

    @torch.no_grad()
    def __call__(self, utt: Any, *, task: str = "transcribe") -> tuple[str, float, int]:
        """(text, seconds, new tokens) of one utterance, language given."""
        f, m = self.feats(utt)
        t0 = time.perf_counter()
        ids = greedy_transcribe(self.model, f, language=utt.language, task=task, max_new_tokens=self.max_new_tokens, attention_mask=m)[0]
        dt = time.perf_counter() - t0
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False), dt, len(ids)


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over paired items of a_i / b_i."""
    return float(np.median(np.asarray(a) / np.asarray(b)))
