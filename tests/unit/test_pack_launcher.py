"""``hydra/launcher=packed``: planning and splitting, without training (CLI runs: tests/e2e/test_packed_sweep.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_exp import pack_launcher, sweep
from lora_exp.errors import LoraExpError
from lora_exp.training.pack import PackTooLarge


def test_plan_groups_by_base_side_in_sweep_order() -> None:
    keys = ["a", "b", None, "a", "a", "b", "a"]
    assert pack_launcher.plan(keys, 3) == [[0, 3, 4], [1, 5], [2], [6]]
    assert pack_launcher.plan(keys, 1) == [[0], [1], [2], [3], [4], [5], [6]]


def test_bad_pack_size_is_one_line() -> None:
    with pytest.raises(LoraExpError, match=r"hydra.launcher.pack=0 must be a positive integer"):
        pack_launcher.PackedLauncher(pack=0)


def test_a_pack_over_budget_is_split_before_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def train(cfgs, dirs, resumes):
        calls.append([d.name for d in dirs])
        if len(dirs) > 2:
            raise PackTooLarge(2, 10, 5)
        return [{"status": "ok", "best_val_acc": 1.0} for _ in dirs]

    solo: list[str] = []
    monkeypatch.setattr(
        "lora_exp.cli._train_or_record", lambda cfg, d, multirun: solo.append(d.name) or {"status": "ok"}
    )
    dirs = [Path(f"/x/{i}") for i in range(5)]
    out: list[dict] = [{} for _ in dirs]
    pack_launcher._train_recorded([None] * 5, dirs, list(range(5)), [False] * 5, out, train)
    assert calls == [["0", "1", "2", "3", "4"], ["0", "1"], ["2", "3"]]
    assert solo == ["4"]  # the remainder of one runs as a solo job
    assert all(r["status"] == "ok" for r in out)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"under": "jolib"}, r"^hydra.launcher.under=jolib: no such option; it is one of basic, joblib, slurm$"),
        ({"n_jobs": 0}, r"^hydra.launcher.n_jobs=0 must be a positive integer .*, or -1 \(one per CPU\)$"),
        ({"n_jobs": "two"}, r"^hydra.launcher.n_jobs=two must be a positive integer"),
    ],
)
def test_bad_under_or_n_jobs_is_one_line(options: dict, message: str) -> None:
    with pytest.raises(LoraExpError, match=message):
        pack_launcher.PackedLauncher(**options)


def test_a_bad_option_is_refused_before_the_launcher_is_built(capsys: pytest.CaptureFixture) -> None:
    cfg = _compose(["hydra/launcher=packed", "hydra.launcher.under=slrum"])
    with pytest.raises(SystemExit) as stop:
        sweep.check_launcher(cfg)  # the sweep callback's on_multirun_start, before Hydra instantiates the launcher
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: hydra.launcher.under=slrum: no such option; it is one of basic, joblib, slurm"
    ]
    sweep.check_launcher(_compose(["hydra/launcher=packed", "hydra.launcher.under=joblib"]))  # a good one passes


def test_slurm_underneath_takes_the_slurm_presets_settings() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from lora_exp.launcher import slurm_executor

    cfg = _compose(
        ["hydra/launcher=packed", "hydra.launcher.under=slurm", "hydra.launcher.slurm.partition=debug"]
        + ["hydra.launcher.slurm.gpus_per_node=0", "hydra.launcher.slurm.mem_gb=3", "hydra.sweep.dir=/x/sweep"]
    )
    lc = cfg.hydra.launcher
    assert (lc.pack, lc.under, lc.n_jobs) == (8, "slurm", -1)
    launcher = pack_launcher.PackedLauncher(pack=lc.pack, under=lc.under, n_jobs=lc.n_jobs, slurm=lc.slurm)
    assert launcher.slurm["submitit_folder"] == "/x/sweep/.submitit/%j"  # resolved, as the slurm preset's
    assert (launcher.slurm["partition"], launcher.slurm["max_num_timeout"]) == ("debug", 5)
    executor, poll_s = slurm_executor(launcher.slurm)
    params = executor._executor.parameters
    assert (params["partition"], params["mem"], poll_s) == ("debug", "3GB", 10.0)
    assert "gpus_per_node" not in params  # 0: no GPU asked for
    assert pack_launcher.PackedLauncher(under="basic", slurm=lc.slurm).slurm == {}  # only read for under=slurm


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from lora_exp.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)
