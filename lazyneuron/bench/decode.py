"""A lean greedy decode loop with a KV cache, usable with every method.

Hugging Face ``generate`` spends a noticeable part of each small-model step in Python (logits
processors, stopping criteria, cache bookkeeping). This loop calls the model's own forward with
a ``DynamicCache``, keeps only the last position's logits and does argmax: the per-token cost is
the model, which is what a method can change. The model forward itself is untouched.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


@torch.inference_mode()
def lean_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, return_timing: bool = False) -> Any:
    """Greedy decoding; returns generated ids (batch, max_new_tokens) and optionally
    ``(prefill_seconds, decode_seconds)`` where decode covers tokens 2..max_new_tokens."""
    from transformers import DynamicCache

    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    b, n = input_ids.shape
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    pos = torch.arange(n).unsqueeze(0)
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1, position_ids=pos)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (batch, 1)
    t1 = time.perf_counter()
    toks = [nxt]
    for i in range(max_new_tokens - 1):
        pos = torch.full((b, 1), n + i, dtype=torch.long)
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1, position_ids=pos)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
    t2 = time.perf_counter()
    ids = torch.cat(toks, 1)
    return (ids, (t1 - t0, t2 - t1)) if return_timing else ids


@torch.inference_mode()
def hf_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, float]:
    """Hugging Face ``generate`` (greedy, same token count), for comparison; returns ids and seconds."""
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=getattr(model.config, "eos_token_id", 0) or 0,
    )
    return out[:, input_ids.shape[1]:], time.perf_counter() - t0
