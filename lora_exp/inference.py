"""Reload a finished run for inference: rebuild the model as training did, load the saved weights, merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from lora_exp import adapter, lora
from lora_exp.errors import LoraExpError


def load_trained(run_dir: Path, merge: bool = True) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and eval-mode model of a finished run (LoRA merged: no extra latency)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lora_exp.train import build_model

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise LoraExpError(f"run dir {str(run_dir)!r} has no config.yaml (not a lora-exp run dir)")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.pop("derived", None)
    if cfg.method.name == "full":
        if not (run_dir / "model").is_dir():
            raise LoraExpError(f"run dir {str(run_dir)!r} has no saved model/ (trained with save_weights=false?)")
        tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
        model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model", dtype=torch.float32)
    else:
        meta, tensors = adapter.read_adapter(run_dir / "adapter")
        if meta.get("num_labels") != cfg.data.num_labels:
            raise LoraExpError(
                f"adapter num_labels={meta.get('num_labels')} but the run's data.num_labels={cfg.data.num_labels}"
            )
        tokenizer, model, _, _ = build_model(cfg, {int(k): v for k, v in (meta.get("id2label") or {}).items()})
        adapter.load_into(model, tensors, str(run_dir / "adapter"))
        if merge:
            lora.merge(model)
    return tokenizer, model.eval()
