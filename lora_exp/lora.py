"""LoRA written from scratch: a wrapper around a frozen ``nn.Linear``, injection by target names, merge.

``h = W0 x + b0 + scaling * B(A(dropout(x)))`` with ``A: r x k`` Kaiming-uniform(a=sqrt(5)), ``B: d x r``
zeros (so the wrapped model is unchanged at step 0) and ``scaling = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA). Attribute names follow PEFT (``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout``,
``scaling``) so exporting to the PEFT layout is a key rename. GPT-2's ``Conv1D`` (weight stored ``in x
out``) is adapted as PEFT does with ``fan_in_fan_out``: same A and B, the merge adds ``delta.T``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_exp.errors import LoraExpError

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


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (or transformers ``Conv1D``) plus a trainable low-rank update ``scaling * B @ A``.

    ``fan_in_fan_out`` is True for a ``Conv1D`` base, whose weight is stored ``in x out``: A and B are the
    same as for a Linear (``A: r x in``, ``B: out x r``) and ``delta_weight()`` stays ``out x in``; only the
    merge transposes it (PEFT's ``fan_in_fan_out``).
    """

    def __init__(self, base: nn.Linear | Conv1D, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.fan_in_fan_out = isinstance(base, Conv1D)
        k, d = base.weight.shape if self.fan_in_fan_out else (base.in_features, base.out_features)
        if not 1 <= r <= min(d, k):
            raise LoraExpError(f"lora.r={r} must be in [1, min(out, in)={min(d, k)}] for this layer")
        self.base_layer = base.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(k, r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(r, d, bias=False, device=dev, dtype=dt)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.merged = False
        self._pristine: torch.Tensor | None = None
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (as ``nn.Linear`` and PEFT), B zero: the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` (``out x in``) in fp32 (merging in low precision drifts)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _stored_delta(self) -> torch.Tensor:
        """The update in the base weight's own layout (``in x out`` for a ``Conv1D``)."""
        delta = self.delta_weight()
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``W0`` so inference runs the plain ``nn.Linear`` / ``Conv1D`` path."""
        if self.merged:
            raise LoraExpError("merge(): this LoRA layer is already merged; call unmerge() first")
        w = self.base_layer.weight
        merged = w.float() + self._stored_delta()
        if not torch.isfinite(merged).all():
            raise LoraExpError("merge(): the merged weight is not finite; the adapter is broken")
        if w.dtype != torch.float32:  # subtracting again in bf16/fp16 would not restore W0 exactly
            self._pristine = w.detach().clone()
        w.copy_(merged.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore ``W0`` (exactly for low precision, to float tolerance for fp32)."""
        if not self.merged:
            raise LoraExpError("unmerge(): this LoRA layer is not merged")
        w = self.base_layer.weight
        if self._pristine is not None:
            w.copy_(self._pristine)
            self._pristine = None
        else:
            w.sub_(self._stored_delta().to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        fifo = ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}{fifo}"


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
) -> list[str]:
    """Replace each targeted ``nn.Linear`` / ``Conv1D`` with a ``LoRALinear``; returns the replaced module paths.

    ``variant`` (lora | dora), ``init`` (default | gaussian | pissa | olora), ``layers`` (block indices),
    ``rank_pattern`` / ``alpha_pattern`` (per-module r / alpha, PEFT's matching): see ``lora_exp.variants``.
    """
    from lora_exp import variants  # variants builds on LoRALinear

    names = variants.select_layers(resolve_targets(model, targets, protected), layers)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if isinstance(base, LoRALinear):
            raise LoraExpError(f"inject(): '{name}' already carries a LoRA adapter")
        r_i = variants.pattern_value(rank_pattern, name, r)
        alpha_i = variants.pattern_value(alpha_pattern, name, alpha)
        setattr(parent, child, variants.make_layer(base, r_i, alpha_i, dropout, rslora, variant, init))
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


def unmerge(model: nn.Module) -> int:
    """Unmerge every LoRA layer; returns how many were unmerged."""
    layers = list(lora_layers(model))
    for _, layer in layers:
        layer.unmerge()
    return len(layers)
