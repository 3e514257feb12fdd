"""A low-precision frozen base: DoRA unchanged at step 0, a no-op for full fine-tuning (said, recorded as fp32),
and inference after such training (bf16 hidden states into an fp32 head)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_exp.adapters.dora import DoRALinear
from lora_exp.adapters.targets import lora_layers
from lora_exp.models.build import build_model
from lora_exp.training.loop import train

BATCH = {"input_ids": torch.randint(5, 100, (4, 16), generator=torch.Generator().manual_seed(0))}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**BATCH, attention_mask=torch.ones(4, 16, dtype=torch.long)).logits.float()


def test_dora_with_a_bf16_base_is_the_identity_at_init(tiny_cfg) -> None:
    _, model, _, adapted = build_model(tiny_cfg("+variant=dora", "model.base_dtype=bf16", "lora.targets=[q,v,ffn]"))
    layers = dict(lora_layers(model))
    assert len(layers) == len(adapted) > 0 and all(isinstance(m, DoRALinear) for m in layers.values())
    for layer in layers.values():
        assert layer.base_layer.weight.dtype == torch.bfloat16
        assert layer.lora_magnitude_vector.dtype == torch.float32  # trainable: an fp32 master weight
        ratio = layer.lora_magnitude_vector / layer.weight_norm()
        assert torch.equal(ratio, torch.ones_like(ratio))  # m from the stored W0: every row's scale is exactly 1
    with_dora = _logits(model)
    for name, layer in layers.items():  # the same model without the DoRA wrappers
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    torch.testing.assert_close(with_dora, _logits(model), rtol=0, atol=0)


def test_base_dtype_with_full_is_said_and_recorded_as_fp32(
    tiny_cfg, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    quick = ("method=full", "trainer.max_steps=2", "trainer.epochs=1", "save_weights=false", "trainer.seed=1")
    said = train(tiny_cfg(*quick, "model.base_dtype=bf16", "trainer.precision=fp32"), tmp_path / "bf16")
    out = capsys.readouterr().out
    assert "model.base_dtype=bf16 has no effect with method=full" in out
    plain = train(tiny_cfg(*quick, "trainer.precision=fp32"), tmp_path / "fp32")
    assert said["base_dtype"] == plain["base_dtype"] == "fp32"
    assert said["group_hash"] == plain["group_hash"]  # the same computation: it pools
    assert said["test_loss"] == plain["test_loss"]
    saved = json.loads((tmp_path / "bf16" / "config.yaml").with_name("results.json").read_text())
    assert saved["base_dtype"] == "fp32"
