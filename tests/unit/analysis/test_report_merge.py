"""``lora-exp report DIR [DIR ...]``: sweep dirs merged into one table; the same configuration pools, a copied
run counts once, set-aside failed attempts never count."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_exp.analysis import report
from tests.helpers.results import write_result


def result(folder: Path, **fields) -> None:
    """``folder/results.json``: the helpers' finished LoRA run plus the identity fields that merging keys on."""
    identity = {"r": 8, "alpha": 16, "config_hash": "c-lora", "group_hash": "g-lora", "wandb_id": None}
    write_result(folder.parent, folder.name, **{**identity, **fields})


def two_sweeps(tmp: Path) -> tuple[Path, Path]:
    a, b = tmp / "cluster_a", tmp / "cluster_b"
    result(a / "0_lora", seed=1, test_acc=0.80, wandb_id="run1", config_hash="c1")
    result(a / "1_full", method="full", group_hash="g-full", config_hash="f1", seed=1, wandb_id="run2")
    result(b / "0_lora", seed=2, test_acc=0.84, wandb_id="run3", config_hash="c2", train_seconds=11.0)
    # a preempted first attempt, set aside when the job continued: never a row
    (b / "0_lora" / "results.failed-0.json").write_text(json.dumps({"status": "failed", "failure": "preempted"}))
    (b / "0_lora" / "error.failed-0.txt").write_text("Traceback ...")
    shutil.copytree(a / "0_lora", b / "copied_0_lora")  # the same run, copied into the second dir
    return a, b


def test_same_configuration_pools_and_a_copied_run_counts_once(tmp_path: Path) -> None:
    a, b = two_sweeps(tmp_path)
    df = report.load_runs([a, b])
    assert len(df) == 3 and sorted(df["wandb_id"]) == ["run1", "run2", "run3"]
    summary = report.summarize(df)
    lora = summary[summary["method"] == "lora"].iloc[0]
    assert lora["seeds"] == 2 and abs(lora["test_acc"] - 0.82) < 1e-12  # seeds 1 and 2 from two dirs pool
    assert len(summary) == 2


def test_copy_without_wandb_id_counts_once_and_a_rerun_stays_apart(tmp_path: Path) -> None:
    result(tmp_path / "a" / "0_lora", seed=1)
    shutil.copytree(tmp_path / "a" / "0_lora", tmp_path / "b" / "0_lora")
    result(tmp_path / "b" / "1_lora", seed=2, train_seconds=12.0, config_hash="c-lora-2")
    df = report.load_runs([tmp_path / "a", tmp_path / "b"])
    assert sorted(df["seed"]) == [1, 2]
    assert report.summarize(df).iloc[0]["seeds"] == 2


@pytest.mark.e2e  # starts lora-exp report
def test_report_command_merges_dirs_into_one_table(tmp_path: Path) -> None:
    a, b = two_sweeps(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "lora_exp", "report", str(a), str(b), "--out", str(tmp_path / "merged")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "config" not in line]
    assert len(rows) == 2 and "Failed jobs" not in out.stdout
    assert (tmp_path / "merged" / "summary.md").is_file() and (tmp_path / "merged" / "summary.csv").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "lora_exp", "report", str(a), str(tmp_path / "nope")], text=True, capture_output=True
    )
    assert bad.returncode == 2 and "is not a folder" in bad.stderr
