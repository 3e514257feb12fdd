"""The run-directory lock: a claimed directory is refused until released."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_exp.errors import LoraExpError
from lora_exp.training import lock


def test_a_claimed_dir_is_refused_until_released(tmp_path: Path) -> None:
    held = lock.claim(tmp_path / "r", "hydra.run.dir='r'", "give a new hydra.run.dir")
    with pytest.raises(LoraExpError, match=rf"in use by another lora-exp run \(pid {os.getpid()} on "):
        lock.claim(tmp_path / "r", "hydra.run.dir='r'", "give a new hydra.run.dir")
    held.release()
    assert not (tmp_path / "r" / lock.LOCK_FILE).exists()
    lock.claim(tmp_path / "r", "hydra.run.dir='r'", "give a new hydra.run.dir").release()  # free again
