"""``lora-exp`` run as a user runs it: a fresh process, not attached to this test process's W&B service."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def fresh_env() -> dict[str, str]:
    """This process's environment without ``WANDB_SERVICE`` (wandb exports it to children once it has started
    one, and a SIGKILLed child's run would stay "in use"), with W&B silent."""
    return {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"WANDB_SILENT": "true"}


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``lora-exp`` as a user would (a fresh process) and wait for it, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "lora_exp", *args], cwd=cwd, capture_output=True, text=True, env=fresh_env(), timeout=600
    )


def start(
    args: list[str], cwd: Path, new_session: bool = False, stdout: int | None = subprocess.PIPE
) -> subprocess.Popen:
    """``lora-exp`` started in a fresh process (stderr piped), optionally as its own process group."""
    return subprocess.Popen(
        [sys.executable, "-m", "lora_exp", *args],
        cwd=cwd,
        env=fresh_env(),
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def errors(stderr: str) -> list[str]:
    """The lines of ``stderr`` that start with ``error``."""
    return [line for line in stderr.splitlines() if line.startswith("error")]
