"""Sequence classification on top of an encoder: the model users fine-tune, and its evaluation.

:class:`TextClassifier` = an encoder (e.g. ``BertModel``) + masked mean pooling + a linear head.
It keeps the encoder under ``.bert`` and its config as ``.config``, so adapters and methods see
an ordinary BERT. Checkpoints are safetensors with metadata; loading checks the encoder type.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

FORMAT = "lazyneuron.classifier/1"


class TextClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.bert = encoder
        self.config = encoder.config
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return hidden.mean(1)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.classifier(self.dropout(self.pool(hidden, attention_mask)))
        ex = getattr(self.bert.encoder, "last_exit", None)  # set by an early-exit encoder
        if ex is not None:
            self.bert.encoder.last_exit = None
            logits = torch.where(ex.exited[:, None], ex.logits.to(logits.dtype), logits)
        return logits

    def pooled_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean-pooled hidden state after every layer, (layers, B, d), and the final logits."""
        states: list[torch.Tensor] = []
        hooks = [layer.register_forward_hook(lambda m, a, out: states.append(out[0] if isinstance(out, tuple) else out))
                 for layer in self.bert.encoder.layer]
        try:
            self.bert(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            for h in hooks:
                h.remove()
        pooled = torch.stack([self.pool(h, attention_mask) for h in states])
        return pooled, self.classifier(self.dropout(pooled[-1]))

    def save(self, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
        from safetensors.torch import save_file

        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        info = {"model_type": str(self.config.model_type), "num_labels": self.num_labels, "hidden": int(self.config.hidden_size), **(meta or {})}
        save_file(sd, os.fspath(path), metadata={"format": FORMAT, "meta": json.dumps(info)})

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: nn.Module) -> "TextClassifier":
        """Weights from :meth:`save` onto ``encoder`` (an encoder of the same architecture)."""
        from .checkpoints import read

        path = os.fspath(path)
        header, sd = read(path, FORMAT, "classifier checkpoint", "fine-tune one with lazyneuron.tasks.finetuned_classifier")
        info = json.loads(header["meta"])
        if info["model_type"] != encoder.config.model_type or info["hidden"] != encoder.config.hidden_size:
            raise ConfigError(f"{path!r} holds a {info['model_type']} classifier of width {info['hidden']}, the encoder is {encoder.config.model_type} of width {encoder.config.hidden_size}")
        model = cls(encoder, int(info["num_labels"]))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ConfigError(f"{path!r} does not fit this encoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model


class MultiTaskClassifier(TextClassifier):
    """One shared encoder, one head per task; ``task`` picks the head (set it, or use
    :meth:`for_task`). Adapters and methods see the same ``.bert`` as a :class:`TextClassifier`."""

    def __init__(self, encoder: nn.Module, tasks: dict[str, int], dropout: float = 0.1) -> None:
        super().__init__(encoder, max(tasks.values()), dropout)
        del self.classifier
        self.tasks = dict(tasks)
        self.heads = nn.ModuleDict({t: nn.Linear(encoder.config.hidden_size, n) for t, n in tasks.items()})
        self.task = next(iter(tasks))

    @property
    def classifier(self) -> nn.Module:  # type: ignore[override]
        if self.task not in self.heads:
            raise ConfigError(f"task {self.task!r} has no head; this classifier knows {sorted(self.heads)}")
        return self.heads[self.task]

    def for_task(self, task: str) -> "MultiTaskClassifier":
        if task not in self.heads:
            raise ConfigError(f"task {task!r} has no head; this classifier knows {sorted(self.heads)}")
        self.task = task
        return self

    def save(self, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
        super().save(path, {"tasks": self.tasks, **(meta or {})})

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: nn.Module) -> "MultiTaskClassifier":  # type: ignore[override]
        from .checkpoints import read

        path = os.fspath(path)
        header, sd = read(path, FORMAT, "classifier checkpoint", "fine-tune one with lazyneuron.tasks.finetuned_multitask")
        info = json.loads(header["meta"])
        if "tasks" not in info:
            raise ConfigError(f"{path!r} is a single-task classifier; load it with TextClassifier.load")
        if info["model_type"] != encoder.config.model_type or info["hidden"] != encoder.config.hidden_size:
            raise ConfigError(f"{path!r} holds a {info['model_type']} classifier of width {info['hidden']}, the encoder is {encoder.config.model_type} of width {encoder.config.hidden_size}")
        model = cls(encoder, info["tasks"])
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ConfigError(f"{path!r} does not fit this encoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def make_batches(tokenizer: Any, rows: Sequence[tuple[str, int]], batch_size: int, max_length: int = 64, sort: bool = False,
                 seed: int | None = None) -> list[Batch]:
    """Tokenised, padded batches of (text, label) rows. ``seed``: shuffle the rows first (training
    batches must mix labels: corpora are often stored sorted); ``sort``: group similar lengths
    (less padding, for evaluation)."""
    if not rows:
        raise ConfigError("no labelled rows to batch; check the corpus and split")
    order = list(range(len(rows)))
    if seed is not None:
        import random

        random.Random(seed).shuffle(order)
    if sort:
        order.sort(key=lambda i: len(rows[i][0]))
    out = []
    for k in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[k : k + batch_size]]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(Batch(enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in chunk])))
    return out


@torch.inference_mode()
def predict(model: nn.Module, batches: Sequence[Batch]) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return torch.cat([model(b.input_ids, b.attention_mask) for b in batches])
    finally:
        model.train(was)


def accuracy(model: nn.Module, batches: Sequence[Batch]) -> float:
    logits = predict(model, batches)
    labels = torch.cat([b.labels for b in batches])
    return float((logits.argmax(-1) == labels).float().mean())


def classification_loss(teacher_logits: dict[int, torch.Tensor] | None = None, alpha: float = 0.5, temperature: float = 2.0):  # type: ignore[no-untyped-def]
    """Loss for :func:`lazyneuron.train.fit` on :class:`Batch` items: cross-entropy, plus (when
    ``teacher_logits`` maps ``id(batch)`` to a teacher's logits) ``alpha`` x the temperature-scaled
    KL divergence to the teacher."""

    def loss(model: nn.Module, b: Batch) -> torch.Tensor:
        logits = model(b.input_ids, b.attention_mask)
        ce = F.cross_entropy(logits, b.labels)
        if teacher_logits is None:
            return ce
        t = teacher_logits[id(b)]
        kd = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True, reduction="batchmean")
        return (1 - alpha) * ce + alpha * kd * temperature**2

    return loss


def finetuned_classifier(model_name: str = "minilm-l6", corpus: str = "mr", *, epochs: int = 2, lr: float = 5e-5, batch_size: int = 32,
                         max_length: int = 64, quick: bool = False, progress: bool = True, max_rows: int | None = None) -> tuple[TextClassifier, Any]:
    """The dense fine-tuned classifier every encoder benchmark compares against, cached as
    safetensors under ``$LAZYNEURON_CACHE/checkpoints`` (training resumes if interrupted).
    ``quick``: a small subset and one epoch (smoke runs); ``max_rows``: the first rows of the
    train split only."""
    from . import data, models
    from .paths import cache_dir
    from .train import fit

    enc, tok = models.load(model_name)
    path = cache_dir("checkpoints") / f"{model_name}-{corpus}{'-quick' if quick else ''}{f'-{max_rows}' if max_rows else ''}.safetensors"
    if path.exists():
        return TextClassifier.load(path, enc).eval(), tok
    rows = subsample(data.labeled(corpus, "train"), max_rows)
    if quick:
        rows = rows[::13]
    labels = sorted({y for _, y in rows})
    clf = TextClassifier(enc, len(labels))
    train = make_batches(tok, rows, batch_size, max_length, seed=0)
    fit(clf, classification_loss(), train, epochs=1 if quick else epochs, lr=lr, desc=f"fine-tune {model_name} on {corpus}", checkpoint=str(path) + ".run",
        progress=progress)
    clf.save(path, {"task": corpus, "epochs": 1 if quick else epochs})
    return clf.eval(), tok


def finetuned_multitask(model_name: str = "minilm-l6", corpora: Sequence[str] = ("mr", "rt", "tweets"), *, epochs: int = 2, lr: float = 5e-5,
                        batch_size: int = 32, max_length: int = 64, max_rows: int = 8000, progress: bool = True) -> tuple[MultiTaskClassifier, Any]:
    """A shared encoder fine-tuned on several labelled corpora at once (batches alternate between
    tasks; each task's training rows capped at ``max_rows``), cached like :func:`finetuned_classifier`."""
    import random

    from . import data, models
    from .paths import cache_dir
    from .train import fit

    enc, tok = models.load(model_name)
    path = cache_dir("checkpoints") / f"{model_name}-multitask-{'-'.join(corpora)}-{max_rows}x{epochs}.safetensors"
    if path.exists():
        return MultiTaskClassifier.load(path, enc).eval(), tok
    clf = MultiTaskClassifier(enc, {c: data.LABELED[c] for c in corpora})
    batches = task_batches(tok, {c: subsample(data.labeled(c, "train"), max_rows) for c in corpora}, batch_size, max_length, seed=0)

    def loss(m: nn.Module, tb: tuple[str, Batch]) -> torch.Tensor:
        task, b = tb
        clf.task = task
        return F.cross_entropy(m(b.input_ids, b.attention_mask), b.labels)

    random.Random(0).shuffle(batches)
    fit(clf, loss, batches, epochs=epochs, lr=lr, desc=f"fine-tune {model_name} on {'+'.join(corpora)}", checkpoint=str(path) + ".run", progress=progress)
    clf.save(path, {"epochs": epochs, "max_rows": max_rows})
    return clf.eval(), tok


def subsample(rows: Sequence[Any], n: int | None, seed: int = 0) -> list[Any]:
    """``n`` rows drawn at random (fixed seed; corpora are often stored sorted by label), all when
    ``n`` is None or at least the number of rows."""
    import random

    rows = list(rows)
    if n is None or n >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def task_batches(tokenizer: Any, rows: dict[str, Sequence[tuple[str, int]]], batch_size: int, max_length: int = 64, seed: int | None = None,
                 sort: bool = False) -> list[tuple[str, Batch]]:
    """(task, batch) pairs: each batch holds one task's rows."""
    return [(t, b) for t, r in rows.items() for b in make_batches(tokenizer, r, batch_size, max_length, sort=sort, seed=seed)]


@torch.inference_mode()
def sentences_per_s(model: nn.Module, batches: Sequence[Batch], warmup: int = 0) -> float:
    """Classification throughput of one timed pass over ``batches`` (after ``warmup`` untimed batches)."""
    import time

    for b in batches[:warmup]:
        model(b.input_ids, b.attention_mask)
    t0 = time.perf_counter()
    for b in batches:
        model(b.input_ids, b.attention_mask)
    return sum(len(b.labels) for b in batches) / (time.perf_counter() - t0)
