"""Quality: perplexity on fixed windows, agreement with the dense model, classification accuracy;
for encoders, how close the output states stay to the dense model's."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _stepwise(model: nn.Module) -> bool:
    return any(getattr(m, "stepwise_eval", False) for m in model.modules())


def window_logits(model: nn.Module, w: torch.Tensor, loop: bool = False) -> torch.Tensor:
    """Logits (length, vocab) of one window. A model converted by a method that acts only in
    step-by-step decoding (per-token early exit) is measured as it decodes, not by a dense
    full-window forward: through the method's exact teacher-forced equivalent of its decode loop
    (a module's ``window_logits``, held to the loop by the tests) or, with ``loop`` or without
    one, fed one token at a time through its KV cache."""
    if not _stepwise(model):
        return model(input_ids=w.unsqueeze(0)).logits[0]
    exact = next((m for m in model.modules() if getattr(m, "stepwise_eval", False) and hasattr(m, "window_logits")), None)
    if exact is not None and not loop:
        return exact.window_logits(w.unsqueeze(0))[0]
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    outs = []
    for i in range(w.numel()):
        out = model(input_ids=w[i : i + 1].view(1, 1), past_key_values=cache, use_cache=True, position_ids=torch.tensor([[i]]), logits_to_keep=1)
        outs.append(out.logits[0, -1])
    return torch.stack(outs)


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over ``windows`` (count, length); every window scored alone."""
    nll, n = 0.0, 0
    for w in windows:
        logits = window_logits(model, w)[:-1].float()  # (length-1, vocab)
        nll += F.cross_entropy(logits, w[1:], reduction="sum").item()
        n += w.numel() - 1
    return math.exp(nll / n)


@torch.inference_mode()
def reference_logprobs(model: nn.Module, windows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Dense (top-1 ids, log-probabilities) per window, the reference for agreement; the
    log-probabilities are kept in bf16 to halve memory, the top-1 ids exactly."""
    out = []
    for w in windows:
        lp = F.log_softmax(window_logits(model, w).float(), -1)  # (length, vocab)
        out.append((lp.argmax(-1), lp.to(torch.bfloat16)))
    return out


@torch.inference_mode()
def agreement(model: nn.Module, windows: torch.Tensor, reference: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Top-1 match rate and mean KL(dense || converted) per token against ``reference``."""
    match, kl, n = 0.0, 0.0, 0
    for w, (top1, ref) in zip(windows, reference):
        lp = F.log_softmax(window_logits(model, w).float(), -1)  # (length, vocab)
        ref = ref.float()
        match += (lp.argmax(-1) == top1).sum().item()
        kl += (ref.exp() * (ref - lp)).sum().item()
        n += w.numel()
    return {"top1_agreement": match / n, "kl": kl / n}


def encoder_states(model: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """(length, width) float32 output states of an encoder for one window: ``last_hidden_state``,
    or ``logits`` for a model with a head."""
    out = model(input_ids=w.unsqueeze(0))
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = out.logits
    return h[0].float()


@torch.inference_mode()
def reference_states(model: nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    """The dense encoder's output states per window, the reference for :func:`state_fidelity`."""
    return [encoder_states(model, w) for w in windows]


@torch.inference_mode()
def state_fidelity(model: nn.Module, windows: torch.Tensor, reference: list[torch.Tensor]) -> dict[str, float]:
    """How close an encoder's outputs stay to the dense model's: the mean cosine similarity of the
    mean-pooled window embeddings (what a sentence-embedding model returns) and the relative error
    of the per-token states, ||h - h_dense|| / ||h_dense|| over all tokens."""
    cos, num, den = 0.0, 0.0, 0.0
    for w, ref in zip(windows, reference):
        h = encoder_states(model, w)
        cos += F.cosine_similarity(h.mean(0), ref.mean(0), dim=0).item()
        num += (h - ref).pow(2).sum().item()
        den += ref.pow(2).sum().item()
    return {"embedding_cosine": cos / len(reference), "state_rel_error": math.sqrt(num / max(den, 1e-30))}


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
