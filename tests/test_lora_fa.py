"""LoRA-FA against PEFT's ``create_lorafa_optimizer`` on tiny BERT, DistilBERT and RoBERTa: equal logits before
and after 3 identical optimizer steps, PEFT round trip, merge / unmerge, counts, no A gradient or state."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import peft.optimizers.lorafa as peft_lorafa
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.optimizers import create_lorafa_optimizer

from lora_exp.adapters import lora_fa
from lora_exp.adapters import store as adapter_store
from lora_exp.adapters import targets as injection
from lora_exp.adapters.params import is_adapter_param
from lora_exp.adapters.peft_format import export_peft, import_peft
from lora_exp.models import methods as model_methods

from .test_variants import ARCHS, R, close, ids, ours_cfg, peft_cfg, peft_name, tiny

LR, WD = 1e-2, 0.01


def fa_pair(arch: str, dropout: float = 0.0):
    """(ours, PEFT's, head, base) with equal A, B (randomised) and head; ours is lora.variant=lora_fa."""
    base, head = tiny(arch)
    ref = get_peft_model(copy.deepcopy(base), peft_cfg(arch, head, dropout))
    ours = copy.deepcopy(base)
    model_methods.apply_method(ours, "lora", head, ours_cfg(arch, dropout, variant="lora_fa"))
    torch.manual_seed(5)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in ref_params.items():
            if ".lora_B." in n:
                p.normal_(std=0.1)
        for n, p in ours.named_parameters():
            if p.requires_grad or is_adapter_param(n):
                p.copy_(ref_params[peft_name(n, head)])
    return ours, ref, head, base


def steps(pairs: list[tuple[torch.nn.Module, torch.optim.Optimizer]], n: int = 3) -> None:
    """``n`` identical steps (same batches, same dropout masks) for each (model, optimizer)."""
    labels = torch.tensor([0, 1, 1])
    for step in range(n):
        for model, opt in pairs:
            torch.manual_seed(10 + step)
            loss = torch.nn.functional.cross_entropy(model(input_ids=ids(step)).logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()


def train_logits(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(123)
    return model(input_ids=ids()).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("peft_bf16", [False, True])
def test_lora_fa_steps_equal_peft(arch: str, peft_bf16: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal logits at the start and after 3 steps (dropout 0.1, weight decay), with PEFT's fp32 projection
    and with its default bf16-autocast one (Adam's normalisation absorbs the rounding: see lora_fa.py)."""
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: peft_bf16)
    ours, ref, head, base = fa_pair(arch, dropout=0.1)
    ours.train(), ref.train()
    close(train_logits(ours), train_logits(ref))
    a0 = {n: m.lora_A.weight.detach().clone() for n, m in injection.lora_layers(ours)}
    opt_ref = create_lorafa_optimizer(ref, r=R, lora_alpha=8, lr=LR, weight_decay=WD)
    opt_ours = lora_fa.make_optimizer(ours, lr=LR, weight_decay=WD, eps=1e-6)  # PEFT's eps
    trainable = {peft_name(n, head) for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in ref.named_parameters() if p.requires_grad}
    steps([(ours, opt_ours), (ref, opt_ref)])
    ours.eval(), ref.eval()
    with torch.no_grad():
        after = ours(input_ids=ids()).logits
        gap = (after - ref(input_ids=ids()).logits).abs().max().item()
        print(f"{arch} PEFT bf16={peft_bf16}: max |logit diff| after 3 steps {gap:.2e}")
        assert gap <= 1e-5
        assert not torch.allclose(after, base(input_ids=ids()).logits, atol=1e-3)
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
    steps([(ours, opt)], 2)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": {n: p.detach().clone() for n, p in ours.named_parameters()}}, buf)
    twin = copy.deepcopy(ours)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt_twin = lora_fa.make_optimizer(twin, lr=LR, weight_decay=WD)
    opt_twin.load_state_dict(saved["opt"])
    steps([(ours, opt), (twin, opt_twin)], 1)
    for (n, p), q in zip(ours.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_fa_round_trips_through_peft_and_our_store(arch: str, tmp_path: Path) -> None:
    """PEFT loads our export (A included though frozen); our store saves A; PEFT's save imports back."""
    ours, ref, head, base = fa_pair(arch)
    export_peft(ours, tmp_path / "peft", {"head_modules": head})
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        expected = ours.eval()(input_ids=ids()).logits
        close(loaded(input_ids=ids()).logits, expected)
    adapter_store.save_adapter(ours, tmp_path / "ours", {"head_modules": head})
    meta, tensors = adapter_store.read_adapter(tmp_path / "ours")
    assert meta["variant"] == "lora_fa" and any(".lora_A." in k for k in tensors)
    torch.manual_seed(99)  # another A init: loading must overwrite it
    fresh = copy.deepcopy(base)
    model_methods.apply_method(fresh, "lora", head, ours_cfg(arch, variant="lora_fa"))
    adapter_store.load_into(fresh, tensors, "test")
    with torch.no_grad():
        close(fresh.eval()(input_ids=ids()).logits, expected)
    ref.save_pretrained(tmp_path / "ref")
    back = copy.deepcopy(base)
    import_peft(back, tmp_path / "ref", head)
    with torch.no_grad():
        close(back.eval()(input_ids=ids()).logits, ref.eval()(input_ids=ids()).logits)


def test_lora_fa_merge_unmerge_and_counts() -> None:
    ours, _, head, _ = fa_pair("bert")
    layers = dict(injection.lora_layers(ours))
    w0 = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    with torch.no_grad():
        before = ours.eval()(input_ids=ids()).logits
        injection.merge(ours)
        close(ours(input_ids=ids()).logits, before)
        injection.unmerge(ours)
    for n, m in layers.items():
        torch.testing.assert_close(m.base_layer.weight, w0[n], atol=1e-6, rtol=1e-5)
    counts = model_methods.count_parameters(ours, head)
    assert counts["adapter"] == sum(R * m.lora_B.weight.shape[0] for m in layers.values())  # B only: r x out
    assert counts["adapter"] == 2 * R * (32 + 32 + 64)  # 2 blocks x (query, value: out 32; intermediate: out 64)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["+variant=lora_fa", "optimizer.loraplus_lr_ratio=16"],
            "optimizer.loraplus_lr_ratio=16.0 cannot combine with lora.variant=lora_fa",
        ),
        (["lora.variant=lora_fa", "lora.use_dora=true"], "lora.use_dora=true is DoRA; it cannot combine with"),
    ],
)
def test_lora_fa_bad_combinations_are_one_line(overrides: list[str], message: str) -> None:
    from lora_exp.config.checks import validate
    from lora_exp.errors import LoraExpError

    from .conftest import make_cfg

    with pytest.raises(LoraExpError) as err:
        validate(make_cfg(overrides))
    assert str(err.value).startswith(message) and len(str(err.value).splitlines()) == 1
