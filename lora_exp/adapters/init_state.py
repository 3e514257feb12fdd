"""The result of a data-driven init (``lora.init=eva | lora_ga``), saved once next to the run: each adapted
layer's rank, alpha and initial A (and B), so a resumed run and a reloaded one rebuild the same layers (and
LoRA-GA's residual W0 - s B0 A0, from the pristine base) without the data.

``<run dir>/init/init.safetensors`` holds ``<layer path>.A`` / ``.B`` (a rank-0 layer: ``A`` with 0 rows),
``init.json`` the ranks, alphas and what computing it cost (batches, tokens, seconds).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_exp.adapters.eva import apply_init
from lora_exp.adapters.lora_ga import apply_residual
from lora_exp.adapters.targets import lora_layers
from lora_exp.errors import LoraExpError

FOLDER, WEIGHTS, RECORD = "init", "init.safetensors", "init.json"


def save_state(run_dir: Path, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], record: dict[str, Any]) -> Path:
    """Write ``<run_dir>/init/`` atomically (a temp folder renamed into place)."""
    final, tmp = run_dir / FOLDER, run_dir / f".{FOLDER}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"{n}.A": t.detach().cpu().contiguous() for n, t in a.items()}
    tensors |= {f"{n}.B": t.detach().cpu().contiguous() for n, t in b.items()}
    save_file(tensors, str(tmp / WEIGHTS))
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def exists(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a saved data-driven init."""
    return (run_dir / FOLDER / RECORD).is_file() and (run_dir / FOLDER / WEIGHTS).is_file()


def restore_state(model: nn.Module, run_dir: Path) -> dict[str, Any]:
    """Re-shape the model's LoRA layers as the saved init left them and load its A (and B); returns the record."""
    folder = Path(run_dir) / FOLDER
    if not exists(Path(run_dir)):
        raise LoraExpError(f"{str(folder)!r}: no saved data-driven init ({RECORD} + {WEIGHTS}); it cannot be rebuilt")
    record = json.loads((folder / RECORD).read_text())
    tensors = load_file(str(folder / WEIGHTS))
    layers = dict(lora_layers(model))
    unknown = sorted(set(record["ranks"]) ^ set(layers))
    if unknown:
        raise LoraExpError(f"{str(folder)!r} was saved for other LoRA layers than this model's: {unknown[:3]}")
    a = {n: tensors[f"{n}.A"] for n in layers}
    if record.get("residual"):  # LoRA-GA: A0, B0 and W0 - s B0 A0, recomputed on the pristine base
        for name, layer in layers.items():
            apply_residual(layer, a[name], tensors[f"{name}.B"])
    else:
        apply_init(model, layers, a, record["alphas"])
    return record
