"""Hugging Face Hub access that fails in one line within seconds instead of a minute of retries when offline.

The loaders (``from_pretrained``, ``datasets.load_dataset``) retry a failed connection five times with
back-off (~24 s per file). So before loading, one HEAD request goes to the Hub endpoint through
``huggingface_hub``'s own HTTP session (the client the loaders use: ``HF_ENDPOINT``, HTTPS proxies and
certificates apply as for them), without retries. When it fails the loader runs in offline mode (cached
files only, no network); ``HF_HUB_OFFLINE=1`` set by the user is honoured as it is. Any network or
cache-miss error of the loader becomes one line naming the option.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

from lora_exp.errors import LoraExpError

T = TypeVar("T")
OFFLINE_HINT = "offline, use the default model=minilm data=rotten_tomatoes_offline"
NETWORK_WORDS = ("connect", "connection", "network", "resolve", "unreachable", "timed out", "timeout", "offline")


def user_offline() -> bool:
    """Whether the user set ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``); read as the loaders read it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.cache
def hub_reachable(timeout: float = 5.0) -> bool:
    """One HEAD request to the Hub endpoint through huggingface_hub's session (no retries; once per process)."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # DNS, refused, timeout, proxy, TLS, offline mode: all mean "cannot download"
        return False
    return True


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Loaders in offline mode (cached files only): the module constants they read at call time."""
    from unittest import mock

    import datasets
    from huggingface_hub import constants

    with (
        mock.patch.object(constants, "HF_HUB_OFFLINE", True),
        mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True),
    ):
        yield


def is_network_error(err: BaseException) -> bool:
    """A connection / offline / not-cached error anywhere in the exception's chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        name = type(err).__name__
        if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectTimeout"):
            return True
        if isinstance(err, ConnectionError | TimeoutError) or "Timeout" in name or "NetworkError" in name:
            return True
        if isinstance(err, OSError) and any(w in str(err).lower() for w in NETWORK_WORDS):
            return True
        err = err.__cause__ or err.__context__
    return False


def from_hub(option: str, name: str, load: Callable[[], T]) -> T:
    """Run ``load()``; an unreachable Hub -> cached files only; a failure -> one line naming ``option``."""
    offline = user_offline()
    unreachable = not offline and not hub_reachable()
    try:
        with _offline() if unreachable else contextlib.nullcontext():
            return load()
    except Exception as err:
        if (offline or unreachable) and (is_network_error(err) or isinstance(err, FileNotFoundError)):
            why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub is unreachable"
            why += " and it is not cached"
        elif is_network_error(err):
            why = f"network error: {_first_line(err)}"
        elif isinstance(err, OSError | ValueError):
            why = _first_line(err)
        else:
            raise
        raise LoraExpError(f"{option}={name!r}: cannot load ({why}); {OFFLINE_HINT}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
