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

from lora_exp.adapters import adalora, vera
from lora_exp.adapters.choices import INITS
from lora_exp.adapters.params import bias_parameters, is_adapter_param, layers_meta
from lora_exp.adapters.store import check_tensors
from lora_exp.adapters.targets import inject, is_under, lora_layers
from lora_exp.errors import LoraExpError

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_TYPES = ("LORA", "VERA", "ADALORA")
VERA_KEYS = tuple(f"base_model.{n}" for n in vera.PROJECTIONS)


def export_peft(model: nn.Module, folder: Path, meta: dict[str, Any]) -> Path:
    """Write the model's LoRA layers + trained head as a PEFT adapter (SEQ_CLS) into ``folder``: a LoRA one
    (``peft_type`` LORA; DoRA, LoRA-FA and the inits are LoRA adapters to PEFT) or a VeRA one (VERA)."""
    layers = dict(lora_layers(model))
    if not layers:
        raise LoraExpError("export_peft(): the model has no LoRA layers")
    if any(m.merged for m in layers.values()):
        raise LoraExpError("export_peft(): unmerge() the LoRA layers first")
    first = next(iter(layers.values()))
    if any(m.rslora != first.rslora for m in layers.values()):
        raise LoraExpError("export_peft(): layers mix rslora on and off; PEFT has one use_rslora per adapter")
    fan_in_fan_out = {m.fan_in_fan_out for m in layers.values()}
    if len(fan_in_fan_out) > 1:
        raise LoraExpError(
            "export_peft(): the adapter mixes transformers Conv1D layers (fan_in_fan_out) with nn.Linear ones; "
            "PEFT takes one fan_in_fan_out per adapter"
        )
    head = list(meta.get("head_modules", []))
    vmeta = layers_meta(layers)
    biases = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")]
    state = {}
    for name, p in model.named_parameters():
        trained_head = p.requires_grad and is_under(name, head)
        if is_adapter_param(name) or trained_head or name in biases:
            state[PREFIX + name] = p.detach().cpu().contiguous()
    bias = _bias_mode(layers, biases, head)
    config = {
        "task_type": "SEQ_CLS",
        "target_modules": sorted(layers),
        "modules_to_save": head,
        "fan_in_fan_out": fan_in_fan_out.pop(),  # GPT-2's Conv1D stores weights in x out
        "inference_mode": True,
        "base_model_name_or_path": str(meta.get("base_model", "")),
    }
    if vmeta["variant"] == "vera":
        config |= {**vera.peft_config(layers, meta), "bias": "vera_only" if bias == "lora_only" else bias}
        state |= vera.projection_tensors(layers)
    elif vmeta["variant"] == "adalora":  # PEFT's keys carry no ".weight"; pruned triplets are cut out
        config |= {**adalora.peft_config(layers, meta), "bias": bias}
        state = {k: v for k, v in state.items() if not is_adapter_param(k)} | adalora.peft_tensors(layers, PREFIX)
    else:
        ranks, alphas = _as_plain_lora(layers, state)  # LoRA-GA: [A | A0], [B | -B0] at rank 2r (PEFT's conversion)
        r0, a0 = ranks[next(iter(layers))], alphas[next(iter(layers))]
        config |= {
            "peft_type": "LORA",
            "r": r0,
            "lora_alpha": a0,
            "use_rslora": first.rslora,
            "lora_dropout": float(meta.get("dropout", 0.0)),
            "bias": bias,
            "init_lora_weights": {"default": True, "lora_ga": True, "eva": True}.get(vmeta["init"], vmeta["init"]),
            "use_dora": vmeta["variant"] == "dora",
            "rank_pattern": {n: r for n, r in ranks.items() if r != r0},
            "alpha_pattern": {n: a for n, a in alphas.items() if a != a0},
        }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _as_plain_lora(layers: dict, state: dict[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-layer r and alpha of the exported LoRA; a layer whose init rewrote W0 from data (LoRA-GA: it keeps
    ``initial_factors`` (A0, B0)) is rewritten in ``state`` as the plain LoRA update ``s (B A - B0 A0)`` on the
    pristine W0: A' = [A; A0], B' = [B, -B0], r' = 2r and alpha' keeping the scaling (x2, x sqrt 2 with rsLoRA),
    as PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does."""
    ranks, alphas = {n: m.r for n, m in layers.items()}, {n: m.alpha for n, m in layers.items()}
    for name, m in layers.items():
        if getattr(m, "initial_factors", None) is None:
            continue
        a0, b0 = m.initial_factors
        ka, kb = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
        state[ka] = torch.cat([state[ka], a0.to(state[ka].dtype)], dim=0).contiguous()
        state[kb] = torch.cat([state[kb], -b0.to(state[kb].dtype)], dim=1).contiguous()
        ranks[name], alphas[name] = 2 * m.r, m.alpha * (2**0.5 if m.rslora else 2)
    return ranks, alphas


def _bias_mode(layers: dict, biases: list[str], head: list[str]) -> str:
    """PEFT's ``bias`` for the trained biases outside the head: none, lora_only or all."""
    outside = [n for n in biases if not any(n.startswith(h + ".") for h in head)]
    if not outside:
        return "none"
    return "lora_only" if all(n.removesuffix(".base_layer.bias") in layers for n in outside) else "all"


def import_peft(model: nn.Module, folder: Path, head: list[str]) -> list[str]:
    """Inject LoRA as a PEFT adapter describes and load its weights (strictly); returns the adapted paths."""
    folder = Path(folder)
    for f in (CONFIG, WEIGHTS):
        if not (folder / f).is_file():
            raise LoraExpError(f"peft adapter {str(folder)!r}: {f} is missing")
    config = json.loads((folder / CONFIG).read_text())
    if config.get("peft_type") not in PEFT_TYPES:
        raise LoraExpError(
            f"peft adapter {str(folder)!r}: peft_type={config.get('peft_type')!r}, supported {', '.join(PEFT_TYPES)}"
        )
    adapted = _inject_from_config(model, config, folder)
    tensors = load_file(str(folder / WEIGHTS))
    projections = {k.removeprefix("base_model."): tensors.pop(k) for k in VERA_KEYS if k in tensors}
    if projections:  # VeRA saved with save_projection=true; else the PRNG key redrew the same pair
        vera.load_projections(dict(lora_layers(model)), projections, f"peft adapter {str(folder)!r}")
    tensors = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    loaded: set[str] = set()
    if config["peft_type"] == "ADALORA":  # A, E, B into the full-rank layers, pruned triplets masked
        layers = {n: m for n, m in lora_layers(model) if isinstance(m, adalora.AdaLoraLinear)}
        adalora.load_peft(layers, tensors, config.get("rank_pattern"))
        loaded = {n for n, _ in model.named_parameters() if is_adapter_param(n)}
    tensors = {
        k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v for k, v in tensors.items()
    }
    # PEFT's bias="all" also saves the head's biases as <head>.modules_to_save.bias and the frozen originals.
    tensors = {k.replace(".modules_to_save.", "."): v for k, v in tensors.items() if ".original_module." not in k}
    params = dict(model.named_parameters())
    expected = {n for n in params if is_adapter_param(n)} - loaded
    bias = {"vera_only": "lora_only"}.get(config.get("bias", "none"), config.get("bias", "none"))
    if bias != "none":
        expected |= set(bias_parameters(model, bias, adapted))
    saved_head = list(config.get("modules_to_save") or [])
    expected |= {n for n in params if is_under(n, saved_head)}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:  # PEFT itself loads non-strictly; a silent partial load is how heads get lost
        raise LoraExpError(f"peft adapter {str(folder)!r}: missing {missing[:3]} unexpected {unexpected[:3]}")
    check_tensors(params, tensors, f"peft adapter {str(folder)!r}")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    missing_head = [h for h in head if h not in saved_head]
    if missing_head:
        raise LoraExpError(
            f"peft adapter {str(folder)!r} saves no weights for the head {missing_head} "
            "(modules_to_save); its predictions would come from a random head"
        )
    return adapted


def _inject_from_config(model: nn.Module, config: dict[str, Any], folder: Path) -> list[str]:
    """Inject the layers a PEFT ``adapter_config.json`` describes (LoRA / DoRA, or VeRA)."""
    lt = config.get("layers_to_transform")
    targets = config["target_modules"]
    targets = [f"re:{targets}"] if isinstance(targets, str) else list(targets)  # PEFT: a string is a full-match regex
    common = {"layers": [lt] if isinstance(lt, int) else lt}
    if config["peft_type"] == "VERA":
        options = {"d_initial": float(config.get("d_initial", 0.1)), "prng_key": int(config["projection_prng_key"])}
        dropout = float(config.get("vera_dropout", 0.0))
        return inject(model, targets, int(config["r"]), 1.0, dropout, variant="vera", options=options, **common)
    if config["peft_type"] == "ADALORA":
        r, alpha, dropout = int(config["init_r"]), float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0))
        return inject(model, targets, r, alpha, dropout, variant="adalora", **common)
    init = config.get("init_lora_weights", True)
    init = "default" if init in (True, False) else str(init)  # the trained tensors replace A and B anyway
    if init not in INITS:
        raise LoraExpError(f"peft adapter {str(folder)!r}: init_lora_weights={init!r}, supported {INITS}")
    if init == "lora_ga":  # its W0 was rewritten from gradients the adapter does not hold
        raise LoraExpError(
            f"peft adapter {str(folder)!r}: init_lora_weights='lora_ga' needs the residual base it was trained on; "
            "save it with save_pretrained(..., path_initial_model_for_weight_conversion=...) (a plain LoRA adapter)"
        )
    return inject(
        model,
        targets,
        int(config["r"]),
        float(config["lora_alpha"]),
        float(config.get("lora_dropout", 0.0)),
        bool(config.get("use_rslora", False)),
        variant="dora" if config.get("use_dora") else "lora",
        init=init,
        rank_pattern=config.get("rank_pattern") or {},
        alpha_pattern=config.get("alpha_pattern") or {},
        **common,
    )
