"""W&B run lifecycle (offline by default), run names, the environment and git state of a job, results files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers

from lora_exp.adapters.params import layer_rank

if TYPE_CHECKING:
    from lora_exp.config.schema import LoggerConfig, LoraConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename): a crash never leaves half a results file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def git_info(root: Path = PROJECT_ROOT, diff_to: Path | None = None) -> dict[str, Any]:
    """Commit, branch and dirty flag of the harness checkout (None outside a git checkout, and installed).

    When the checkout is dirty and ``diff_to`` is given, the uncommitted diff is saved there.
    """

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    if not (root / "pyproject.toml").is_file():  # installed (a wheel in site-packages): no checkout of ours
        return {"git_commit": None, "git_branch": None, "git_dirty": None, "git_diff_file": None}
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = bool(status) if status is not None else None
    if dirty and diff_to is not None:
        diff_to.write_text((git("diff", "HEAD") or "") + "\n")
    return {
        "git_commit": commit,
        "git_branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "git_dirty": dirty,
        "git_diff_file": str(diff_to) if dirty and diff_to is not None else None,
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


def run_name(variant: str, method: str, lora_cfg: LoraConfig, lr: float, seed: int) -> str:
    """Compact, readable W&B run name: ``variant`` (``adapters.params.variant_label``: lora, dora, pissa, lora+,
    ...), the LoRA shape (``lora_cfg``, for ``method=lora``), lr (``optimizer.lr``), seed (``trainer.seed``)."""
    parts = [variant]
    if method == "lora":
        parts += [f"r{layer_rank(lora_cfg)}", f"a{lora_cfg.alpha:g}", "+".join(lora_cfg.targets)]
    parts += [f"lr{lr:g}", f"s{seed}"]
    return "-".join(parts)


class NoRun:
    """Stands in for a W&B run with ``logger.mode=disabled``: ``log`` and ``summary`` record nothing."""

    disabled = True

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}

    def log(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to log to."""


@contextlib.contextmanager
def wandb_run(
    lg: LoggerConfig, run_dir: Path, config: dict, name: str, job_type: str, resume_id: str | None = None
) -> Iterator[Any]:
    """A W&B run for this job only, finished on exit (failed runs exit with code 1), never global.

    ``lg`` is the ``logger`` options; ``config`` the resolved config W&B records (plain containers); ``name`` and
    ``job_type`` the run's name and job type unless ``logger.name`` / ``logger.job_type`` give them. ``resume_id``
    continues that run (a resumed job keeps its W&B run). ``logger.mode=disabled`` needs no wandb installed (the
    GPU image has none): a stand-in run that records nothing.
    """
    if lg.mode == "disabled":
        yield NoRun()
        return
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    kwargs = dict(
        mode=lg.mode,
        project=lg.project,
        entity=lg.entity,
        group=lg.group,
        job_type=lg.job_type or job_type,
        name=lg.name or name,
        tags=list(lg.tags),
        dir=str(run_dir),
        config=config,
        reinit="create_new",
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )
    run = None
    if resume_id:
        # A killed process's W&B service can hold the id for a moment: retry, then continue in a new run
        # that names the old one (training state is ours; only the W&B history would be split).
        for _ in range(15):
            try:
                run = wandb.init(id=resume_id, resume="allow", **kwargs)
                break
            except Exception as err:  # wandb raises its own error types here
                if "in use" not in str(err):
                    raise
                time.sleep(1.0)
        if run is None:
            print(f"[lora-exp] W&B run {resume_id} stays in use; logging the rest to a new run", file=sys.stderr)
            kwargs["config"] = {**config, "wandb_resumed_from": resume_id}
            kwargs.update(id=secrets.token_hex(4), resume="never")  # else W&B picks the old id up again

    if run is None:
        run = wandb.init(**kwargs)
    failed = True
    try:
        yield run
        failed = False
    finally:
        try:
            run.finish(exit_code=1 if failed else 0)
        except Exception as err:  # on SLURM, SIGTERM reaches W&B's service too: it may be gone already
            if not failed:
                raise
            # the job's own failure (preempted: checkpoint saved) is what it records, not W&B's lost connection
            why = f"{type(err).__name__}: {err}".splitlines()[0]
            print(
                f"[lora-exp] W&B run {run.id} not finished ({why}); its offline files stay for wandb sync",
                file=sys.stderr,
            )


def wandb_ref(run: Any) -> dict[str, Any]:
    """The W&B run id / URL / local dir, for results.json (so a job dir names its W&B run)."""
    if run is None or getattr(run, "disabled", False) or run.settings.mode == "disabled":
        return {"wandb_id": None, "wandb_url": None, "wandb_dir": None}
    return {"wandb_id": run.id, "wandb_url": run.url, "wandb_dir": run.dir}


VAL_VS_TIME = "val_vs_time"  # the validation metrics again, against training time (W&B: one x-axis per metric)


def declare_axes(run: Any, higher_is_better: dict[str, bool]) -> None:
    """The seed's two figures as W&B's default panels: ``val/*`` against ``epoch`` and the same values as
    ``val_vs_time/*`` against ``time/train_s``; each one's summary is its best value (max, or min for a
    loss), per ``higher_is_better`` (``{"val/acc": True, "val/loss": False, ...}``); nothing without W&B."""
    if getattr(run, "disabled", False):
        return
    run.define_metric("epoch")
    run.define_metric("time/train_s")
    for name, higher in higher_is_better.items():
        metric, best = name.split("/", 1)[1], "max" if higher else "min"
        run.define_metric(f"val/{metric}", step_metric="epoch", summary=best)
        run.define_metric(f"{VAL_VS_TIME}/{metric}", step_metric="time/train_s", summary=best)


def log_folder(run: Any, folder: Path, what: str, kind: str, metadata: dict[str, Any]) -> None:
    """Log ``folder``'s files as the W&B artifact ``<what>-<run id>`` of type ``kind`` (offline: recorded in the
    run file and staged locally, so ``wandb sync`` uploads it with the run); nothing without W&B."""
    if getattr(run, "disabled", False):
        return
    import wandb

    artifact = wandb.Artifact(f"{what}-{run.id}", type=kind, metadata=metadata)
    artifact.add_dir(str(folder))
    run.log_artifact(artifact)
