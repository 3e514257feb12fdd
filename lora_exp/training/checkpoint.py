"""Checkpoints for resuming a run exactly where it stopped (same data order, same RNG, same W&B run).

A checkpoint is a folder ``<run dir>/checkpoint/`` written atomically (temp folder + rename):
- ``trainable.safetensors``: every trainable tensor (LoRA A/B + head, or the whole model for ``full``);
- ``best.safetensors``: the best-so-far trainable tensors (the final test uses them);
- ``adapter_buffers.safetensors`` (AdaLoRA only): the allocator's rank masks and importance EMAs;
- ``state.pt``: optimizer, scheduler and scaler state, the torch CPU/CUDA RNG states and the data-order
  generator's state at the start of the current epoch, in torch's weights-only format (tensors, numbers,
  strings and containers only: loading it with ``weights_only=True`` never runs code);
- ``progress.json``: step, epoch, batches consumed in the epoch, counters, history, best metrics, W&B id.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lora_exp.adapters.adalora import TRAINING_BUFFERS as ADALORA_BUFFERS
from lora_exp.adapters.store import raw
from lora_exp.errors import LoraExpError

FOLDER = "checkpoint"
BUFFERS = "adapter_buffers.safetensors"


def adapter_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA layers' own buffers that training changes (AdaLoRA's rank masks and importance EMAs)."""
    kept = {n: b for n, b in raw(model).named_buffers() if n.rpartition(".")[2] in ("rank_mask", *ADALORA_BUFFERS)}
    return kept


@dataclass
class Progress:
    """Where a run is: enough to continue the loop and its bookkeeping."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # micro-batches consumed in the current epoch
    samples: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    train_seconds: float = 0.0
    steady_seconds: float = 0.0  # the steady part of train_seconds (measure.timing.Steady)
    steady_samples: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)  # evaluate's metrics at the best step, with step / epoch
    wandb_id: str | None = None
    order_digest: str = ""
    config_hash: str | None = None  # whose checkpoint this is (a reused job dir must not resume another's)


def save(
    run_dir: Path,
    model: torch.nn.Module,
    best_state: dict[str, torch.Tensor],
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    epoch_generator_state: torch.Tensor,
    progress: Progress,
) -> Path:
    """Write the checkpoint atomically; the previous one stays until the new one is complete."""
    final = run_dir / FOLDER
    tmp = run_dir / f".{FOLDER}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = raw(model).named_parameters()  # plain paths, compiled or not
    trainable = {n: p.detach().cpu().contiguous() for n, p in params if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    buffers = adapter_buffers(model)
    if buffers:  # AdaLoRA's masks and importance EMAs: the allocation continues where it was
        save_file({n: b.detach().cpu().contiguous() for n, b in buffers.items()}, str(tmp / BUFFERS))
    save_file({k: v.contiguous() for k, v in best_state.items()}, str(tmp / "best.safetensors"))
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data_generator": epoch_generator_state,
    }
    torch.save(state, tmp / "state.pt")
    (tmp / "progress.json").write_text(json.dumps(asdict(progress), default=float) + "\n")
    old = run_dir / f".{FOLDER}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def exists(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a complete checkpoint (or one mid-swap that ``load`` can still use)."""
    return any((run_dir / f / "progress.json").is_file() for f in (FOLDER, f".{FOLDER}.old"))


def owner(run_dir: Path) -> str | None:
    """The config hash of the run that wrote the checkpoint in ``run_dir``."""
    for folder in (FOLDER, f".{FOLDER}.old"):
        try:
            return json.loads((run_dir / folder / "progress.json").read_text()).get("config_hash")
        except (OSError, json.JSONDecodeError):
            continue
    return None


def load(
    run_dir: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any
) -> tuple[Progress, dict[str, torch.Tensor], torch.Tensor]:
    """Restore model, optimizer, scheduler, scaler and RNG; returns progress, best tensors, data generator state."""
    folder = run_dir / FOLDER
    if not (folder / "progress.json").is_file() and (run_dir / f".{FOLDER}.old" / "progress.json").is_file():
        folder = run_dir / f".{FOLDER}.old"  # killed between the two renames: the previous one is complete
    if not (folder / "progress.json").is_file():
        raise LoraExpError(f"resume={str(run_dir)!r}: no checkpoint in this run dir")
    try:
        progress = Progress(**json.loads((folder / "progress.json").read_text()))
        trainable = load_file(str(folder / "trainable.safetensors"))
        best = load_file(str(folder / "best.safetensors"))
        state = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")
    except Exception as err:  # corrupted or foreign files: one line, nothing deleted
        raise LoraExpError(
            f"resume={str(run_dir)!r}: the checkpoint is unreadable ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    params = dict(raw(model).named_parameters())
    if set(trainable) != {n for n, p in params.items() if p.requires_grad}:
        raise LoraExpError(f"resume={str(run_dir)!r}: the checkpoint's tensors do not match this model/method")
    with torch.no_grad():
        for name, t in trainable.items():
            params[name].copy_(t)
        if (folder / BUFFERS).is_file():
            own = adapter_buffers(model)
            for name, t in load_file(str(folder / BUFFERS)).items():
                own[name].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        restore_cuda_rng(state["rng_cuda"])
    return progress, best, state["data_generator"]


def restore_cuda_rng(states: list[torch.Tensor]) -> None:
    """Restore per-GPU RNG states, tolerant of a different number of visible GPUs (a job resumed under another
    ``CUDA_VISIBLE_DEVICES``): the first ``min(saved, visible)`` devices get theirs back."""
    for index, state in enumerate(states[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, index)
