"""LoRA initialisations, each as PEFT does it: ``gaussian`` A ~ N(0, 1/r), B = 0; ``pissa`` top-r SVD of W0
with the scaling divided out of the singular values, W0 replaced by the residual; ``olora`` QR of W0,
A = R_r, B = Q_r, W0 replaced by ``W0 - s Q_r R_r``.

The residual is a deterministic function of the pristine W0, so an adapter of a PiSSA / OLoRA run is loaded
by injecting with the same init on the pristine base (the residual is recomputed) and then copying the
trained tensors: what PEFT's ``from_pretrained`` does.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_exp.adapters.choices import DATA_INITS, INITS, RESIDUAL_INITS
from lora_exp.adapters.dora import DoRALinear
from lora_exp.adapters.layer import LoRALinear, _set_base_weight, base_weight
from lora_exp.errors import LoraExpError


@torch.no_grad()
def init_lora(layer: LoRALinear, init: str) -> None:
    """Initialise A and B (and for pissa / olora rewrite W0 to the residual), exactly as PEFT does."""
    a, b = layer.lora_A.weight, layer.lora_B.weight
    if init == "default" or init in DATA_INITS:  # a data-driven init replaces these once batches are at hand
        layer.reset_lora_parameters()
    elif init == "gaussian":
        nn.init.normal_(a, std=1 / layer.r)
        nn.init.zeros_(b)
    elif init in RESIDUAL_INITS:
        w = base_weight(layer).float()
        if init == "pissa":
            v, s, uh = torch.linalg.svd(w, full_matrices=False)
            sr = s[: layer.r] / layer.scaling
            new_a = torch.diag(torch.sqrt(sr)) @ uh[: layer.r]
            new_b = v[:, : layer.r] @ torch.diag(torch.sqrt(sr))
        else:
            q, rr = torch.linalg.qr(w)
            new_a, new_b = rr[: layer.r], q[:, : layer.r]
        a.copy_(new_a)
        b.copy_(new_b)
        _set_base_weight(layer, w - layer.scaling * new_b @ new_a)
    else:
        raise LoraExpError(f"lora.init={init!r} is not one of {', '.join(INITS)}")
    if isinstance(layer, DoRALinear):
        layer.reset_magnitude()
