"""A real SLURM on localhost (tests/helpers/slurm_cluster.py): a 2-job sweep through ``hydra/launcher=slurm``, one
job requeued mid-run with ``scontrol requeue`` (what preemption does: SIGTERM), the other sent SIGUSR2 (what SLURM
sends ``signal_delay_s`` before the time limit: the job requeues itself). The requeued job ends bit-identical to an
uninterrupted run with the same W&B run id, the sweep's summary counts both as finished, the report has both rows.
And ``hydra/launcher=packed hydra.launcher.under=slurm``: a pack of 2 LoRA jobs runs as ONE SLURM job.

Needs root and Debian's slurm-wlm + munge (``.ci/run`` installs them); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import slurm_cluster
from tests.helpers.configs import tiny_run

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
SLOW_STEPS = REPO / "tests" / "helpers" / "slow_steps"  # sitecustomize: each optimizer step sleeps (the jobs only)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    reason = slurm_cluster.missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    try:
        env = slurm_cluster.start(root)
        yield env
    finally:
        slurm_cluster.stop(root)


def sweep_args(reviews: Path, sweep_dir: Path) -> list[str]:
    return [
        "hydra/launcher=slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.signal_delay_s=60",
        "hydra.launcher.poll_s=1",
        "method=lora,frozen",
        f"hydra.sweep.dir={sweep_dir}",
        "model=tiny_bert",
        f"data.path={reviews}",
        f"data.cache_dir={sweep_dir.parent / 'hf'}",
        "logger=wandb",  # offline: the resumed job must keep its W&B run id
        "trainer.epochs=4",
        "trainer.batch_size=16",
        "trainer.checkpoint_every=1",
        "trainer.device=cpu",
        "optimizer.warmup_ratio=0.0",
        "optimizer.lr=3e-3",
    ]


def squeue(env: dict, *args: str) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", *args], capture_output=True, text=True, env=env)
    return dict(line.split("|", 1) for line in out.stdout.split())


def wait_for(check, what: str, timeout: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"no {what} within {timeout:.0f}s")


def checkpoint_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoint" / "progress.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def test_requeued_job_resumes_bit_identical_and_counts_once(cluster, reviews: Path, tmp_path: Path) -> None:
    from lora_exp.training.loop import train
    from lora_exp.training.rundir import recorded_config

    env = {**os.environ, **cluster, "WANDB_SILENT": "true", "LORA_EXP_TEST_STEP_SLEEP": "0.3"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(SLOW_STEPS), env.get("PYTHONPATH", "")])
    sweep_dir = tmp_path / "sweep"
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_exp", "-m", *sweep_args(reviews, sweep_dir)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lora_dir, frozen_dir = sweep_dir / "0_lora", sweep_dir / "1_frozen"
        jobs = wait_for(lambda: sorted(squeue(cluster)) if len(squeue(cluster)) == 2 else None, "2 jobs", 120, proc)
        wait_for(lambda: checkpoint_step(frozen_dir) >= 2, "checkpoint of the frozen job", 240, proc)
        subprocess.run(["scancel", "--signal=USR2", jobs[1]], check=True, env=env)  # the time-limit signal
        print(f"SIGUSR2 to SLURM job {jobs[1]} (frozen) at step {checkpoint_step(frozen_dir)}")
        wait_for(lambda: checkpoint_step(lora_dir) >= 4, "checkpoint of the lora job", 240, proc)
        wandb_id = json.loads((lora_dir / "checkpoint" / "progress.json").read_text())["wandb_id"]
        subprocess.run(["scontrol", "requeue", jobs[0]], check=True, env=env)  # what preemption does
        print(f"scontrol requeue {jobs[0]} (lora) at step {checkpoint_step(lora_dir)}")
        for job_id in jobs:
            wait_for(lambda j=job_id: squeue(cluster, "-j", j.split("_")[0]).get(j) == "PENDING", "requeue", 120, proc)
            # SLURM holds a requeued job back for two minutes (BeginTime); release it now
            subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True, env=env)
        out, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(out[-4000:])
    print(f"sweep with one requeue: {time.monotonic() - started:.0f}s")
    assert proc.returncode == 0, out[-3000:]

    # the summary waited for the requeued attempt: both rows, nothing failed, one offline W&B run per job
    summary = out[out.index(f"sweep {sweep_dir}:") :]
    assert "No finished runs" not in summary and "Failed jobs" not in summary
    assert "| frozen" in summary and "| lora r=8" in summary
    assert "W&B: 2 offline run(s); upload with: wandb sync" in summary
    assert out.count("Bypassing sacct error") <= 1

    final = json.loads((lora_dir / "results.json").read_text())
    first = json.loads((lora_dir / "results.failed-0.json").read_text())  # the first attempt's record, set aside
    assert first["failure"] == "preempted" and "SIGTERM" in first["reason"]
    assert final["status"] == "ok" and final["resumed"] is True
    assert final["wandb_id"] == wandb_id  # the same W&B run, continued
    frozen = json.loads((frozen_dir / "results.json").read_text())
    assert "SIGUSR2" in json.loads((frozen_dir / "results.failed-0.json").read_text())["reason"]
    assert frozen["status"] == "ok" and frozen["resumed"] is True  # requeued itself, resumed, finished

    # an uninterrupted run of the same recorded config, here: bit-identical adapter and scores
    straight = train(recorded_config(lora_dir), tmp_path / "straight")
    for key in ("best_val_acc", "best_step", "test_acc", "test_loss", "steps", "config_hash"):
        assert final[key] == straight[key], key
    a, b = (load_file(str(d / "adapter" / "adapter.safetensors")) for d in (lora_dir, tmp_path / "straight"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"adapter of the requeued job == uninterrupted run: {len(a)} tensors bit-identical")

    report = subprocess.run(
        [sys.executable, "-m", "lora_exp", "report", str(sweep_dir)], capture_output=True, text=True, env=env
    )
    assert report.returncode == 0, report.stderr[-2000:]
    rows = [line for line in report.stdout.splitlines() if line.startswith("| ") and "config" not in line]
    assert len(rows) == 2 and "Failed jobs" not in report.stdout  # results.failed-0.json is not counted


def test_a_pack_runs_as_one_slurm_job(cluster, reviews: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hydra/launcher=packed hydra.launcher.under=slurm``: a pack of 2 is ONE SLURM job (one array task), its
    jobs both finish with their pack-mate recorded."""
    from omegaconf import OmegaConf

    from tests.helpers.processes import cli

    for key, value in cluster.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    sweep_dir = tmp_path / "sweep"
    slurm = ("partition=debug", "gpus_per_node=0", "cpus_per_task=1", "mem_gb=2", "timeout_min=10", "poll_s=1")
    args = [
        "-m",
        "hydra/launcher=packed",
        "hydra.launcher.under=slurm",
        *(f"hydra.launcher.slurm.{s}" for s in slurm),
        "optimizer.lr=1e-3,2e-3",
        f"hydra.sweep.dir={sweep_dir}",
        *tiny_run(reviews, tmp_path, "trainer.max_steps=4", "logger=none"),
    ]
    proc = cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 job(s) -> 1 pack(s) of [2], 0 solo, under slurm" in proc.stdout
    submitted = proc.stdout.split("submitted 1 job(s) to SLURM: ", 1)[1].split()[0]
    tasks = sorted((sweep_dir / ".submitit").glob("*/*_log.out"))
    assert len(tasks) == 1, tasks  # one SLURM job (one array task) for the whole pack
    assert "pack of 2 (#0 #1) in process" in tasks[0].read_text()
    for run_dir, mate in ((sweep_dir / "0_lora", "1_lora"), (sweep_dir / "1_lora", "0_lora")):
        results = json.loads((run_dir / "results.json").read_text())
        assert results["status"] == "ok" and results["packed_with"] == [mate] and results["pack_size"] == 2
        job_id = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.job.id
        assert str(job_id).split("_")[0] == submitted  # both jobs ran in that SLURM job
