"""A packed sweep (``hydra/launcher=packed``) killed with SIGKILL mid-training and run again with the same command:
each job resumes from its own checkpoint and ends bit-identical (adapter and head tensors, test loss and
predictions, validation history) to an uninterrupted pack of the same jobs (issue 28)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers.configs import make_cfg, tiny_run
from tests.helpers.processes import cli, fresh_env

LRS = ("1e-3", "3e-3")
RUN = ("logger=none", "trainer.epochs=2", "trainer.checkpoint_every=1", "trainer.num_threads=1")
RUN += ("optimizer.warmup_ratio=0.0", "lora.dropout=0.1", "lora.r=4")  # dropout on: the RNG streams must resume
JOBS = ("0_lora", "1_lora")  # the job dirs (hydra.sweep.subdir)
STEPS = 16  # 2 epochs x 8 updates (128 training examples / batch 16)


def wait_for_step(proc: subprocess.Popen, progress: Path, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the pack finished before it could be killed"
        try:
            if json.loads(progress.read_text())["step"] >= step:
                return
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.002)
    raise AssertionError(f"no checkpoint at step {step} within {timeout}s")


def test_a_packed_sweep_killed_with_sigkill_resumes_bit_identical(reviews: Path, tmp_path: Path) -> None:
    from lora_exp.training.pack import train_pack

    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=packed", f"optimizer.lr={','.join(LRS)}", *tiny_run(reviews, tmp_path, *RUN)]
    args.append(f"hydra.sweep.dir={sweep}")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}  # nobody reads them: no pipe fills up
    proc = subprocess.Popen([sys.executable, "-m", "lora_exp", *args], cwd=tmp_path, env=fresh_env(), **quiet)
    kill_at = random.Random().randint(2, STEPS - 4)
    try:
        wait_for_step(proc, sweep / "0_lora" / "checkpoint" / "progress.json", kill_at)
    finally:
        proc.send_signal(signal.SIGKILL)  # also when the wait failed: no pack left running
        proc.wait()
    steps = [json.loads((sweep / j / "checkpoint" / "progress.json").read_text())["step"] for j in JOBS]
    assert not list(sweep.glob("*/results.json")) and min(steps) < STEPS, steps  # killed mid-training

    done = cli(args, tmp_path)  # the same command again
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("[lora-exp] resuming") == 2, done.stdout[-3000:]
    assert "1 pack(s) of [2]" in done.stdout

    # the reference: the same two jobs as one uninterrupted pack (in this process)
    ref = [tmp_path / "ref0", tmp_path / "ref1"]
    cfgs = [make_cfg(tiny_run(reviews, tmp_path, *RUN, f"optimizer.lr={lr}")) for lr in LRS]
    whole = train_pack(cfgs, ref, [False, False])
    for j, r in enumerate(whole):
        got = json.loads((sweep / JOBS[j] / "results.json").read_text())
        assert got["status"] == "ok" and got["resumed"] is True and got["packed_with"] == [JOBS[1 - j]]
        assert isinstance(r, dict) and got["lr"] == r["lr"] == float(LRS[j])
        for key in ("test_loss", "test_acc", "test_pred_counts", "best_val_acc", "best_step", "steps"):
            assert got[key] == r[key], (j, key, steps)
        assert [h["val_loss"] for h in got["history"]] == [h["val_loss"] for h in r["history"]]
        a, b = (load_file(str(d / "adapter" / "adapter.safetensors")) for d in (sweep / JOBS[j], ref[j]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (j, steps)  # bit-identical
        assert not (sweep / JOBS[j] / "checkpoint").exists()
