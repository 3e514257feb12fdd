"""LoRA-FA (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation"), equal to PEFT's
``create_lorafa_optimizer``.

A is frozen after its (Kaiming) init and only B trains: no gradient and no optimizer state for A. The
optimizer is PEFT's ``LoraFAOptimizer``: "adamw-hf" (weight decay applied after the update, to every trainable
tensor, bias-corrected step size) with B's gradient replaced by its projection onto the best full-rank
update reachable through B, ``g_B <- (1 / s^2) g_B (A A^T + 1e-8 I)^+`` (``s`` the layer's scaling).

PEFT computes that projection under ``torch.autocast(bfloat16)`` whenever bf16 is available (a CPU too),
rounding the projected gradient to bf16; here it is computed in fp32, the paper's equation. Adam divides the
gradient by its own running scale, so the rounding barely reaches the weights: after 3 steps the logits
agree within 1e-5 with PEFT's default and with its fp32 path (tests/unit/adapters/test_lora_fa.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lora_exp.adapters.layer import LoRALinear
from lora_exp.errors import LoraExpError

PINV_DELTA = 1e-8  # PEFT's regulariser of A A^T before the pseudo-inverse


class LoRAFALinear(LoRALinear):
    """A LoRA layer whose A stays at its initialisation (frozen): only B trains."""

    variant = "lora_fa"

    def trainable_parameters(self) -> list[nn.Parameter]:
        """B only."""
        return [self.lora_B.weight]


def projected_grad(grad_b: torch.Tensor, a: torch.Tensor, scaling: float) -> torch.Tensor:
    """``(1 / s^2) g_B (A A^T + delta I)^+`` in fp32 (PEFT's order of operations), in ``grad_b``'s dtype."""
    a = a.float()
    inv = torch.linalg.pinv(a @ a.T + PINV_DELTA * torch.eye(a.shape[0], device=a.device))
    return ((1 / scaling**2) * (grad_b.float() @ inv)).to(grad_b.dtype)


class LoraFAOptimizer(torch.optim.Optimizer):
    """PEFT's ``LoraFAOptimizer`` over the trainable tensors only; ``projections`` maps each LoRA B to its
    layer's frozen A and scaling (kept outside the param groups: the state dict holds no frozen tensor)."""

    def __init__(
        self,
        params: list[dict],
        projections: dict[int, tuple[torch.Tensor, float]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ):
        if lr < 0 or eps < 0 or not all(0 <= b < 1 for b in betas):
            raise LoraExpError(f"LoRA-FA optimizer: lr={lr} and eps={eps} must be >= 0, betas={betas} in [0, 1)")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": True}
        super().__init__(params, defaults)
        self.projections = projections

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> torch.Tensor | None:
        """One update: B's gradient projected, then adamw-hf on every trainable tensor."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if id(p) in self.projections:
                    grad = projected_grad(grad, *self.projections[id(p)])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0.0:  # adamw-hf: decay after the update, of the updated weight
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def has_layers(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA-FA layers (its optimizer is then ``make_optimizer``'s)."""
    return any(isinstance(m, LoRAFALinear) for m in model.modules())


def make_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
) -> LoraFAOptimizer:
    """PEFT's ``create_lorafa_optimizer``: one group of every trainable tensor (decayed alike), B projected.

    PEFT fixes betas at (0.9, 0.999) and eps at 1e-6; here they come from ``optimizer.*`` (the same for every
    arm of a comparison).
    """
    layers = [m for m in model.modules() if isinstance(m, LoRAFALinear)]
    if not layers:
        raise LoraExpError("LoRA-FA optimizer: the model has no lora.variant=lora_fa layers")
    if any(m.lora_A.weight.requires_grad for m in layers):
        raise LoraExpError("LoRA-FA optimizer: LoRA A must be frozen (lora.variant=lora_fa freezes it)")
    projections = {id(m.lora_B.weight): (m.lora_A.weight, m.scaling) for m in layers}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    group = {"params": [p for _, p in named], "names": [n for n, _ in named], "weight_decay": weight_decay, "lr": lr}
    return LoraFAOptimizer([group], projections, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
