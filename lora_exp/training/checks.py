"""Checks that fail a run loudly instead of letting it train nothing: finite loss and weights, a usable
gradient for every trainable tensor after the first update, LoRA moving a few updates later."""

from __future__ import annotations

import torch

from lora_exp.errors import TrainingFailure

# The adapter tensor that starts at zero (LoRA B, VeRA lambda_b) and its partner, whose gradient is exactly zero
# while the first is (LoRA A, VeRA lambda_d): exempt at step 0, checked a few updates later.
# AdaLoRA: E starts at zero, so both A and B get zero gradients at first (and a pruned triplet's stay zero).
STARTS_AT_ZERO = (".lora_B.", ".vera_lambda_b", ".lora_E")
ZERO_GRAD_AT_START = (".lora_A.", ".vera_lambda_d")


def _svd_form(named: list[tuple[str, torch.nn.Parameter]]) -> tuple[str, ...]:
    """Module paths of AdaLoRA layers (they hold a ``lora_E``): their A and B gradients follow E's."""
    return tuple(n.removesuffix("lora_E") for n, _ in named if n.endswith(".lora_E"))


def _named_like(name: str, parts: tuple[str, ...]) -> bool:
    return any(p in name + "." for p in parts)


def has_adapter(named: list[tuple[str, torch.nn.Parameter]]) -> bool:
    """Whether a trainable adapter tensor that starts at zero is among ``named`` (``check_lora_moving`` applies)."""
    return any(_named_like(n, STARTS_AT_ZERO) for n, _ in named)


def check_finite(named: list[tuple[str, torch.nn.Parameter]], step: int, loss: torch.Tensor | None = None) -> None:
    """A diverged run is reported as ``nan`` before any other check can call it untrained."""
    bad = ["loss"] if loss is not None and not torch.isfinite(loss).all() else []
    bad += [n for n, p in named if not torch.isfinite(p).all()]
    if bad:
        more = " ..." if len(bad) > 4 else ""
        raise TrainingFailure("nan", f"train loss or weights are not finite at step {step}: {', '.join(bad[:4])}{more}")


def check_gradients(
    named: list[tuple[str, torch.nn.Parameter]], allow_inf: bool = False, loss: torch.Tensor | None = None
) -> None:
    """After the first update every trainable tensor must have a finite, non-zero gradient.

    LoRA A is exempt here: its gradient is exactly zero while B = 0 (B still is after a warm-up step at
    lr 0); ``check_lora_moving`` covers it a few steps later. A bias whose weight gets a gradient is exempt
    too: its gradient is the sum of the output gradients, exactly zero when a fresh head gives every example
    the same probabilities (bf16 rounds them to 0.5) on a class-balanced batch. Non-finite is ``nan``.
    """
    check_finite(named, 0, None if allow_inf else loss)
    if not allow_inf:  # fp16: an overflowing step is skipped by the scaler, not a broken graph
        inf = [n for n, p in named if p.grad is not None and not torch.isfinite(p.grad).all()]
        if inf:
            raise TrainingFailure(
                "nan", f"{len(inf)} trainable tensors have a non-finite gradient: {', '.join(inf[:4])}"
            )
    moving = {n for n, p in named if p.grad is not None and p.grad.abs().sum() > 0}
    svd_form = _svd_form(named)
    bad = []
    for name, p in named:
        bias_of_moving = name.endswith(".bias") and name.removesuffix(".bias") + ".weight" in moving
        adalora_factor = name.startswith(svd_form) and not name.endswith(".lora_E") if svd_form else False
        if _named_like(name, ZERO_GRAD_AT_START) or bias_of_moving or adalora_factor:
            continue
        if p.grad is None:
            bad.append(f"{name} (no grad)")
        elif torch.isfinite(p.grad).all() and not p.grad.abs().sum() > 0:
            bad.append(f"{name} (zero grad)")
    _fail_if(bad, "trainable tensors get no usable gradient")


def check_lora_moving(named: list[tuple[str, torch.nn.Parameter]], step: int, loss: torch.Tensor | None = None) -> None:
    """After a few updates every LoRA B (VeRA lambda_b) has left zero and every LoRA A (VeRA lambda_d) gets a
    non-zero gradient (weights and loss finite first: a diverged run is ``nan``, not untrained)."""
    check_finite(named, step, loss)
    bad = [f"{n} (still zero)" for n, p in named if _named_like(n, STARTS_AT_ZERO) and not p.abs().sum() > 0]
    svd_form = _svd_form(named)
    bad += [
        f"{n} (zero grad)"
        for n, p in named
        if _named_like(n, ZERO_GRAD_AT_START)
        and not (svd_form and n.startswith(svd_form))  # AdaLoRA: a fully pruned layer's A rightly gets none
        and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    _fail_if(bad, f"LoRA tensors are not training after {step} steps")


def _fail_if(bad: list[str], what: str) -> None:
    if bad:
        raise TrainingFailure(
            "untrained", f"{len(bad)} {what}: " + ", ".join(bad[:4]) + (" ..." if len(bad) > 4 else "")
        )
