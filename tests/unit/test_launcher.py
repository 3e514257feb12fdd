"""hydra/launcher=slurm without a cluster: the preset composes, a requeued job is waited for and reported by its
last attempt's results.json, the sacct warning comes once, the time-limit signal stops a SLURM job's loop."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn

from lora_exp import launcher
from lora_exp.cli import CONF_DIR
from lora_exp.training import interrupt


class FakeJob:
    """A submitit job: its id and result file (the first attempt's, as submitit leaves it)."""

    def __init__(self, job_id: str, folder: Path, value: float | None = None) -> None:
        self.job_id = job_id
        self.paths = SimpleNamespace(result_pickle=folder / f"{job_id}_result.pkl")
        self.value = value
        if value is not None:
            self.paths.result_pickle.write_text("x")

    def done(self) -> bool:
        return self.paths.result_pickle.exists()

    def _get_outcome_and_result(self):
        return "success", JobReturn(overrides=["method=lora"], _return_value=self.value)


def write_results(run_dir: Path, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(fields))


def test_preset_composes_with_overrides() -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=proj"],
            return_hydra_config=True,
        )
    lc = cfg.hydra.launcher
    assert lc._target_ == "hydra_plugins.lora_exp_plugins.slurm_launcher.SlurmLauncher"
    assert (lc.partition, lc.account, lc.qos, lc.gpus_per_node) == ("gpu", "proj", None, 1)
    assert lc.signal_delay_s > 0 and lc.max_num_timeout > 0 and lc.array_parallelism > 0
    assert lc.additional_parameters.requeue is True


def test_requeued_job_is_waited_for_and_reported_by_its_last_attempt(tmp_path: Path, monkeypatch) -> None:
    run_dir = tmp_path / "0_lora"
    write_results(run_dir, status="failed", failure="preempted", reason="SIGTERM at step 4: checkpoint saved")
    job = FakeJob("7_0", tmp_path, value=math.nan)  # the first attempt returned NaN (preempted)
    # squeue over the polls: the requeue (COMPLETING, PENDING), the second attempt, then gone
    states = iter([{"7_0": "COMPLETING"}, {"7_0": "PENDING"}, {"7_0": "RUNNING"}, {"7_0": "RUNNING"}, {}])
    polls = []

    def squeue(ids):
        polls.append(ids)
        seen = next(states)
        if len(polls) == 4:  # the second attempt finishes
            write_results(run_dir, status="ok", best_val_acc=0.75, resumed=True)
        return seen

    monkeypatch.setattr(launcher, "squeue_states", squeue)
    launcher.wait_for_last_attempts([job], poll_s=0)
    assert len(polls) == 5  # not done at the first attempt's result file
    ret = launcher.last_attempt_return(job, ["method=lora"], run_dir)
    assert ret.return_value == 0.75
    assert launcher.ran_out_line("7_0", run_dir, tmp_path) is None


def test_job_whose_attempts_ran_out_is_named_with_reason_and_command(tmp_path: Path) -> None:
    run_dir = tmp_path / "1_lora"
    write_results(run_dir, status="failed", failure="preempted", reason="SIGUSR2 at step 9: checkpoint saved")
    line = launcher.ran_out_line("7_1", run_dir, tmp_path)
    assert "7_1" in line and "SIGUSR2 at step 9" in line
    assert f"lora-exp resume={run_dir}" in line and f"hydra.sweep.dir={tmp_path}" in line
    assert math.isnan(launcher.last_attempt_return(FakeJob("7_1", tmp_path), [], run_dir).return_value)
    write_results(run_dir, status="failed", failure="nan", reason="train loss is nan")  # running again won't help
    assert launcher.ran_out_line("7_1", run_dir, tmp_path) is None


def test_squeue_failure_falls_back_to_submitit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(launcher, "squeue_states", lambda ids: None)
    launcher.wait_for_last_attempts([FakeJob("8_0", tmp_path, value=0.5)], poll_s=0)  # returns: result file


def test_sacct_warning_comes_once(caplog: pytest.LogCaptureFixture) -> None:
    launcher.quiet_sacct()
    launcher.quiet_sacct()  # a second sweep in the same process adds no second filter
    log = logging.getLogger("submitit")
    with caplog.at_level(logging.WARNING, logger="submitit"):
        for n in range(5):
            log.warning(f"Call #{n} - Bypassing sacct error Command sacct returned 1, status may be inaccurate.")
        log.warning("something else")
    assert sum("Bypassing sacct error" in r.getMessage() for r in caplog.records) == 1
    assert any(r.getMessage() == "something else" for r in caplog.records)


def test_time_limit_signal_sets_the_stop_flag_in_a_slurm_job(monkeypatch) -> None:
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert signal.SIGUSR2 in interrupt.signals()
    with interrupt.stop_flag() as flag:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.wait(5) and flag.signal_name == "SIGUSR2"
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    assert signal.SIGUSR2 not in interrupt.signals()


def test_time_limited_job_requeues_itself_until_its_limit(monkeypatch, capsys) -> None:
    calls = []
    monkeypatch.setattr(launcher.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "11"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    stopped = {"status": "failed", "failure": "preempted", "reason": "SIGUSR2 at step 3: checkpoint saved"}
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    launcher.requeue_if_timed_out(stopped, max_requeues=2)
    assert calls == [["scontrol", "requeue", "11_1"]]
    launcher.requeue_if_timed_out({**stopped, "reason": "SIGTERM at step 3"}, max_requeues=2)  # SLURM requeues
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    launcher.requeue_if_timed_out(stopped, max_requeues=2)
    assert len(calls) == 1 and "not requeued" in capsys.readouterr().err
