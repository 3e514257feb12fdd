"""Kill a run (SIGKILL at a random step, or SIGTERM = preemption), resume it, and get exactly the
uninterrupted run's metrics and weights (CPU, deterministic)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.configs import tiny_run
from tests.helpers.processes import cli, start

EPOCHS, STEPS_PER_EPOCH = 6, 8  # 128 training examples / batch 16


def args(reviews: Path, tmp: Path) -> list[str]:
    run = ("logger=wandb", f"trainer.epochs={EPOCHS}", "trainer.checkpoint_every=1", "optimizer.lr=3e-3")
    return tiny_run(reviews, tmp, *run, "lora.dropout=0.1", "lora.targets=[q,v,ffn]")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, reviews: Path) -> Path:
    tmp = tmp_path_factory.mktemp("straight")
    proc = cli([*args(reviews, tmp), f"hydra.run.dir={tmp / 'run'}"], tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp / "run"


def start_run(reviews: Path, tmp: Path, run_dir: Path) -> subprocess.Popen:
    return start([*args(reviews, tmp), f"hydra.run.dir={run_dir}"], tmp, stdout=subprocess.DEVNULL)


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
    proc = start_run(reviews, tmp_path, run_dir)
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
    proc = start_run(reviews, tmp_path, run_dir)
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
    assert (run_dir / "error.failed-0.txt").is_file() and not (run_dir / "error.txt").exists()  # with its traceback


def test_resume_without_checkpoint_is_one_line(tmp_path: Path) -> None:
    proc = cli([f"resume={tmp_path}", "logger=none", f"hydra.run.dir={tmp_path / 'h'}"], tmp_path)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error")] == [
        f"error: resume='{tmp_path}': no checkpoint in that dir"
    ]


def test_divergence_never_checkpoints_non_finite_weights(tiny_cfg, tmp_path: Path) -> None:
    from lora_exp.errors import TrainingFailure
    from lora_exp.training import loop

    cfg = tiny_cfg("method=full", "optimizer.lr=inf", "trainer.max_grad_norm=0", "trainer.checkpoint_every=1")
    with pytest.raises(TrainingFailure, match="not finite at step 1"):
        loop.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint").exists()  # nothing diverged was saved


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders): equal snapshots = nothing written."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_resume_that_cannot_resume_writes_nothing(tiny_cfg, tmp_path: Path) -> None:
    """A missing dir and a failed run without a checkpoint: one line, exit 2, not one byte changed anywhere."""
    from lora_exp.errors import LoraExpError
    from lora_exp.training import loop

    failed = tmp_path / "work" / "failed"
    with pytest.raises(LoraExpError):  # a run that failed before any checkpoint (max_length beyond the model)
        loop.train(tiny_cfg("data.max_length=1024"), failed)
    (failed / "results.json").write_text(json.dumps({"status": "failed", "reason": "the original reason"}))
    before = snapshot(tmp_path)
    missing = tmp_path / "work" / "missing"
    for target, line in (
        (missing, f"error: resume='{missing}': no such folder"),
        (failed, f"error: resume='{failed}': no checkpoint in that dir"),
    ):
        proc = cli([f"resume={target}"], tmp_path / "work")
        assert proc.returncode == 2 and [x for x in proc.stderr.splitlines() if x.startswith("error")] == [line]
        assert snapshot(tmp_path) == before  # no results.json rewritten, no run dir, no resume dir created
    assert not missing.exists()


def test_single_run_into_a_dir_holding_another_run_refuses(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("theirs\n")
    (run / "results.json").write_text(json.dumps({"status": "ok", "test_acc": 0.9}))
    before = snapshot(tmp_path)
    proc = cli(["logger=none", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 2
    assert [x for x in proc.stderr.splitlines() if x.startswith("error")] == [
        f"error: hydra.run.dir='{run}' already holds a run (results.json); give a new hydra.run.dir"
    ]
    assert snapshot(tmp_path) == before  # Hydra's .hydra/ of that run is untouched too


def test_run_rejected_by_validation_leaves_no_run_dir(tmp_path: Path) -> None:
    proc = cli(["trainer.seed=-1", "logger=none", f"hydra.run.dir={tmp_path / 'runs' / 'r'}"], tmp_path)
    assert proc.returncode == 2
    assert [x for x in proc.stderr.splitlines() if x.startswith("error")] == [
        "error: trainer.seed=-1 must be an integer in [0, 2**32)"
    ]
    assert list(tmp_path.iterdir()) == []  # not even runs/
    proc = cli(["trainer.seed=-1", "logger=none"], tmp_path)  # the default run dir (runs/<date>/<time>_...)
    assert proc.returncode == 2 and list(tmp_path.iterdir()) == []


def test_resumed_run_charges_the_feature_cache_once(tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A preempted frozen run (feature cache on) resumed in-process: the cache's encoding time, already in the
    checkpoint, is not added again, so the cost bar shows the configuration's time, not the interruption's."""
    from lora_exp.errors import TrainingFailure
    from lora_exp.training import feature_cache, loop

    encode_s = 1000.0  # a cache encoding time far above the tiny run's whole training time
    real_cache, real_step = feature_cache.maybe_cache, loop.optimizer_step

    def slow_cache(*a, **kw):
        cache = real_cache(*a, **kw)
        assert cache is not None  # frozen: the whole base is cached
        cache.seconds = encode_s
        return cache

    def preempt_at_3(job, timed: bool) -> None:
        real_step(job, timed)
        if job.progress.step == 3 and not job.resumed:
            os.kill(os.getpid(), signal.SIGTERM)  # the real preemption path: the loop's SIGTERM flag

    monkeypatch.setattr(feature_cache, "maybe_cache", slow_cache)
    monkeypatch.setattr(loop, "optimizer_step", preempt_at_3)
    cfg, run_dir = tiny_cfg("method=frozen"), tmp_path / "run"
    with pytest.raises(TrainingFailure, match="SIGTERM at step 3"):
        loop.train(cfg, run_dir)
    before = json.loads((run_dir / "checkpoint" / "progress.json").read_text())["train_seconds"]
    assert encode_s <= before < encode_s + 60
    resumed = loop.train(cfg, run_dir, resume=True)
    assert resumed["resumed"] is True and resumed["feature_cache"] is True and resumed["steps"] == 16
    assert before < resumed["train_seconds"] < before + 60  # not before + another 1000 s of encoding
