"""``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml): Hydra's submitit launcher, with a job's result taken
from what its LAST attempt wrote.

submitit takes a job as done once a result file exists, so a job that SLURM requeued (preemption, ``scontrol
requeue``, or our own requeue before the time limit) was reported by its first attempt's return value (``preempted``)
while the next attempt was still queued. Here the main process waits until SLURM no longer lists the job (``squeue``,
which needs no accounting), then reads the job dir's ``results.json``. A job whose attempts ran out is named with
the reason and the command that continues it.

In the job (``requeue_if_timed_out``): the signal submitit asks SLURM to send ``signal_delay_s`` before the time
limit (USR2) stops the loop like SIGTERM (checkpoint, record ``preempted``); the job then requeues itself while it
has attempts left (``max_num_timeout``). After SIGTERM (preemption, ``scontrol requeue``) SLURM requeues it itself.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurm
from omegaconf import DictConfig, open_dict

from lora_exp.training.rundir import read_json

# squeue lists a job in one of these states while it (or its next attempt) may still write results.json
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
FINAL_STATES |= {"PREEMPTED"}  # a preempted job that SLURM requeues shows REQUEUED / PENDING instead


class OnceFilter(logging.Filter):
    """Let through the first record whose message holds ``text``; drop the repeats (submitit warns
    "Bypassing sacct error" on every poll of a cluster without accounting)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.seen = text, False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        seen, self.seen = self.seen, True
        return not seen


def quiet_sacct() -> None:
    """At most one line about missing accounting, however long the sweep polls."""
    log = logging.getLogger("submitit")
    if not any(isinstance(f, OnceFilter) for f in log.filters):
        log.addFilter(OnceFilter("Bypassing sacct error"))


def squeue_states(job_ids: Sequence[str]) -> dict[str, str] | None:
    """``{job id: state}`` for the jobs SLURM still lists (array tasks one per line, ``A_i``); None when squeue
    itself fails (then submitit's own checks decide)."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    cmd = ["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(arrays)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # a job id SLURM has already forgotten makes squeue fail with "Invalid job id": all are gone
        return {} if "Invalid job id" in out.stderr else None
    return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)


def wait_for_last_attempts(jobs: Sequence[Any], poll_s: float) -> None:
    """Return once no job is queued or running any more, requeued attempts included."""
    pending = {j.job_id: j for j in jobs}
    while pending:
        states = squeue_states(list(pending))
        for job_id, job in list(pending.items()):
            state = None if states is None else states.get(job_id)
            gone = job.done() if states is None else state is None or state in FINAL_STATES
            if gone:
                del pending[job_id]
        if pending:
            time.sleep(poll_s)


def job_dir(config: DictConfig, hydra_context: Any, overrides: Sequence[str], num: int) -> Path:
    """The job dir Hydra gives job ``num`` (the sweep's subdir pattern resolved with its overrides)."""
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config.hydra.job):
        sweep_config.hydra.job.num = num
    return Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)


def last_attempt_return(job: Any, overrides: Sequence[str], run_dir: Path) -> JobReturn:
    """The job's JobReturn with the value its last attempt recorded in ``results.json`` (best validation
    accuracy, NaN for a failed or unfinished job, as ``lora_exp.cli.hydra_app`` returns), not the value of
    whichever attempt wrote submitit's result file."""
    ret = JobReturn(overrides=list(overrides), working_dir=str(run_dir))
    try:  # submitit's result file, possibly an earlier attempt's (none when the last attempt was killed)
        if job.paths.result_pickle.exists():
            outcome, value = job._get_outcome_and_result()
            ret = value if outcome == "success" and isinstance(value, JobReturn) else ret
    except Exception:  # an unreadable result file: results.json speaks for the job
        pass
    results = read_json(run_dir / "results.json")
    ret.status = JobStatus.COMPLETED
    ret._return_value = results.get("best_val_acc", math.nan) if results.get("status") == "ok" else math.nan
    return ret


def ran_out_line(job_id: str, run_dir: Path, sweep_dir: Path) -> str | None:
    """For a job that ended without finishing: its reason and the command that continues it (None when it
    finished, or failed for a reason that running it again would not change)."""
    results = read_json(run_dir / "results.json")
    if results.get("status") == "ok" or (results and results.get("failure") != "preempted"):
        return None
    reason = results.get("reason") or "no results.json (killed before it recorded anything)"
    return (
        f"[lora-exp] job {job_id} ({run_dir.name}) ended unfinished, its attempts ran out: {reason}; continue it with "
        f"lora-exp resume={run_dir}, or run the sweep's command again with hydra.sweep.dir={sweep_dir}"
    )


def slurm_executor(settings: dict[str, Any]) -> tuple[Any, float]:
    """A submitit SLURM executor from the settings of conf/hydra/launcher/slurm.yaml (resolved), and ``poll_s``."""
    import submitit

    quiet_sacct()
    params = {k: v for k, v in settings.items() if k != "_target_"}
    poll_s = float(params.pop("poll_s", 10))
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=params.pop("submitit_folder"), slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name"}
    base.add("stderr_to_stdout")
    if not params.get("gpus_per_node"):  # 0: no GPU requested (a CPU-only partition, the local test cluster)
        params["gpus_per_node"] = None
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor, poll_s


class SlurmLauncher(_SubmititSlurm):
    """submitit's SLURM launcher whose results are the jobs' last attempts (see the module's docstring)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Submit the jobs as one array, wait for their last attempts, and return what those recorded."""
        executor, poll_s = slurm_executor(self.params)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        nums = range(initial_job_idx, initial_job_idx + len(job_overrides))
        args = [(list(o), "hydra.sweep.dir", n, f"job_id_for_{n}", _singletons()) for o, n in zip(job_overrides, nums)]
        jobs = executor.map_array(self, *zip(*args))
        dirs = [job_dir(self.config, self.hydra_context, o, n) for o, n in zip(job_overrides, nums)]
        print(f"[lora-exp] submitted {len(jobs)} job(s) to SLURM: {', '.join(j.job_id for j in jobs)}", flush=True)
        wait_for_last_attempts(jobs, poll_s)
        for job, run_dir in zip(jobs, dirs):
            line = ran_out_line(job.job_id, run_dir, sweep_dir)
            if line:
                print(line, file=sys.stderr, flush=True)
        return [last_attempt_return(j, o, d) for j, o, d in zip(jobs, job_overrides, dirs)]


def _singletons() -> Any:
    from hydra.core.singleton import Singleton

    return Singleton.get_state()


def in_slurm_job() -> bool:
    """This process is a job that submitit started on SLURM."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


def requeue_if_timed_out(results: dict[str, Any], max_requeues: int) -> None:
    """In a SLURM job stopped by the time-limit signal (``preempted`` by SIGUSR2): requeue it, which continues
    from its checkpoint, while it has requeues left; else one line that its attempts ran out."""
    if not in_slurm_job() or results.get("failure") != "preempted" or "SIGUSR" not in str(results.get("reason")):
        return
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array}_{task}" if array and task else os.environ["SLURM_JOB_ID"]
    if restarts >= max_requeues:
        print(f"[lora-exp] job {job_id}: time limit reached {restarts + 1} time(s), not requeued", file=sys.stderr)
        return
    subprocess.run(["scontrol", "requeue", job_id], check=False, timeout=60)
    print(f"[lora-exp] job {job_id}: requeued before its time limit (restart {restarts + 1})", file=sys.stderr)
