"""``lora-exp``: the Hydra app (one training job, or a multirun), plus a few subcommands.

lora-exp [key=value ...]          one job (Hydra overrides), e.g. lora-exp method=full
lora-exp -m [key=a,b ...]         a multirun sweep
lora-exp fetch                    fetch the offline model and data once (otherwise done on first use)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lora_exp.config import register_configs
from lora_exp.errors import LoraExpError, TrainingFailure
from lora_exp.tracking import write_json

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()


def run_job(cfg: DictConfig, run_dir: Path, multirun: bool = False) -> dict:
    """Train one job; a failure leaves ``results.json`` with ``status: failed`` and the one-line reason.

    In a multirun the failure is recorded and the sweep goes on; in a single run it exits non-zero.
    """
    from lora_exp.train import train  # heavy imports only when a job actually runs

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
    results = run_job(cfg, Path(hc.runtime.output_dir), multirun=hc.mode == RunMode.MULTIRUN)
    return results.get("best_val_acc", math.nan)


def _fetch() -> int:
    from lora_exp import assets

    print(f"model: {assets.minilm_dir()}\ndata:  {assets.rotten_tomatoes_file()}")
    return 0


SUBCOMMANDS = {"fetch": _fetch}


def main() -> None:
    """Console entry point: a subcommand, or Hydra overrides for a training job."""
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        try:
            sys.exit(SUBCOMMANDS[sys.argv[1]](*sys.argv[2:]))
        except LoraExpError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    hydra_app()
