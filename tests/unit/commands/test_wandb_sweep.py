"""``lora-exp wandb-sweep NAME``: the W&B sweep file generated from ``sweeps/NAME.yaml`` has the Hydra sweep's
job set, its commands compose and validate, and W&B logs online."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from lora_exp.commands.wandb_sweep import wandb_sweep
from lora_exp.config.checks import validate
from lora_exp.config.identity import config_hash
from lora_exp.config.schema import SWEEPS_DIR
from tests.helpers.configs import make_cfg
from tests.helpers.processes import cli
from tests.helpers.sweeps import expand, sweep_jobs


def wandb_jobs(spec: dict) -> list[list[str]]:
    """W&B's grid of ``spec`` as the argument lists ``${args_no_hyphens}`` gives ``lora-exp``."""
    axes = [
        [f"{k}={v}" for v in (p["values"] if "values" in p else [p["value"]])] for k, p in spec["parameters"].items()
    ]
    return [list(point) for point in itertools.product(*axes)]


@pytest.mark.parametrize("name", ["methods", "seeds", "rank_alpha", "variants"])
def test_generated_grid_is_the_hydra_sweeps_job_set(name: str) -> None:
    spec = wandb_sweep(name)
    assert spec["command"] == ["lora-exp", "${args_no_hyphens}"] and spec["method"] == "grid"
    assert spec["metric"] == {"name": "best_val_acc", "goal": "maximize"} and spec["program"] == "lora-exp"
    jobs = wandb_jobs(spec)
    fixed = [f"+sweep={name}", "logger=wandb_online"]
    hydra = sweep_jobs(name)
    assert sorted(sorted(fixed + j) for j in hydra) == sorted(sorted(j) for j in jobs)
    assert len(jobs) == {"methods": 3, "seeds": 9, "rank_alpha": 42, "variants": 52}[name]
    for args in jobs[:: max(1, len(jobs) // 5)]:  # as W&B runs them: the same job as the multirun's
        cfg = make_cfg(args)
        validate(cfg)
        assert cfg.logger.mode == "online" and cfg.sweep_name == name
        multirun = [a for a in args if a != "logger=wandb_online"]
        assert config_hash(cfg) == config_hash(make_cfg(multirun))


@pytest.mark.e2e  # composes a whole sweep's jobs (>5 s): the full tier
def test_every_sweep_generates_and_a_monitor_sets_the_metric() -> None:
    names = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
    assert {"methods", "quick", "fair", "fair_variants", "variants", "gw_methods"} <= set(names)
    for name in names:
        spec = wandb_sweep(name)
        assert len(wandb_jobs(spec)) == len(expand(dict(spec_params(name))))
    assert wandb_sweep("gw_methods")["metric"] == {"name": "best_val_auc", "goal": "maximize"}
    assert wandb_sweep("quick")["parameters"]["method"] == {"values": ["full", "frozen", "lora"]}


def spec_params(name: str) -> dict:
    from hydra import compose, initialize_config_dir

    from lora_exp.config.schema import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return dict(compose("config", overrides=[f"+sweep={name}"], return_hydra_config=True).hydra.sweeper.params)


@pytest.mark.e2e  # starts lora-exp
def test_cli_writes_the_file_and_refuses_an_unknown_sweep(tmp_path: Path) -> None:
    proc = cli(["wandb-sweep", "targets", "--out", str(tmp_path / "targets.yaml")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    spec = yaml.safe_load((tmp_path / "targets.yaml").read_text())
    assert spec == wandb_sweep("targets")
    assert spec["parameters"]["lora.targets"]["values"][0] == "[q,v]" and len(wandb_jobs(spec)) == 6
    proc = cli(["wandb-sweep", "nope"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: wandb-sweep: NAME='nope' is no sweep; one of "
        + ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
    ]
