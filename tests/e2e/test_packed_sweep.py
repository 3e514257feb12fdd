"""``hydra/launcher=packed`` through the real CLI (issue 28): LoRA jobs that share the base train as one pack, the
others (full fine-tuning) solo in the same sweep; every packed job writes what a solo job writes (results.json with
``packed_with``, adapter, its own W&B run); a diverging job fails alone; running the command again skips them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.configs import tiny_sweep
from tests.helpers.processes import cli

AXES = ("hydra/launcher=packed", "hydra.launcher.pack=4", "method=lora,full", "optimizer.lr=1e-3,1e30")


@pytest.fixture(scope="module")
def packed_sweep(tmp_path_factory: pytest.TempPathFactory, reviews: Path) -> tuple[Path, str, list[str]]:
    tmp = tmp_path_factory.mktemp("packed")
    args = tiny_sweep(reviews, tmp, tmp / "sweep", *AXES)
    proc = cli(args, tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "sweep", proc.stdout, args


def _results(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))}


def test_lora_jobs_pack_and_full_jobs_run_solo(packed_sweep) -> None:
    sweep, stdout, _ = packed_sweep
    got = _results(sweep)
    assert len(got) == 4
    assert "1 pack(s) of [2], 2 solo" in stdout
    lora = {k: r for k, r in got.items() if r["method"] == "lora"}
    full = {k: r for k, r in got.items() if r["method"] == "full"}
    assert len(lora) == 2 and len(full) == 2
    for name, r in lora.items():
        if r["status"] == "ok":
            assert sorted(r["packed_with"]) == sorted(n for n in lora if n != name)
            assert (sweep / name / "adapter" / "adapter.safetensors").is_file()
    assert all("packed_with" not in r for r in full)
    # lr=1e30 diverges: those jobs fail alone (nan), their pack-mates at lr=1e-3 finish
    assert sorted((r["status"], r.get("failure")) for r in lora.values()) == [("failed", "nan"), ("ok", None)]


def test_each_packed_job_has_its_own_wandb_run(packed_sweep) -> None:
    sweep, _, _ = packed_sweep
    ids = {r["wandb_id"] for r in _results(sweep).values() if r["status"] == "ok" and r["method"] == "lora"}
    assert len(ids) == 1 and None not in ids
    for name, r in _results(sweep).items():
        if r["method"] == "lora" and r["status"] == "ok":
            assert list((sweep / name / "wandb").glob("offline-run-*")), name


def test_running_it_again_skips_the_finished_jobs(packed_sweep, tmp_path: Path) -> None:
    sweep, _, args = packed_sweep
    before = _results(sweep)
    proc = cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("skip: this job already finished") == 2  # the ok jobs; the failed ones run again
    after = _results(sweep)
    assert {k: r["config_hash"] for k, r in after.items()} == {k: r["config_hash"] for k, r in before.items()}
