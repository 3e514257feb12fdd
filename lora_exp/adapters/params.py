"""Which parameters train and how they are grouped: BitFit / bias modes, adapter parameters, AdamW groups
(PEFT's LoRA+ grouping), the variant's short name and counts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from lora_exp.adapters.adalora import E_NAME as ADALORA_E
from lora_exp.adapters.choices import BIASES, DATA_INITS, RESIDUAL_INITS, adalora_initial_rank
from lora_exp.adapters.dora import MAGNITUDE
from lora_exp.adapters.layer import LoRALinear
from lora_exp.adapters.vera import PARAMS as VERA_PARAMS
from lora_exp.errors import LoraExpError

if TYPE_CHECKING:
    from lora_exp.config.schema import LoraConfig


def layers_meta(layers: Mapping[str, LoRALinear]) -> dict[str, Any]:
    """Variant, init and (for pissa / olora) how the residual base is rebuilt, for ``adapter_config.json``."""
    if not layers:
        return {}
    kinds = {(m.variant, getattr(m, "init", "default")) for m in layers.values()}
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
    """LoRA A / B, DoRA magnitude, VeRA's vectors, AdaLoRA's E: the parameters counted as 'adapter'."""
    if ".lora_A." in name or ".lora_B." in name:
        return True
    return name.rpartition(".")[2] in (MAGNITUDE, ADALORA_E, *VERA_PARAMS)


def optimizer_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    loraplus_lr_ratio: float | None = None,
) -> list[dict]:
    """AdamW parameter groups over the trainable parameters.

    Without LoRA+: ``>= 2-D`` weights with ``weight_decay``, the rest without (the loop's historical rule).
    With ``loraplus_lr_ratio``: PEFT's ``create_loraplus_optimizer`` (with ``loraplus_weight_decay =
    weight_decay``): group A (every other trainable tensor: LoRA A, the head's weight matrices) at ``lr``
    (PEFT's LoRA-embedding group is always empty here: no embedding is adapted); group B (LoRA B and
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
            (group_b, weight_decay, lr * loraplus_lr_ratio),
            (group_b_nd, 0.0, lr * loraplus_lr_ratio),
        ]
    return [
        {"params": [p for _, p in g], "names": [n for n, _ in g], "weight_decay": wd, "lr": glr}
        for g, wd, glr in groups
        if g
    ]


def variant_label(lora_cfg: LoraConfig, method: str, loraplus_lr_ratio: float | None = None) -> str:
    """Short name of what trains, for run names, results and report rows.

    ``full`` / ``frozen`` / ``bitfit`` for those methods; for LoRA ``lora``, ``rslora``, the variant
    (``dora``, ``lora_fa``, ...), the init (``pissa``, ``olora``, ``gaussian``, ``eva``) or ``lora+``
    (``loraplus_lr_ratio`` is ``cfg.optimizer.loraplus_lr_ratio``), joined by ``-`` when combined
    (``dora-rslora``, ``pissa-lora+``). r and targets are not part of it.
    """
    if method != "lora":
        return method
    parts = []
    if variant_of(lora_cfg) != "lora":
        parts.append(variant_of(lora_cfg))
    init = lora_cfg.init
    if init in RESIDUAL_INITS or init in DATA_INITS or init == "gaussian":
        parts.append(init)
    if lora_cfg.rslora:
        parts.append("rslora")
    if loraplus_lr_ratio is not None:
        parts.append("lora+")
    return "-".join(parts) or "lora"


def variant_of(lora_cfg: LoraConfig) -> str:
    """``lora.variant`` (``dora`` also from its alias ``lora.use_dora``)."""
    return "dora" if lora_cfg.use_dora else lora_cfg.variant


def layer_rank(lora_cfg: LoraConfig) -> int:
    """The rank each adapted layer is built with: ``lora.r``; for VeRA its own ``lora.vera.r`` (the shared
    projections'); for AdaLoRA ``lora.adalora.init_r``, null: 1.5 x ``lora.r`` rounded up (PEFT's 12 for a
    target of 8), which it prunes to an average of ``lora.r``."""
    variant = variant_of(lora_cfg)
    if variant == "vera":
        return int(lora_cfg.vera.r)
    if variant == "adalora":
        return adalora_initial_rank(int(lora_cfg.r), lora_cfg.adalora.init_r)
    return int(lora_cfg.r)


def variant_options(lora_cfg: LoraConfig) -> dict[str, Any]:
    """The variant's own layer options from ``lora.*`` (``inject(options=...)``): VeRA's d_initial and PRNG key."""
    if variant_of(lora_cfg) == "vera":
        return {"d_initial": float(lora_cfg.vera.d_initial), "prng_key": int(lora_cfg.vera.prng_key)}
    return {}


def variant_counts(model: nn.Module) -> dict[str, int]:
    """Adapter parameters split by kind (deduplicated), for results.json: LoRA A/B and DoRA magnitudes always,
    VeRA's vectors (``vera_vector_params``), AdaLoRA's E (``adalora_e_params``) when the model has them."""
    out = {"lora_ab_params": 0, "dora_magnitude_params": 0}
    for name, p in model.named_parameters():
        if name.endswith("." + MAGNITUDE):
            out["dora_magnitude_params"] += p.numel()
        elif name.rpartition(".")[2] in VERA_PARAMS:
            out["vera_vector_params"] = out.get("vera_vector_params", 0) + p.numel()
        elif name.endswith("." + ADALORA_E):
            out["adalora_e_params"] = out.get("adalora_e_params", 0) + p.numel()
        elif ".lora_A." in name or ".lora_B." in name:
            out["lora_ab_params"] += p.numel()
    return out
