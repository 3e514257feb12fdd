"""The classification head, found from the model's structure for any architecture.

Every parameter of the task model outside its base model (``getattr(model, base_model_prefix)``), plus every
parameter ``from_pretrained`` reports as newly initialised (a missing pooler inside the base). So a frozen or
LoRA run trains (and saves) the whole head, DistilBERT's ``pre_classifier`` and DeBERTa's ``pooler`` too,
whether the checkpoint already holds head weights or not. Text and audio builders both import it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from lora_exp.adapters.targets import is_under


def find_head(model: nn.Module, new_keys: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The classification head: module paths (or bare parameter names) that train in full with frozen/lora.

    A parameter belongs to the head when it lies outside the base (``getattr(model, base_model_prefix)``) or
    is in ``new_keys`` (newly initialised by ``from_pretrained``); a parameter whose storage is shared with
    a pretrained one is not. The list is minimal: each head parameter is named through its largest
    enclosing module whose parameters are all head (``classifier``, ``pre_classifier``, ``bert.pooler``),
    or by its own name where no such module exists (a bare ``layer_weights``).
    """
    base = base_path(model)
    named = list(model.named_parameters(remove_duplicate=False))
    outside = {n for n, _ in named if base is None or not is_under(n, [base])}
    head = outside | (set(new_keys) & {n for n, _ in named})
    shared = {p.data_ptr() for n, p in named if n not in head}
    head = {n for n, p in named if n in head and p.data_ptr() not in shared}
    mixed = {n.rsplit(".", i)[0] for n in {n for n, _ in named} - head for i in range(1, n.count(".") + 1)}
    out = set()
    for name in head:
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]  # outermost first, the model root excluded
        out.add(next((m for m in prefixes if m not in mixed), name))
    return _ordered(model, out)


def base_path(model: nn.Module) -> str | None:
    """Path of the pretrained base inside the task model: ``base_model_prefix``, else the largest child.

    The fallback covers task models that name their base otherwise (``WhisperForAudioClassification``
    keeps ``encoder`` although its prefix is ``model``).
    """
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module) and base is not model:
        return next((n for n, m in model.named_modules() if m is base and n), None)
    sizes = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_children()}
    return max(sizes, key=sizes.__getitem__) if sizes else None


def _ordered(model: nn.Module, paths: set[str]) -> list[str]:
    """``paths`` in the model's own definition order (parameters first seen)."""
    order = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    first = {p: next(i for i, n in enumerate(order) if is_under(n, [p])) for p in paths}
    return sorted(paths, key=first.__getitem__)


def head_parameters(model: nn.Module, head: list[str]) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every head parameter (deduplicated), modules and bare parameters alike."""
    return [(n, p) for n, p in model.named_parameters() if is_under(n, head)]


@torch.no_grad()
def init_head(model: PreTrainedModel, head: list[str]) -> None:
    """Re-initialise the head with the model's own ``_init_weights`` (from the caller's RNG state).

    transformers 5 marks loaded tensors ``_is_hf_initialized`` and its init functions skip them, so a
    checkpoint that already holds a head would silently keep it: the marks are lifted on the head first,
    and the rest of the model is marked while a bare parameter's owner is initialised, so only the head
    changes.
    """
    params = head_parameters(model, head)
    marks = {n: getattr(p, "_is_hf_initialized", None) for n, p in model.named_parameters()}
    for _, p in params:
        p._is_hf_initialized = False
    modules = dict(model.named_modules())
    bare = [h for h in head if h not in modules]
    for name in head:
        if name in modules:
            modules[name].apply(model._init_weights)
    if bare:
        heads = {n for n, _ in params}
        for n, p in model.named_parameters():
            if n not in heads:
                p._is_hf_initialized = True
        for owner in dict.fromkeys(h.rpartition(".")[0] for h in bare):
            model._init_weights(modules[owner])
    for n, p in model.named_parameters():  # restore the loader's marks
        if marks[n] is None:
            p.__dict__.pop("_is_hf_initialized", None)
        else:
            p._is_hf_initialized = marks[n]
