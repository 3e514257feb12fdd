"""The training checks without a run: an untrainable tensor and a LoRA B stuck at zero are caught, the head's init
follows the seed across methods, a max_length beyond the model is an error before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_exp.config.schema import typed_config
from lora_exp.errors import LoraExpError, TrainingFailure
from lora_exp.training import checks, loop
from lora_exp.training.job import build_model_for


def test_same_seed_same_head_init_across_methods(tiny_cfg) -> None:
    heads = {}
    for method in ("full", "frozen", "lora"):
        _, model, _, _ = build_model_for(typed_config(tiny_cfg(f"method={method}")))
        heads[method] = model.classifier.weight.detach().clone()
    assert torch.equal(heads["full"], heads["frozen"]) and torch.equal(heads["full"], heads["lora"])
    _, other, _, _ = build_model_for(typed_config(tiny_cfg("trainer.seed=7")))
    assert not torch.equal(other.classifier.weight, heads["full"])


def test_untrainable_tensor_is_caught() -> None:
    layer = torch.nn.Linear(4, 2)
    extra = torch.nn.Parameter(torch.zeros(3))  # trainable but not in the graph (a frozen-head mistake)
    layer(torch.randn(2, 4)).sum().backward()
    with pytest.raises(TrainingFailure, match="extra.weight \\(no grad\\)"):
        checks.check_gradients([("layer.weight", layer.weight), ("extra.weight", extra)])


def test_lora_b_stuck_at_zero_is_caught() -> None:
    b = torch.nn.Parameter(torch.zeros(4, 2))
    with pytest.raises(TrainingFailure, match="lora_B.weight \\(still zero\\)"):
        checks.check_lora_moving([("x.lora_B.weight", b)], step=9)


def test_max_length_beyond_model_is_an_error(tiny_cfg, tmp_path: Path) -> None:
    with pytest.raises(LoraExpError, match="data.max_length=1024 exceeds the model's maximum of 512"):
        loop.train(tiny_cfg("data.max_length=1024"), tmp_path / "run")
