"""W&B run lifecycle, results.json, and measurement (memory, environment, git)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from omegaconf import DictConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename): a crash never leaves half a results file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def git_info(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Commit, branch and dirty flag of the harness checkout (None outside a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": commit,
        "git_branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and the accelerator's name, for the reproducibility record."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
    }


def reset_memory(device: torch.device) -> int:
    """Clean measurement state for this job (previous jobs in the same process leave leftovers).

    Returns the baseline allocated bytes (0 on CPU).
    """
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory(device: torch.device, baseline: int) -> dict[str, int | None]:
    """Peak allocated (the comparison metric), peak reserved and peak above baseline; host peak RSS."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if device.type != "cuda":
        return {
            "peak_vram_bytes": None,
            "peak_vram_reserved_bytes": None,
            "peak_vram_above_baseline_bytes": None,
            "peak_host_rss_bytes": rss,
        }
    peak = torch.cuda.max_memory_allocated(device)
    return {
        "peak_vram_bytes": peak,
        "peak_vram_reserved_bytes": torch.cuda.max_memory_reserved(device),
        "peak_vram_above_baseline_bytes": peak - baseline,
        "peak_host_rss_bytes": rss,
    }


def run_name(cfg: DictConfig) -> str:
    """Compact, readable W&B run name: method, LoRA shape, lr, seed."""
    parts = [cfg.method.name]
    if cfg.method.name == "lora":
        parts += [f"r{cfg.lora.r}", f"a{cfg.lora.alpha:g}", "+".join(cfg.lora.targets)]
        if cfg.lora.rslora:
            parts.append("rs")
    parts += [f"lr{cfg.optimizer.lr:g}", f"s{cfg.trainer.seed}"]
    return "-".join(parts)


@contextlib.contextmanager
def wandb_run(cfg: DictConfig, run_dir: Path, config: dict) -> Iterator[Any]:
    """A W&B run for this job only, finished on exit (failed runs exit with code 1), never global."""
    import wandb

    lg = cfg.logger
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        mode=lg.mode,
        project=lg.project,
        entity=lg.entity,
        group=lg.group,
        job_type=lg.job_type,
        name=lg.name or run_name(cfg),
        tags=list(lg.tags),
        dir=str(run_dir),
        config=config,
        reinit="create_new",
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )
    failed = True
    try:
        yield run
        failed = False
    finally:
        run.finish(exit_code=1 if failed else 0)


def wandb_ref(run: Any) -> dict[str, Any]:
    """The W&B run id / URL / local dir, for results.json (so a job dir names its W&B run)."""
    if run is None or getattr(run, "disabled", False) or run.settings.mode == "disabled":
        return {"wandb_id": None, "wandb_url": None, "wandb_dir": None}
    return {"wandb_id": run.id, "wandb_url": run.url, "wandb_dir": run.dir}
