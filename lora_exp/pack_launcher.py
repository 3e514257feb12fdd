"""``hydra/launcher=packed hydra.launcher.pack=8`` (conf/hydra/launcher/packed.yaml): a multirun whose jobs that
share the base side (``training.pack.base_key``: model, data and cleaning, max length, batch size, epochs,
precision, base dtype, the frozen-base method) train in packs of at most ``pack`` jobs in one process, the frozen
base running once per step for all of them (``training.pack``). Jobs that cannot pack (``training.pack.packable``:
full fine-tuning, a base-rewriting init, ...) or that are alone on their base side run as the basic
launcher runs them, in the same sweep.

Each packed job is still a Hydra job: its own job dir (``.hydra/``, ``config.yaml``), ``results.json`` (with
``packed_with``), adapter, W&B run, lock, ``skip_done`` and failure records, exactly as ``cli.run_job`` writes them;
a pack that cannot start (its jobs turn out to have different bases) falls back to running them one by one.
What runs each pack or solo job underneath (``hydra.launcher.under``): ``basic`` (one after the other in the
launching process), ``joblib`` (``n_jobs`` loky processes, as Hydra's joblib launcher; each pack or solo job is one
joblib task) or ``slurm`` (through submitit with the settings of conf/hydra/launcher/slurm.yaml under
``hydra.launcher.slurm``; each pack or solo job is one task of one SLURM job array, its results its last
attempt's). In every case a group runs as ``run_group``: each job's Hydra set-up through ``run_job``, then
``run_pack``.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from lora_exp.errors import LoraExpError

log = logging.getLogger(__name__)

UNDER = ("basic", "joblib", "slurm")  # what runs each pack or solo job (hydra.launcher.under)


def check_options(pack: Any, under: Any, n_jobs: Any) -> None:
    """The packed launcher's own options, each refused in one line naming what is allowed (``LoraExpError``)."""
    if isinstance(pack, bool) or not isinstance(pack, int) or pack < 1:
        raise LoraExpError(f"hydra.launcher.pack={pack} must be a positive integer (jobs per pack)")
    if under not in UNDER:
        raise LoraExpError(f"hydra.launcher.under={under}: no such option; it is one of {', '.join(UNDER)}")
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or not (n_jobs >= 1 or n_jobs == -1):
        raise LoraExpError(
            f"hydra.launcher.n_jobs={n_jobs} must be a positive integer (packs or solo jobs at once), or -1 (one "
            "per CPU)"
        )
    need = {"joblib": ("joblib", "joblib"), "slurm": ("hydra_submitit_launcher", "lora-exp[slurm]")}.get(under)
    if need and importlib.util.find_spec(f"hydra_plugins.{need[0]}" if under == "slurm" else need[0]) is None:
        raise LoraExpError(f"hydra.launcher.under={under} needs {need[0]}: pip install {need[1]}")


def plan(keys: Sequence[str | None], pack: int) -> list[list[int]]:
    """Job indices grouped: jobs with the same key in packs of at most ``pack`` (in sweep order), every job whose
    key is None alone."""
    groups: dict[str, list[int]] = {}
    out: list[list[int]] = []
    for i, key in enumerate(keys):
        if key is None:
            out.append([i])
        else:
            groups.setdefault(key, []).append(i)
    for members in groups.values():
        out += [members[a : a + pack] for a in range(0, len(members), pack)]
    return sorted(out, key=lambda g: g[0])


class PackedLauncher(Launcher):
    """Hydra launcher training packs of jobs that share a frozen base (see the module's docstring)."""

    def __init__(self, pack: int = 8, under: str = "basic", n_jobs: int = -1, slurm: Any = None) -> None:
        super().__init__()
        check_options(pack, under, n_jobs)
        self.pack, self.under, self.n_jobs = pack, under, n_jobs
        self.slurm: dict[str, Any] = {}
        if under == "slurm" and slurm is not None:  # resolved here, as Hydra's submitit launcher resolves its own
            self.slurm = dict(OmegaConf.to_container(slurm, resolve=True) if OmegaConf.is_config(slurm) else slurm)
        self.config: DictConfig | None = None
        self.task_function: Any = None
        self.hydra_context: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        """Hydra's launcher set-up."""
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Plan the packs, then run each pack (one process, shared base) or solo job through ``under``."""
        setup_globals()
        assert self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs, groups = self._plan(job_overrides, initial_job_idx)
        batches = [[configs[i] for i in g] for g in groups]
        if self.under == "joblib":
            returns = self._joblib(batches)
        elif self.under == "slurm":
            returns = self._slurm(batches)
        else:
            returns = []
            for batch in batches:
                returns.append(run_group(self.hydra_context, self.task_function, batch))
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        runs: list[JobReturn | None] = [None] * len(configs)
        for group, rets in zip(groups, returns):
            for i, ret in zip(group, rets):
                runs[i] = ret
        return [r for r in runs if r is not None]

    def _plan(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> tuple[list, list[list[int]]]:
        """Each job's sweep config, and the jobs grouped into packs (same ``base_key``) and solo jobs."""
        from lora_exp.training.pack import base_key, packable

        assert self.config is not None
        configs, keys = [], []
        for i, overrides in enumerate(job_overrides):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = sweep_config.hydra.job.num = initial_job_idx + i
                if self.under == "joblib":  # as Hydra's joblib launcher names its jobs
                    sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{initial_job_idx + i}"
            configs.append(sweep_config)
            HydraConfig.instance().set_config(sweep_config)
            job = copy.deepcopy(sweep_config)
            with open_dict(job):
                del job["hydra"]
            try:
                why = packable(job)
                keys.append(None if why else base_key(job))
            except Exception as err:  # a config that does not resolve: its own run reports it
                why = f"{type(err).__name__}"
                keys.append(None)
            if why:
                log.info(f"\t#{initial_job_idx + i} runs solo: {why}")
        groups = plan(keys, self.pack)
        sizes = [len(g) for g in groups if len(g) > 1]
        print(
            f"[lora-exp] packed launcher: {len(job_overrides)} job(s) -> {len(sizes)} pack(s) of {sizes or '-'}, "
            f"{sum(len(g) == 1 for g in groups)} solo, under {self.under}",
            flush=True,
        )
        return configs, groups

    def _joblib(self, batches: list[list[DictConfig]]) -> list[list[JobReturn]]:
        """Each group one joblib task on loky processes (``n_jobs`` at once), as Hydra's joblib launcher runs
        each of its jobs: Hydra's singletons handed over, ``run_group`` in the worker."""
        from joblib import Parallel, delayed

        state = Singleton.get_state()
        log.info(f"Joblib.Parallel(n_jobs={self.n_jobs}, backend=loky) is launching {len(batches)} pack(s)/job(s)")
        tasks = (delayed(run_group)(self.hydra_context, self.task_function, b, state) for b in batches)
        return list(Parallel(n_jobs=self.n_jobs, backend="loky")(tasks))

    def _slurm(self, batches: list[list[DictConfig]]) -> list[list[JobReturn]]:
        """Each group one task of one SLURM job array (submitit, the settings of conf/hydra/launcher/slurm.yaml);
        wait for every task's last attempt (requeues included) and return what each job recorded."""
        from lora_exp.launcher import last_attempt_return, ran_out_line, slurm_executor, wait_for_last_attempts

        assert self.config is not None
        executor, poll_s = slurm_executor(self.slurm)
        state, requeues = Singleton.get_state(), int(self.slurm.get("max_num_timeout", 0))
        jobs = executor.map_array(SlurmGroup(self.hydra_context, self.task_function, state, requeues), batches)
        print(f"[lora-exp] submitted {len(jobs)} job(s) to SLURM: {', '.join(j.job_id for j in jobs)}", flush=True)
        wait_for_last_attempts(jobs, poll_s)
        sweep_dir, out = Path(str(self.config.hydra.sweep.dir)), []
        for job, batch in zip(jobs, batches):
            rets = []
            for cfg in batch:
                run_dir = job_dir(cfg)
                line = ran_out_line(job.job_id, run_dir, sweep_dir)
                if line:
                    print(line, file=sys.stderr, flush=True)
                rets.append(last_attempt_return(job, _overrides(cfg), run_dir))
            out.append(rets)
        return out


def job_dir(cfg: DictConfig) -> Path:
    """The Hydra job dir of a loaded sweep config (``hydra.sweep.dir`` / ``hydra.sweep.subdir``)."""
    return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)


def _overrides(cfg: DictConfig) -> list[str]:
    return list(cfg.hydra.overrides.task)


def run_group(
    hydra_context: Any, task_function: Any, configs: list[DictConfig], singleton_state: Any = None
) -> list[JobReturn]:
    """One group: a solo job through Hydra's ``run_job``; a pack: each job's Hydra set-up (job dir, .hydra,
    callbacks) through ``run_job`` with a task that only collects it, then ``run_pack`` for all of them.

    ``singleton_state``: in another process (a joblib worker, a SLURM job), Hydra's singletons of the launching
    process, set as Hydra's joblib and submitit launchers set them."""
    if singleton_state is not None:
        setup_globals()
        Singleton.set_state(singleton_state)
    for cfg in configs:
        log.info(f"\t#{cfg.hydra.job.num} : {' '.join(filter_overrides(_overrides(cfg)))}")
    if len(configs) == 1:
        return [_run(hydra_context, configs[0], task_function)]
    nums = " ".join(f"#{cfg.hydra.job.num}" for cfg in configs)
    print(f"[lora-exp] pack of {len(configs)} ({nums}) in process {os.getpid()}", flush=True)
    collected: list[tuple[DictConfig, Path]] = []

    def collect(cfg: DictConfig) -> float:
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        if cfg.logger.group is None:  # as cli.hydra_app: one W&B group per sweep
            cfg.logger.group = f"{cfg.sweep_name or 'adhoc'}-{run_dir.parent.name}"
        collected.append((copy.deepcopy(cfg), run_dir))
        return math.nan

    rets = [_run(hydra_context, cfg, collect) for cfg in configs]
    results = run_pack([c for c, _ in collected], [d for _, d in collected])
    for ret, res in zip(rets, results):
        ret.return_value = res.get("best_val_acc", math.nan) if res.get("status") == "ok" else math.nan
    return rets


class SlurmGroup:
    """submitit's callable for one group as one SLURM job (as Hydra's submitit launcher is for one job): the
    jobs' ``hydra.job.id`` is the SLURM job's; a group stopped by the time-limit signal requeues itself
    (``launcher.requeue_if_timed_out``), and the signal arriving outside training makes submitit requeue it
    (``checkpoint``); the next attempt resumes each unfinished job from its checkpoint, skipping finished ones."""

    def __init__(self, hydra_context: Any, task_function: Any, singleton_state: Any, max_requeues: int) -> None:
        self.hydra_context, self.task_function = hydra_context, task_function
        self.singleton_state, self.max_requeues = singleton_state, max_requeues

    def __call__(self, configs: list[DictConfig]) -> list[JobReturn]:
        """Run the group in this SLURM job."""
        import submitit

        from lora_exp.launcher import requeue_if_timed_out
        from lora_exp.training.rundir import read_json

        job_id = submitit.JobEnvironment().job_id
        for cfg in configs:
            with read_write(cfg.hydra):
                cfg.hydra.job.id = job_id
        rets = run_group(self.hydra_context, self.task_function, configs, self.singleton_state)
        timed_out = [r for r in (read_json(job_dir(c) / "results.json") for c in configs) if "SIGUSR" in str(r)]
        if timed_out:
            requeue_if_timed_out(timed_out[0], self.max_requeues)
        return rets

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Resubmit the same group (submitit's requeue hook)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _run(hydra_context: Any, config: DictConfig, task: Any) -> JobReturn:
    state = Singleton.get_state()
    try:
        return run_job(
            hydra_context=hydra_context,
            task_function=task,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    finally:
        Singleton.set_state(state)


def run_pack(cfgs: list[DictConfig], run_dirs: list[Path]) -> list[dict]:
    """``cli.run_job`` for K jobs at once: each job's lock, ``skip_done``, guard and resume decision, then one
    ``training.pack.train_pack`` for those still to train, each failure recorded for its own job."""
    from lora_exp import cli
    from lora_exp.config.identity import config_hash
    from lora_exp.training import checkpoint, interrupt
    from lora_exp.training.lock import claim
    from lora_exp.training.pack import train_pack
    from lora_exp.training.rundir import finished_job, guard_job_dir, set_aside_failure

    out: list[dict] = [{} for _ in cfgs]
    held, todo, resumes = [], [], []
    with interrupt.stop_flag():
        try:
            for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
                stopped = interrupt.requested()
                if stopped is not None:
                    out[i] = {"status": "not started", "reason": stopped.signal_name}
                    continue
                try:
                    held.append(claim(run_dir, f"job dir {str(run_dir)!r}", "is another sweep running into it?"))
                    if cfg.skip_done:
                        done = finished_job(run_dir.parent, config_hash(cfg))
                        if done is not None:
                            print(f"[lora-exp] skip: this job already finished in {done}", file=sys.stderr)
                            out[i] = cli.read_json(done / "results.json")
                            continue
                        guard_job_dir(run_dir, config_hash(cfg))
                    set_aside_failure(run_dir)
                except LoraExpError as err:
                    print(f"error: {cli.one_line(err)}", file=sys.stderr)
                    out[i] = {"status": "failed", "failure": "config", "reason": cli.one_line(err)}
                    continue
                todo.append(i)
                resumes.append(checkpoint.exists(run_dir))
            if todo:
                _train_recorded(cfgs, run_dirs, todo, resumes, out, train_pack)
        finally:
            for lock in held:
                lock.release()
    return out


def _train_recorded(
    cfgs: list[DictConfig], run_dirs: list[Path], todo: list[int], resumes: list[bool], out: list[dict], train: Any
) -> None:
    """Train the pack; a job's failure recorded as ``cli`` records a solo job's; a pack that cannot start runs its
    jobs one by one instead."""
    from lora_exp import cli
    from lora_exp.training.pack import PackTooLarge

    if len(todo) == 1:
        out[todo[0]] = cli._train_or_record(cfgs[todo[0]], run_dirs[todo[0]], True)
        return
    try:
        results = train([cfgs[i] for i in todo], [run_dirs[i] for i in todo], resumes)
    except PackTooLarge as err:  # split before training: packs of the size that fits
        print(f"[lora-exp] pack of {len(todo)}: {err}; split into packs of {err.fits}", file=sys.stderr, flush=True)
        for a in range(0, len(todo), err.fits):
            _train_recorded(cfgs, run_dirs, todo[a : a + err.fits], resumes[a : a + err.fits], out, train)
        return
    except Exception as err:  # the pack itself (not one job) failed: each job runs (or resumes) on its own
        print(
            f"[lora-exp] pack of {len(todo)} could not run ({cli.one_line(err)}); running its jobs one by one",
            file=sys.stderr,
            flush=True,
        )
        for i in todo:
            out[i] = cli._train_or_record(cfgs[i], run_dirs[i], True)
        return
    for i, res in zip(todo, results):
        if isinstance(res, dict):
            out[i] = res
            continue
        kind = getattr(res, "kind", "config" if isinstance(res, LoraExpError) else "error")
        reason = cli.one_line(res)
        cli._record_failure(cfgs[i], run_dirs[i], kind, reason)
        trace = cli._write_traceback(run_dirs[i], res)
        where = f" (traceback in {trace})" if trace and kind not in ("config", "preempted", "pruned") else ""
        print(f"error ({kind}): {reason}{where}", file=sys.stderr)
        out[i] = {"status": "failed", "failure": kind, "reason": reason}
