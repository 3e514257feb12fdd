"""LoRA-FA against PEFT's ``create_lorafa_optimizer`` on tiny BERT, DistilBERT and RoBERTa: equal logits before
and after 3 identical optimizer steps, PEFT round trip, merge / unmerge, counts, no A gradient or state."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import peft.optimizers.lorafa as peft_lorafa
import pytest
import torch
from peft.optimizers import create_lorafa_optimizer

from lora_exp.adapters import lora_fa
from lora_exp.adapters import store as adapter_store
from lora_exp.adapters import targets as injection
from lora_exp.adapters.params import is_adapter_param
from lora_exp.models import methods as model_methods
from tests.helpers import parity
from tests.helpers.parity import ARCHS, R, close, eval_logits, ours_cfg, peft_cfg, tiny_model

LR, WD = 1e-2, 0.01


def fa_pair(arch: str, dropout: float = 0.0):
    """(ours, PEFT's, head, base) with equal A (frozen in ours, so copied too), B (randomised) and head;
    ours is lora.variant=lora_fa."""
    base, head = tiny_model(arch)
    conf = ours_cfg(arch, dropout, variant="lora_fa")
    copied = lambda n, p: p.requires_grad or is_adapter_param(n)  # noqa: E731
    ours, ref = parity.build_pair(base, head, peft_cfg(arch, head, dropout), conf, copied=copied)
    return ours, ref, head, base


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("peft_bf16", [False, True])
def test_lora_fa_steps_equal_peft(arch: str, peft_bf16: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal logits at the start and after 3 steps (dropout 0.1, weight decay), with PEFT's fp32 projection
    and with its default bf16-autocast one (Adam's normalisation absorbs the rounding: see lora_fa.py)."""
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: peft_bf16)
    ours, ref, head, base = fa_pair(arch, dropout=0.1)
    parity.assert_start_equal(ours, ref)
    a0 = {n: m.lora_A.weight.detach().clone() for n, m in injection.lora_layers(ours)}
    opt_ref = create_lorafa_optimizer(ref, r=R, lora_alpha=8, lr=LR, weight_decay=WD)
    opt_ours = lora_fa.make_optimizer(ours, lr=LR, weight_decay=WD, eps=1e-6)  # PEFT's eps
    parity.assert_same_trainable(ours, ref, head)
    parity.train_steps([(ours, opt_ours), (ref, opt_ref)])
    parity.assert_trained_equal(ours, ref, base, max_gap=1e-5)
    for n, m in injection.lora_layers(ours):  # A frozen: unchanged, no gradient, no optimizer state
        assert torch.equal(m.lora_A.weight, a0[n]) and m.lora_A.weight.grad is None
        assert m.lora_A.weight not in opt_ours.state and m.lora_B.weight in opt_ours.state


def test_projection_is_peft_formula() -> None:
    """g_B (A A^T)^-1 / s^2: for a full-rank A, B's projected step times A reproduces the full gradient's
    projection onto A's row space (the LoRA-FA paper's least-squares solution)."""
    torch.manual_seed(0)
    a, g_full, s = torch.randn(4, 16), torch.randn(12, 16), 2.0
    g_b = s * g_full @ a.T  # chain rule: dL/dB for W = W0 + s B A
    got = s * lora_fa.projected_grad(g_b, a, s) @ a
    row_space = a.T @ torch.linalg.inv(a @ a.T) @ a
    torch.testing.assert_close(got, g_full @ row_space, atol=1e-4, rtol=1e-4)


def test_optimizer_state_round_trips_weights_only() -> None:
    """The optimizer's state dict loads with ``weights_only`` (a checkpoint) and the next step is identical."""
    ours, _, _, _ = fa_pair("bert")
    opt = lora_fa.make_optimizer(ours, lr=LR, weight_decay=WD)
    parity.train_steps([(ours, opt)], 2)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": {n: p.detach().clone() for n, p in ours.named_parameters()}}, buf)
    twin = copy.deepcopy(ours)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt_twin = lora_fa.make_optimizer(twin, lr=LR, weight_decay=WD)
    opt_twin.load_state_dict(saved["opt"])
    parity.train_steps([(ours, opt), (twin, opt_twin)], 1)
    for (n, p), q in zip(ours.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_fa_round_trips_through_peft_and_our_store(arch: str, tmp_path: Path) -> None:
    """PEFT loads our export (A included though frozen); our store saves A; PEFT's save imports back."""
    ours, ref, head, base = fa_pair(arch)
    parity.assert_peft_round_trip(ours, ref, head, base, tmp_path)
    adapter_store.save_adapter(ours, tmp_path / "store", {"head_modules": head})
    meta, tensors = adapter_store.read_adapter(tmp_path / "store")
    assert meta["variant"] == "lora_fa" and any(".lora_A." in k for k in tensors)
    torch.manual_seed(99)  # another A init: loading must overwrite it
    fresh = copy.deepcopy(base)
    model_methods.apply_method(fresh, "lora", head, ours_cfg(arch, variant="lora_fa"))
    adapter_store.load_into(fresh, tensors, "test")
    close(eval_logits(fresh), eval_logits(ours))


def test_lora_fa_merge_unmerge_and_counts() -> None:
    ours, _, head, _ = fa_pair("bert")
    layers = parity.assert_merge_unmerge(ours)
    counts = model_methods.count_parameters(ours, head)
    assert counts["adapter"] == sum(R * m.lora_B.weight.shape[0] for m in layers.values())  # B only: r x out
    assert counts["adapter"] == 2 * R * (32 + 32 + 64)  # 2 blocks x (query, value: out 32; intermediate: out 64)


test_lora_fa_bad_combinations_are_one_line = parity.one_line_error_test(
    [
        (
            ["+preset=lora_fa", "optimizer.loraplus_lr_ratio=16"],
            "optimizer.loraplus_lr_ratio=16.0 cannot combine with lora.variant=lora_fa",
        ),
        (["lora.variant=lora_fa", "lora.use_dora=true"], "lora.use_dora=true is DoRA; it cannot combine with"),
    ]
)
