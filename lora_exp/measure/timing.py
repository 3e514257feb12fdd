"""Time and host/device memory of a job: a synchronising clock, the forward/backward/optimizer split of
sampled steps, the host-RSS peak, and the CUDA allocator's baseline and peak."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import torch


def reset_memory(device: torch.device) -> int:
    """Clean measurement state for this job (previous jobs in the same process leave leftovers); on CUDA the
    libraries' workspaces are created first (``warm_up_cuda``), so every job's baseline holds them.

    Returns the baseline allocated bytes (0 on CPU); ``reserved(device)`` right after is the reserved one.
    """
    gc.collect()
    if device.type != "cuda":
        return 0
    warm_up_cuda(device)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def reserved(device: torch.device) -> int:
    """Bytes the CUDA allocator holds now (0 off CUDA)."""
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else 0


def warm_up_cuda(device: torch.device) -> None:
    """One small matmul (fp32, and under bf16 / fp16 autocast where the GPU runs it) with its backward, and one
    convolution: cuBLAS, cuBLASLt and cuDNN create their handles and workspaces now. Otherwise the first job of a
    process carries cuBLAS's workspace (32 MiB on Hopper) in its measured memory and the later ones do not."""
    x = torch.ones(64, 64, device=device, requires_grad=True)
    (x @ x).sum().backward()
    for dtype in (torch.bfloat16, torch.float16):
        try:
            with torch.autocast("cuda", dtype=dtype):
                (x @ x).float().sum().backward()
        except RuntimeError:  # a dtype this GPU does not compute
            continue
    w = torch.ones(4, 4, 3, device=device, requires_grad=True)
    torch.nn.functional.conv1d(torch.ones(1, 4, 16, device=device), w).sum().backward()
    torch.cuda.synchronize(device)


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


def proc_status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` in bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def open_rss_window() -> int | None:
    """Start a host-memory window on Linux: free heap pages go back to the OS (``malloc_trim``, so memory freed
    earlier is not silently reused inside the window), the peak RSS (``VmHWM``) is reset to the current RSS
    (``/proc/self/clear_refs`` 5); returns that RSS, or None where any of it is unavailable."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, AttributeError):
        return None
    return proc_status_bytes("VmRSS")


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


@dataclass
class Steady:
    """The steady part of training: updates after ``start`` (start-up, allocator growth and kernel selection,
    the gradient checks of the first updates), with pauses (validation, checkpoints) and the sampled memory
    step left out. ``begin`` / ``end`` bracket each stretch with the loop's synchronising clock; seconds and
    samples accumulate in the run's progress (``steady_seconds``, ``steady_samples``), so a resume adds to them.
    """

    start: int
    t0: float | None = None
    samples0: int = 0

    def begin(self, now: float, step: int, samples: int) -> None:
        """Open a stretch at ``now`` when update ``step`` is past ``start`` (no-op when one is open)."""
        if self.t0 is None and step >= self.start:
            self.t0, self.samples0 = now, samples

    def end(self, now: float, samples: int, progress: Any) -> None:
        """Close the open stretch at ``now`` and add it to ``progress``."""
        if self.t0 is not None:
            progress.steady_seconds += now - self.t0
            progress.steady_samples += samples - self.samples0
            self.t0 = None
