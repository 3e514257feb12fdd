"""Where and in which precision a job computes: device choice, autocast dtypes, the frozen base's dtype.

The one table of dtypes (``DTYPES``) that the config's choices, the model's ``base_dtype``, autocast and the
bench all read.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from lora_exp.errors import LoraExpError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANT_DTYPES = ("nf4", "fp4", "int8")  # model.base_dtype through bitsandbytes (lora_exp.quantize)
AMP_DTYPES = {name: dtype for name, dtype in DTYPES.items() if dtype != torch.float32}  # autocast: low precision


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an explicit CUDA request without CUDA is an error.

    ``cuda:N`` also becomes the current device, so streams, events and the allocator statistics that the
    loop reads without an explicit index refer to that GPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LoraExpError(f"trainer.device={name} but no CUDA device is available; use auto or cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LoraExpError(
                f"trainer.device={name}: only {torch.cuda.device_count()} CUDA device(s) are visible (cuda:0..)"
            )
        torch.cuda.set_device(device)
    return device


def cpu_computes_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX), not emulated."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def gpu_computes_bf16(device: torch.device) -> bool:
    """Whether this GPU computes bf16 natively (compute capability >= 8.0); torch's default check also says
    yes where bf16 is only emulated (a T4)."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def pick_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware computes it natively (GPUs with compute capability >= 8.0; CPUs with
    AVX512-BF16 / AMX, where a seeded methods sweep gave test accuracy within noise of fp32 at 1.7x the
    samples/s: README), fp16 + GradScaler on older GPUs, fp32 on other CPUs."""
    native = gpu_computes_bf16(device) if device.type == "cuda" else cpu_computes_bf16()
    if requested == "auto":
        if device.type != "cuda":
            return "bf16" if native else "fp32"
        return "bf16" if native else "fp16"
    if requested == "bf16" and device.type == "cuda" and not native:
        major = torch.cuda.get_device_capability(device)[0]
        raise LoraExpError(
            f"trainer.precision=bf16 needs compute capability >= 8.0 (this GPU: {major}.x); use fp16 or auto"
        )
    if requested == "fp16" and device.type != "cuda":
        raise LoraExpError("trainer.precision=fp16 needs CUDA; on CPU use bf16 or fp32")
    return requested


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Autocast in ``precision`` on ``device`` (a null context for fp32)."""
    dtype = AMP_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def make_deterministic(device: torch.device) -> None:
    """Deterministic kernels (``trainer.deterministic``): reruns on CUDA give bit-identical results."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs a fixed workspace for it
    torch.use_deterministic_algorithms(True, warn_only=False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False


def effective_base_dtype(base_dtype: str, method: str) -> str:
    """The dtype the frozen parameters are stored in: ``model.base_dtype``, except with ``method=full``, where
    nothing is frozen (every parameter trains and stays fp32), so the setting has no effect."""
    return "fp32" if method == "full" else base_dtype


def compute_identity(device: torch.device, precision: str, base_dtype: str) -> dict[str, str | None]:
    """What a run computed on, as resolved (``auto`` already decided): the device type, the GPU model, the
    autocast precision and the frozen base's dtype. Two runs differ in it exactly when their numbers may."""
    return {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": precision,
        "base_dtype": base_dtype,
    }


def resolve_compute(trainer: Any, model: Any, method: str) -> dict[str, str | None]:
    """``compute_identity`` from a config's ``trainer`` / ``model`` sections, resolving ``auto`` on this machine
    (for records written without a job, e.g. a failure before training started)."""
    device = pick_device(trainer.device)
    precision = pick_precision(trainer.precision, device)
    return compute_identity(device, precision, effective_base_dtype(model.base_dtype, method))


def check_base_dtype(base_dtype: str, precision: str) -> None:
    """A low-precision frozen base needs autocast in that dtype (plain fp32 matmuls would mix dtypes). A quantised
    base (nf4 / fp4 / int8) computes in the run's precision, whichever it is."""
    if base_dtype not in ("fp32", *QUANT_DTYPES) and base_dtype != precision:
        raise LoraExpError(
            f"model.base_dtype={base_dtype} needs trainer.precision={base_dtype} (autocast in that dtype); "
            f"this run computes in {precision}"
        )
