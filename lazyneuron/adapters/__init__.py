"""Architecture knowledge as data: roles -> module paths, per model family.

A :class:`ModelAdapter` names where the transformer blocks live and, inside one block, which
submodules play each role (``attn``, ``attn_in``, ``attn_out``, ``mlp``, ``mlp_in``,
``mlp_out``), plus model-level roles (``final_norm``, ``head``, ``embed``). Each entry is a tuple
of candidate relative paths; the ones that exist in the model are used (so Phi-3's fused
``qkv_proj`` and Llama's separate ``q_proj``/``k_proj``/``v_proj`` share one table).
Unknown models fall back to :func:`discover`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from torch import nn

from ..errors import UnsupportedModelError

BLOCK_ROLES = ("attn", "attn_in", "attn_out", "cross_attn", "cross_attn_in", "cross_attn_out", "mlp", "mlp_in", "mlp_out",
               "router", "experts")  # router / experts: native MoE blocks; cross_attn*: encoder-decoder (Whisper) decoders
MODEL_ROLES = ("final_norm", "head", "embed")
# encoder-decoder models (Whisper): the layer list is the decoder's; the encoder's blocks and front end
# are roles of their own, listed as absolute paths
ENCODER_ROLES = ("front_end", "enc_layer", "enc_attn", "enc_attn_in", "enc_attn_out", "enc_mlp_in", "enc_mlp_out")
ROLE_ORDER = ("layer",) + BLOCK_ROLES + ENCODER_ROLES + MODEL_ROLES


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...]  # candidate paths of the ModuleList of blocks
    block: dict[str, tuple[str, ...]]  # role -> candidate paths relative to one block
    model: dict[str, tuple[str, ...]]  # role -> candidate paths relative to the root
    causal_lm: bool
    encoder_layers: tuple[str, ...] = ()  # encoder-decoder models: candidate paths of the encoder's blocks
    encoder_block: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # role -> paths in one encoder block
    front_end: tuple[str, ...] = ()  # modules before the encoder's blocks (Whisper's convolutions)


_LLAMA = Family(
    "llama",
    ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3", "olmo", "olmo2",
     "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"),
    ("model.layers", "layers", "model.language_model.layers"),
    {
        "attn": ("self_attn",),
        "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj"),
        "attn_out": ("self_attn.o_proj",),
        "mlp": ("mlp",),
        "mlp_in": ("mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj"),
        "mlp_out": ("mlp.down_proj",),
        "router": ("mlp.gate",),  # native MoE (Mixtral, Qwen2/3-MoE, OLMoE): the top-k router and the experts
        "experts": ("mlp.experts",),
    },
    {"final_norm": ("model.norm", "norm"), "head": ("lm_head",), "embed": ("model.embed_tokens", "embed_tokens")},
    True,
)
_BERT = Family(
    "bert",
    ("bert", "roberta", "xlm-roberta", "electra", "camembert"),
    ("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer", "electra.encoder.layer"),
    {
        "attn": ("attention",),
        "attn_in": ("attention.self.query", "attention.self.key", "attention.self.value"),
        "attn_out": ("attention.output.dense",),
        "mlp": (),  # BERT's FFN is two sibling modules (intermediate, output) with the residual inside
        "mlp_in": ("intermediate.dense",),
        "mlp_out": ("output.dense",),
    },
    {"final_norm": (), "head": ("classifier", "cls"), "embed": ("embeddings", "bert.embeddings")},
    False,
)
_GPT2 = Family(
    "gpt2",
    ("gpt2",),
    ("transformer.h", "h"),
    {
        "attn": ("attn",),
        "attn_in": ("attn.c_attn",),
        "attn_out": ("attn.c_proj",),
        "mlp": ("mlp",),
        "mlp_in": ("mlp.c_fc",),
        "mlp_out": ("mlp.c_proj",),
    },
    {"final_norm": ("transformer.ln_f", "ln_f"), "head": ("lm_head",), "embed": ("transformer.wte", "wte")},
    True,
)
_WHISPER = Family(
    "whisper",
    ("whisper",),
    ("model.decoder.layers",),
    {
        "attn": ("self_attn",),
        "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attn_out": ("self_attn.out_proj",),
        "cross_attn": ("encoder_attn",),
        "cross_attn_in": ("encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj"),
        "cross_attn_out": ("encoder_attn.out_proj",),
        "mlp": (),  # fc1 / fc2 are siblings in the block (pre-LN, residual in the block)
        "mlp_in": ("fc1",),
        "mlp_out": ("fc2",),
    },
    {"final_norm": ("model.decoder.layer_norm",), "head": ("proj_out",), "embed": ("model.decoder.embed_tokens",)},
    False,  # a speech decoder: the language-model tools (perplexity, early exit) do not apply
    encoder_layers=("model.encoder.layers",),
    encoder_block={
        "enc_attn": ("self_attn",),
        "enc_attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "enc_attn_out": ("self_attn.out_proj",),
        "enc_mlp_in": ("fc1",),
        "enc_mlp_out": ("fc2",),
    },
    front_end=("model.encoder.conv1", "model.encoder.conv2"),
)
FAMILIES: tuple[Family, ...] = (_LLAMA, _BERT, _GPT2, _WHISPER)


def is_linear(m: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (a linear with a transposed weight)."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def linear_dims(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    w = m.weight  # Conv1D stores (in, out)
    return int(w.shape[0]), int(w.shape[1])


@dataclasses.dataclass
class ModelAdapter:
    """Roles of one concrete model, resolved to paths."""

    family: str
    model_type: str
    layers_path: str
    num_layers: int
    block_roles: dict[str, tuple[str, ...]]  # role -> relative paths present in block 0
    model_roles: dict[str, str]
    causal_lm: bool
    discovered: bool = False
    encoder_roles: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # role -> absolute paths (encoder-decoder)
    encoder_layers_path: str = ""

    @property
    def encoder_decoder(self) -> bool:
        return bool(self.encoder_layers_path)

    def layer_path(self, i: int) -> str:
        return f"{self.layers_path}.{i}"

    def paths(self, role: str) -> list[str]:
        """Absolute module paths of ``role`` across all layers (or the model-level path)."""
        if role == "layer":
            return [self.layer_path(i) for i in range(self.num_layers)]
        if role in self.encoder_roles:
            return list(self.encoder_roles[role])
        if role in self.model_roles:
            return [self.model_roles[role]]
        rel = self.block_roles.get(role, ())
        return [f"{self.layer_path(i)}.{r}" for i in range(self.num_layers) for r in rel]

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _exists(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _from_family(model: nn.Module, fam: Family, model_type: str) -> ModelAdapter | None:
    layers_path = next((p for p in fam.layers if _exists(model, p)), None)
    if layers_path is None:
        return None
    layers = model.get_submodule(layers_path)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    block = layers[0]
    roles = {r: tuple(p for p in cands if _exists(block, p)) for r, cands in fam.block.items()}
    if not any(roles.get(r) for r in ("attn_in", "mlp_in")):
        return None
    mroles = {}
    for r, cands in fam.model.items():
        p = next((c for c in cands if _exists(model, c)), None)
        if p is not None:
            mroles[r] = p
    enc_roles: dict[str, tuple[str, ...]] = {}
    enc_path = next((p for p in fam.encoder_layers if _exists(model, p)), "")
    if enc_path:
        enc = model.get_submodule(enc_path)
        enc_roles["front_end"] = tuple(p for p in fam.front_end if _exists(model, p))
        enc_roles["enc_layer"] = tuple(f"{enc_path}.{i}" for i in range(len(enc)))
        for r, cands in fam.encoder_block.items():
            rel = [c for c in cands if _exists(enc[0], c)]
            enc_roles[r] = tuple(f"{enc_path}.{i}.{c}" for i in range(len(enc)) for c in rel)
    return ModelAdapter(fam.name, model_type, layers_path, len(layers), roles, mroles, fam.causal_lm and "head" in mroles,
                        encoder_roles=enc_roles, encoder_layers_path=enc_path)


def model_type_of(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", type(model).__name__))


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Resolve the roles of ``model``: by ``config.model_type`` first, then generic discovery."""
    mt = model_type_of(model)
    tried = []
    for fam in FAMILIES:
        if mt in fam.model_types:
            ad = _from_family(model, fam, mt)
            if ad is not None:
                break
            tried.append(f"family {fam.name!r} (no {' / '.join(fam.layers)} with role modules)")
    else:
        ad = None
    if ad is None:
        ad, why = discover(model)
        if ad is None:
            known = sorted(t for f in FAMILIES for t in f.model_types)
            tried.append(f"generic discovery ({why})")
            raise UnsupportedModelError(
                f"cannot map model_type {mt!r} ({type(model).__name__}) onto roles. Tried: {'; '.join(tried)}. "
                f"Supported model types: {known}. Fix: pass a model whose transformer blocks sit in an nn.ModuleList "
                f"of identical blocks with nn.Linear / Conv1D projections, or add a Family to lazyneuron.adapters.FAMILIES."
            )
    return ad


def discover(model: nn.Module) -> tuple[ModelAdapter | None, str]:
    """Generic fallback: the largest ``ModuleList`` of identical blocks; linears classified by shape."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1:
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        return None, "found no nn.ModuleList of 2 or more identical blocks"
    path, layers = best
    block = layers[0]
    lins = [(n, c) for n, c in block.named_modules() if n and is_linear(c)]
    if not lins:
        return None, f"blocks at {path!r} ({type(block).__name__}) hold no nn.Linear / Conv1D"
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if d is None:
        d = Counter(linear_dims(c)[0] for _, c in lins).most_common(1)[0][0]
    roles: dict[str, list[str]] = {r: [] for r in BLOCK_ROLES}
    for n, c in lins:
        i, o = linear_dims(c)
        low = n.lower()
        attn_hint = any(k in low for k in ("attn", "attention", "self", "mixer"))
        mlp_hint = any(k in low for k in ("mlp", "ffn", "feed", "fc", "intermediate", "ff"))
        if i == d and o > 3 * d or (mlp_hint and not attn_hint and i == d):
            roles["mlp_in"].append(n)
        elif o == d and i > 3 * d or (mlp_hint and not attn_hint and o == d):
            roles["mlp_out"].append(n)
        elif i == d and o == d and any(k in low.rsplit(".", 1)[-1] for k in ("o", "out", "dense", "proj")) and not any(
            k in low.rsplit(".", 1)[-1] for k in ("q", "k", "v", "qkv", "query", "key", "value")
        ):
            roles["attn_out"].append(n)
        elif i == d:
            roles["attn_in"].append(n)
        elif o == d:
            roles["attn_out"].append(n)
    for r, names in (("attn", roles["attn_in"]), ("mlp", roles["mlp_in"])):
        parents = {n.rpartition(".")[0] for n in names if "." in n}
        if len(parents) == 1:
            roles[r].append(parents.pop())
    if not roles["attn_in"] and not roles["mlp_in"]:
        return None, f"no linear in {type(block).__name__} reads the hidden size {d}"
    head = next((n for n in ("lm_head", "head", "classifier") if _exists(model, n)), None)
    mroles = {"head": head} if head else {}
    ad = ModelAdapter("generic", model_type_of(model), path, len(layers), {k: tuple(v) for k, v in roles.items()}, mroles, False, True)
    return ad, ""
