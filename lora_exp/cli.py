"""``lora-exp``: the Hydra app (one training job, or a multirun), plus a few subcommands.

lora-exp [key=value ...]              one job (Hydra overrides), e.g. lora-exp method=full
lora-exp -m [key=a,b ...]             a multirun sweep, e.g. lora-exp -m +sweep=methods
lora-exp resume=RUN_DIR               continue an interrupted run from its checkpoint
lora-exp fetch                        fetch the offline models and data once (else done on first use)
lora-exp report DIR [DIR ...] [--out D] [--wandb]   summary.csv / .md / fair.md / figures from results under DIRs
lora-exp rerun JOB_DIR [--out D]      train a finished job again from its recorded config, compare
lora-exp predict adapter=RUN_DIR text="..." | file=F [--force]   merged inference: label and probability
lora-exp export-peft RUN_DIR OUT [--force]   a LoRA run's adapter + head in the PEFT layout
lora-exp bench [--steps N] [--compile off|on|both] [overrides]    our loop vs HF Trainer (+ PEFT), same work
lora-exp bench --latency [--out F] [overrides]    ms per batch: base / LoRA unmerged / LoRA merged
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

from lora_exp.config import cmdline
from lora_exp.config.checks import validate
from lora_exp.config.identity import arm_hash, config_hash, group_hash
from lora_exp.config.schema import CONF_DIR, register_configs
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
    recorded_config,
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
    results = {
        "status": "failed",
        "failure": kind,
        "reason": reason,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "config_hash": digest,
        **ident,
        "r": cfg.lora.r if lora else None,
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


def _fetch() -> int:
    """Fetch every offline asset once (a no-op offline when cached); one line per asset: name and path."""
    from lora_exp.data import assets
    from lora_exp.models.whisper_ct2 import whisper_tiny_en_dir

    for name, where in (
        ("minilm", assets.minilm_dir),
        ("rotten_tomatoes", assets.rotten_tomatoes_file),
        ("whisper_tiny_en", whisper_tiny_en_dir),
    ):
        print(f"{name}: {where()}", flush=True)
    return 0


def _report(*args: str) -> int:
    import argparse

    from lora_exp.analysis.fair import widen_commands
    from lora_exp.analysis.report import fair_comparison, load_runs, write_report

    parser = argparse.ArgumentParser(prog="lora-exp report", description="Table + figures from a (multi)run dir")
    parser.add_argument("dirs", type=Path, nargs="+", help="run or multirun dirs (every results.json below them)")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write (default: DIR/report; several DIRs: DIR/report-merged)"
    )
    parser.add_argument("--wandb", action="store_true", help="also log tables + figures to a W&B run (job_type=report)")
    ns = parser.parse_args(args)
    for folder in ns.dirs:
        if not folder.is_dir():
            raise LoraExpError(f"report: {str(folder)!r} is not a folder")
    ns.dir = ns.dirs[0]  # where the fair comparison's widening sweeps and the W&B report are written
    written = write_report(ns.dirs, ns.out)
    print(written["summary.md"].read_text())  # the runs are read once (an unreadable one is reported once)
    if "fair.md" in written:  # a chosen lr at the edge of its grid: the sweep that looks beyond it
        df = load_runs(ns.dirs)
        print("\n".join(widen_commands(df, fair_comparison(df)[0], ns.dir)))
    print("\n".join(f"wrote {p}" for p in written.values()))
    if ns.wandb:
        from lora_exp.analysis.report import load_runs, report_tables
        from lora_exp.analysis.wandb_report import log_report

        out = written["summary.md"].parent
        df = load_runs(ns.dirs)
        df = df[~df["job_dir"].str.startswith(str(out))]
        figures = {name: path for name, path in written.items() if name.endswith(".png")}
        print(log_report(ns.dir, out, df, report_tables(df), figures))
    return 0


RERUN_COMPARED = ("best_val_acc", "best_step", "test_acc", "test_loss", "trainable_params", "data_order_digest")


def _rerun(*args: str) -> int:
    import argparse
    import time

    from lora_exp.training.loop import train

    parser = argparse.ArgumentParser(prog="lora-exp rerun", description="Train a finished job again from its config")
    parser.add_argument("job_dir", type=Path, help="a run dir holding config.yaml and results.json")
    parser.add_argument("--out", type=Path, default=None, help="new run dir (default: JOB_DIR-rerun-<stamp>)")
    ns = parser.parse_args(args)
    cfg = recorded_config(ns.job_dir)
    out = ns.out or ns.job_dir.with_name(f"{ns.job_dir.name}-rerun-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "results.json").exists():
        raise LoraExpError(f"rerun: {str(out)!r} already holds results.json; give another --out")
    new = train(cfg, out)
    old = json.loads((ns.job_dir / "results.json").read_text()) if (ns.job_dir / "results.json").exists() else {}
    tolerance = rerun_tolerance(new)
    same = True
    for key in RERUN_COMPARED:
        equal = same_metric(old.get(key), new.get(key), tolerance)
        same &= equal
        print(f"  {key:<20} {old.get(key)!s:<22} {new.get(key)!s:<22} {'same' if equal else 'DIFFERENT'}")
    how = "identical" if tolerance == 0 else f"within {tolerance:g} (CUDA without trainer.deterministic)"
    print(f"rerun in {out}: {how if same else 'differs'} (config hash {new['config_hash']})")
    return 0


def rerun_tolerance(results: dict) -> float:
    """0 (bit-identical) on CPU or with ``trainer.deterministic``; on CUDA otherwise non-deterministic kernels
    (atomics in backward, cuBLAS split-K) move metrics slightly, so floats are compared to 0.01."""
    cuda = str(results.get("device", "cpu")).startswith("cuda")
    return 0.0 if not cuda or results.get("deterministic") else 0.01


def same_metric(old: object, new: object, tolerance: float) -> bool:
    """Equal, or (floats) within ``tolerance``."""
    if tolerance and isinstance(old, float) and isinstance(new, float):
        return abs(old - new) <= tolerance
    return old == new


def _predict(*args: str) -> int:
    """lora-exp predict adapter=RUN_DIR text="..." | file=TEXTS.txt | audio=CLIP.wav|.npy [--force]  (key=value
    arguments; --force: load the adapter although the base's weights differ from those it was trained on)."""
    from lora_exp.inference import predict

    force = "--force" in args  # an adapter onto a base of the same shapes but other weights
    args = tuple(a for a in args if a != "--force")
    kv = dict(a.split("=", 1) for a in args if "=" in a)
    bad = [a for a in args if "=" not in a] + [k for k in kv if k not in ("adapter", "run", "text", "file", "audio")]
    if bad or not (kv.get("adapter") or kv.get("run")) or not (kv.get("text") or kv.get("file") or kv.get("audio")):
        raise LoraExpError(
            'predict: usage: lora-exp predict adapter=RUN_DIR text="..." | file=TEXTS.txt | audio=CLIP.wav '
            f"[--force] (got {list(args)})"
        )
    run_dir = Path(kv.get("adapter") or kv["run"])
    if run_dir.name == "adapter":  # the adapter folder itself: its run dir holds the config
        run_dir = run_dir.parent
    texts = [kv["text"]] if "text" in kv else []
    if "audio" in kv:  # an audio run: the clip's path (.wav, or .npy at the data's sample rate)
        if not Path(kv["audio"]).is_file():
            raise LoraExpError(f"predict: audio={kv['audio']!r}: no such file")
        texts.append(kv["audio"])
    if "file" in kv:
        if not Path(kv["file"]).is_file():
            raise LoraExpError(f"predict: file={kv['file']!r}: no such file")
        lines = Path(kv["file"]).read_text().split("\n")  # not splitlines(): \x85 or \u2028 inside a line is text
        texts += [line.strip() for line in lines if line.strip()]
    for (label, prob), text in zip(predict(run_dir, texts, force=force), texts):
        print(f"{label}\t{prob:.4f}\t{text}")
    return 0


def _export_peft(*args: str) -> int:
    """lora-exp export-peft RUN_DIR OUT_DIR: a LoRA run's adapter (and head) in the PEFT layout."""
    from lora_exp.adapters import init_state, store
    from lora_exp.adapters.peft_format import export_peft
    from lora_exp.models.build import build_model

    force = "--force" in args
    paths = [a for a in args if a != "--force"]
    if len(paths) != 2 or any(a.startswith("-") for a in paths):
        raise LoraExpError(f"export-peft: usage: lora-exp export-peft RUN_DIR OUT_DIR [--force] (got {list(args)})")
    run_dir, out = Path(paths[0]), Path(paths[1])
    if out.exists() and not out.is_dir():
        raise LoraExpError(f"export-peft: OUT_DIR={str(out)!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LoraExpError(
            f"export-peft: OUT_DIR={str(out)!r} is not empty; give a new or empty folder, or --force to replace "
            "the adapter files in it"
        )
    cfg = recorded_config(run_dir)
    if cfg.method.name != "lora":
        raise LoraExpError(f"export-peft: {str(run_dir)!r} is a method={cfg.method.name} run; only lora exports")
    meta, tensors = store.read_adapter(run_dir / "adapter")
    _, model, _, _ = build_model(cfg)
    if init_state.exists(run_dir):  # lora.init=eva: the saved ranks
        init_state.restore_state(model, run_dir)
    store.load_into(model, tensors, str(run_dir / "adapter"))
    export_peft(model, out, meta)
    store.make_readable(out)
    print(f"wrote {out / 'adapter_config.json'} and {out / 'adapter_model.safetensors'}")
    return 0


def _bench(*args: str) -> int:
    from lora_exp.bench.run import main as bench_main

    return bench_main(*args)


SUBCOMMANDS = {
    "fetch": _fetch,
    "report": _report,
    "rerun": _rerun,
    "predict": _predict,
    "export-peft": _export_peft,
    "bench": _bench,
}


def main() -> None:
    """Console entry point: a subcommand, or Hydra overrides for a training job."""
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        try:
            sys.exit(SUBCOMMANDS[sys.argv[1]](*sys.argv[2:]))
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
            cmdline.check_overrides(ns.overrides)
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
