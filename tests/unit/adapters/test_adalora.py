"""AdaLoRA against PEFT's ``AdaLoraConfig`` on tiny BERT, DistilBERT and RoBERTa: equal logits and equal pruning
(E masks) before and after 4 identical AdamW steps with ``update_and_allocate`` after each (budget cut at steps
1, 2 and forced at 3), the orthogonality term in both losses; PEFT round trips (pruned triplets cut out and
back); merge / unmerge; counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import AdaLoraConfig

from lora_exp.adapters import adalora
from lora_exp.adapters import targets as injection
from lora_exp.errors import LoraExpError
from lora_exp.models import methods as model_methods
from tests.helpers import parity
from tests.helpers.parity import ARCHS, TARGETS, R, close, ids, ours_cfg, tiny_model

TARGET_R, TOTAL, TFINAL, ORTH = 2, 4, 1, 0.5


def peft_key(name: str, head: list[str]) -> str:
    """Our AdaLoRA parameter path -> the PEFT model's (PEFT's A, B, E are bare parameters)."""
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.weight", f".{part}.default")
    if name.endswith(".lora_E"):
        name += ".default"
    return parity.in_peft(name, head)


def ada_pair(arch: str, dropout: float = 0.1):
    """(ours, PEFT's, head, base, allocator): equal A, E (randomised), B and head; our allocator and regulariser on."""
    base, head = tiny_model(arch)
    conf = AdaLoraConfig(
        init_r=R,
        target_r=TARGET_R,
        tinit=0,
        tfinal=TFINAL,
        deltaT=1,
        total_step=TOTAL,
        orth_reg_weight=ORTH,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules=TARGETS[arch],
        task_type="SEQ_CLS",
        modules_to_save=list(head),
    )
    # PEFT's init_r=R, target_r=TARGET_R: our lora.r is the target, lora.adalora.init_r the start
    ours_conf = ours_cfg(arch, dropout, variant="adalora", alpha=8.0, r=TARGET_R, adalora={"init_r": R})
    ours, ref = parity.build_pair(base, head, conf, ours_conf, ".lora_E.", lambda p: p.normal_(std=0.5), peft_key)
    layers = dict(injection.lora_layers(ours))
    allocator = adalora.RankAllocator(layers, TARGET_R, TOTAL, tinit=0, tfinal=TFINAL, delta_t=1)
    adalora.add_orthogonality(ours, ORTH)
    return ours, ref, head, base, allocator


def train_both(ours, ref, head, allocator, steps: int = TOTAL) -> None:
    """``steps`` identical AdamW steps, each followed by the rank allocation; equal losses at every step."""
    opt_ours, opt_ref = parity.adamw_pair(ours, ref, head, peft_key)
    ours.train(), ref.train()
    runs = [(ours, opt_ours, allocator.step), (ref, opt_ref, ref.base_model.update_and_allocate)]
    loss = lambda model, step: model(input_ids=ids(step), labels=parity.LABELS).loss  # noqa: E731  (+ orthogonality)
    for ours_loss, ref_loss in parity.train_steps(runs, steps, loss):
        close(ours_loss, ref_loss)


@pytest.mark.parametrize("arch", ARCHS)
def test_adalora_steps_and_pruning_equal_peft(arch: str) -> None:
    ours, ref, head, base, allocator = ada_pair(arch)
    parity.assert_start_equal(ours, ref)
    train_both(ours, ref, head, allocator)
    refp = dict(ref.named_parameters())
    layers = dict(injection.lora_layers(ours))
    for n, m in layers.items():  # the same triplets pruned (E = 0), the same values elsewhere
        close(m.lora_E, refp[f"base_model.model.{n}.lora_E.default"])
        assert torch.equal(m.lora_E.view(-1) != 0, m.rank_mask)
    ranks = [m.rank() for m in layers.values()]
    assert sum(ranks) == TARGET_R * len(layers) and len(set(ranks)) > 1  # budget met, unevenly
    parity.assert_trained_equal(ours, ref, base)


@pytest.mark.parametrize("arch", ARCHS)
def test_adalora_round_trips_through_peft(arch: str, tmp_path: Path) -> None:
    """After pruning: ours -> PEFT's ADALORA layout (rank_pattern, triplets cut) -> PeftModel.from_pretrained,
    and PEFT's save -> import_peft, equal logits both ways."""
    ours, ref, head, base, allocator = ada_pair(arch, dropout=0.0)
    train_both(ours, ref, head, allocator)
    loaded, back = parity.assert_peft_round_trip(ours, ref, head, base, tmp_path)
    assert isinstance(loaded.peft_config["default"], AdaLoraConfig)
    assert {n: m.rank() for n, m in injection.lora_layers(back)} == {
        n: m.rank() for n, m in injection.lora_layers(ours)
    }


def test_adalora_merge_unmerge_counts_and_regulariser() -> None:
    ours, _, head, _, _ = ada_pair("bert", dropout=0.0)
    layers = parity.assert_merge_unmerge(ours)
    counts = model_methods.count_parameters(ours, head)
    assert counts["adapter"] == 2 * R * ((32 + 32 + 1) * 2 + (32 + 64 + 1))  # r x (in + out + 1) per layer
    eye = torch.eye(R)  # the regulariser is 0 for orthonormal A rows and B columns
    with torch.no_grad():
        for m in layers.values():
            m.lora_A.weight.copy_(torch.linalg.qr(torch.randn(m.lora_A.weight.shape[1], R))[0].T)
            m.lora_B.weight.copy_(torch.linalg.qr(torch.randn(m.lora_B.weight.shape[0], R))[0])
        assert adalora.orthogonality(list(layers.values())).item() < 1e-5
        first = next(iter(layers.values()))
        assert torch.allclose(first.lora_A.weight @ first.lora_A.weight.T, eye, atol=1e-5)


def test_schedule_without_a_pruning_phase_is_an_error() -> None:
    base, head = tiny_model("bert")
    model_methods.apply_method(base, "lora", head, ours_cfg("bert", variant="adalora", adalora={"init_r": parity.R}))
    with pytest.raises(LoraExpError, match="leave no budgeting phase in 4 steps"):
        adalora.RankAllocator(dict(injection.lora_layers(base)), 2, 4, tinit=2, tfinal=2)


test_adalora_bad_options_are_one_line = parity.one_line_error_test(
    [
        (["+preset=adalora", "lora.adalora.init_r=4"], "lora.adalora.init_r=4 must be null or >= lora.r=8"),
        (["+preset=adalora", "lora.adalora.beta1=1"], "lora.adalora.beta1/beta2=1.0/0.85 must be in (0, 1)"),
        (["+preset=adalora", "lora.adalora.tinit_ratio=0.6", "lora.adalora.tfinal_ratio=0.4"], "lora.adalora.tinit"),
        (["+preset=adalora", "lora.init=pissa"], "lora.init=pissa does not apply to lora.variant=adalora"),
        (["+preset=adalora", "lora.adalora.orth_reg_weight=-1"], "lora.adalora.orth_reg_weight=-1.0 must be >= 0"),
    ]
)


def test_checkpoint_keeps_the_allocator_state(tmp_path: Path) -> None:
    """Masks and importance EMAs travel with the checkpoint: a resumed run continues the same allocation."""
    from lora_exp.training import checkpoint

    ours, ref, head, _, allocator = ada_pair("bert")
    train_both(ours, ref, head, allocator, steps=2)  # step 1 pruned: masks and EMAs are not at their init
    buffers = {n: b.clone() for n, b in checkpoint.adapter_buffers(ours).items()}
    assert any(not bool(b.all()) for n, b in buffers.items() if n.endswith("rank_mask"))
    assert all(b.abs().sum() > 0 for n, b in buffers.items() if ".adalora_" in n)
    params = [p for p in ours.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    checkpoint.save(tmp_path, ours, {}, opt, sched, None, torch.Generator().get_state(), checkpoint.Progress(step=2))
    fresh = ada_pair("bert")[0]
    fresh_params = [p for p in fresh.parameters() if p.requires_grad]
    opt2 = torch.optim.AdamW(fresh_params)
    checkpoint.load(tmp_path, fresh, opt2, torch.optim.lr_scheduler.LambdaLR(opt2, lambda _: 1.0), None)
    restored = checkpoint.adapter_buffers(fresh)
    assert restored.keys() == buffers.keys() and all(torch.equal(restored[n], b) for n, b in buffers.items())


def test_initial_rank_may_exceed_the_layer_size() -> None:
    """As PEFT's SVDLinear: init_r above min(out, in) is allowed (the allocator prunes it); LoRA's is not."""
    layer = injection.make_layer(torch.nn.Linear(16, 24), 20, 8.0, 0.0, False, "adalora")
    assert layer.lora_A.weight.shape == (20, 16) and layer.lora_B.weight.shape == (24, 20)
    with pytest.raises(LoraExpError, match=r"lora.r=20 must be in \[1, min\(out, in\)=16\]"):
        injection.make_layer(torch.nn.Linear(16, 24), 20, 8.0, 0.0, False, "lora")
