"""One preset per variant (``conf/preset/``, ``+preset=NAME``): rank and targets are options and sweep axes, every
old ``+variant=NAME_r32_all`` job is the same job spelled ``+preset=NAME lora.r=32 'lora.targets=[...]'`` (same
config hash), the report groups a sweep over those axes as before, and the old spelling is a one-line error."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lora_exp.adapters.params import layer_rank, variant_label
from lora_exp.analysis import report
from lora_exp.cli import CONF_DIR
from lora_exp.config import cmdline
from lora_exp.config.checks import validate
from lora_exp.config.identity import arm_hash, config_hash, group_hash
from lora_exp.config.schema import LoraConfig, typed_config
from lora_exp.errors import LoraExpError
from tests.helpers.processes import cli

PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "preset").glob("*.yaml"))
ALL = "lora.targets=[q,k,v,o,ffn]"

# config_hash of each job of the 41 presets before this change (conf/variant/NAME.yaml at 9c8732b, composed on
# the default config): the same jobs spelled with +preset must keep them, so finished runs are still found.
OLD_VARIANT_HASHES = {
    "adalora": "43ab6022060f3b0c",
    "adalora_all": "81f36eaa28761320",
    "adalora_r32": "17779d670f279330",
    "adalora_r32_all": "d8eeee9decf9c7cf",
    "bitfit": "d427a63493ebd0cd",
    "dora": "241d1409e46b5736",
    "dora_all": "18327fcdc170a4f5",
    "dora_r32": "c70ba9fa4c7c7b73",
    "dora_r32_all": "c892559033a80c9a",
    "eva": "4ccc2e756a84f694",
    "eva_all": "1537ab822d3ab817",
    "eva_r32": "415e031414dd2baa",
    "eva_r32_all": "8bf39d4d62fd5989",
    "frozen": "f7d5af7a8243f2d3",
    "full": "02341518a0dbae88",
    "lora": "a7b21fd132d6d2a8",
    "lora_all": "61bde7fb7ad1d44f",
    "lora_fa": "c54263bc658dc9f0",
    "lora_fa_all": "a2ff74599ba4982b",
    "lora_fa_r32": "aa8eaef131784ccd",
    "lora_fa_r32_all": "7b4837ec2a50b352",
    "lora_ga": "d303e8df2cbe88ef",
    "lora_ga_all": "5736589641f47563",
    "lora_ga_r32": "79701895bda3eb7f",
    "lora_ga_r32_all": "ae9c1cd8d5d533ea",
    "lora_r32": "d80a5f6568ad2597",
    "lora_r32_all": "2bf512c6b472f506",
    "loraplus": "4e460a60484f88c5",
    "loraplus_all": "8cbbf34892cd7b9c",
    "loraplus_r32": "a4f06a6fd0dc994b",
    "loraplus_r32_all": "26bb9a5d668e7d47",
    "pissa": "06ea69c0004f59d2",
    "pissa_all": "79fa5c1b34a091ba",
    "pissa_r32": "bd6296441ac9848d",
    "pissa_r32_all": "73a20ce750e5fcff",
    "rslora": "58b26ce6730a0b67",
    "rslora_all": "6885ae6133fd57e2",
    "rslora_r32": "f99f98cede8b1585",
    "rslora_r32_all": "5af6a3264088c617",
    "vera": "1bcdbb91cfe6eb17",
    "vera_all": "01a76f830cd4505f",
}


def compose_all(overrides_list: list[list[str]]) -> list:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return [compose("config", overrides=o) for o in overrides_list]


def test_thirteen_presets_one_per_variant() -> None:
    assert (
        sorted(
            ["lora", "dora", "rslora", "pissa", "loraplus", "lora_fa", "eva", "lora_ga", "adalora", "vera"]
            + ["full", "frozen", "bitfit"]
        )
        == PRESETS
    )
    assert not (Path(CONF_DIR) / "variant").exists() and not (Path(CONF_DIR) / "sweep").exists()


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_at_rank_32_on_every_layer(preset: str) -> None:
    (cfg,) = compose_all([[f"+preset={preset}", "lora.r=32", ALL]])
    validate(cfg)
    assert (cfg.lora.r, list(cfg.lora.targets)) == (32, ["q", "k", "v", "o", "ffn"])
    expected = {"vera": 256, "adalora": 48}.get(preset, 32)  # VeRA keeps its own rank; AdaLoRA starts at 1.5 r
    assert layer_rank(typed_config(cfg.lora, LoraConfig)) == expected
    assert cfg.optimizer.lr == cfg.method.lr and cfg.optimizer.lr in cfg.method.lr_grid


@pytest.mark.e2e  # composes a whole sweep's jobs (>5 s): the full tier
def test_old_variant_jobs_keep_their_config_hash() -> None:
    spelled = {}
    for old in OLD_VARIANT_HASHES:
        preset = old.replace("_r32", "").replace("_all", "")
        spelled[old] = [f"+preset={preset}"] + ["lora.r=32"] * ("_r32" in old) + [ALL] * old.endswith("_all")
    cfgs = compose_all(list(spelled.values()))
    assert {old: config_hash(c) for old, c in zip(spelled, cfgs)} == OLD_VARIANT_HASHES


def test_lora_shape_that_does_not_apply_is_the_same_job() -> None:
    full8, full32, vera8, vera32, lora8, lora32 = compose_all(
        [[f"+preset={p}", f"lora.r={r}"] for p in ("full", "vera", "lora") for r in (8, 32)]
    )
    for a, b in ((full8, full32), (vera8, vera32)):
        assert config_hash(a) == config_hash(b) and group_hash(a) == group_hash(b) and arm_hash(a) == arm_hash(b)
    assert group_hash(lora8) != group_hash(lora32)


@pytest.mark.e2e  # composes a whole sweep's jobs (>5 s): the full tier
def test_report_groups_the_variants_sweep_by_preset_rank_and_targets(tmp_path: Path) -> None:
    """Every grid point of ``+sweep=variants`` written as a result (as with skip_done=false): the report finds
    41 configurations, one per job that trains, labelled by variant, the layers' rank and the targets."""
    from tests.helpers.sweeps import sweep_jobs

    jobs = sweep_jobs("variants")
    for i, (cfg, overrides) in enumerate(zip(compose_all([["+sweep=variants", *o] for o in jobs]), jobs)):
        lora = cfg.method.name == "lora"
        result = {
            "status": "ok",
            "method": cfg.method.name,
            "variant": variant_label(cfg.lora, cfg.method.name, cfg.optimizer.loraplus_lr_ratio),
            "model": cfg.model.name,
            "data": cfg.data.name,
            "r": layer_rank(cfg.lora) if lora else None,
            "alpha": cfg.lora.alpha if lora else None,
            "rslora": cfg.lora.rslora if lora else None,
            "targets": "+".join(cfg.lora.targets) if lora else None,
            "lr": cfg.optimizer.lr,
            "seed": cfg.trainer.seed,
            "config_hash": config_hash(cfg),
            "group_hash": group_hash(cfg),
            "arm_hash": arm_hash(cfg),
            "trainable_params": 100,
            "trainable_pct": 1.0,
            "train_seconds": 10.0,
            "samples_per_s": 5.0,
            "peak_host_rss_bytes": 2**30,
            "best_val_acc": 0.8,
            "test_acc": 0.8,
            "history": [],
        }
        (tmp_path / f"{i}").mkdir()
        (tmp_path / f"{i}" / "results.json").write_text(json.dumps(result))
        assert overrides[0].startswith("+preset=")
    summary = report.summarize(report.load_runs(tmp_path))
    assert len(summary) == 41
    rows = {(m, v, r, t) for m, v, r, t in zip(summary.method, summary.variant, summary.r, summary.targets)}
    assert len(rows) == 41 and summary["config"].nunique() == 41  # distinct labels, no hash needed
    assert ("lora", "adalora", 12, "q+v") in rows and ("lora", "adalora", 48, "q+k+v+o+ffn") in rows
    assert {r for m, v, r, t in rows if v == "vera"} == {256}
    assert {"adalora r=12 a=16 q+v", "dora r=32 a=16 q+k+v+o+ffn", "full"} <= set(summary["config"])


@pytest.mark.e2e  # starts lora-exp
def test_old_variant_spelling_is_one_line_naming_preset(tmp_path: Path) -> None:
    with pytest.raises(LoraExpError) as err:
        cmdline.check_overrides(["+variant=dora_r32_all"])
    assert str(err.value).startswith(
        "+variant=dora_r32_all: the presets are +preset=NAME now, with rank and targets as options: +preset=dora "
        "lora.r=32 'lora.targets=[q,k,v,o,ffn]'"
    )
    proc = cli(["+variant=vera", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "+preset=vera" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_runs_recorded_before_presets_load_as_the_same_job(tmp_path: Path) -> None:
    """A run dir from before (AdaLoRA's lora.r its initial rank and lora.adalora.target_r; VeRA's rank in lora.r)
    reloads (rerun, predict, export-peft, resume) as the same job: same layers, same config hash."""
    from omegaconf import OmegaConf

    from lora_exp.training.rundir import recorded_config

    adalora, vera = compose_all([["+preset=adalora"], ["+preset=vera"]])
    old_adalora = OmegaConf.to_container(adalora, resolve=True)
    old_adalora["lora"]["r"] = 12
    old_adalora["lora"]["adalora"] = {k: v for k, v in old_adalora["lora"]["adalora"].items() if k != "init_r"}
    old_adalora["lora"]["adalora"]["target_r"] = 8
    old_vera = OmegaConf.to_container(vera, resolve=True)
    old_vera["lora"]["r"] = 256
    del old_vera["lora"]["vera"]["r"]
    for name, old in (("adalora", old_adalora), ("vera", old_vera)):
        (tmp_path / name).mkdir()
        OmegaConf.save(OmegaConf.create(old), tmp_path / name / "config.yaml")
        cfg = recorded_config(tmp_path / name)
        assert config_hash(cfg) == OLD_VARIANT_HASHES[name]
    ada = recorded_config(tmp_path / "adalora").lora
    assert (ada.r, ada.adalora.init_r, layer_rank(ada)) == (8, 12, 12)
    assert layer_rank(recorded_config(tmp_path / "vera").lora) == 256


def test_widening_an_old_variant_job_spells_it_as_a_preset(tmp_path: Path) -> None:
    """``lora-exp report`` on a sweep from before prints a widening command that today's CLI accepts."""
    import pandas as pd
    import yaml

    from lora_exp.analysis import fair

    job = tmp_path / "3_dora_r32_all"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["+sweep=fair_variants", "+variant=dora_r32_all"]))
    runs = pd.DataFrame({"job_dir": [str(job)], "seed": [1], "method": ["lora"]})
    command = fair.widen_command("arm", runs, 2e-3, [5e-4, 1e-3, 2e-3], "high", tmp_path)
    assert command.startswith("lora-exp -m +sweep=fair_variants +preset=dora lora.r=32 'lora.targets=[q,k,v,o,ffn]'")
    cmdline.check_overrides(shlex.split(command)[2:])  # after "lora-exp -m"  # accepted as it stands
