"""Export our adapters to the PEFT layout and import PEFT LoRA adapters (no peft import needed).

PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` and the trained head under its plain
path (``base_model.model.classifier.weight``: PEFT strips ``modules_to_save.<adapter>`` when saving).
Our ``LoRALinear`` uses PEFT's attribute names, so the mapping is a prefix: the module paths are the HF
model's own ``named_modules()`` paths. ``fan_in_fan_out`` follows the layers (true for GPT-2's ``Conv1D``);
on import it is read from each layer's type, as PEFT itself corrects it per layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_exp import lora
from lora_exp.errors import LoraExpError

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def export_peft(model: nn.Module, folder: Path, meta: dict[str, Any]) -> Path:
    """Write the model's LoRA layers + trained head as a PEFT LoRA adapter (SEQ_CLS) into ``folder``."""
    layers = dict(lora.lora_layers(model))
    if not layers:
        raise LoraExpError("export_peft(): the model has no LoRA layers")
    if any(m.merged for m in layers.values()):
        raise LoraExpError("export_peft(): unmerge() the LoRA layers first")
    first = next(iter(layers.values()))
    if any((m.r, m.alpha, m.rslora) != (first.r, first.alpha, first.rslora) for m in layers.values()):
        raise LoraExpError("export_peft(): layers with different r/alpha need PEFT rank_pattern, not supported")
    fan_in_fan_out = {m.fan_in_fan_out for m in layers.values()}
    if len(fan_in_fan_out) > 1:
        raise LoraExpError(
            "export_peft(): the adapter mixes transformers Conv1D layers (fan_in_fan_out) with nn.Linear ones; "
            "PEFT takes one fan_in_fan_out per adapter"
        )
    head = list(meta.get("head_modules", []))
    state = {}
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name or p.requires_grad and lora.is_under(name, head):
            state[PREFIX + name] = p.detach().cpu().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "r": first.r,
        "lora_alpha": first.alpha,
        "use_rslora": first.rslora,
        "lora_dropout": float(meta.get("dropout", 0.0)),
        "target_modules": sorted(layers),
        "modules_to_save": head,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out.pop(),  # GPT-2's Conv1D stores weights in x out
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": str(meta.get("base_model", "")),
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def import_peft(model: nn.Module, folder: Path, head: list[str]) -> list[str]:
    """Inject LoRA as a PEFT adapter describes and load its weights (strictly); returns the adapted paths."""
    folder = Path(folder)
    for f in (CONFIG, WEIGHTS):
        if not (folder / f).is_file():
            raise LoraExpError(f"peft adapter {str(folder)!r}: {f} is missing")
    config = json.loads((folder / CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise LoraExpError(f"peft adapter {str(folder)!r}: peft_type={config.get('peft_type')!r}, only LORA")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LoraExpError(f"peft adapter {str(folder)!r}: rank_pattern/alpha_pattern are not supported")
    targets = config["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    if isinstance(config["target_modules"], str):  # PEFT: a string is a full-match regex
        targets = [f"re:{config['target_modules']}"]
    adapted = lora.inject(
        model,
        targets,
        int(config["r"]),
        float(config["lora_alpha"]),
        float(config.get("lora_dropout", 0.0)),
        bool(config.get("use_rslora", False)),
    )
    tensors = {k.removeprefix(PREFIX): v for k, v in load_file(str(folder / WEIGHTS)).items()}
    tensors = {
        k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v for k, v in tensors.items()
    }
    params = dict(model.named_parameters())
    expected = {n for n in params if ".lora_A." in n or ".lora_B." in n}
    saved_head = list(config.get("modules_to_save") or [])
    expected |= {n for n in params if lora.is_under(n, saved_head)}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:  # PEFT itself loads non-strictly; a silent partial load is how heads get lost
        raise LoraExpError(f"peft adapter {str(folder)!r}: missing {missing[:3]} unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise LoraExpError(
                    f"peft adapter {str(folder)!r}: {name} is {tuple(t.shape)}, "
                    f"the model has {tuple(params[name].shape)}"
                )
            params[name].copy_(t)
    missing_head = [h for h in head if h not in saved_head]
    if missing_head:
        raise LoraExpError(
            f"peft adapter {str(folder)!r} saves no weights for the head {missing_head} "
            "(modules_to_save); its predictions would come from a random head"
        )
    return adapted
