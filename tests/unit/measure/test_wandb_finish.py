"""On SLURM, SIGTERM reaches W&B's service process too: finishing the run then fails with a lost connection.
That must not replace the job's own failure (``preempted``, checkpoint saved), which is what a requeue resumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_exp.config.schema import typed_config
from lora_exp.errors import TrainingFailure
from lora_exp.measure import tracking


class LostService:
    id = "run1"

    def finish(self, exit_code: int) -> None:
        raise ConnectionResetError("Connection lost")


def test_lost_wandb_service_does_not_mask_preempted(tiny_cfg, tmp_path: Path, monkeypatch, capsys) -> None:
    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kwargs: LostService())
    logger = typed_config(tiny_cfg("logger=wandb")).logger
    with (
        pytest.raises(TrainingFailure, match="SIGTERM at step 3"),
        tracking.wandb_run(logger, tmp_path, {}, "lora-r8", "lora"),
    ):
        raise TrainingFailure("preempted", "SIGTERM at step 3: checkpoint saved")
    assert "W&B run run1 not finished (ConnectionResetError: Connection lost)" in capsys.readouterr().err
    with pytest.raises(ConnectionResetError), tracking.wandb_run(logger, tmp_path, {}, "lora-r8", "lora"):
        pass  # a job that finished: the lost connection is its error
