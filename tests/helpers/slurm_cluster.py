"""A single-node SLURM on localhost for tests and measurements: munge + slurmctld + slurmd, configured and kept
in one temporary folder, stopped by their pids.

    python -m tests.helpers.slurm_cluster start DIR    # prints the `export SLURM_CONF=...` line
    python -m tests.helpers.slurm_cluster stop DIR

Needs Debian's ``slurm-wlm`` and ``munge`` and root (``missing()`` says why not, in one line). No accounting:
``sacct`` fails, as on a cluster without slurmdbd.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
TOOLS = ("sbatch", "squeue", "scontrol", "scancel")
NODE = "localhost"
# One local cluster at a time on a machine (slurmd's node is always "localhost"): start() holds this lock until
# stop(), so test processes running side by side (pytest -n 2) take turns instead of colliding.
LOCK = Path(os.environ.get("TMPDIR", "/tmp")) / "lora-exp-test-slurm.lock"
_held: dict[Path, int] = {}


def missing() -> str | None:
    """Why a local SLURM cannot start here (one line), or None."""
    if os.geteuid() != 0:
        return "a local SLURM needs root (slurmd runs jobs as their user)"
    absent = [
        p for p in (*DAEMONS, *TOOLS, "mungekey") if shutil.which(p) is None and not Path("/usr/sbin", p).exists()
    ]
    if absent:
        return f"slurm-wlm / munge not installed ({', '.join(absent)} missing): apt-get install -y slurm-wlm munge"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_resources() -> tuple[int, int]:
    """CPUs and memory (MB) of this machine as slurmd sees them (``slurmd -C``)."""
    out = subprocess.run([_exe("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(part.split("=", 1) for part in out.split() if "=" in part)
    return int(fields["CPUs"]), int(fields["RealMemory"])


def slurm_conf(root: Path, cpus: int, mem_mb: int) -> str:
    """slurm.conf for one node named localhost, a ``debug`` partition, no accounting, state under ``root``."""
    return f"""ClusterName=loraexp
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
KillWait=30
MinJobAge=30
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _wait(check, what: str, timeout: float, root: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.3)
    logs = " | ".join(p.read_text()[-300:] for p in sorted(root.glob("*.log")) if p.is_file())
    raise RuntimeError(f"local SLURM: {what} not up within {timeout:.0f}s ({logs})")


def start(root: Path) -> dict[str, str]:
    """Start munged, slurmctld and slurmd with config and state under ``root``; the environment (``SLURM_CONF``)
    that sbatch / squeue / scontrol need. Raises RuntimeError (with the daemons' log tails) if one does not come up."""
    root = Path(root).resolve()
    fd = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another process's cluster is up
    _held[root] = fd
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    if not key.exists():
        subprocess.run([_exe("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
    os.chmod(key, 0o600)
    cpus, mem_mb = _node_resources()
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, cpus, max(1024, mem_mb - 1024)))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(
        [
            _exe("munged"),
            "--force",
            f"--key-file={key}",
            f"--socket={root / 'munge' / 'munge.socket'}",
            f"--pid-file={root / 'munged.pid'}",
            f"--log-file={root / 'munged.log'}",
            f"--seed-file={root / 'munge' / 'munge.seed'}",
        ],
        check=True,
        capture_output=True,
    )
    _wait(lambda: _pid(root / "munged.pid") is not None, "munged", 10, root)
    subprocess.run([_exe("slurmctld"), "-i", "-f", str(conf)], check=True, env=env, capture_output=True)
    subprocess.run([_exe("slurmd"), "-N", NODE, "-f", str(conf)], check=True, env=env, capture_output=True)

    def node_idle() -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout
        return out.strip().startswith("idle")

    _wait(node_idle, "node localhost (idle)", 60, root)
    return {"SLURM_CONF": str(conf)}


def stop(root: Path) -> None:
    """Stop the daemons ``start`` started under ``root`` (by their pid files), slurmd first; jobs still running die
    with slurmd."""
    root = Path(root).resolve()
    for name in ("slurmd", "slurmctld", "munged"):
        pid = _pid(root / f"{name}.pid")
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
    fd = _held.pop(root, None)
    if fd is not None:
        os.close(fd)  # drops the flock: the next cluster may start


if __name__ == "__main__":
    action, folder = sys.argv[1], Path(sys.argv[2])
    if action == "start":
        reason = missing()
        if reason:
            sys.exit(f"cannot start: {reason}")
        print(f"export SLURM_CONF={start(folder)['SLURM_CONF']}")
    elif action == "stop":
        stop(folder)
    else:
        sys.exit("usage: python -m tests.helpers.slurm_cluster start|stop DIR")
