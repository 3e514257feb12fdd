"""Injection: target names -> module paths (aliases per architecture, exact names, dotted suffixes or
``re:<regex>``), replacing each target with a LoRA layer, and merge / unmerge over a model."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_exp.adapters.adalora import AdaLoraLinear
from lora_exp.adapters.choices import VARIANTS
from lora_exp.adapters.dora import DoRALinear
from lora_exp.adapters.inits import init_lora
from lora_exp.adapters.layer import LoRALinear
from lora_exp.adapters.lora_fa import LoRAFALinear
from lora_exp.adapters.vera import VeraLinear
from lora_exp.errors import LoraExpError
from lora_exp.quantize import dequantize, dequantize_model, is_quantized

LAYER_CLASSES = {cls.variant: cls for cls in (LoRALinear, DoRALinear, LoRAFALinear, VeraLinear, AdaLoraLinear)}

# Friendly target aliases, as full-match regexes over ``named_modules()`` paths, per ``config.model_type``.
# Regexes (not suffixes) because BERT's FFN output ``layer.N.output.dense`` is a suffix of the attention
# output ``layer.N.attention.output.dense``. Checked against transformers' own module names (tests build
# each family from a tiny config). The classification head is never an alias: it trains in full.
_BERT = {
    "q": [r".*\.layer\.\d+\.attention\.self\.query"],
    "k": [r".*\.layer\.\d+\.attention\.self\.key"],
    "v": [r".*\.layer\.\d+\.attention\.self\.value"],
    "o": [r".*\.layer\.\d+\.attention\.output\.dense"],
    "ffn": [r".*\.layer\.\d+\.intermediate\.dense", r".*\.layer\.\d+\.output\.dense"],
}


_DEBERTA = {
    **_BERT,
    "q": [r".*\.layer\.\d+\.attention\.self\.query_proj"],
    "k": [r".*\.layer\.\d+\.attention\.self\.key_proj"],
    "v": [r".*\.layer\.\d+\.attention\.self\.value_proj"],
}


_LLAMA = {
    **{a: [rf".*\.layers\.\d+\.self_attn\.{a}_proj"] for a in ("q", "k", "v", "o")},
    "ffn": [rf".*\.layers\.\d+\.mlp\.{m}_proj" for m in ("gate", "up", "down")],
}


_GPT2 = {
    "qkv": [r".*\.h\.\d+\.attn\.c_attn"],
    "o": [r".*\.h\.\d+\.attn\.c_proj"],
    "ffn": [r".*\.h\.\d+\.mlp\.c_fc", r".*\.h\.\d+\.mlp\.c_proj"],
}


_MODERNBERT = {
    "qkv": [r".*\.layers\.\d+\.attn\.Wqkv"],
    "o": [r".*\.layers\.\d+\.attn\.Wo"],
    "ffn": [r".*\.layers\.\d+\.mlp\.Wi", r".*\.layers\.\d+\.mlp\.Wo"],
}


ALIASES: dict[str, dict[str, list[str]]] = {
    "distilbert": {
        "q": [r".*\.attention\.q_lin"],
        "k": [r".*\.attention\.k_lin"],
        "v": [r".*\.attention\.v_lin"],
        "o": [r".*\.attention\.out_lin"],
        "ffn": [r".*\.ffn\.lin1", r".*\.ffn\.lin2"],
    },
    "bert": {**_BERT, "head": [r"bert\.pooler\.dense"]},  # the pooler is pretrained (part of the base)
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "deberta-v2": _DEBERTA,
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    "gpt2": _GPT2,
    "modernbert": _MODERNBERT,
    "whisper": {  # the encoder's layers (WhisperForAudioClassification, or a seq2seq model's encoder)
        "q": [r"(.*\.)?encoder\.layers\.\d+\.self_attn\.q_proj"],
        "k": [r"(.*\.)?encoder\.layers\.\d+\.self_attn\.k_proj"],
        "v": [r"(.*\.)?encoder\.layers\.\d+\.self_attn\.v_proj"],
        "o": [r"(.*\.)?encoder\.layers\.\d+\.self_attn\.out_proj"],
        "ffn": [r"(.*\.)?encoder\.layers\.\d+\.fc1", r"(.*\.)?encoder\.layers\.\d+\.fc2"],
    },
}


ALIAS_NAMES = ("q", "k", "v", "qkv", "o", "ffn", "head")


# Families whose attention computes q, k and v in one fused layer: q/k/v alone cannot be adapted.
FUSED_QKV = {"gpt2": "attn.c_attn", "modernbert": "attn.Wqkv"}


ADAPTABLE = (nn.Linear, Conv1D)


def is_under(name: str, paths: Sequence[str]) -> bool:
    """Whether parameter/module ``name`` is one of ``paths`` or lies inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in paths)


def target_patterns(model_type: str, targets: Sequence[str]) -> list[tuple[str, str]]:
    """Map each target to full-match regexes: an alias, ``re:<regex>``, or an exact name / dotted suffix."""
    out = []
    for t in targets:
        if t in ALIAS_NAMES:
            out += [(t, p) for p in _alias(model_type, t)]
        elif t.startswith("re:"):
            out.append((t, t[3:]))
        else:
            out.append((t, rf"(.*\.)?{re.escape(t)}"))
    return out


def _alias(model_type: str, alias: str) -> list[str]:
    """The regexes of one alias for ``model_type``; a one-line error where it does not exist."""
    if alias in ("q", "k", "v") and model_type in FUSED_QKV:
        raise LoraExpError(
            f"lora.targets: '{alias}' does not exist for model_type '{model_type}': its attention projects q, k "
            f"and v in one fused layer ({FUSED_QKV[model_type]}); use 'qkv'"
        )
    table = ALIASES.get(model_type)
    if table is None:
        raise LoraExpError(
            f"lora.targets: alias '{alias}' is not defined for model_type '{model_type}' "
            f"(aliases exist for {sorted(ALIASES)}); give module-name suffixes or 're:<regex>'"
        )
    if alias not in table:
        why = " (its classification head trains in full and is never a target)" if alias == "head" else ""
        raise LoraExpError(
            f"lora.targets: alias '{alias}' is not defined for model_type '{model_type}'{why}; "
            f"its aliases: {' '.join(sorted(table))}"
        )
    return table[alias]


def resolve_targets(model: nn.Module, targets: Sequence[str], protected: Sequence[str] = ()) -> list[str]:
    """Module paths that ``targets`` select; an error if a target matches nothing or a non-Linear.

    ``protected`` are module paths that must never be adapted (the trained classification head).
    """
    if not targets:
        raise LoraExpError("lora.targets is empty; give aliases (q k v qkv o ffn head) or module names")
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for target, pattern in target_patterns(model_type, targets):
        hits = [n for n in modules if n and re.fullmatch(pattern, n)]
        if not hits:
            raise LoraExpError(f"lora.targets: '{target}' matches no module of this {model_type or 'model'}")
        for name in hits:
            if is_under(name, protected):
                raise LoraExpError(
                    f"lora.targets: '{target}' matches '{name}', part of the classification head (newly "
                    "initialised, trained in full); target pretrained layers"
                )

            if not isinstance(modules[name], (*ADAPTABLE, LoRALinear)):
                kind = type(modules[name]).__name__
                raise LoraExpError(
                    f"lora.targets: '{target}' matches '{name}', a {kind}, not an nn.Linear or transformers Conv1D"
                )
            if name not in chosen:
                chosen.append(name)
    return chosen


def inject(
    model: nn.Module,
    targets: Sequence[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
    protected: Sequence[str] = (),
    *,
    variant: str = "lora",
    init: str = "default",
    layers: Sequence[int] | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Replace each targeted ``nn.Linear`` / ``Conv1D`` with a ``LoRALinear``; returns the replaced module paths.

    ``variant`` (``LAYER_CLASSES``), ``init`` (default | gaussian | pissa | olora), ``layers`` (block indices),
    ``rank_pattern`` / ``alpha_pattern`` (per-module r / alpha, PEFT's matching), ``options`` (the variant's own
    keyword arguments, e.g. VeRA's ``d_initial``): see ``lora_exp.adapters``.
    """
    names = select_layers(resolve_targets(model, targets, protected), layers)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if isinstance(base, LoRALinear):
            raise LoraExpError(f"inject(): '{name}' already carries a LoRA adapter")
        r_i = pattern_value(rank_pattern, name, r)
        alpha_i = pattern_value(alpha_pattern, name, alpha)
        setattr(parent, child, make_layer(base, r_i, alpha_i, dropout, rslora, variant, init, options))
    LAYER_CLASSES[variant].after_injection([model.get_submodule(n) for n in names])  # VeRA: shared projections
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every ``(path, LoRALinear)`` in the model."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def merge(model: nn.Module) -> int:
    """Merge every LoRA layer; returns how many were merged."""
    layers = list(lora_layers(model))
    for _, layer in layers:
        layer.merge()
    return len(layers)


def merge_and_unload(model: nn.Module) -> int:
    """Merge every LoRA layer and put its wrapped module back in its place (PEFT's name): the model is then the
    base model's own structure, so inference pays nothing for the adapter. Returns how many were unloaded.

    A quantised base (bitsandbytes layers) is dequantised first, every block Linear, into an fp32 copy: the merged
    model is the 32-bit model whose W0 is the quantised one's (re-quantising W0 + dW would round the update away).
    """
    layers = list(lora_layers(model))
    for _, layer in layers:
        if is_quantized(layer.base_layer):
            layer.base_layer = dequantize(layer.base_layer)
    dequantize_model(model)  # the layers without an adapter: the same plain fp32 Linear
    for name, layer in layers:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
    return len(layers)


def unmerge(model: nn.Module) -> int:
    """Unmerge every LoRA layer; returns how many were unmerged."""
    layers = list(lora_layers(model))
    for _, layer in layers:
        layer.unmerge()
    return len(layers)


def pattern_value(patterns: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching ``(.*\\.)?(key)$`` wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer-block index in a module path (``...layer.3.attention...`` -> 3), or None."""
    m = _LAYER_INDEX.search(name + ".")
    return int(m.group(1)) if m else None


def select_layers(names: list[str], layers: list[int] | None) -> list[str]:
    """Keep the module paths whose block index is in ``layers`` (PEFT's ``layers_to_transform``)."""
    if layers is None:
        return names
    kept = [n for n in names if layer_index(n) in set(layers)]
    if not kept:
        found = sorted({i for n in names if (i := layer_index(n)) is not None})
        raise LoraExpError(f"lora.layers={list(layers)} selects none of the targeted modules (layer indices {found})")
    return kept


def make_layer(
    base: nn.Module,
    r: int,
    alpha: float,
    dropout: float,
    rslora: bool,
    variant: str = "lora",
    init: str = "default",
    options: Mapping[str, Any] | None = None,
) -> LoRALinear:
    """The ``variant``'s layer class (``LAYER_CLASSES``) around ``base``, initialised with ``init``."""
    if variant not in VARIANTS:
        raise LoraExpError(f"lora.variant={variant!r} is not one of {', '.join(VARIANTS)}")
    layer = LAYER_CLASSES[variant](base, r, alpha, dropout, rslora, **(options or {}))
    if init != "default":
        init_lora(layer, init)
    layer.init = init  # read back by save_adapter / export_peft
    return layer
