"""W&B run lifecycle, results.json, and measurement (memory, environment, git)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
import transformers
from omegaconf import DictConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename): a crash never leaves half a results file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def git_info(root: Path = PROJECT_ROOT, diff_to: Path | None = None) -> dict[str, Any]:
    """Commit, branch and dirty flag of the harness checkout (None outside a git checkout).

    When the checkout is dirty and ``diff_to`` is given, the uncommitted diff is saved there.
    """

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = bool(status) if status is not None else None
    if dirty and diff_to is not None:
        diff_to.write_text((git("diff", "HEAD") or "") + "\n")
    return {
        "git_commit": commit,
        "git_branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "git_dirty": dirty,
        "git_diff_file": str(diff_to) if dirty and diff_to is not None else None,
    }


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and the accelerator's name, for the reproducibility record."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
    }


def reset_memory(device: torch.device) -> int:
    """Clean measurement state for this job (previous jobs in the same process leave leftovers).

    Returns the baseline allocated bytes (0 on CPU).
    """
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory(device: torch.device, baseline: int, rss: RssPeak) -> dict[str, int | None]:
    """Peak allocated (the comparison metric), peak reserved and peak above baseline; this job's host RSS."""
    host = {"peak_host_rss_bytes": rss.peak, "host_rss_at_start_bytes": rss.start}
    if device.type != "cuda":
        return {
            "peak_vram_bytes": None,
            "peak_vram_reserved_bytes": None,
            "peak_vram_above_baseline_bytes": None,
            **host,
        }
    peak = torch.cuda.max_memory_allocated(device)
    return {
        "peak_vram_bytes": peak,
        "peak_vram_reserved_bytes": torch.cuda.max_memory_reserved(device),
        "peak_vram_above_baseline_bytes": peak - baseline,
        **host,
    }


def clock(device: torch.device) -> Callable[[], float]:
    """A wall clock for throughput: on CUDA it waits for queued work first (used at window edges only)."""
    if device.type != "cuda":
        return time.perf_counter

    def now() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


class RssPeak:
    """This job's own peak host RSS, sampled by a thread (``ru_maxrss`` is the whole process's peak, and the
    basic launcher runs every job of a sweep in one process)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self._stop = interval, threading.Event()
        self.start = self.peak = self.current()

        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        """This process's resident set size in bytes (psutil: Linux, macOS, Windows)."""
        return psutil.Process().memory_info().rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


class PhaseTimer:
    """Forward / backward / optimizer time of sampled steps.

    On CUDA it records events and reads them once at the end, so a timed step never waits on the host;
    on CPU it reads ``perf_counter`` (CPU work is synchronous).
    """

    PHASES = ("forward", "backward", "optimizer")

    def __init__(self, device: torch.device, every: int):
        self.cuda, self.every = device.type == "cuda", every
        self.samples: list[list[Any]] = []

    def wants(self, step: int) -> bool:
        """Whether the update numbered ``step`` is timed (skipping step 0: warm-up, allocator growth)."""
        return step > 0 and step % self.every == 0

    def mark(self) -> None:
        """Record a boundary: call before forward, then after forward, backward and the optimizer step."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:
            event = time.perf_counter()
        if not self.samples or len(self.samples[-1]) == len(self.PHASES) + 1:
            self.samples.append([])
        self.samples[-1].append(event)

    def _ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1000

    def summary(self) -> dict[str, float | None]:
        """Mean milliseconds per phase over the sampled steps (None when none was sampled)."""
        done = [s for s in self.samples if len(s) == len(self.PHASES) + 1]
        if self.cuda and done:
            torch.cuda.synchronize()
        out: dict[str, float | None] = {}
        for i, phase in enumerate(self.PHASES):
            if not done:
                out[f"time_{phase}_ms"] = None
                continue
            ms = [self._ms(s[i], s[i + 1]) for s in done]
            out[f"time_{phase}_ms"] = sum(ms) / len(ms)
        out["time_sampled_steps"] = len(done)
        return out


def run_name(cfg: DictConfig) -> str:
    """Compact, readable W&B run name: variant (lora, dora, pissa, lora+, ...), LoRA shape, lr, seed."""
    from lora_exp.variants import variant_label

    parts = [variant_label(cfg.lora, cfg.method.name, cfg.optimizer.get("loraplus_lr_ratio"))]
    if cfg.method.name == "lora":
        parts += [f"r{cfg.lora.r}", f"a{cfg.lora.alpha:g}", "+".join(cfg.lora.targets)]
    parts += [f"lr{cfg.optimizer.lr:g}", f"s{cfg.trainer.seed}"]
    return "-".join(parts)


@contextlib.contextmanager
def sigterm_flag() -> Iterator[threading.Event]:
    """Turn SIGTERM (preemption) into a flag the loop checks after each update, to checkpoint and stop."""
    flag = threading.Event()
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
    except ValueError:  # not the main thread: leave signals alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


class NoRun:
    """Stands in for a W&B run with ``logger.mode=disabled``: ``log`` and ``summary`` record nothing."""

    disabled = True

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}

    def log(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to log to."""


@contextlib.contextmanager
def wandb_run(cfg: DictConfig, run_dir: Path, config: dict, resume_id: str | None = None) -> Iterator[Any]:
    """A W&B run for this job only, finished on exit (failed runs exit with code 1), never global.

    ``resume_id`` continues that run (a resumed job keeps its W&B run). ``logger.mode=disabled`` needs no
    wandb installed (the GPU image has none): a stand-in run that records nothing.
    """
    if cfg.logger.mode == "disabled":
        yield NoRun()
        return
    import wandb

    from lora_exp.variants import variant_label

    lg = cfg.logger
    os.environ.setdefault("WANDB_SILENT", "true")
    kwargs = dict(
        mode=lg.mode,
        project=lg.project,
        entity=lg.entity,
        group=lg.group,
        job_type=lg.job_type or variant_label(cfg.lora, cfg.method.name, cfg.optimizer.get("loraplus_lr_ratio")),
        name=lg.name or run_name(cfg),
        tags=list(lg.tags),
        dir=str(run_dir),
        config=config,
        reinit="create_new",
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )
    run = None
    if resume_id:
        # A killed process's W&B service can hold the id for a moment: retry, then continue in a new run
        # that names the old one (training state is ours; only the W&B history would be split).
        for _ in range(15):
            try:
                run = wandb.init(id=resume_id, resume="allow", **kwargs)
                break
            except Exception as err:  # wandb raises its own error types here
                if "in use" not in str(err):
                    raise
                time.sleep(1.0)
        if run is None:
            print(f"[lora-exp] W&B run {resume_id} stays in use; logging the rest to a new run", file=sys.stderr)
            kwargs["config"] = {**config, "wandb_resumed_from": resume_id}
            kwargs.update(id=secrets.token_hex(4), resume="never")  # else W&B picks the old id up again

    if run is None:
        run = wandb.init(**kwargs)
    failed = True
    try:
        yield run
        failed = False
    finally:
        run.finish(exit_code=1 if failed else 0)


def wandb_ref(run: Any) -> dict[str, Any]:
    """The W&B run id / URL / local dir, for results.json (so a job dir names its W&B run)."""
    if run is None or getattr(run, "disabled", False) or run.settings.mode == "disabled":
        return {"wandb_id": None, "wandb_url": None, "wandb_dir": None}
    return {"wandb_id": run.id, "wandb_url": run.url, "wandb_dir": run.dir}
