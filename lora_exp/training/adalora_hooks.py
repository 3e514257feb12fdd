"""AdaLoRA in a training job: the rank allocator runs after every optimizer step (PEFT's
``update_and_allocate``, between ``optimizer.step()`` and ``zero_grad``) and the orthogonality regulariser joins
the training loss, both as hooks, so the loop stays the same for every variant."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from lora_exp.adapters import adalora
from lora_exp.adapters.targets import lora_layers

if TYPE_CHECKING:
    from lora_exp.config.schema import Config


def attach(
    cfg: Config, model: nn.Module, optimizer: Any, total_steps: int, step_of: Any
) -> adalora.RankAllocator | None:
    """Hook AdaLoRA's allocator onto ``optimizer`` and its regulariser onto ``model``; ``step_of()`` gives the
    0-based index of the update that just ran. ``None`` for other variants."""
    layers = {n: m for n, m in lora_layers(model) if isinstance(m, adalora.AdaLoraLinear)}
    if not layers:
        return None
    opts = cfg.lora.adalora
    allocator = adalora.RankAllocator(
        layers,
        target_r=int(cfg.lora.r),  # lora.r is AdaLoRA's average rank at the end
        total_step=total_steps,
        tinit=int(opts.tinit_ratio * total_steps),
        tfinal=int(opts.tfinal_ratio * total_steps),
        delta_t=int(opts.delta_t),
        beta1=float(opts.beta1),
        beta2=float(opts.beta2),
    )
    optimizer.register_step_post_hook(lambda *_: allocator.step(step_of()))
    adalora.add_orthogonality(model, float(opts.orth_reg_weight))
    return allocator


def final_ranks(model: nn.Module) -> dict[str, int] | None:
    """Each AdaLoRA layer's rank after the allocation (for results.json and the report's figure)."""
    ranks = {n: m.rank() for n, m in lora_layers(model) if isinstance(m, adalora.AdaLoraLinear)}
    return ranks or None
