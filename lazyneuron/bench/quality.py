"""Quality: perplexity on fixed windows, agreement with the dense model, classification accuracy."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over ``windows`` (count, length); every window scored alone."""
    nll, n = 0.0, 0
    for w in windows:
        logits = model(input_ids=w.unsqueeze(0)).logits[0, :-1].float()  # (length-1, vocab)
        nll += F.cross_entropy(logits, w[1:], reduction="sum").item()
        n += w.numel() - 1
    return math.exp(nll / n)


@torch.inference_mode()
def reference_logprobs(model: nn.Module, windows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Dense (top-1 ids, log-probabilities) per window, the reference for agreement; the
    log-probabilities are kept in bf16 to halve memory, the top-1 ids exactly."""
    out = []
    for w in windows:
        lp = F.log_softmax(model(input_ids=w.unsqueeze(0)).logits[0].float(), -1)  # (length, vocab)
        out.append((lp.argmax(-1), lp.to(torch.bfloat16)))
    return out


@torch.inference_mode()
def agreement(model: nn.Module, windows: torch.Tensor, reference: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Top-1 match rate and mean KL(dense || converted) per token against ``reference``."""
    match, kl, n = 0.0, 0.0, 0
    for w, (top1, ref) in zip(windows, reference):
        lp = F.log_softmax(model(input_ids=w.unsqueeze(0)).logits[0].float(), -1)  # (length, vocab)
        ref = ref.float()
        match += (lp.argmax(-1) == top1).sum().item()
        kl += (ref.exp() * (ref - lp)).sum().item()
        n += w.numel()
    return {"top1_agreement": match / n, "kl": kl / n}


@torch.inference_mode()
def accuracy(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, int]], batch_size: int = 32, max_length: int = 128) -> float:
    """Accuracy of a sequence classifier (``.logits`` of shape (batch, classes)) on (text, label)."""
    right = 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        enc = tokenizer([t for t, _ in chunk], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        pred = model(**enc).logits.argmax(-1)
        right += (pred == torch.tensor([y for _, y in chunk])).sum().item()
    return right / max(len(pairs), 1)
