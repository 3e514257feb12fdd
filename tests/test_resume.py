"""Kill a run (SIGKILL at a random step, or SIGTERM = preemption), resume it, and get exactly the
uninterrupted run's metrics and weights (CPU, deterministic)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .test_train import cli

EPOCHS, STEPS_PER_EPOCH = 6, 8  # 128 training examples / batch 16


def args(reviews: Path, tmp: Path) -> list[str]:
    return [
        "model=tiny_bert",
        f"data.path={reviews}",
        f"data.cache_dir={tmp / 'hf'}",
        "logger=wandb",
        f"trainer.epochs={EPOCHS}",
        "trainer.batch_size=16",
        "trainer.checkpoint_every=1",
        "trainer.device=cpu",
        "optimizer.lr=3e-3",
        "lora.dropout=0.1",
        "lora.targets=[q,v,ffn]",
    ]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, reviews: Path) -> Path:
    tmp = tmp_path_factory.mktemp("straight")
    proc = cli([*args(reviews, tmp), f"hydra.run.dir={tmp / 'run'}"], tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp / "run"


def start(reviews: Path, tmp: Path, run_dir: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"WANDB_SILENT": "true"}

    return subprocess.Popen(
        [sys.executable, "-m", "lora_exp", *args(reviews, tmp), f"hydra.run.dir={run_dir}"],
        cwd=tmp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> int:
    progress = run_dir / "checkpoint" / "progress.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run finished before it could be interrupted"
        try:
            at = json.loads(progress.read_text())["step"]
            if at >= step:
                return at
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.002)
    raise AssertionError(f"no checkpoint at step {step} within {timeout}s")


def assert_same_run(resumed: Path, straight: Path) -> None:
    a, b = (json.loads((d / "results.json").read_text()) for d in (resumed, straight))
    assert a["status"] == b["status"] == "ok" and a["resumed"] is True
    for key in ("best_val_acc", "best_step", "test_acc", "test_loss", "steps", "config_hash"):
        assert a[key] == b[key], key
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
    wa, wb = (load_file(str(d / "adapter" / "adapter.safetensors")) for d in (resumed, straight))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical
    assert not (resumed / "checkpoint").exists()  # cleaned up after the finished run


def test_sigkill_at_random_step_then_resume_is_bit_identical(straight: Path, reviews: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "crash"
    proc = start(reviews, tmp_path, run_dir)
    kill_at = random.Random().randint(2, EPOCHS * STEPS_PER_EPOCH - 6)
    wait_for_step(proc, run_dir, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "results.json").exists()
    wandb_id = json.loads((run_dir / "checkpoint" / "progress.json").read_text())["wandb_id"]
    done = cli([f"resume={run_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(run_dir, straight)
    assert json.loads((run_dir / "results.json").read_text())["wandb_id"] == wandb_id  # same W&B run


def test_sigterm_saves_a_checkpoint_and_resume_finishes(straight: Path, reviews: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "preempted"
    proc = start(reviews, tmp_path, run_dir)
    wait_for_step(proc, run_dir, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "preempted" in err and f"lora-exp resume={run_dir}" in err
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["status"] == "failed" and saved["failure"] == "preempted"
    done = cli([f"resume={run_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(run_dir, straight)
    assert len(list(run_dir.glob("results.failed-*.json"))) == 1  # the preemption record is kept


def test_resume_without_checkpoint_is_one_line(tmp_path: Path) -> None:
    proc = cli([f"resume={tmp_path}", "logger=none", f"hydra.run.dir={tmp_path / 'h'}"], tmp_path)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error")] == [
        f"error: resume='{tmp_path}': no checkpoint in that dir"
    ]


def test_divergence_never_checkpoints_non_finite_weights(tiny_cfg, tmp_path: Path) -> None:
    from lora_exp import train
    from lora_exp.errors import TrainingFailure

    cfg = tiny_cfg("method=full", "optimizer.lr=inf", "trainer.max_grad_norm=0", "trainer.checkpoint_every=1")
    with pytest.raises(TrainingFailure, match="not finite at step 1"):
        train.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint").exists()  # nothing diverged was saved
