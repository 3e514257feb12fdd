"""Tiny random text models, LoRA config slices and small model utilities shared by the unit tests."""

from __future__ import annotations

import torch

from lora_exp.config.schema import LoraConfig, ModelConfig, typed_config
from lora_exp.models import text as text_models

H, FFN, LAYERS, R = 32, 64, 2, 4  # the tiny text model: hidden size, FFN size, layers; the LoRA rank


def tiny_text(arch: str):
    """``(tokenizer, model, head)`` of a tiny random ``arch`` ("bert" or "distilbert") built by
    ``lora_exp.models.text`` (hidden H, FFN, LAYERS layers, seed 0), as built (train mode)."""
    cfg = typed_config(
        {
            "source": "tiny",
            "arch": arch,
            "hidden_size": H,
            "layers": LAYERS,
            "heads": 2,
            "ffn_size": FFN,
            "name": f"tiny_{arch}",
            "path": None,
            "trust_remote_code": False,
        },
        ModelConfig,
    )
    torch.manual_seed(0)
    return text_models.build(cfg, num_labels=2)


def lora_cfg(*targets: str, r: int = R) -> LoraConfig:
    """A ``lora`` config slice: ``targets`` at rank ``r``, alpha 8, no dropout, no rsLoRA."""
    return LoraConfig(targets=list(targets), r=r, alpha=8.0, dropout=0.0, rslora=False)


def randomise_trainables(model: torch.nn.Module, seed: int = 3, std: float = 0.2) -> None:
    """Draw every trainable parameter from N(0, std) (seeded), so an adapter differs from its zero start."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=std)


def count_calls(monkeypatch, class_name: str) -> dict[str, int]:
    """Count the forward calls of modules whose class is ``class_name`` (``calls["n"]``) for the rest of the test."""
    calls = {"n": 0}
    forward = torch.nn.Module.__call__

    def counting(self, *args, **kwargs):
        if type(self).__name__ == class_name:
            calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__call__", counting)
    return calls
