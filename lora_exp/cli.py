"""``lora-exp``: the Hydra app (one training job, or a multirun), and the dispatcher of the subcommands
(``lora_exp/commands/``).

lora-exp [key=value ...]              one job (Hydra overrides), e.g. lora-exp method=full
lora-exp -m [key=a,b ...]             a multirun sweep, e.g. lora-exp -m +sweep=methods
lora-exp resume=RUN_DIR               continue an interrupted run from its checkpoint
lora-exp fetch                        fetch the offline models and data once (else done on first use)
lora-exp report DIR [DIR ...] [--out D] [--wandb]   summary.csv / .md / fair.md / figures from results under DIRs
lora-exp rerun JOB_DIR [--out D]      train a finished job again from its recorded config, compare
lora-exp predict adapter=RUN_DIR text="..." [text_pair="..."] | file=F | audio=CLIP|FOLDER [--force]   merged inference
lora-exp export-peft RUN_DIR OUT [--force]   a LoRA run's adapter + head in the PEFT layout
lora-exp bench [--steps N] [--compile off|on|both] [overrides]    our loop vs HF Trainer (+ PEFT), same work
lora-exp bench --latency [--out F] [overrides]    ms per batch: base / LoRA unmerged / LoRA merged
lora-exp wandb-sweep NAME [--out FILE]   the W&B sweep file (grid) of sweeps/NAME.yaml, for wandb agent
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lora_exp.adapters.params import layer_rank
from lora_exp.config import cmdline
from lora_exp.config.checks import validate
from lora_exp.config.identity import arm_hash, config_hash, group_hash
from lora_exp.config.schema import CONF_DIR, LoraConfig, register_configs, typed_config
from lora_exp.device import resolve_compute
from lora_exp.errors import LoraExpError, TrainingFailure
from lora_exp.measure.tracking import write_json
from lora_exp.training import interrupt
from lora_exp.training.lock import RunLock, claim
from lora_exp.training.rundir import (
    ERROR_FILE,
    check_resume,
    check_single_run_dir,
    finished_job,
    guard_job_dir,
    read_json,
    set_aside_failure,
)

register_configs()


def usage() -> str:
    """The usage lines of this module's docstring: the single source for ``--help`` and the README."""
    return "\n".join(line for line in (__doc__ or "").splitlines() if line.startswith("lora-exp"))


if not OmegaConf.has_resolver("lora_exp_usage"):  # conf/hydra/help/lora_exp.yaml
    OmegaConf.register_new_resolver("lora_exp_usage", usage)


class RunGuard(Callback):
    """Checks a single run before Hydra creates its run dir (``hydra.callbacks.guard`` in conf/config.yaml).

    A config that fails ``validate``, a ``resume=`` that cannot resume and a ``hydra.run.dir`` that holds
    another run are refused in one line (exit 2) before anything is written, so no run dir is left behind.
    The run dir (or the resumed one) is then claimed (``training/lock.py``): a second run started into it at
    the same time is refused in one line before Hydra writes anything there, and its files never mix in.
    """

    claimed: RunLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            if config.get("resume"):
                run_dir, recorded = check_resume(config.resume)
                validate(recorded)
                self.claimed = claim(run_dir, f"resume={config.resume}", "wait for it to finish or stop it first")
            else:
                validate(config)
                run_dir = Path(str(config.hydra.run.dir))
                self.claimed = claim(run_dir, f"hydra.run.dir={str(run_dir)!r}", "give a new hydra.run.dir")
                try:
                    check_single_run_dir(run_dir)
                except LoraExpError:
                    self.claimed.release()
                    raise
        except LoraExpError as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            raise SystemExit(2) from None

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.claimed is not None:
            self.claimed.release()


def one_line(err: BaseException) -> str:
    """An exception as one line (problems joined with ' | '); its type when it has no message."""
    text = " | ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    if not isinstance(err, LoraExpError | TrainingFailure):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text or type(err).__name__


def run_job(cfg: DictConfig, run_dir: Path, multirun: bool = False) -> dict:
    """Train one job; a failure leaves ``results.json`` with ``status: failed`` and the one-line reason.

    In a multirun the failure is recorded and the sweep goes on (the sweeper gets NaN); in a single run it
    exits non-zero. Either way the console gets one line and ``<run>/error.txt`` the full traceback.
    With ``skip_done`` a multirun job whose config hash already finished in the sweep dir is not trained
    again; a failed one is trained again, an interrupted one continues from its checkpoint.
    ``resume=<run dir>`` continues that run with the config it recorded; when it cannot, nothing is written.
    SIGINT / SIGTERM checkpoint and record ``preempted``; a multirun job that would start after them does not
    start. A multirun job dir that another live process holds is left alone (one line, nothing written).
    """
    with interrupt.stop_flag():
        if not multirun:  # the single run's dir was claimed by RunGuard
            return _train_or_record(cfg, run_dir, multirun)
        stopped = interrupt.requested()
        if stopped is not None:
            if {p.name for p in run_dir.iterdir()} <= {".hydra"}:  # only what Hydra wrote for this job
                shutil.rmtree(run_dir, ignore_errors=True)
            print(f"[lora-exp] not started: the sweep was stopped ({stopped.signal_name})", file=sys.stderr)
            return {"status": "not started", "reason": stopped.signal_name}
        try:
            held = claim(run_dir, f"job dir {str(run_dir)!r}", "is another sweep running into this hydra.sweep.dir?")
        except LoraExpError as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            return {"status": "failed", "failure": "config", "reason": one_line(err)}
        try:
            return _train_or_record(cfg, run_dir, multirun)
        finally:
            held.release()


def _train_or_record(cfg: DictConfig, run_dir: Path, multirun: bool) -> dict:
    """``run_job``'s work: resume / skip / guard, train, and record a failure in one line."""
    from lora_exp.training import checkpoint
    from lora_exp.training.loop import train  # heavy imports only when a job actually runs

    resume = False
    if cfg.get("resume"):  # refused before anything is written (no results.json in a dir we cannot resume)
        run_dir, cfg = check_resume(cfg.resume)
        resume = True
    try:
        if resume:
            set_aside_failure(run_dir)
        elif multirun and cfg.skip_done:
            digest = config_hash(cfg)
            done = finished_job(run_dir.parent, digest)
            if done is not None:
                print(f"[lora-exp] skip: this job already finished in {done}", file=sys.stderr)
                return json.loads((done / "results.json").read_text())
            guard_job_dir(run_dir, digest)
            set_aside_failure(run_dir)
            resume = checkpoint.exists(run_dir)
        return train(cfg, run_dir, resume=resume)
    except Exception as err:  # recorded, one line; in a multirun the other jobs go on
        kind = getattr(err, "kind", "config" if isinstance(err, LoraExpError) else "error")
        if "out of memory" in str(err).lower():
            kind = "oom"
        reason = one_line(err)
        _record_failure(cfg, run_dir, kind, reason)
        trace = _write_traceback(run_dir, err)
        where = f" (traceback in {trace})" if trace and kind not in ("config", "preempted", "pruned") else ""
        print(f"error: {reason}" if kind == "config" else f"error ({kind}): {reason}{where}", file=sys.stderr)
        if multirun:
            return {"status": "failed", "failure": kind, "reason": reason}
        raise SystemExit(2 if kind == "config" else 1) from None


def _write_traceback(run_dir: Path, err: BaseException) -> Path | None:
    """The full traceback of a failed job in ``<run>/error.txt`` (None when the dir cannot be written)."""
    try:
        path = run_dir / ERROR_FILE
        path.write_text("".join(traceback.format_exception(err)))
        return path
    except OSError:
        return None


def _record_failure(cfg: DictConfig, run_dir: Path, kind: str, reason: str) -> None:
    """results.json with status failed, unless the dir already holds a finished result (never overwritten)."""
    try:
        digest = config_hash(cfg)
        compute = resolve_compute(cfg.trainer, cfg.model, cfg.method.name)  # hashed as a finished run hashes
        ident = {"group_hash": group_hash(cfg, compute), "arm_hash": arm_hash(cfg, compute), "lr": cfg.optimizer.lr}
    except Exception:  # an unresolvable config has no identity
        digest, ident = None, {}
    lora = cfg.method.name == "lora"
    try:
        rank = layer_rank(typed_config(cfg.lora, LoraConfig)) if lora else None
    except Exception:  # a lora node that does not convert: its r as given
        rank = cfg.lora.get("r")
    results = {
        "status": "failed",
        "failure": kind,
        "reason": reason,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "config_hash": digest,
        **ident,
        "r": rank,
        "alpha": cfg.lora.alpha if lora else None,
        "targets": "+".join(cfg.lora.targets) if lora else None,
        "seed": cfg.trainer.seed,
    }
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        old = run_dir / "results.json"
        if not (old.exists() and read_json(old).get("status") == "ok"):
            write_json(old, results)
    except OSError:  # an unwritable run dir: the console line is all there is
        pass


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_app(cfg: DictConfig) -> float:
    """Hydra entry: returns best validation accuracy (NaN for a failed job) for sweepers."""
    hc = HydraConfig.get()
    run_dir, multirun = Path(hc.runtime.output_dir), hc.mode == RunMode.MULTIRUN
    if multirun and cfg.logger.group is None:  # one W&B group per sweep: its name + the sweep dir's stamp
        cfg.logger.group = f"{cfg.sweep_name or 'adhoc'}-{run_dir.parent.name}"
    results = run_job(cfg, run_dir, multirun)
    if multirun and "max_num_timeout" in hc.launcher:  # hydra/launcher=slurm: requeue before the time limit
        from lora_exp.launcher import requeue_if_timed_out

        requeue_if_timed_out(results, int(hc.launcher.max_num_timeout))
    return results.get("best_val_acc", math.nan)


# The subcommands: lora_exp/commands/<module>.py, each main(*args) -> exit status (imported when it runs).
SUBCOMMANDS = {
    "fetch": "fetch",
    "report": "report",
    "rerun": "rerun",
    "predict": "predict",
    "export-peft": "export_peft",
    "bench": "bench",
    "wandb-sweep": "wandb_sweep",
}


def run_subcommand(name: str, *args: str) -> int:
    """``lora-exp NAME args...``: ``lora_exp.commands.<module>.main(*args)``."""
    import importlib

    return importlib.import_module(f"lora_exp.commands.{SUBCOMMANDS[name]}").main(*args)


def main() -> None:
    """Console entry point: a subcommand, or Hydra overrides for a training job."""
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        try:
            sys.exit(run_subcommand(sys.argv[1], *sys.argv[2:]))
        except LoraExpError as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            sys.exit(2)
        except TrainingFailure as err:
            print(f"error ({err.kind}): {one_line(err)}", file=sys.stderr)
            sys.exit(1)
    args = sys.argv[1:]
    multirun = any(a in ("-m", "--multirun") for a in args)
    if multirun and any(a in ("-c", "--cfg") or a.startswith("--cfg=") for a in args):  # Hydra: a traceback
        print(
            "error: --cfg shows one job's config and cannot be combined with -m; drop -m and give one value per "
            "option (e.g. lora-exp +sweep=quick method=full --cfg job)",
            file=sys.stderr,
        )
        sys.exit(2)
    try:  # a closed config: each refused override in one line, before Hydra composes anything
        ns = cmdline.parse_args(args)
        if not (ns.help or ns.hydra_help or ns.shell_completion):
            cmdline.check_overrides(ns.overrides, ns.config_dir)
        if ns.cfg == "job" and not (ns.config_path or ns.config_dir):  # only the fields that apply
            sys.stdout.write(cmdline.show_job(ns))
            sys.exit(0)
    except LoraExpError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    try:
        hydra_app()
    except KeyboardInterrupt:  # Ctrl-C twice (lora_exp/training/interrupt.py)
        print(
            "error (preempted): Ctrl-C twice: stopped at once, without a checkpoint; an earlier one, if any, "
            "continues with lora-exp resume=RUN_DIR (a sweep: run the same command again)",
            file=sys.stderr,
        )
        sys.exit(130)
