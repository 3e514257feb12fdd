"""A multirun's main process (``hydra.callbacks.sweep`` in conf/config.yaml): Ctrl-C that stops a local sweep
within seconds, and the report's summary table when the sweep ends.

On the first SIGINT / SIGTERM the main process forwards the signal to joblib's loky workers (a signal sent to
the main process alone reaches them too), keeps waiting for them, and so exits only once every running job has
checkpointed and recorded ``preempted``; jobs still queued do not start (``training/interrupt.py``). It then
prints the table and exits with 128 + the signal number. Running the same command again resumes. A second
Ctrl-C aborts at once (joblib kills the workers; their last checkpoints remain).
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

import psutil
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lora_exp.training import interrupt


def forward_to_workers(signum: int) -> None:
    """Send ``signum`` to this process's loky workers (not to W&B's service or anything else it started)."""
    for child in psutil.Process().children():
        try:
            if any("loky" in part and "resource_tracker" not in part for part in child.cmdline()):
                child.send_signal(signum)
        except psutil.Error:  # gone already
            pass


_executors: list[Any] = []  # loky executors our backend configured (to end idle workers after a stop)


def use_interruptible_loky() -> None:
    """Make joblib's ``loky`` backend (what Hydra's joblib launcher asks for) start its workers with
    ``interrupt.worker_init``: a worker hit by Ctrl-C before or between jobs keeps a flag instead of dying,
    which would break the pool and make joblib SIGKILL the other workers before they checkpoint."""
    try:
        from joblib import register_parallel_backend
        from joblib.parallel import LokyBackend
    except ImportError:  # no joblib: no joblib launcher either
        return

    class InterruptibleLoky(LokyBackend):
        def configure(self, *args: Any, **kwargs: Any) -> int:
            kwargs.setdefault("initializer", interrupt.worker_init)
            n_jobs = super().configure(*args, **kwargs)
            _executors.append(self._workers)
            return n_jobs

    register_parallel_backend("loky", InterruptibleLoky)


def end_idle_workers() -> None:
    """After a stopped sweep every job has returned: end the idle loky workers now rather than wait seconds
    for each to tear down torch and transformers at exit (nothing of theirs is left to write)."""
    while _executors:
        _executors.pop().shutdown(wait=True, kill_workers=True)


def summary_table(sweep_dir: Path) -> str:
    """The report's summary (``lora-exp report``'s console table) of the results under ``sweep_dir``."""
    from lora_exp.analysis.report import load_runs, summarize, to_markdown

    df = load_runs(sweep_dir)
    return to_markdown(summarize(df), df)


def stopped_line(sweep_dir: Path, signal_name: str) -> str:
    """One line after an interrupted sweep: how many jobs checkpointed, and how to resume."""
    preempted = 0
    for path in sweep_dir.glob("*/results.json"):
        try:
            preempted += json.loads(path.read_text()).get("failure") == "preempted"
        except (OSError, ValueError):
            continue
    return (
        f"stopped by {signal_name}: {preempted} job(s) checkpointed and recorded preempted; run the same command "
        f"again to resume (hydra.sweep.dir={sweep_dir})"
    )


def wandb_sync_line(sweep_dir: Path) -> str | None:
    """The command that uploads the sweep's offline W&B runs (a resumed job's second run dir continues the same
    run id, so it is counted once); None when there are none."""
    found = sorted(sweep_dir.glob("*/wandb/offline-run-*"))
    if not found:
        return None
    runs = {path.name.rsplit("-", 1)[-1] for path in found}
    return f"W&B: {len(runs)} offline run(s); upload with: wandb sync {sweep_dir}/*/wandb/offline-run-*"


class SweepCallback(Callback):
    """Hydra callback for the multirun's main process (see the module's docstring). It holds no state: Hydra
    pickles the callbacks into every joblib task."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        register_plugins(config)
        check_launcher(config)
        interrupt.install(escalate=True, then=forward_to_workers)
        use_interruptible_loky()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            table = summary_table(sweep_dir)
        except Exception as err:  # the sweep's results are written; a table that fails must not hide that
            table = f"[lora-exp] no summary table: {type(err).__name__}: {err}".splitlines()[0]
        print(f"\nsweep {sweep_dir}:\n{table}", flush=True)
        sync = wandb_sync_line(sweep_dir)
        if sync:
            print(sync, flush=True)
        stopped = interrupt.requested()
        if stopped is not None:
            end_idle_workers()
            name = stopped.signal_name or "SIGINT"
            print(stopped_line(sweep_dir, name), file=sys.stderr, flush=True)
            raise SystemExit(128 + signal.Signals[name].value)


def check_launcher(config: DictConfig) -> None:
    """``hydra/launcher=packed``: its options (``pack``, ``under``, ``n_jobs``) checked before Hydra builds the
    launcher, a bad one refused in one line (exit 2), as the rest of the config is."""
    node = config.hydra.launcher
    if not str(node.get("_target_", "")).endswith(".PackedLauncher"):
        return
    from lora_exp.errors import LoraExpError
    from lora_exp.pack_launcher import check_options

    try:
        check_options(node.get("pack"), node.get("under"), node.get("n_jobs"))
    except LoraExpError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def register_plugins(config: DictConfig) -> None:
    """Register the sweeper and launcher of ``hydra_plugins.lora_exp_plugins`` that this multirun names, before
    Hydra instantiates them (it calls the callbacks' ``on_multirun_start`` first).

    Hydra finds plugins by walking the ``hydra_plugins`` namespace package, which does not see a package that an
    editable install (``pip install -e .``) serves through its import hook; an explicit registration works for
    every kind of install. Only the plugins this run names are imported (the SLURM one needs submitit).
    """
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()
    for node in (config.hydra.sweeper, config.hydra.launcher):
        target = str(node.get("_target_", ""))
        module, _, name = target.rpartition(".")
        if module.startswith("hydra_plugins.lora_exp_plugins.") and target not in plugins.class_name_to_class:
            plugins.register(getattr(importlib.import_module(module), name))
