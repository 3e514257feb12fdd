"""Ctrl-C and SIGTERM as a flag: a job checkpoints at its next update and stops; a sweep starts no more jobs.

A terminal's Ctrl-C reaches every process of its foreground group: a multirun's main process, joblib's loky
workers and their resource trackers (which ignore it). Python's default turns SIGINT into ``KeyboardInterrupt``
wherever the process happens to be, and a loky worker that dies of it breaks the pool: joblib then SIGKILLs the
other workers before they can checkpoint. So each process keeps a flag instead:

- a single run (``stop_flag``): the first SIGINT / SIGTERM sets it, the loop checkpoints and records
  ``preempted``; a second Ctrl-C aborts at once;
- a loky worker (``worker_init``, joblib's initializer): the flag lives as long as the worker, so a job queued
  after the signal sees it and does not start;
- a multirun's main process (``install``, from ``lora_exp.sweep``): forwards the signal to its workers, waits
  for them, and aborts at once on a second Ctrl-C.

In a job that submitit started on SLURM the signal it asks SLURM to send before the time limit (SIGUSR2, or
``SUBMITIT_PREEMPT_SIGNAL``) sets the flag too (``lora_exp/launcher.py`` then requeues the job).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signals() -> tuple[signal.Signals, ...]:
    """SIGINT and SIGTERM, plus submitit's time-limit signal in a SLURM job (submitit sets SUBMITIT_EXECUTOR)."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return SIGNALS
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    extra = getattr(signal, f"SIG{name}", None) or getattr(signal, name, None)
    return SIGNALS + ((extra,) if extra is not None and extra not in SIGNALS else ())


class StopFlag(threading.Event):
    """Set by the first SIGINT / SIGTERM; ``signal_name`` says which (for the one-line record)."""

    signal_name: str | None = None


_current: StopFlag | None = None  # the flag this process's handlers set (None: Python's defaults apply)


def _handler(flag: StopFlag, escalate: bool, then: Callable[[int], None] | None) -> Callable:
    def on_signal(signum: int, _frame: object) -> None:
        if flag.is_set() and escalate and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for checkpoints
        if not flag.is_set():
            flag.signal_name = signal.Signals(signum).name
        flag.set()
        if then is not None:
            then(signum)

    return on_signal


def install(escalate: bool, then: Callable[[int], None] | None = None) -> StopFlag:
    """For the rest of this process, SIGINT and SIGTERM set the returned flag (and call ``then(signum)``).

    ``escalate``: a second SIGINT raises ``KeyboardInterrupt`` (the multirun's main process); a worker keeps
    only the flag, since the main process forwards each signal it gets as well.
    """
    global _current
    flag = StopFlag()
    for sig in signals():
        signal.signal(sig, _handler(flag, escalate, then))
    _current = flag
    return flag


def worker_init() -> None:
    """joblib's loky initializer: a Ctrl-C between or before jobs sets the flag instead of killing the worker."""
    install(escalate=False)


def requested() -> StopFlag | None:
    """The flag when this process has been asked to stop, else None."""
    return _current if _current is not None and _current.is_set() else None


@contextlib.contextmanager
def stop_flag() -> Iterator[StopFlag]:
    """The flag a job's loop checks after each update: the process's own where one is installed (a sweep),
    else SIGINT / SIGTERM are caught for the duration (a second Ctrl-C aborts) and the old handlers restored."""
    global _current
    if _current is not None:
        yield _current
        return
    flag = StopFlag()
    try:
        previous = {sig: signal.signal(sig, _handler(flag, True, None)) for sig in signals()}
    except ValueError:  # not the main thread: signals stay as they are
        yield flag
        return
    _current = flag
    try:
        yield flag
    finally:
        _current = None
        for sig, old in previous.items():
            signal.signal(sig, old)
