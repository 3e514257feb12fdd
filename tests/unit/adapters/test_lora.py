"""LoRA invariants on a single layer: zero delta at init, the forward formula, merge / unmerge."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_exp.adapters.layer import LoRALinear
from lora_exp.errors import LoraExpError


@pytest.fixture
def layer() -> LoRALinear:
    torch.manual_seed(0)
    return LoRALinear(nn.Linear(12, 20), r=4, alpha=8.0)


def _train_b(layer: LoRALinear) -> None:
    with torch.no_grad():
        layer.lora_B.weight.normal_()


def test_zero_delta_at_init(layer: LoRALinear) -> None:
    x = torch.randn(5, 12)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert layer.lora_A.weight.abs().sum() > 0  # A is random, B is zero
    assert layer.lora_B.weight.abs().sum() == 0


def test_forward_equals_formula(layer: LoRALinear) -> None:
    _train_b(layer)
    x = torch.randn(3, 7, 12)
    w0, b0 = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ w0.T + b0 + (8.0 / 4) * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected)


def test_rslora_scaling() -> None:
    assert LoRALinear(nn.Linear(16, 16), r=4, alpha=8.0, rslora=True).scaling == pytest.approx(8.0 / math.sqrt(4))
    assert LoRALinear(nn.Linear(16, 16), r=4, alpha=8.0).scaling == pytest.approx(2.0)


def test_kaiming_uniform_bound(layer: LoRALinear) -> None:
    bound = 1 / math.sqrt(12)  # kaiming_uniform(a=sqrt(5)) on fan_in=12
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.lora_A.weight.abs().max() > bound / 2


def test_merge_then_forward_equals_unmerged(layer: LoRALinear) -> None:
    _train_b(layer)
    x = torch.randn(4, 12)
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer(x), before, atol=1e-5, rtol=1e-5)  # plain Linear path


def test_unmerge_restores_w0(layer: LoRALinear) -> None:
    _train_b(layer)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert not torch.allclose(layer.base_layer.weight, w0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_unmerge_restores_bf16_exactly() -> None:
    layer = LoRALinear(nn.Linear(32, 32).to(torch.bfloat16), r=4, alpha=4.0)
    _train_b(layer)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)


def test_merge_twice_and_unmerge_unmerged_are_errors(layer: LoRALinear) -> None:
    with pytest.raises(LoraExpError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(LoraExpError, match="already merged"):
        layer.merge()


def test_gradients_only_on_a_and_b(layer: LoRALinear) -> None:
    _train_b(layer)
    layer(torch.randn(6, 12)).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert layer.lora_A.weight.grad.abs().sum() > 0
    assert layer.lora_B.weight.grad.abs().sum() > 0


def test_rank_bounds() -> None:
    with pytest.raises(LoraExpError, match="lora.r=0"):
        LoRALinear(nn.Linear(8, 8), r=0, alpha=1.0)
    with pytest.raises(LoraExpError, match=r"min\(out, in\)=6"):
        LoRALinear(nn.Linear(8, 6), r=7, alpha=1.0)


def test_dropout_applies_to_input_in_train_only() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), r=4, alpha=4.0, dropout=0.5)
    _train_b(layer)
    x = torch.randn(8, 16)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))  # different masks
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


def _conv1d_layer() -> LoRALinear:
    """GPT-2's Conv1D (weight stored in x out: 12 -> 20) wrapped, B trained."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(20, 12)  # nf=out, nx=in
    nn.init.normal_(base.weight, std=0.2)
    nn.init.normal_(base.bias, std=0.2)
    layer = LoRALinear(base, r=4, alpha=8.0)
    _train_b(layer)
    return layer


def test_conv1d_is_adapted_with_fan_in_fan_out() -> None:
    layer = _conv1d_layer()
    assert layer.fan_in_fan_out and not LoRALinear(nn.Linear(12, 20), r=4, alpha=8.0).fan_in_fan_out
    assert layer.base_layer.weight.shape == (12, 20)  # in x out, as stored
    assert layer.lora_A.weight.shape == (4, 12) and layer.lora_B.weight.shape == (20, 4)  # as for a Linear
    x = torch.randn(3, 5, 12)
    w0, b0 = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ w0 + b0 + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected)


def test_conv1d_merge_adds_the_transposed_delta_and_unmerge_restores_w0() -> None:
    layer = _conv1d_layer()
    x = torch.randn(4, 12)
    w0, before = layer.base_layer.weight.detach().clone(), layer(x)
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, w0 + layer.delta_weight().T)
    torch.testing.assert_close(layer.base_layer(x), before, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_conv1d_rank_bound_uses_its_stored_shape() -> None:
    from transformers.pytorch_utils import Conv1D

    with pytest.raises(LoraExpError, match=r"min\(out, in\)=6"):
        LoRALinear(Conv1D(6, 8), r=7, alpha=1.0)  # 8 -> 6
