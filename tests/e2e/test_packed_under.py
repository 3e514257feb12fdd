"""``hydra/launcher=packed hydra.launcher.under=joblib`` through the real CLI (issue 28: a pack is one job for the
launcher underneath): 2 packs and a solo job as 3 joblib tasks on 2 loky processes, each pack in its own process,
every job's results.json and adapter as with the basic launcher underneath. (SLURM underneath:
tests/e2e/test_slurm.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.configs import tiny_sweep
from tests.helpers.processes import cli

# pack=2 over 5 LoRA jobs on one base: packs (#0 #1), (#2 #3), and #4 alone (solo); W&B off to keep it short
AXES = ("hydra/launcher=packed", "hydra.launcher.pack=2", "optimizer.lr=1e-3,2e-3,3e-3,4e-3,5e-3", "logger=none")
PACK_LINE = re.compile(r"\[lora-exp\] pack of 2 \((#\d #\d)\) in process (\d+)")


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory, reviews: Path) -> dict[str, tuple[Path, str]]:
    """The same sweep with joblib (n_jobs=2) and with basic underneath: {under: (sweep dir, stdout)}."""
    tmp = tmp_path_factory.mktemp("packed_under")
    out = {}
    for under in ("joblib", "basic"):
        args = tiny_sweep(reviews, tmp, tmp / under, *AXES, f"hydra.launcher.under={under}", "hydra.launcher.n_jobs=2")
        proc = cli(args, tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[under] = (tmp / under, proc.stdout)
    return out


def _results(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))}


def test_each_pack_is_one_joblib_task_in_its_own_process(sweeps) -> None:
    _, stdout = sweeps["joblib"]
    assert "5 job(s) -> 2 pack(s) of [2, 2], 1 solo, under joblib" in stdout
    packs = dict(PACK_LINE.findall(stdout))
    assert sorted(packs) == ["#0 #1", "#2 #3"], stdout[-2000:]
    assert packs["#0 #1"] != packs["#2 #3"]  # two loky workers, one pack each
    basic = dict(PACK_LINE.findall(sweeps["basic"][1]))
    assert sorted(basic) == ["#0 #1", "#2 #3"] and len(set(basic.values())) == 1  # basic: one process for both


def test_jobs_record_what_they_record_with_basic_underneath(sweeps) -> None:
    got, ref = _results(sweeps["joblib"][0]), _results(sweeps["basic"][0])
    assert sorted(got) == sorted(ref) == [f"{i}_lora" for i in range(5)]
    for name in ("0_lora", "1_lora", "2_lora", "3_lora"):
        mate = {"0": "1_lora", "1": "0_lora", "2": "3_lora", "3": "2_lora"}[name[0]]
        assert got[name]["status"] == "ok", got[name]
        assert got[name]["packed_with"] == [mate] and got[name]["pack_size"] == 2, name
    assert "packed_with" not in got["4_lora"] and got["4_lora"]["status"] == "ok"  # the solo job
    keys = ("status", "packed_with", "pack_size", "config_hash", "best_val_acc", "best_step", "test_acc", "steps")
    for name in got:
        assert {k: got[name].get(k) for k in keys} == {k: ref[name].get(k) for k in keys}, name


def test_adapters_equal_the_basic_launchers(sweeps) -> None:
    for i in range(5):
        a, b = (load_file(str(sweeps[u][0] / f"{i}_lora" / "adapter" / "adapter.safetensors")) for u in sweeps)
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), i  # bit-identical: same code, same seeds, other process
