"""A low-precision frozen base: DoRA unchanged at step 0, a no-op for full fine-tuning (said, recorded as fp32),
and inference after such training (bf16 hidden states into an fp32 head)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_exp.adapters.dora import DoRALinear
from lora_exp.adapters.targets import lora_layers
from lora_exp.config.schema import typed_config
from lora_exp.training.job import build_model_for

BATCH = {"input_ids": torch.randint(5, 100, (4, 16), generator=torch.Generator().manual_seed(0))}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**BATCH, attention_mask=torch.ones(4, 16, dtype=torch.long)).logits.float()


def test_dora_with_a_bf16_base_is_the_identity_at_init(tiny_cfg) -> None:
    _, model, _, adapted = build_model_for(
        typed_config(tiny_cfg("+preset=dora", "model.base_dtype=bf16", "lora.targets=[q,v,ffn]"))
    )
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


def test_lora_layer_takes_bf16_input_without_autocast() -> None:
    from lora_exp.adapters.layer import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 8).to(torch.bfloat16), r=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    assert layer.lora_A.weight.dtype == torch.bfloat16  # factors follow the wrapped weight ...
    layer.lora_A.float(), layer.lora_B.float()  # ... trained ones are fp32 master weights (store_frozen_in)
    x = torch.randn(3, 16).to(torch.bfloat16)
    out = layer(x)  # bf16 hidden states of a bf16-stored base, no autocast
    assert out.dtype == torch.bfloat16
    expected = layer.base_layer(x).float() + layer.scaling * (x.float() @ layer.delta_weight().T / layer.scaling)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


def test_a_gpu_run_predicts_on_the_cpu_here_and_says_so(tiny_cfg, tmp_path: Path, capsys: pytest.CaptureFixture):
    from omegaconf import OmegaConf

    from lora_exp import inference

    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"device": "cuda:0", "precision": "fp16"}))
    cfg = tiny_cfg()
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    assert inference.run_compute(run, typed_config(cfg)) == (torch.device("cpu"), "fp32")  # fp16 autocast is CUDA's
    assert "the run computed on cuda:0, which is not available here: cpu in fp32" in capsys.readouterr().err
    (run / "results.json").write_text(json.dumps({"device": "cpu", "precision": "bf16"}))
    assert inference.run_compute(run, typed_config(OmegaConf.merge(cfg, {"trainer": {"precision": "fp32"}}))) == (
        torch.device("cpu"),
        "bf16",
    )
