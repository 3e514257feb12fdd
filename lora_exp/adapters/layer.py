"""The LoRA layer, written from scratch: a wrapper around a frozen ``nn.Linear`` (or GPT-2 ``Conv1D``).

``h = W0 x + b0 + scaling * B(A(dropout(x)))`` with ``A: r x k`` Kaiming-uniform(a=sqrt(5)), ``B: d x r``
zeros (so the wrapped model is unchanged at step 0) and ``scaling = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA). Attribute names follow PEFT (``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout``,
``scaling``) so exporting to the PEFT layout is a key rename. GPT-2's ``Conv1D`` (weight stored ``in x
out``) is adapted as PEFT does with ``fan_in_fan_out``: same A and B, the merge adds ``delta.T``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_exp.errors import LoraExpError
from lora_exp.quantize import dequantized_weight, is_quantized


def scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """The update's scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (stable across ranks)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (or transformers ``Conv1D``) plus a trainable low-rank update ``scaling * B @ A``.

    ``fan_in_fan_out`` is True for a ``Conv1D`` base, whose weight is stored ``in x out``: A and B are the
    same as for a Linear (``A: r x in``, ``B: out x r``) and ``delta_weight()`` stays ``out x in``; only the
    merge transposes it (PEFT's ``fan_in_fan_out``).
    """

    variant = "lora"  # the ``lora.variant`` a layer class implements (saved with the adapter)
    rank_bounded = True  # r <= min(out, in) (AdaLoRA, like PEFT's, allows more: its ranks are pruned)

    def __init__(self, base: nn.Linear | Conv1D, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.fan_in_fan_out = isinstance(base, Conv1D)
        k, d = base.weight.shape if self.fan_in_fan_out else (base.in_features, base.out_features)
        if r < 1 or (self.rank_bounded and r > min(d, k)):
            raise LoraExpError(f"lora.r={r} must be in [1, min(out, in)={min(d, k)}] for this layer")
        self.base_layer = base.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        dt = dt if dt.is_floating_point else torch.float32  # a quantised base (packed uint8 / int8): fp32 factors
        self.lora_A = nn.Linear(k, r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(r, d, bias=False, device=dev, dtype=dt)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = scaling(r, alpha, rslora)
        self.merged = False
        self._pristine: torch.Tensor | None = None
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (as ``nn.Linear`` and PEFT), B zero: the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def after_injection(cls, layers: list[LoRALinear]) -> None:
        """Called once with every layer of one injection (state shared across layers: VeRA's projections)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter tensors that train (A and B); ``models.methods.apply_method`` marks them."""
        return [self.lora_A.weight, self.lora_B.weight]

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` (``out x in``) in fp32 (merging in low precision drifts)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _stored_delta(self) -> torch.Tensor:
        """The update in the base weight's own layout (``in x out`` for a ``Conv1D``)."""
        delta = self.delta_weight()
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        update = self.lora_B(self.lora_A(self.lora_dropout(cast_for(x, self.lora_A.weight)))) * self.scaling
        return out + update.to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``W0`` so inference runs the plain ``nn.Linear`` / ``Conv1D`` path."""
        if self.merged:
            raise LoraExpError("merge(): this LoRA layer is already merged; call unmerge() first")
        refuse_quantized(self, "merge()")
        w = self.base_layer.weight
        merged = w.float() + self._stored_delta()
        if not torch.isfinite(merged).all():
            raise LoraExpError("merge(): the merged weight is not finite; the adapter is broken")
        if w.dtype != torch.float32:  # subtracting again in bf16/fp16 would not restore W0 exactly
            self._pristine = w.detach().clone()
        w.copy_(merged.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore ``W0`` (exactly for low precision, to float tolerance for fp32)."""
        if not self.merged:
            raise LoraExpError("unmerge(): this LoRA layer is not merged")
        w = self.base_layer.weight
        if self._pristine is not None:
            w.copy_(self._pristine)
            self._pristine = None
        else:
            w.sub_(self._stored_delta().to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        fifo = ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}{fifo}"


def cast_for(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` in ``weight``'s dtype when autocast is off: bf16 hidden states of a bf16-stored base (inference
    without autocast) meet fp32 LoRA factors. Under autocast the matmul casts both itself (no extra copy)."""
    if x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


def refuse_quantized(layer: nn.Module, what: str) -> None:
    """One line where ``what`` would write W0 of a quantised (bitsandbytes) base layer."""
    if is_quantized(layer.base_layer):
        raise LoraExpError(
            f"{what}: the base layer is quantised ({type(layer.base_layer).__name__}); merge into a dequantised "
            "copy (adapters.targets.merge_and_unload does) or run unmerged"
        )


def base_weight(layer: LoRALinear) -> torch.Tensor:
    """W0 as (out, in), whatever the storage (GPT-2 Conv1D stores (in, out): ``fan_in_fan_out``; a quantised
    base: its dequantised weight, fp32)."""
    if is_quantized(layer.base_layer):
        return dequantized_weight(layer.base_layer)
    w = layer.base_layer.weight
    return w.T if getattr(layer, "fan_in_fan_out", False) else w


@torch.no_grad()
def _set_base_weight(layer: LoRALinear, w_out_in: torch.Tensor) -> None:
    refuse_quantized(layer, "rewriting W0")
    w = layer.base_layer.weight
    w.copy_((w_out_in.T if getattr(layer, "fan_in_fan_out", False) else w_out_in).to(w.dtype))
