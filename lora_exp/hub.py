"""Hugging Face Hub access that fails in one line instead of half a minute of retries when offline."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import TypeVar
from urllib.parse import urlparse

from lora_exp.errors import LoraExpError

T = TypeVar("T")
OFFLINE_HINT = "offline, use the default model=minilm data=rotten_tomatoes_offline"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host resolves and accepts a connection (HF_ENDPOINT respected)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_env() -> Iterator[None]:
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def from_hub(option: str, name: str, load: Callable[[], T]) -> T:
    """Run ``load()``; unreachable Hub -> cached files only; failure -> one line naming ``option``."""
    reachable = hub_reachable()
    try:
        if reachable:
            return load()
        with _offline_env():
            return load()
    except (OSError, ConnectionError, ValueError, FileNotFoundError) as err:
        why = "the Hugging Face Hub is unreachable and it is not cached" if not reachable else str(err)
        first = why.strip().splitlines()[0] if why.strip() else type(err).__name__
        raise LoraExpError(f"{option}={name!r}: cannot load ({first}); {OFFLINE_HINT}") from err
