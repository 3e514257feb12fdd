"""``lora-exp rerun JOB_DIR [--out D]``: train a finished job again from its recorded config and compare."""

from __future__ import annotations

import json
from pathlib import Path

from lora_exp.errors import LoraExpError

RERUN_COMPARED = ("best_val_acc", "best_step", "test_acc", "test_loss", "trainable_params", "data_order_digest")


def main(*args: str) -> int:
    """Train JOB_DIR's recorded config into a new run dir and print each compared result old / new."""
    import argparse
    import time

    from lora_exp.training.loop import train
    from lora_exp.training.rundir import recorded_config

    parser = argparse.ArgumentParser(prog="lora-exp rerun", description="Train a finished job again from its config")
    parser.add_argument("job_dir", type=Path, help="a run dir holding config.yaml and results.json")
    parser.add_argument("--out", type=Path, default=None, help="new run dir (default: JOB_DIR-rerun-<stamp>)")
    ns = parser.parse_args(args)
    cfg = recorded_config(ns.job_dir)
    out = ns.out or ns.job_dir.with_name(f"{ns.job_dir.name}-rerun-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "results.json").exists():
        raise LoraExpError(f"rerun: {str(out)!r} already holds results.json; give another --out")
    new = train(cfg, out)
    old = json.loads((ns.job_dir / "results.json").read_text()) if (ns.job_dir / "results.json").exists() else {}
    tolerance = rerun_tolerance(new)
    same = True
    for key in compared(new):
        equal = same_metric(old.get(key), new.get(key), tolerance)
        same &= equal
        print(f"  {key:<20} {old.get(key)!s:<22} {new.get(key)!s:<22} {'same' if equal else 'DIFFERENT'}")
    how = "identical" if tolerance == 0 else f"within {tolerance:g} (CUDA without trainer.deterministic)"
    print(f"rerun in {out}: {how if same else 'differs'} (config hash {new['config_hash']})")
    return 0


def compared(results: dict) -> tuple[str, ...]:
    """The results a rerun compares: ``RERUN_COMPARED`` plus the monitored metric's best validation and test
    values when it is not accuracy (a regression run has no accuracy: its Pearson, ...)."""
    key = str(results.get("monitor") or "val/acc").split("/", 1)[-1]
    extra = () if key in ("acc", "loss") else (f"best_val_{key}", f"test_{key}")
    return (*RERUN_COMPARED, *extra)


def rerun_tolerance(results: dict) -> float:
    """0 (bit-identical) on CPU or with ``trainer.deterministic``; on CUDA otherwise non-deterministic kernels
    (atomics in backward, cuBLAS split-K) move metrics slightly, so floats are compared to 0.01."""
    cuda = str(results.get("device", "cpu")).startswith("cuda")
    return 0.0 if not cuda or results.get("deterministic") else 0.01


def same_metric(old: object, new: object, tolerance: float) -> bool:
    """Equal, or (floats) within ``tolerance``."""
    if tolerance and isinstance(old, float) and isinstance(new, float):
        return abs(old - new) <= tolerance
    return old == new
