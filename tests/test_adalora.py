"""AdaLoRA against PEFT's ``AdaLoraConfig`` on tiny BERT, DistilBERT and RoBERTa: equal logits and equal pruning
(E masks) before and after 4 identical AdamW steps with ``update_and_allocate`` after each (budget cut at steps
1, 2 and forced at 3), the orthogonality term in both losses; PEFT round trips (pruned triplets cut out and
back); merge / unmerge; counts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model

from lora_exp.adapters import adalora
from lora_exp.adapters import targets as injection
from lora_exp.adapters.peft_format import export_peft, import_peft
from lora_exp.errors import LoraExpError
from lora_exp.models import methods as model_methods

from .test_variants import ARCHS, TARGETS, R, close, ids, ours_cfg, tiny

TARGET_R, TOTAL, TFINAL, ORTH = 2, 4, 1, 0.5


def peft_key(name: str, head: list[str]) -> str:
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.weight", f".{part}.default")
    if name.endswith(".lora_E"):
        name += ".default"
    for h in head:
        if name.startswith(h + "."):
            name = f"{h}.modules_to_save.default.{name[len(h) + 1 :]}"
    return "base_model.model." + name


def ada_pair(arch: str, dropout: float = 0.1):
    """(ours, PEFT's, head, base, allocator): equal A, E (randomised), B and head; our allocator and regulariser on."""
    base, head = tiny(arch)
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
    ref = get_peft_model(copy.deepcopy(base), conf)
    ours = copy.deepcopy(base)
    model_methods.apply_method(ours, "lora", head, ours_cfg(arch, dropout, variant="adalora", alpha=8.0))
    torch.manual_seed(5)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in ref_params.items():
            if ".lora_E." in n:
                p.normal_(std=0.5)
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(ref_params[peft_key(n, head)])
    layers = dict(injection.lora_layers(ours))
    allocator = adalora.RankAllocator(layers, TARGET_R, TOTAL, tinit=0, tfinal=TFINAL, delta_t=1)
    adalora.add_orthogonality(ours, ORTH)
    return ours, ref, head, base, allocator


def train_both(ours, ref, head, allocator, steps: int = TOTAL) -> None:
    names = [n for n, p in ours.named_parameters() if p.requires_grad]
    ref_params = dict(ref.named_parameters())
    assert {peft_key(n, head) for n in names} == {n for n, p in ref_params.items() if p.requires_grad}
    opt_ours = torch.optim.AdamW([dict(ours.named_parameters())[n] for n in names], lr=1e-2)
    opt_ref = torch.optim.AdamW([ref_params[peft_key(n, head)] for n in names], lr=1e-2)
    labels = torch.tensor([0, 1, 1])
    ours.train(), ref.train()
    for step in range(steps):
        losses = []
        for model, opt, allocate in (
            (ours, opt_ours, allocator.step),
            (ref, opt_ref, ref.base_model.update_and_allocate),
        ):
            torch.manual_seed(10 + step)
            loss = model(input_ids=ids(step), labels=labels).loss  # + the orthogonality term in both
            losses.append(loss.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
            allocate(step)
        close(losses[0], losses[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_adalora_steps_and_pruning_equal_peft(arch: str) -> None:
    ours, ref, head, base, allocator = ada_pair(arch)
    ours.train(), ref.train()
    torch.manual_seed(123)
    start = ours(input_ids=ids()).logits
    torch.manual_seed(123)
    close(start, ref(input_ids=ids()).logits)
    train_both(ours, ref, head, allocator)
    refp = dict(ref.named_parameters())
    layers = dict(injection.lora_layers(ours))
    for n, m in layers.items():  # the same triplets pruned (E = 0), the same values elsewhere
        close(m.lora_E, refp[f"base_model.model.{n}.lora_E.default"])
        assert torch.equal(m.lora_E.view(-1) != 0, m.rank_mask)
    ranks = [m.rank() for m in layers.values()]
    assert sum(ranks) == TARGET_R * len(layers) and len(set(ranks)) > 1  # budget met, unevenly
    with torch.no_grad():
        after = ours.eval()(input_ids=ids()).logits
        close(after, ref.eval()(input_ids=ids()).logits)
        assert not torch.allclose(after, base(input_ids=ids()).logits, atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_adalora_round_trips_through_peft(arch: str, tmp_path: Path) -> None:
    """After pruning: ours -> PEFT's ADALORA layout (rank_pattern, triplets cut) -> PeftModel.from_pretrained,
    and PEFT's save -> import_peft, equal logits both ways."""
    ours, ref, head, base, allocator = ada_pair(arch, dropout=0.0)
    train_both(ours, ref, head, allocator)
    export_peft(ours, tmp_path / "ours", {"head_modules": head})
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert isinstance(loaded.peft_config["default"], AdaLoraConfig)
    with torch.no_grad():
        expected = ours.eval()(input_ids=ids()).logits
        close(loaded(input_ids=ids()).logits, expected)
    ref.save_pretrained(tmp_path / "ref")
    back = copy.deepcopy(base)
    import_peft(back, tmp_path / "ref", head)
    assert {n: m.rank() for n, m in injection.lora_layers(back)} == {
        n: m.rank() for n, m in injection.lora_layers(ours)
    }
    with torch.no_grad():
        close(back.eval()(input_ids=ids()).logits, ref.eval()(input_ids=ids()).logits)


def test_adalora_merge_unmerge_counts_and_regulariser() -> None:
    ours, _, head, _, _ = ada_pair("bert", dropout=0.0)
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
    base, head = tiny("bert")
    model_methods.apply_method(base, "lora", head, ours_cfg("bert", variant="adalora"))
    with pytest.raises(LoraExpError, match="leave no budgeting phase in 4 steps"):
        adalora.RankAllocator(dict(injection.lora_layers(base)), 2, 4, tinit=2, tfinal=2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+variant=adalora", "lora.adalora.target_r=20"], "lora.adalora.target_r=20 must be in [1, lora.r=12]"),
        (["+variant=adalora", "lora.adalora.beta1=1"], "lora.adalora.beta1/beta2=1.0/0.85 must be in (0, 1)"),
        (["+variant=adalora", "lora.adalora.tinit_ratio=0.6", "lora.adalora.tfinal_ratio=0.4"], "lora.adalora.tinit"),
        (["+variant=adalora", "lora.init=pissa"], "lora.init=pissa does not apply to lora.variant=adalora"),
        (["+variant=adalora", "lora.adalora.orth_reg_weight=-1"], "lora.adalora.orth_reg_weight=-1.0 must be >= 0"),
    ],
)
def test_adalora_bad_options_are_one_line(overrides: list[str], message: str) -> None:
    from lora_exp.config.checks import validate

    from .conftest import make_cfg

    with pytest.raises(LoraExpError) as err:
        validate(make_cfg(overrides))
    assert str(err.value).startswith(message) and len(str(err.value).splitlines()) == 1


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
