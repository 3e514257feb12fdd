"""LoRA-GA (Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation"), equal to PEFT's
``init_lora_weights="lora_ga"`` (``LoraGAConfig``, ``preprocess_loraga``).

The full fine-tuning gradient of each adapted weight, averaged over a few training batches (train mode, only
the adapted weights require a gradient), is decomposed by a randomized SVD ``G ~ U S V^T`` (``q = min(4r,
min(out, in))``, 4 iterations); A and B take complementary singular directions (``direction``: ArB2r, PEFT's
default, A = V^T[:r], B = U[:, r:2r] S[r:2r]), B is rescaled (``scale``: stable, ``out^(1/4) / sqrt(gamma)``),
and W0 becomes ``W0 - s B A`` so the model is unchanged at init while the first steps follow the full
gradient's direction. The randomized SVD draws its test matrix under a fixed seed (PEFT draws it from the
global RNG): the init is reproducible per seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from itertools import islice

import torch
from torch import nn

from lora_exp.adapters.choices import LORA_GA_DIRECTIONS, LORA_GA_SCALES
from lora_exp.adapters.layer import LoRALinear, _set_base_weight, base_weight
from lora_exp.errors import LoraExpError

DIRECTIONS, SCALES = LORA_GA_DIRECTIONS, LORA_GA_SCALES


def check_ranks(layers: dict[str, LoRALinear]) -> None:
    """A and B take 2r different singular directions of each gradient: 2r <= min(out, in) (PEFT fails on less)."""
    for name, m in layers.items():
        out_f, in_f = base_weight(m).shape
        if 2 * m.r > min(out_f, in_f):
            raise LoraExpError(
                f"lora.init=lora_ga needs 2 x lora.r <= min(out, in) of every adapted layer (A and B take different "
                f"singular directions); {name} is {out_f}x{in_f} at r={m.r}: lower lora.r"
            )


def estimate_gradients(
    model: nn.Module,
    layers: dict[str, LoRALinear],
    batches: Iterable[dict],
    n_batches: int,
    amp: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[dict[str, torch.Tensor], int]:
    """The mean gradient of each layer's base weight (``out x in``, fp32) over ``n_batches`` batches of
    ``batches`` (each with ``labels``), as PEFT's ``estimate_gradients``: train mode, the LoRA branch out of
    the way (B = 0 at this point, so it is merged as the zero update it is), only those weights require grad.
    Returns the gradients and how many batches were used."""
    if any(m.lora_B.weight.any() for m in layers.values()):
        raise LoraExpError("LoRA-GA: the gradient is estimated before training, while every LoRA B is zero")
    device = next(model.parameters()).device
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for m in layers.values():
        m.merge()  # W0 + 0: the forward is the plain base layer's, as in PEFT's preprocess on the base model
        m.base_layer.weight.requires_grad_(True)
    used = 0
    try:
        model.train()
        with torch.enable_grad():
            for batch in islice(batches, n_batches):
                with amp():
                    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                loss.backward()
                used += 1
        if used == 0:
            raise LoraExpError("LoRA-GA: the training loader yielded no batch")
        grads = {n: _out_in(m, m.base_layer.weight.grad).float() / used for n, m in layers.items()}
    finally:
        for m in layers.values():
            m.base_layer.weight.grad = None
            m.unmerge()
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))
        model.train(was_training)
    return grads, used


def _out_in(layer: LoRALinear, t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as (out, in) (GPT-2's Conv1D stores (in, out))."""
    return t.detach().T if layer.fan_in_fan_out else t.detach()


def _svd_lowrank(x: torch.Tensor, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return torch.svd_lowrank(x, q=q, niter=4)


@torch.no_grad()
def factors(
    grad: torch.Tensor,
    layer: LoRALinear,
    direction: str = "ArB2r",
    scale: str = "stable",
    gamma: int = 16,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (``r x in``) and B (``out x r``) from the gradient, as PEFT's ``LoraLayer.lora_ga_init``."""
    r = layer.r
    u, s, v = _svd_lowrank(grad.float(), min(4 * r, min(grad.shape)), seed)
    vh, u, s = v.t()[: 2 * r], u[:, : 2 * r], s[: 2 * r]
    if direction == "ArBr":
        a, b, s_b = vh[1 : 2 * r : 2], u[:, 0 : 2 * r : 2], s[0 : 2 * r : 2]
    elif direction == "A2rBr":
        a, b, s_b = vh[r : 2 * r], u[:, :r], s[:r]
    elif direction == "ArB2r":
        a, b, s_b = vh[:r], u[:, r : 2 * r], s[r : 2 * r]
    elif direction == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            idx = torch.randperm(2 * r)[:r]
        a, b, s_b = vh[idx], u[:, idx], s[idx]
    else:
        raise LoraExpError(f"lora.lora_ga.direction={direction!r} is not one of {', '.join(DIRECTIONS)}")
    b = b @ torch.diag(s_b)
    w = base_weight(layer)
    if scale == "stable":
        b = b * ((w.shape[0] ** 0.25) / (gamma**0.5))
    elif scale == "weight_svd":
        w_s = _svd_lowrank(w.float(), r, seed)[1]
        if s_b[0] > 0:
            b = b * (w_s[0] / s_b[0])
    elif scale == "gd_scale":
        a, b = a / layer.scaling, b / layer.scaling
    elif scale != "unit":
        raise LoraExpError(f"lora.lora_ga.scale={scale!r} is not one of {', '.join(SCALES)}")
    dtype = layer.lora_A.weight.dtype
    return a.contiguous().to(dtype), b.contiguous().to(dtype)


@torch.no_grad()
def apply_residual(layer: LoRALinear, a: torch.Tensor, b: torch.Tensor) -> None:
    """A, B into the layer and ``W0 <- W0 - s B A`` (fp32), keeping (A0, B0) on the layer for the PEFT export."""
    layer.lora_A.weight.copy_(a)
    layer.lora_B.weight.copy_(b)
    w = base_weight(layer)
    _set_base_weight(layer, w.float() - layer.scaling * (b.float() @ a.float()))
    layer.initial_factors = (a.detach().cpu().clone(), b.detach().cpu().clone())
