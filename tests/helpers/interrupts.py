"""A training run that 'dies' inside an optimizer step: the process-death half of the resume tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from torch.optim.optimizer import register_optimizer_step_post_hook

from lora_exp.training.loop import train


class Interrupt(Exception):
    """Raised from inside an optimizer step: the process 'dies' mid-run."""


def train_until_update(cfg: Any, run_dir: Path, update: int) -> None:
    """Train ``cfg`` into ``run_dir`` and die right after optimizer step number ``update`` (1-based), leaving
    whatever checkpoint the run had written by then."""
    seen = {"n": 0}

    def die(*_: object) -> None:
        seen["n"] += 1
        if seen["n"] == update:
            raise Interrupt

    hook = register_optimizer_step_post_hook(die)
    try:
        with pytest.raises(Interrupt):
            train(cfg, run_dir)
    finally:
        hook.remove()
