"""An override outside the schema is refused with one line by a real ``lora-exp`` process."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.processes import cli as cli_process

CLOSED = "; the config is closed: + only adds a config group, e.g. +sweep=NAME"


def test_refusal_through_a_real_process(tmp_path: Path) -> None:
    proc = cli_process(["+lora.rank=8", "trainer.epochs=1"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: +lora.rank=8: no such option (did you mean lora.r?){CLOSED}"
    ]
    assert list(tmp_path.iterdir()) == []
