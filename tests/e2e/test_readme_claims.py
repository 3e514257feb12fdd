"""README claims that are easy to break silently."""

from __future__ import annotations

from pathlib import Path

from lora_exp.training import loop
from tests.helpers import wandb_file


def test_train_loss_is_logged_every_log_every_steps(tiny_cfg, tmp_path: Path) -> None:
    """README: `train/loss` + `train/lr` every `trainer.log_every` updates (and at the last one)."""
    cfg = tiny_cfg("logger=wandb", "trainer.log_every=3", "trainer.max_steps=7")
    loop.train(cfg, tmp_path / "run")
    rows = wandb_file.history(wandb_file.run_file(tmp_path / "run" / "wandb"))
    assert [r["_step"] for r in rows if "train/loss" in r] == [3, 6, 7]
    assert [r["_step"] for r in rows if "train/lr" in r] == [3, 6, 7]
