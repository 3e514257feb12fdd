"""``hydra/launcher=packed``: planning and splitting, without training (CLI runs: tests/e2e/test_packed_sweep.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_exp import pack_launcher
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
