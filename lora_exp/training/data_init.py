"""Data-driven LoRA inits in a training job (``lora.init=eva | lora_ga``): computed once from training batches, saved in
``<run dir>/init/``, restored on resume (never recomputed: the data, the model and their cost stay as they
were), recorded in results.json (``data_init``: batches, tokens, seconds, ranks)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lora_exp.adapters import eva, init_state, lora_ga
from lora_exp.adapters.choices import DATA_INITS
from lora_exp.adapters.targets import lora_layers
from lora_exp.errors import LoraExpError

if TYPE_CHECKING:
    from lora_exp.config.schema import Config


def wanted(cfg: Config) -> str | None:
    """The data-driven init this job uses, if any."""
    init = cfg.lora.init if cfg.method.name == "lora" else None
    return init if init in DATA_INITS else None


def prepare(
    cfg: Config,
    model: nn.Module,
    train_loader: Any,
    generator: torch.Generator,
    amp: Callable[[], AbstractContextManager],
    run_dir: Path,
    resume: bool,
) -> dict[str, Any] | None:
    """Run (or, resuming, restore) the job's data-driven init; ``None`` when it has none. The data order of
    training is unchanged: the loader's generator is put back where it was."""
    init = wanted(cfg)
    if init is None:
        return None
    if resume:
        if not init_state.exists(run_dir):
            raise LoraExpError(f"resume={str(run_dir)!r}: lora.init={init} but the run dir has no saved init/")
        record = init_state.restore_state(model, run_dir)
        print(f"[lora-exp] {init} init restored from {run_dir / init_state.FOLDER} (not recomputed)")
        return {**record, "restored": True}
    state = generator.get_state()
    try:
        record, a, b = (_eva if init == "eva" else _lora_ga)(cfg, model, train_loader, amp)
    finally:
        generator.set_state(state)
    init_state.save_state(run_dir, a, b, record)
    ranks = [r for r in record["ranks"].values()]
    print(
        f"[lora-exp] {init} init: {record['batches']} batches ({record['tokens']:,} tokens) in "
        f"{record['seconds']:.1f} s; ranks {min(ranks)}-{max(ranks)} over {len(ranks)} layers "
        f"({sum(r == 0 for r in ranks)} dropped); saved in {run_dir / init_state.FOLDER}"
    )
    return {**record, "restored": False}


def _eva(
    cfg: Config, model: nn.Module, train_loader: Any, amp: Callable[[], AbstractContextManager]
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """EVA on the training batches: the record and each layer's A (B stays 0)."""
    opts = cfg.lora.eva
    layers = dict(lora_layers(model))
    start = time.perf_counter()
    result = eva.eva_components(
        model, layers, train_loader, rho=opts.rho, tau=opts.tau, max_batches=opts.max_batches, amp=amp
    )
    alphas = eva.eva_alphas(layers, result.ranks, opts.adjust_scaling)
    a = {n: result.components[n] for n in layers}
    eva.apply_init(model, layers, a, alphas)
    record = {"init": "eva", "batches": result.batches, "tokens": result.tokens, "seconds": _since(start, model)}
    return {**record, "ranks": {n: int(result.ranks[n]) for n in layers}, "alphas": alphas}, a, {}


def _lora_ga(
    cfg: Config, model: nn.Module, train_loader: Any, amp: Callable[[], AbstractContextManager]
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """LoRA-GA: the mean gradient over ``lora.lora_ga.batches`` batches, A, B from its SVD, W0 adjusted."""
    opts = cfg.lora.lora_ga
    layers = dict(lora_layers(model))
    lora_ga.check_ranks(layers)  # before the gradient passes
    start = time.perf_counter()
    counted = _Counted(train_loader)
    grads, used = lora_ga.estimate_gradients(model, layers, counted, opts.batches, amp)
    a, b = {}, {}
    for name, layer in layers.items():
        a[name], b[name] = lora_ga.factors(
            grads[name], layer, opts.direction, opts.scale, opts.stable_gamma, seed=int(cfg.trainer.seed)
        )
        lora_ga.apply_residual(layer, a[name], b[name])
    record = {"init": "lora_ga", "batches": used, "tokens": counted.tokens, "seconds": _since(start, model)}
    ranks = {n: m.r for n, m in layers.items()}
    return {**record, "ranks": ranks, "alphas": {n: m.alpha for n, m in layers.items()}, "residual": True}, a, b


class _Counted:
    """Iterates a loader, counting the non-padding tokens it hands out."""

    def __init__(self, loader: Any):
        self.loader, self.tokens = loader, 0

    def __iter__(self) -> Any:
        for batch in self.loader:
            mask = batch.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None else 0
            yield batch


def _since(start: float, model: nn.Module) -> float:
    """Seconds since ``start`` (CUDA work finished first)."""
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
