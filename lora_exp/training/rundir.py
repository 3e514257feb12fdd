"""What a run dir holds, and whether a job may write into it: a finished job of a sweep (``skip_done``), a dir
reused by another grid, a failed result set aside before a retry, the recorded config behind ``resume`` and
``rerun``, and a single run's dir that already holds a run. Ownership by a live process is ``lock.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lora_exp.errors import LoraExpError

ERROR_FILE = "error.txt"  # the full traceback of a failed job


def finished_job(sweep_dir: Path, digest: str) -> Path | None:
    """A job dir in ``sweep_dir`` whose results.json finished ``status: ok`` with this config hash."""
    for path in sorted(sweep_dir.glob("*/results.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if res.get("status") == "ok" and res.get("config_hash") == digest:
            return path.parent
    return None


def guard_job_dir(run_dir: Path, digest: str) -> None:
    """A job dir reused by another grid (job numbers repeat) must not be resumed or overwritten."""
    from lora_exp.training import checkpoint

    owners = []
    if checkpoint.exists(run_dir):
        owners.append(checkpoint.owner(run_dir))
    if (run_dir / "results.json").exists():
        owners.append(read_json(run_dir / "results.json").get("config_hash"))
    foreign = [o for o in owners if o and o != digest]
    if foreign:
        raise LoraExpError(
            f"{str(run_dir)!r} holds another configuration's job (config hash {foreign[0]}); "
            "run this sweep into a new hydra.sweep.dir"
        )


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; an empty dict when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def set_aside_failure(run_dir: Path) -> None:
    """A failed result in this job dir is kept as results.failed-N.json (error.txt as error.failed-N.txt)
    before the job runs again."""
    old = run_dir / "results.json"
    if old.exists() and read_json(old).get("status") != "ok":
        n = len(list(run_dir.glob("results.failed-*.json")))
        os.replace(old, run_dir / f"results.failed-{n}.json")
        if (run_dir / ERROR_FILE).exists():  # its traceback goes with it
            os.replace(run_dir / ERROR_FILE, run_dir / f"error.failed-{n}.txt")


def recorded_config(run_dir: Path) -> DictConfig:
    """The resolved config a job recorded (``config.yaml``), checked against the schema."""
    from lora_exp.config.schema import Config

    if not (run_dir / "config.yaml").is_file():
        raise LoraExpError(f"{str(run_dir)!r} has no config.yaml (not a lora-exp run dir)")
    saved = OmegaConf.load(run_dir / "config.yaml")
    saved.pop("derived", None)
    return OmegaConf.merge(OmegaConf.structured(Config), _before_presets(saved))


def _before_presets(saved: DictConfig) -> DictConfig:
    """A config recorded before ``+preset`` in today's keys: AdaLoRA's ``lora.r`` (its initial rank) becomes
    ``lora.adalora.init_r`` and its ``target_r`` ``lora.r``; VeRA's ``lora.r`` becomes ``lora.vera.r``."""
    lora = saved.get("lora")
    if not isinstance(lora, DictConfig):
        return saved
    ada, vera = lora.get("adalora"), lora.get("vera")
    if isinstance(ada, DictConfig) and "target_r" in ada:
        ada.init_r = lora.r
        lora.r = ada.pop("target_r")
    if lora.get("variant") == "vera" and isinstance(vera, DictConfig) and "r" not in vera:
        vera.r = lora.r
    return saved


def check_resume(value: str) -> tuple[Path, DictConfig]:
    """The run dir and recorded config behind ``resume=<dir>``; one line, nothing written, when it cannot resume."""
    from lora_exp.training import checkpoint

    run_dir = Path(value)
    if not run_dir.is_dir():
        raise LoraExpError(f"resume={value!r}: no such folder")
    if not checkpoint.exists(run_dir):
        raise LoraExpError(f"resume={value!r}: no checkpoint in that dir")
    return run_dir, recorded_config(run_dir)


def check_single_run_dir(run_dir: Path) -> None:
    """A single run never writes into a dir that already holds a run (results or a checkpoint)."""
    from lora_exp.training import checkpoint

    held = [f for f in ("results.json", "config.yaml") if (run_dir / f).exists()]
    if checkpoint.exists(run_dir):
        raise LoraExpError(
            f"hydra.run.dir={str(run_dir)!r} holds an interrupted run's checkpoint; continue it with "
            f"resume={run_dir} or give a new hydra.run.dir"
        )
    if held:
        raise LoraExpError(f"hydra.run.dir={str(run_dir)!r} already holds a run ({held[0]}); give a new hydra.run.dir")
