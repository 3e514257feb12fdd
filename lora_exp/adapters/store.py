"""Adapters saved alone: LoRA A/B + the trained head in safetensors, with a JSON config to rebuild them.

``adapter.safetensors`` keys are the model's own ``named_parameters()`` paths, so loading is a strict
``load_state_dict`` on the wrapped model; ``adapter_config.json`` stores what loading must check first
(base model, targets, r, alpha, num_labels).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lora_exp.adapters.adalora import STATE_PREFIX as ADALORA_STATE
from lora_exp.adapters.params import is_adapter_param, layers_meta
from lora_exp.adapters.targets import lora_layers
from lora_exp.errors import LoraExpError

WEIGHTS, CONFIG = "adapter.safetensors", "adapter_config.json"
FILE_MODE = 0o644  # readable by the group, as save_pretrained's files usually are (safetensors writes 0600)


def make_readable(folder: Path) -> None:
    """Give every file in ``folder`` mode 0644 whatever the umask (a shared adapter must be readable)."""
    for path in Path(folder).iterdir():
        if path.is_file():
            path.chmod(FILE_MODE)


def raw(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its keys would gain ``_orig_mod.``), else ``model`` itself:
    what is saved, loaded and exported always carries the model's own parameter paths."""
    return getattr(model, "_orig_mod", model)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every trainable tensor (LoRA A/B and head) on CPU.

    ``copy=True``: on a CPU model ``.to("cpu")`` would return the live parameter itself, and a "best"
    snapshot would silently follow every later update.
    """
    params = raw(model).named_parameters()
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in params if p.requires_grad}


def frozen_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the adapter tensors that do not train, on CPU: LoRA-FA's A, VeRA's shared projections (buffers
    of the adapter layers, saved once under the path ``model.named_buffers()`` gives them)."""
    state = {
        n: p.detach().to("cpu", copy=True).contiguous()
        for n, p in model.named_parameters()
        if not p.requires_grad and is_adapter_param(n)
    }
    seen: set[int] = set()
    for path, layer in lora_layers(model):
        for name, buf in layer.named_buffers(prefix=path):
            training_only = name.rpartition(".")[2].startswith(ADALORA_STATE)  # AdaLoRA's importance EMAs
            if ".base_layer." not in name and not training_only and id(buf) not in seen:
                seen.add(id(buf))
                state[name] = buf.detach().to("cpu", copy=True).contiguous()
    return state


def save_adapter(model: nn.Module, folder: Path, meta: dict[str, Any]) -> dict[str, int]:
    """Write ``adapter.safetensors`` + ``adapter_config.json`` into ``folder``; returns their sizes.

    Frozen adapter tensors (LoRA-FA's A, VeRA's projections) are saved too: the adapter alone rebuilds the update.
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = {**frozen_adapter_state(raw(model)), **trainable_state(model)}
    layers = dict(lora_layers(raw(model)))
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise LoraExpError(f"save_adapter(): {len(merged)} LoRA layers are merged; unmerge() before saving")
    save_file(state, str(folder / WEIGHTS))
    config = {**meta, **layers_meta(layers), "adapted_modules": sorted(layers), "keys": sorted(state)}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    make_readable(folder)
    return {"adapter_bytes": (folder / WEIGHTS).stat().st_size}


def read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Config and tensors of a saved adapter; a one-line error when missing or corrupted."""
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG, folder / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise LoraExpError(f"adapter={str(folder)!r}: {p.name} is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise LoraExpError(f"adapter={str(folder)!r}: {CONFIG} is not valid JSON ({err})") from err
    try:
        tensors = load_file(str(w_path))  # safetensors: no pickle, no code execution
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraExpError(f"adapter={str(folder)!r}: {WEIGHTS} is corrupted ({err})") from err
    return config, tensors


def load_into(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy adapter tensors into a model that already carries the same LoRA layers; checks keys and shapes."""
    plain = raw(model)
    params = {**dict(plain.named_buffers()), **dict(plain.named_parameters())}
    check_tensors(params, tensors, f"adapter={where!r}")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].device, params[name].dtype))


def check_tensors(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor names a parameter of the model, with its shape; else one line naming ``where``."""
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise LoraExpError(f"{where} has tensors this model lacks (other targets?): {unknown[:3]}")
    for name, t in tensors.items():
        if params[name].shape != t.shape:
            raise LoraExpError(f"{where}: {name} has shape {tuple(t.shape)}, the model {tuple(params[name].shape)}")


def check_base(meta: dict[str, Any], fingerprint: str | None, where: str, current: str, force: bool = False) -> None:
    """Refuse an adapter whose recorded base fingerprint differs from the base it is loaded onto, in one line
    naming both bases; ``force`` loads it anyway with a one-line warning. Adapters saved before fingerprints
    were recorded (and models built without one) are not checked."""
    recorded = meta.get("base_fingerprint")
    if not recorded or not fingerprint or recorded == fingerprint:
        return
    trained_on = meta.get("base_model") or meta.get("model_name") or "unknown"
    line = (
        f"{where} was trained on base {trained_on!r} (fingerprint {recorded[:12]}) but the base loaded now, "
        f"{current!r}, has fingerprint {fingerprint[:12]}: other weights of the same shapes"
    )
    if not force:
        raise LoraExpError(f"{line}; pass --force to load it anyway")
    print(f"warning: {line}; loading anyway (--force)", file=sys.stderr)
