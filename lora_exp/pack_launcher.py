"""``hydra/launcher=packed hydra.launcher.pack=8`` (conf/hydra/launcher/packed.yaml): a multirun whose jobs that
share the base side (``training.pack.base_key``: model, data and cleaning, max length, batch size, epochs,
precision, base dtype, the frozen-base method) train in packs of at most ``pack`` jobs in one process, the frozen
base running once per step for all of them (``training.pack``). Jobs that cannot pack (``training.pack.packable``:
full fine-tuning, AdaLoRA, a base-rewriting init, ...) or that are alone on their base side run as the basic
launcher runs them, in the same sweep.

Each packed job is still a Hydra job: its own job dir (``.hydra/``, ``config.yaml``), ``results.json`` (with
``packed_with``), adapter, W&B run, lock, ``skip_done`` and failure records, exactly as ``cli.run_job`` writes them;
a pack that cannot start (its jobs turn out to have different bases) falls back to running them one by one.
Packs run one after the other in the launching process (no joblib / SLURM underneath yet).
"""

from __future__ import annotations

import copy
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

from lora_exp.errors import LoraExpError

log = logging.getLogger(__name__)


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

    def __init__(self, pack: int = 8) -> None:
        super().__init__()
        if int(pack) < 1:
            raise LoraExpError(f"hydra.launcher.pack={pack} must be a positive integer (jobs per pack)")
        self.pack = int(pack)
        self.config: DictConfig | None = None
        self.task_function: Any = None
        self.hydra_context: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        """Hydra's launcher set-up."""
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Plan the packs, then run each pack (one process, shared base) or solo job in sweep order."""
        from lora_exp.training.pack import base_key, packable

        setup_globals()
        assert self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs, keys = [], []
        for i, overrides in enumerate(job_overrides):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = sweep_config.hydra.job.num = initial_job_idx + i
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
            f"{sum(len(g) == 1 for g in groups)} solo",
            flush=True,
        )
        runs: list[JobReturn | None] = [None] * len(configs)
        for group in groups:
            for i, ret in zip(group, self._run_group([configs[i] for i in group], [job_overrides[i] for i in group])):
                runs[i] = ret
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [r for r in runs if r is not None]

    def _run_group(self, configs: list[DictConfig], overrides: list[Sequence[str]]) -> list[JobReturn]:
        """One solo job through Hydra's ``run_job``; a pack: each job's Hydra set-up (job dir, .hydra, callbacks)
        through ``run_job`` with a task that only collects it, then ``run_pack`` for all of them."""
        for cfg, o in zip(configs, overrides):
            log.info(f"\t#{cfg.hydra.job.num} : {' '.join(filter_overrides(o))}")
        if len(configs) == 1:
            return [self._run(configs[0], self.task_function)]
        collected: list[tuple[DictConfig, Path]] = []

        def collect(cfg: DictConfig) -> float:
            hc = HydraConfig.get()
            run_dir = Path(hc.runtime.output_dir)
            if cfg.logger.group is None:  # as cli.hydra_app: one W&B group per sweep
                cfg.logger.group = f"{cfg.sweep_name or 'adhoc'}-{run_dir.parent.name}"
            collected.append((copy.deepcopy(cfg), run_dir))
            return math.nan

        rets = [self._run(cfg, collect) for cfg in configs]
        results = run_pack([c for c, _ in collected], [d for _, d in collected])
        for ret, res in zip(rets, results):
            ret.return_value = res.get("best_val_acc", math.nan) if res.get("status") == "ok" else math.nan
        return rets

    def _run(self, config: DictConfig, task: Any) -> JobReturn:
        state = Singleton.get_state()
        try:
            return run_job(
                hydra_context=self.hydra_context,
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
