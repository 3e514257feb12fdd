"""VeRA (Kopiczko et al. 2024, "Vector-based Random Matrix Adaptation"), equal to PEFT's ``VeraConfig``.

``h = W0 x + b0 + lambda_b * (B_sl (lambda_d * (A_sl dropout(x))))``: one pair of frozen random matrices
``vera_A: r x max_in`` and ``vera_B: max_out x r`` shared by every adapted layer (PEFT's design: one pair,
sized to the largest input / output among the targets; each layer uses the top-left slice of its own shape),
and per layer two trained vectors, ``vera_lambda_d`` (r, starts at ``d_initial``) and ``vera_lambda_b`` (out,
starts at 0: the model is unchanged at init). The pair is drawn as PEFT draws it: a CPU ``torch.Generator``
seeded with ``projection_prng_key``, Kaiming-uniform (gain sqrt 2, fan-in) for A then B, so our matrices and
PEFT's are the same tensors, not copies. There is no alpha or scaling (``lora.alpha`` is not used).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_exp.adapters.layer import LoRALinear
from lora_exp.errors import LoraExpError

PARAMS = ("vera_lambda_b", "vera_lambda_d")  # PEFT's names: the export is a prefix rename
PROJECTIONS = ("vera_A", "vera_B")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init``: U(-b, b), ``b = sqrt(3) * sqrt(2) / sqrt(fan_in)``, drawn from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The shared frozen pair, a module every VeRA layer holds (so ``.to(device)`` moves one copy).

    Non-persistent buffers: the base model's own ``state_dict`` stays clean; the adapter store and the PEFT
    export save them explicitly.
    """

    def __init__(self, r: int, max_in: int, max_out: int, prng_key: int):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(prng_key)
        self.register_buffer("vera_A", kaiming_uniform((r, max_in), generator), persistent=False)
        self.register_buffer("vera_B", kaiming_uniform((max_out, r), generator), persistent=False)
        self.prng_key = prng_key


class VeraLinear(LoRALinear):
    """A frozen ``nn.Linear`` / ``Conv1D`` plus VeRA's scaled shared projections (``lora.variant=vera``)."""

    variant = "vera"

    def __init__(
        self,
        base: nn.Linear | Conv1D,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        d_initial: float = 0.1,
        prng_key: int = 0,
    ):
        nn.Module.__init__(self)  # no lora_A / lora_B: the projections are shared
        if r < 1:
            raise LoraExpError(f"lora.r={r} must be >= 1")
        self.fan_in_fan_out = isinstance(base, Conv1D)
        k, d = base.weight.shape if self.fan_in_fan_out else (base.in_features, base.out_features)
        self.in_features, self.out_features = k, d
        self.base_layer = base.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.vera_lambda_b = nn.Parameter(torch.zeros(d, device=dev, dtype=dt))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=dev, dtype=dt))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.rslora, self.scaling = r, alpha, rslora, 1.0
        self.d_initial, self.prng_key = float(d_initial), int(prng_key)
        self.merged = False
        self._pristine: torch.Tensor | None = None
        self.projections: VeraProjections | None = None

    @classmethod
    def after_injection(cls, layers: list[LoRALinear]) -> None:
        """Draw the shared pair, sized to the largest input / output of ``layers``, and hand it to each."""
        if not layers:
            return
        first = layers[0]
        if any(m.r != first.r or m.prng_key != first.prng_key for m in layers):
            raise LoraExpError("lora.variant=vera: every layer shares one pair of projections: one r, one PRNG key")
        max_in = max(m.in_features for m in layers)
        max_out = max(m.out_features for m in layers)
        shared = VeraProjections(first.r, max_in, max_out, first.prng_key).to(first.vera_lambda_b.device)
        for m in layers:
            m.projections = shared

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The two vectors."""
        return [self.vera_lambda_b, self.vera_lambda_d]

    def _sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.projections is None:
            raise LoraExpError("VeRA layer without its shared projections (inject() draws them)")
        return self.projections.vera_A[:, : self.in_features], self.projections.vera_B[: self.out_features, :]

    def delta_weight(self) -> torch.Tensor:
        """``(lambda_b B_sl) @ (lambda_d A_sl)`` (``out x in``) in fp32."""
        a, b = (t.float() for t in self._sliced())
        return (self.vera_lambda_b.float().unsqueeze(-1) * b) @ (self.vera_lambda_d.float().unsqueeze(-1) * a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a, b = self._sliced()
        lambda_d = self.vera_lambda_d
        x = x.to(lambda_d.dtype)
        update = self.vera_lambda_b * F.linear(lambda_d * F.linear(self.vera_dropout(x), a.to(x.dtype)), b.to(x.dtype))
        return (result + update).to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, d_initial={self.d_initial:g}, prng_key={self.prng_key}, merged={self.merged}"


def peft_config(layers: dict[str, LoRALinear], meta: dict[str, Any]) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` fields of a VeRA adapter (``peft_format.export_peft`` adds the common ones)."""
    first = next(iter(layers.values()))
    return {
        "peft_type": "VERA",
        "r": first.r,
        "projection_prng_key": first.prng_key,
        "save_projection": True,
        "vera_dropout": float(meta.get("dropout", 0.0)),
        "d_initial": first.d_initial,
        "init_weights": True,
    }


def projection_tensors(layers: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """PEFT's keys for the shared pair: ``base_model.vera_A`` / ``base_model.vera_B``."""
    shared = next(iter(layers.values())).projections
    return {f"base_model.{n}": getattr(shared, n).detach().cpu().contiguous() for n in PROJECTIONS}


def load_projections(layers: dict[str, LoRALinear], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy a saved pair into the model's (they must have the shapes this injection drew)."""
    shared = next(iter(layers.values())).projections
    for name in PROJECTIONS:
        own, saved = getattr(shared, name), tensors[name]
        if own.shape != saved.shape:
            raise LoraExpError(f"{where}: {name} has shape {tuple(saved.shape)}, the model {tuple(own.shape)}")
        own.copy_(saved.to(own.device, own.dtype))
