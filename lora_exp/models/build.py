"""``build_model``: tokenizer / feature extractor, model with the method applied, head, LoRA paths;
deterministic per seed (independent sub-seeds for model, head, LoRA, data order and dropout)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import logging as hf_logging

from lora_exp.errors import LoraExpError
from lora_exp.models import audio, text
from lora_exp.models.heads import init_head
from lora_exp.models.methods import apply_method, base_fingerprint, quantize_base, store_frozen_in
from lora_exp.quantize import is_quant

if TYPE_CHECKING:
    from lora_exp.config.schema import LoraConfig, ModelConfig

hf_logging.set_verbosity_error()  # the load report is replaced by our own line naming the head modules


SUB_SEEDS = ("model", "head", "lora", "data", "dropout")


def sub_seeds(seed: int) -> dict[str, int]:
    """Independent seeds for each random stream, derived from ``trainer.seed`` (recorded in results)."""
    states = np.random.SeedSequence(seed).generate_state(len(SUB_SEEDS))
    return {k: int(s) for k, s in zip(SUB_SEEDS, states)}


def build_model(
    model_cfg: ModelConfig,
    method: str,
    lora_cfg: LoraConfig,
    *,
    num_labels: int,
    max_length: int,
    seed: int,
    id2label: dict[int, str] | None = None,
    problem_type: str | None = None,
    clip_seconds: float | None = None,
    precision: str = "fp32",
) -> tuple[Any, torch.nn.Module, list, list]:
    """Tokenizer, model with the method applied, head and LoRA module paths; deterministic per ``seed``
    (``trainer.seed``). ``model_cfg`` is ``model``, ``method`` is ``method.name``, ``lora_cfg`` is ``lora`` (read
    for ``method=lora`` only), ``num_labels`` and ``max_length`` are ``data``'s; ``problem_type`` (transformers'
    name: ``regression`` gives an MSE loss on one output) is set on the model's config; ``clip_seconds`` is the
    audio clips' length (``data.max_seconds``): a Whisper encoder without ``model.audio_max_seconds`` runs on that
    window.

    The head is re-initialised from its own sub-seed so every method of one seed starts from the same
    head (a paired comparison); LoRA A from another, so adding LoRA does not shift the head's init.
    Frozen parameters are then stored in ``model.base_dtype``; trainable ones stay fp32 (master weights). A
    quantised base (nf4 / fp4 / int8) has its block Linears quantised instead (``quantize_base``), computing in
    ``precision`` (the run's, resolved).
    ``model.base_fingerprint`` is the sha256 of the pristine fp32 base (``base_fingerprint``), taken first.
    """
    seeds = sub_seeds(seed)
    torch.manual_seed(seeds["model"])  # random-init (tiny) models and anything from_pretrained draws
    if model_cfg.task == "audio":
        tokenizer, model, head = audio.build(model_cfg, num_labels, id2label, clip_seconds)
    else:
        tokenizer, model, head = text.build(model_cfg, num_labels, id2label)
    if problem_type is not None:  # the loss transformers' *For*Classification computes (MSE for regression)
        model.config.problem_type = problem_type
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and max_length > max_pos:
        raise LoraExpError(f"data.max_length={max_length} exceeds the model's maximum of {max_pos}")
    model.base_fingerprint = base_fingerprint(model, head)  # before PiSSA / OLoRA rewrite W0 and base_dtype casts
    torch.manual_seed(seeds["head"])
    init_head(model, head)
    torch.manual_seed(seeds["lora"])
    adapted = apply_method(model, method, head, lora_cfg)
    if is_quant(model_cfg.base_dtype):
        quantize_base(model, model_cfg.base_dtype, head, precision, model_cfg.double_quant)
    else:
        store_frozen_in(model, model_cfg.base_dtype)
    return tokenizer, model, head, adapted
