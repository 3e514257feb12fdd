"""A run dir belongs to one process at a time: ``<run>/.lock``, created with ``O_EXCL`` and held with ``flock``.

Checking "does the dir already hold a run?" works only for runs that come one after the other; two started
together both pass it and write into one dir. The lock closes that gap: the file names its owner (pid, host,
start time) for the message; the ``flock`` on it is what says the owner is alive (the kernel drops it when the
process dies, even of SIGKILL), so a lock left by a dead run is taken over, with a line saying so. POSIX only.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from lora_exp.errors import LoraExpError

LOCK_FILE = ".lock"


def _owner_text(raw: str) -> str:
    try:
        owner = json.loads(raw)
        return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
    except (ValueError, KeyError, TypeError):
        return "an unnamed owner"


class RunLock:
    """The claim on one run dir; ``release`` (or the process's exit) gives it back and removes the file."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir, self.fd = run_dir, fd

    def release(self) -> None:
        """Remove ``<run>/.lock`` and drop the flock (idempotent)."""
        if self.fd < 0:
            return
        try:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = -1


def claim(run_dir: Path, what: str, advice: str) -> RunLock:
    """Own ``run_dir`` (created if missing) or raise a one-line ``LoraExpError``: ``<what> is in use by another
    lora-exp run (<owner>); <advice>``. A lock whose owner died is taken over with a line on stderr saying so.
    The claim is released at the latest when this process exits.
    """
    path = run_dir / LOCK_FILE
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd, created = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:  # released between the two opens: try again
                continue
        except OSError as err:  # read-only, no permission, not a folder
            raise LoraExpError(f"{what} cannot be written ({err.strerror}: {err.filename})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner_text(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            raise LoraExpError(f"{what} is in use by another lora-exp run ({owner}); {advice}") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # we locked a file its owner had just removed; the path now names another (or none)
    previous = os.pread(fd, 4096, 0).decode(errors="replace")
    if not created and previous.strip():  # empty: its creator had not written it yet, and lost the race
        print(
            f"[lora-exp] {what}: taking over the lock of a run that is no longer running ({_owner_text(previous)})",
            file=sys.stderr,
        )
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    lock = RunLock(run_dir, fd)
    atexit.register(lock.release)
    return lock
