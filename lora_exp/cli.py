"""``lora-exp``: the Hydra app (one training job, or a multirun), plus a few subcommands.

lora-exp [key=value ...]          one job (Hydra overrides), e.g. lora-exp method=full
lora-exp -m [key=a,b ...]         a multirun sweep
lora-exp fetch                    fetch the offline model and data once (otherwise done on first use)
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lora_exp.config import config_hash, register_configs
from lora_exp.errors import LoraExpError, TrainingFailure
from lora_exp.tracking import write_json

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()


def finished_job(sweep_dir: Path, digest: str) -> Path | None:
    """A job dir in ``sweep_dir`` whose results.json finished ``status: ok`` with this config hash."""
    for path in sorted(sweep_dir.glob("*/results.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if res.get("status") == "ok" and res.get("config_hash") == digest:
            return path.parent
    return None


def set_aside_failure(run_dir: Path) -> None:
    """A failed result in this job dir is kept as results.failed-N.json before the job runs again."""
    old = run_dir / "results.json"
    if old.exists() and json.loads(old.read_text()).get("status") != "ok":
        n = len(list(run_dir.glob("results.failed-*.json")))
        os.replace(old, run_dir / f"results.failed-{n}.json")


def run_job(cfg: DictConfig, run_dir: Path, multirun: bool = False) -> dict:
    """Train one job; a failure leaves ``results.json`` with ``status: failed`` and the one-line reason.

    In a multirun the failure is recorded and the sweep goes on (the sweeper gets NaN); in a single run it
    exits non-zero. With ``skip_done`` a multirun job whose config hash already finished in the sweep dir
    is not trained again; a failed or interrupted one is.
    """
    from lora_exp.train import train  # heavy imports only when a job actually runs

    if multirun and cfg.skip_done:
        done = finished_job(run_dir.parent, config_hash(cfg))
        if done is not None:
            print(f"[lora-exp] skip: this job already finished in {done}", file=sys.stderr)
            return json.loads((done / "results.json").read_text())
        set_aside_failure(run_dir)
    try:
        return train(cfg, run_dir)
    except (LoraExpError, TrainingFailure, RuntimeError) as err:
        kind = getattr(err, "kind", "config" if isinstance(err, LoraExpError) else "error")
        if "out of memory" in str(err).lower():
            kind = "oom"
        reason = " | ".join(str(err).strip().splitlines()) or type(err).__name__
        run_dir.mkdir(parents=True, exist_ok=True)
        results = {
            "status": "failed",
            "failure": kind,
            "reason": reason,
            "method": cfg.method.name,
            "model": cfg.model.name,
            "data": cfg.data.name,
        }
        if not (run_dir / "results.json").exists():  # never overwrite a finished result
            write_json(run_dir / "results.json", results)
        print(f"error: {reason}" if kind == "config" else f"error ({kind}): {reason}", file=sys.stderr)
        if multirun:
            return results
        raise SystemExit(2 if kind == "config" else 1) from None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_app(cfg: DictConfig) -> float:
    """Hydra entry: returns best validation accuracy (NaN for a failed job) for sweepers."""
    hc = HydraConfig.get()
    run_dir, multirun = Path(hc.runtime.output_dir), hc.mode == RunMode.MULTIRUN
    if multirun and cfg.logger.group is None:  # one W&B group per sweep: its name + the sweep dir's stamp
        cfg.logger.group = f"{cfg.sweep_name or 'adhoc'}-{run_dir.parent.name}"
    results = run_job(cfg, run_dir, multirun)
    return results.get("best_val_acc", math.nan)


def _fetch() -> int:
    from lora_exp import assets

    print(f"model: {assets.minilm_dir()}\ndata:  {assets.rotten_tomatoes_file()}")
    return 0


def _report(*args: str) -> int:
    import argparse

    from lora_exp.report import load_runs, summarize, to_markdown, write_report

    parser = argparse.ArgumentParser(prog="lora-exp report", description="Table + figures from a (multi)run dir")
    parser.add_argument("dir", type=Path, help="a run or multirun dir (every results.json below it is read)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: DIR/report)")
    ns = parser.parse_args(args)
    if not ns.dir.is_dir():
        raise LoraExpError(f"report: {str(ns.dir)!r} is not a folder")
    written = write_report(ns.dir, ns.out)
    df = load_runs(ns.dir)
    print(to_markdown(summarize(df), df))
    print("\n".join(f"wrote {p}" for p in written.values()))
    return 0


SUBCOMMANDS = {"fetch": _fetch, "report": _report}


def main() -> None:
    """Console entry point: a subcommand, or Hydra overrides for a training job."""
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        try:
            sys.exit(SUBCOMMANDS[sys.argv[1]](*sys.argv[2:]))
        except LoraExpError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    hydra_app()
