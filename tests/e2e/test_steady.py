"""Steady-state samples/s: a window after the start-up and the gradient checks, next to the wall-clock figure."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lora_exp.analysis import report
from lora_exp.training import loop


def test_steady_window_leaves_out_the_one_off_checks(tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    slow = 1.0

    def slowed(check):  # noqa: ANN001, ANN202
        def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            time.sleep(slow)
            return check(*args, **kwargs)

        return run

    # the two one-off checks of a LoRA run: gradients at update 1, LoRA moving at update 10
    monkeypatch.setattr(loop, "check_gradients", slowed(loop.check_gradients))
    monkeypatch.setattr(loop, "check_lora_moving", slowed(loop.check_lora_moving))
    res = loop.train(tiny_cfg("trainer.epochs=2", "save_weights=false"), tmp_path / "run")
    batch, per_epoch = 16, res["train_examples"]
    assert res["steps"] == 2 * per_epoch // batch and res["steady_from_update"] == 10
    assert res["steady_samples"] == 2 * per_epoch - 10 * batch  # the updates after the 10th, every sample
    assert res["train_seconds"] - res["steady_seconds"] >= 2 * slow  # both sleeps are outside the window
    assert 0 < res["steady_seconds"] < res["train_seconds"]
    assert res["steady_samples_per_s"] == pytest.approx(res["steady_samples"] / res["steady_seconds"])
    md = report.to_markdown(report.summarize(report.load_runs(tmp_path)), report.load_runs(tmp_path))
    assert "steady samples/s" in md and f"{res['steady_samples_per_s']:.1f}" in md


def test_too_short_a_run_has_no_steady_window(tiny_cfg, tmp_path: Path) -> None:
    res = loop.train(tiny_cfg("trainer.max_steps=4", "save_weights=false"), tmp_path / "run")
    assert res["steady_samples_per_s"] is None and res["steady_seconds"] is None and res["samples_per_s"] > 0
