"""Runs through the real CLI: one process per run dir (two started together; a dead run's lock), and no
empty ``cli.log``."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_exp.errors import LoraExpError
from lora_exp.training import lock

from .test_train import cli


def tiny(reviews: Path, tmp: Path, steps: int) -> list[str]:
    return [
        "model=tiny_bert",
        f"data.path={reviews}",
        f"data.cache_dir={tmp / 'hf'}",
        f"trainer.max_steps={steps}",
        "trainer.epochs=100",
        "trainer.device=cpu",
        "trainer.batch_size=16",
    ]


def start(args: list[str], cwd: Path, new_session: bool = False) -> subprocess.Popen:
    """``lora-exp`` in a fresh process (not attached to this test's W&B service), optionally as its own group."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"WANDB_SILENT": "true"}
    return subprocess.Popen(
        [sys.executable, "-m", "lora_exp", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error")]


def test_two_runs_started_together_into_one_dir(reviews: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = [*tiny(reviews, tmp_path, 60), "logger=none", f"hydra.run.dir={run}"]
    procs = {seed: start([*base, f"trainer.seed={seed}"], tmp_path) for seed in (1, 2)}
    outs = {seed: p.communicate(timeout=600) for seed, p in procs.items()}
    codes = {seed: p.returncode for seed, p in procs.items()}
    assert sorted(codes.values()) == [0, 2], {s: o[1][-2000:] for s, o in outs.items()}
    first = next(s for s, c in codes.items() if c == 0)
    second = 3 - first
    refused = errors(outs[second][1])
    owner = rf"pid {procs[first].pid} on {re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert len(refused) == 1, outs[second][1][-2000:]
    assert re.fullmatch(
        rf"error: hydra.run.dir='{re.escape(str(run))}' is in use by another lora-exp run \({owner}\); "
        "give a new hydra.run.dir",
        refused[0],
    ), refused[0]
    assert len(list(run.rglob("results.json"))) == 1
    assert json.loads((run / "results.json").read_text())["seed"] == first
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert f"trainer.seed={first}" in overrides and f"trainer.seed={second}" not in overrides  # no mixed files
    assert not (run / lock.LOCK_FILE).exists()  # released at the end
    assert not list(run.glob("*.log"))  # Hydra's job log (cli.log) is not created: it only ever stayed empty


def test_lock_of_a_dead_run_is_taken_over(reviews: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = {"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}
    (run / lock.LOCK_FILE).write_text(json.dumps(owner))
    proc = cli([*tiny(reviews, tmp_path, 2), "logger=none", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        f"[lora-exp] hydra.run.dir='{run}': taking over the lock of a run that is no longer running "
        f"(pid {dead.pid} on {owner['host']}, started 2026-01-01 00:00:00)"
    ) in proc.stderr.splitlines()
    assert json.loads((run / "results.json").read_text())["status"] == "ok"
    assert not (run / lock.LOCK_FILE).exists()
    assert not list(run.glob("*.log"))


def test_a_claimed_dir_is_refused_until_released(tmp_path: Path) -> None:
    held = lock.claim(tmp_path / "r", "hydra.run.dir='r'", "give a new hydra.run.dir")
    with pytest.raises(LoraExpError, match=rf"in use by another lora-exp run \(pid {os.getpid()} on "):
        lock.claim(tmp_path / "r", "hydra.run.dir='r'", "give a new hydra.run.dir")
    held.release()
    assert not (tmp_path / "r" / lock.LOCK_FILE).exists()
    lock.claim(tmp_path / "r", "hydra.run.dir='r'", "give a new hydra.run.dir").release()  # free again
