"""LoRA variants, each equal to PEFT's (peft 0.21): DoRA, PiSSA / OLoRA / gaussian init, LoRA+ groups, BitFit.

- **DoRA** (``DoRALinear``): ``h = W0 x + b0 + (m / ||W0 + s B A||_row - 1) W0 x + (m / ||.||_row) s B A x``,
  the magnitude ``m`` (PEFT's name ``lora_magnitude_vector``) initialised to the row norms of ``W0 + s B A``;
  the norm is detached (a constant in backward, DoRA paper section 4.3). With dropout in training the DoRA
  term runs on the dropped-out input, as PEFT does. Merge folds ``m / norm * (W0 + s B A)`` into W0 and
  caches the norm so unmerge is exact.
- **Initialisations** (``init_lora``): ``gaussian`` A ~ N(0, 1/r), B = 0; ``pissa`` top-r SVD of W0 with
  the scaling divided out of the singular values, W0 replaced by the residual; ``olora`` QR of W0, A = R_r,
  B = Q_r, W0 replaced by ``W0 - s Q_r R_r``. The residual is a deterministic function of the pristine
  W0, so an adapter of a PiSSA / OLoRA run is loaded by injecting with the same init on the pristine base
  (the residual is recomputed) and then copying the trained tensors: what PEFT's ``from_pretrained`` does.
- **LoRA+** (``optimizer_groups``): PEFT's ``create_loraplus_optimizer`` grouping.
- **BitFit / bias** (``bias_parameters``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_exp.errors import LoraExpError
from lora_exp.lora import LoRALinear

VARIANTS = ("lora", "dora")
INITS = ("default", "gaussian", "pissa", "olora")
BIASES = ("none", "lora_only", "all")
RESIDUAL_INITS = ("pissa", "olora")  # inits that rewrite W0
MAGNITUDE = "lora_magnitude_vector"  # PEFT's attribute name: export is a prefix rename


def base_weight(layer: LoRALinear) -> torch.Tensor:
    """W0 as (out, in), whatever the storage (GPT-2 Conv1D stores (in, out): ``fan_in_fan_out``)."""
    w = layer.base_layer.weight
    return w.T if getattr(layer, "fan_in_fan_out", False) else w


@torch.no_grad()
def _set_base_weight(layer: LoRALinear, w_out_in: torch.Tensor) -> None:
    w = layer.base_layer.weight
    w.copy_((w_out_in.T if getattr(layer, "fan_in_fan_out", False) else w_out_in).to(w.dtype))


class DoRALinear(LoRALinear):
    """LoRA with weight decomposition (DoRA): a trainable magnitude per output row on top of ``LoRALinear``."""

    def __init__(self, base: nn.Module, *args: Any, **kwargs: Any):
        super().__init__(base, *args, **kwargs)
        w = base_weight(self)
        self.lora_magnitude_vector = nn.Parameter(torch.empty(w.shape[0], device=w.device, dtype=w.dtype))
        self._merged_norm: torch.Tensor | None = None
        self.reset_magnitude()

    def weight_norm(self) -> torch.Tensor:
        """Row norms of ``W0 + scaling * B A`` (fp32 when W0 is), detached: DoRA treats them as constants."""
        w = base_weight(self)
        lora_w = (self.lora_B.weight @ self.lora_A.weight).detach().to(w.dtype)
        return torch.linalg.norm(w + self.scaling * lora_w, dim=1).to(w.dtype).detach()

    def _delta(self) -> torch.Tensor:
        """``scaling * B @ A`` as (out, in) in fp32 (independent of how ``delta_weight`` orients Conv1D)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

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
        lora_result = self.lora_B(self.lora_A(x)) * self.scaling
        return result + (scale - 1) * base_result + scale * lora_result

    @torch.no_grad()
    def merge(self) -> None:
        """``W <- m / ||W0 + dW||_row * (W0 + dW)``; the norm is cached so unmerge inverts exactly."""
        if self.merged:
            raise LoraExpError("merge(): this LoRA layer is already merged; call unmerge() first")
        w = base_weight(self)
        delta = self._delta()
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
            _set_base_weight(self, base_weight(self).float() / factor - self._delta())
        self._merged_norm = None
        self.merged = False


@torch.no_grad()
def init_lora(layer: LoRALinear, init: str) -> None:
    """Initialise A and B (and for pissa / olora rewrite W0 to the residual), exactly as PEFT does."""
    a, b = layer.lora_A.weight, layer.lora_B.weight
    if init == "default":
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


def pattern_value(patterns: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching ``(.*\\.)?(key)$`` wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer-block index in a module path (``...layer.3.attention...`` -> 3), or None."""
    m = _LAYER_INDEX.search(name + ".")
    return int(m.group(1)) if m else None


def select_layers(names: list[str], layers: list[int] | None) -> list[str]:
    """Keep the module paths whose block index is in ``layers`` (PEFT's ``layers_to_transform``)."""
    if layers is None:
        return names
    kept = [n for n in names if layer_index(n) in set(layers)]
    if not kept:
        found = sorted({i for n in names if (i := layer_index(n)) is not None})
        raise LoraExpError(f"lora.layers={list(layers)} selects none of the targeted modules (layer indices {found})")
    return kept


def make_layer(
    base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool, variant: str = "lora", init: str = "default"
) -> LoRALinear:
    """A ``LoRALinear`` (or ``DoRALinear``) around ``base`` initialised with ``init``."""
    if variant not in VARIANTS:
        raise LoraExpError(f"lora.variant={variant!r} is not one of {', '.join(VARIANTS)}")
    cls = DoRALinear if variant == "dora" else LoRALinear
    layer = cls(base, r, alpha, dropout, rslora)
    if init != "default":
        init_lora(layer, init)
    layer.init = init  # read back by save_adapter / export_peft
    return layer


def layers_meta(layers: Mapping[str, LoRALinear]) -> dict[str, Any]:
    """Variant, init and (for pissa / olora) how the residual base is rebuilt, for ``adapter_config.json``."""
    if not layers:
        return {}
    kinds = {("dora" if isinstance(m, DoRALinear) else "lora", getattr(m, "init", "default")) for m in layers.values()}
    if len(kinds) > 1:
        raise LoraExpError(f"save: the model mixes LoRA variants / inits {sorted(kinds)}; one adapter holds one")
    variant, init = kinds.pop()
    meta: dict[str, Any] = {"variant": variant, "init": init}
    if init in RESIDUAL_INITS:
        meta["residual_base"] = (
            f"W0 of each adapted layer is the residual W0 - scaling * B0 @ A0 of the {init} init; it is "
            "recomputed from the pristine base model by injecting with the same init before loading these tensors"
        )
    return meta


def bias_parameters(model: nn.Module, bias: str, adapted: list[str]) -> list[str]:
    """Names of the bias tensors that train: ``all`` every bias, ``lora_only`` the adapted layers' (PEFT)."""
    if bias not in BIASES:
        raise LoraExpError(f"lora.bias={bias!r} is not one of {', '.join(BIASES)}")
    names = [n for n, _ in model.named_parameters() if n == "bias" or n.endswith(".bias")]
    if bias == "none":
        return []
    if bias == "all":
        return names
    return [n for n in names if any(n == f"{a}.base_layer.bias" for a in adapted)]


def is_adapter_param(name: str) -> bool:
    """LoRA A / B and DoRA magnitude: the parameters counted as 'adapter'."""
    return ".lora_A." in name or ".lora_B." in name or name.endswith("." + MAGNITUDE)


def optimizer_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    loraplus_lr_ratio: float | None = None,
    loraplus_lr_embedding: float = 1e-6,
) -> list[dict]:
    """AdamW parameter groups over the trainable parameters.

    Without LoRA+: ``>= 2-D`` weights with ``weight_decay``, the rest without (the loop's historical rule).
    With ``loraplus_lr_ratio``: PEFT's ``create_loraplus_optimizer`` (with ``loraplus_weight_decay =
    weight_decay``): group A (every other trainable tensor: LoRA A, the head's weight matrices) at ``lr``;
    LoRA embeddings at ``loraplus_lr_embedding`` (we adapt no embedding: always empty); group B (LoRA B and
    every 1-D tensor: biases, LayerNorm, DoRA magnitudes) at ``lr * ratio``, decayed unless the name holds
    "bias" or the tensor sits in a LayerNorm. Empty groups are dropped; each group carries ``names``.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if loraplus_lr_ratio is None:
        groups = [
            ([(n, p) for n, p in trainable if p.ndim >= 2], weight_decay, lr),
            ([(n, p) for n, p in trainable if p.ndim < 2], 0.0, lr),
        ]
    else:
        if loraplus_lr_ratio <= 0:
            raise LoraExpError(f"optimizer.loraplus_lr_ratio={loraplus_lr_ratio} must be > 0 (or null)")
        norm_params = {
            id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)
        }
        group_a, group_b, group_b_nd = [], [], []
        for n, p in trainable:
            if "lora_B" in n or p.ndim == 1:
                (group_b if "bias" not in n and id(p) not in norm_params else group_b_nd).append((n, p))
            else:
                group_a.append((n, p))
        groups = [
            (group_a, weight_decay, lr),
            ([], weight_decay, loraplus_lr_embedding),
            (group_b, weight_decay, lr * loraplus_lr_ratio),
            (group_b_nd, 0.0, lr * loraplus_lr_ratio),
        ]
    return [
        {"params": [p for _, p in g], "names": [n for n, _ in g], "weight_decay": wd, "lr": glr}
        for g, wd, glr in groups
        if g
    ]


def variant_label(lora_cfg: Any, method: str, loraplus_lr_ratio: float | None = None) -> str:
    """Short name of what trains, for run names, results and report rows.

    ``full`` / ``frozen`` / ``bitfit`` for those methods; for LoRA ``lora``, ``rslora``, ``dora``, ``pissa``,
    ``olora``, ``gaussian`` or ``lora+`` (``loraplus_lr_ratio`` is ``cfg.optimizer.loraplus_lr_ratio``),
    joined by ``-`` when combined (``dora-rslora``, ``pissa-lora+``). r and targets are not part of it.
    """
    if method != "lora":
        return method
    get = lora_cfg.get if hasattr(lora_cfg, "get") else (lambda k, d=None: getattr(lora_cfg, k, d))
    parts = []
    if get("variant", "lora") == "dora" or get("use_dora", False):
        parts.append("dora")
    init = get("init", "default")
    if init in RESIDUAL_INITS or init == "gaussian":
        parts.append(init)
    if get("rslora", False):
        parts.append("rslora")
    if loraplus_lr_ratio is not None:
        parts.append("lora+")
    return "-".join(parts) or "lora"


def variant_of(lora_cfg: Any) -> str:
    """``lora`` or ``dora`` from ``lora.variant`` and its alias ``lora.use_dora``."""
    get = lora_cfg.get if hasattr(lora_cfg, "get") else (lambda k, d=None: getattr(lora_cfg, k, d))
    return "dora" if get("use_dora", False) or get("variant", "lora") == "dora" else get("variant", "lora")


def variant_counts(model: nn.Module) -> dict[str, int]:
    """Adapter parameters split by kind (deduplicated): LoRA A/B and DoRA magnitudes, for results.json."""
    out = {"lora_ab_params": 0, "dora_magnitude_params": 0}
    for name, p in model.named_parameters():
        if name.endswith("." + MAGNITUDE):
            out["dora_magnitude_params"] += p.numel()
        elif ".lora_A." in name or ".lora_B." in name:
            out["lora_ab_params"] += p.numel()
    return out
