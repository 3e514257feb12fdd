"""Bad inputs met by real runs and ``lora-exp`` processes: one line each, a failed result, nothing leaked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_exp.errors import LoraExpError
from lora_exp.training import loop
from tests.helpers.processes import cli


def test_unwritable_output_dir(tiny_cfg, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LoraExpError, match="is not writable"):
        loop.train(tiny_cfg(), blocker / "run")


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        (["model=distilbert"], "model.path='distilbert-base-uncased'"),
        (["data=imdb", "model=tiny_bert"], "data.path='imdb'"),
    ],
)
def test_hub_preset_offline_is_one_line(overrides: list[str], option: str, tmp_path: Path) -> None:
    from lora_exp.data import hub

    if hub.hub_reachable():
        pytest.skip("the Hugging Face Hub is reachable from here")
    proc = cli(
        [*overrides, "logger=none", f"data.cache_dir={tmp_path / 'hf'}", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {option}: cannot load")
    assert "model=minilm data=rotten_tomatoes_offline" in errors[0]


def test_predict_usage_errors(tmp_path: Path) -> None:
    proc = cli(["predict", "text=hello"], tmp_path)
    assert proc.returncode == 2 and "predict: usage" in proc.stderr
    proc = cli(["predict", f"adapter={tmp_path}", "text=hello"], tmp_path)
    assert proc.returncode == 2 and "has no config.yaml" in proc.stderr


def test_wandb_api_key_never_written(tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    loop.train(tiny_cfg("logger=wandb", "trainer.max_steps=2"), tmp_path / "run")
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_diverging_run_is_nan_not_untrained(tiny_cfg, tmp_path: Path) -> None:
    from lora_exp.errors import TrainingFailure

    # batch 8: 16 updates per epoch, so the LoRA probe at step 9 is the first check to run after divergence
    cfg = tiny_cfg("optimizer.lr=1e6", "trainer.batch_size=8", "trainer.log_every=50", "trainer.checkpoint_every=0")
    with pytest.raises(TrainingFailure, match=r"train loss or weights are not finite at step 9: ") as err:
        loop.train(cfg, tmp_path / "run")
    assert err.value.kind == "nan"


def test_single_class_data_through_the_cli_is_one_line_and_failed(tmp_path: Path) -> None:
    path = tmp_path / "one.csv"
    path.write_text("text,label\n" + "".join(f"good film {i},pos\n" for i in range(40)))
    run = tmp_path / "run"
    proc = cli(["model=tiny_bert", "data=csv", f"data.path={path}", "logger=none", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == [
        "error: data.label_column='label': the data holds a single class ('pos'); a classifier needs at least two"
    ]
    saved = json.loads((run / "results.json").read_text())
    assert saved["status"] == "failed" and saved["failure"] == "config" and saved["reason"] == errors[0][7:]


def test_export_peft_refuses_a_non_empty_out_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = cli(["export-peft", str(tmp_path / "run"), str(out)], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: export-peft: OUT_DIR='{out}' is not empty; give a new or empty folder, or --force to replace the "
        "adapter files in it"
    ]
    proc = cli(["export-peft", str(tmp_path / "run"), str(out), "--force"], tmp_path)  # gets past the check
    assert proc.returncode == 2 and "has no config.yaml" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_multirun_with_cfg_is_one_line(tmp_path: Path) -> None:
    proc = cli(["-m", "method=full,lora", "--cfg", "job"], tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: --cfg shows one job's config and cannot be combined with -m")
    proc = cli(["+sweep=quick", "method=full", "--cfg", "job"], tmp_path)
    assert proc.returncode == 0 and "sweep_name: quick" in proc.stdout


def test_help_lists_subcommands_and_real_groups(tmp_path: Path) -> None:
    from lora_exp.cli import CONF_DIR, SUBCOMMANDS
    from lora_exp.config.schema import SWEEPS_DIR

    proc = cli(["--help"], tmp_path)
    assert proc.returncode == 0
    for name in SUBCOMMANDS:
        assert f"lora-exp {name}" in proc.stdout, name
    groups = dict(
        line.split(": ", 1)
        for line in proc.stdout.split("== Config groups ==")[1].split("== Config ==")[0].splitlines()
        if ": " in line
    )
    conf = Path(CONF_DIR)
    on_disk = {d.name for d in conf.iterdir() if d.is_dir() and d.name != "hydra" and any(d.glob("*.yaml"))}
    assert set(groups) == on_disk | {"sweep"} and "sweep/wandb" not in proc.stdout  # sweep: sweeps/ at the top
    assert groups["sweep"].split(", ") == sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
    assert groups["preset"].split(", ") == sorted(p.stem for p in (conf / "preset").glob("*.yaml"))
