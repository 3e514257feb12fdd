"""DoRA (weight-decomposed LoRA), equal to PEFT's.

``h = W0 x + b0 + (m / ||W0 + s B A||_row - 1) W0 x + (m / ||.||_row) s B A x``, the magnitude ``m`` (PEFT's
name ``lora_magnitude_vector``) initialised to the row norms of ``W0 + s B A``; the norm is detached (a
constant in backward, DoRA paper section 4.3). With dropout in training the DoRA term runs on the dropped-out
input, as PEFT does. Merge folds ``m / norm * (W0 + s B A)`` into W0 and caches the norm so unmerge is exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_exp.adapters.layer import LoRALinear, _set_base_weight, base_weight, cast_for
from lora_exp.errors import LoraExpError

MAGNITUDE = "lora_magnitude_vector"  # PEFT's attribute name: export is a prefix rename


class DoRALinear(LoRALinear):
    """LoRA with weight decomposition (DoRA): a trainable magnitude per output row on top of ``LoRALinear``."""

    variant = "dora"

    def __init__(self, base: nn.Module, *args: Any, **kwargs: Any):
        super().__init__(base, *args, **kwargs)
        w = base_weight(self)
        self.lora_magnitude_vector = nn.Parameter(torch.empty(w.shape[0], device=w.device, dtype=w.dtype))
        self._merged_norm: torch.Tensor | None = None
        self.reset_magnitude()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """A, B and the magnitude."""
        return [*super().trainable_parameters(), self.lora_magnitude_vector]

    def weight_norm(self) -> torch.Tensor:
        """Row norms of ``W0 + scaling * B A`` (fp32 when W0 is), detached: DoRA treats them as constants."""
        w = base_weight(self)
        lora_w = (self.lora_B.weight @ self.lora_A.weight).detach().to(w.dtype)
        return torch.linalg.norm(w + self.scaling * lora_w, dim=1).to(w.dtype).detach()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """``m = ||W0 + scaling * B A||_row``: the model is unchanged at initialisation (PEFT's DoRA init)."""
        self.lora_magnitude_vector.copy_(self.weight_norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        w = base_weight(self)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base_result = result - bias if bias is not None else result
        else:  # PEFT: the DoRA term (base part included) runs on the dropped-out input
            x = self.lora_dropout(x)
            base_result = F.linear(x, w.to(x.dtype))
        scale = (self.lora_magnitude_vector / self.weight_norm()).view(*([1] * (result.dim() - 1)), -1)
        lora_result = self.lora_B(self.lora_A(cast_for(x, self.lora_A.weight))) * self.scaling
        # in the base output's dtype, as PEFT: the fp32 magnitude would turn a bf16 stream into fp32 (the next
        # bf16-stored LayerNorm refuses fp32 input)
        return (result + (scale - 1) * base_result + scale * lora_result).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """``W <- m / ||W0 + dW||_row * (W0 + dW)``; the norm is cached so unmerge inverts exactly."""
        if self.merged:
            raise LoraExpError("merge(): this LoRA layer is already merged; call unmerge() first")
        w = base_weight(self)
        delta = self.delta_weight()
        norm = torch.linalg.norm(w.float() + delta, dim=1)
        merged = (self.lora_magnitude_vector.float() / norm).view(-1, 1) * (w.float() + delta)
        if not torch.isfinite(merged).all():
            raise LoraExpError("merge(): the merged weight is not finite; the adapter is broken")
        if w.dtype != torch.float32:
            self._pristine = self.base_layer.weight.detach().clone()
        self._merged_norm = norm
        _set_base_weight(self, merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore ``W0 = W / (m / cached norm) - dW`` (a pristine copy for low precision)."""
        if not self.merged:
            raise LoraExpError("unmerge(): this LoRA layer is not merged")
        if self._pristine is not None:
            self.base_layer.weight.copy_(self._pristine)
            self._pristine = None
        else:
            factor = (self.lora_magnitude_vector.float() / self._merged_norm).view(-1, 1)
            _set_base_weight(self, base_weight(self).float() / factor - self.delta_weight())
        self._merged_norm = None
        self.merged = False
