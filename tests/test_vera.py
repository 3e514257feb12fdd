"""VeRA against PEFT's ``VeraConfig`` on tiny BERT, DistilBERT and RoBERTa: the shared projections drawn equal
(not copied), equal logits before and after 3 AdamW steps, PEFT round trips, merge / unmerge, counts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel, VeraConfig, get_peft_model

from lora_exp.adapters import store as adapter_store
from lora_exp.adapters import targets as injection
from lora_exp.adapters.params import variant_counts
from lora_exp.adapters.peft_format import export_peft, import_peft
from lora_exp.adapters.vera import VeraLinear
from lora_exp.models import methods as model_methods

from .test_variants import ARCHS, TARGETS, close, ids, ours_cfg, tiny

RV, D_INIT, KEY = 48, 0.2, 7  # r above the hidden size (32): VeRA's r is the shared projections' rank


def vera_peft_name(name: str, head: list[str]) -> str:
    for part in ("vera_lambda_b", "vera_lambda_d"):
        if name.endswith("." + part):
            name += ".default"
    for h in head:
        if name.startswith(h + "."):
            name = f"{h}.modules_to_save.default.{name[len(h) + 1 :]}"
    return "base_model.model." + name


def vera_pair(arch: str, dropout: float = 0.0, bias: str = "none"):
    """(ours, PEFT's, head, base): projections drawn by each from the same key; vectors randomised, copied."""
    base, head = tiny(arch)
    peft_bias = {"lora_only": "vera_only"}.get(bias, bias)
    conf = VeraConfig(
        r=RV,
        target_modules=TARGETS[arch],
        vera_dropout=dropout,
        d_initial=D_INIT,
        projection_prng_key=KEY,
        bias=peft_bias,
        task_type="SEQ_CLS",
        modules_to_save=list(head),
    )
    ref = get_peft_model(copy.deepcopy(base), conf)
    ours = copy.deepcopy(base)
    over = {"variant": "vera", "r": RV, "vera": {"d_initial": D_INIT, "prng_key": KEY}, "bias": bias}
    model_methods.apply_method(ours, "lora", head, ours_cfg(arch, dropout, **over))
    torch.manual_seed(5)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in ref_params.items():
            if ".vera_lambda_" in n:
                p.add_(torch.randn_like(p) * 0.3)
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(ref_params[vera_peft_name(n, head)])
    return ours, ref, head, base


@pytest.mark.parametrize("arch", ARCHS)
def test_projections_are_drawn_as_peft_draws_them(arch: str) -> None:
    ours, ref, _, _ = vera_pair(arch)
    layers = dict(injection.lora_layers(ours))
    assert len(layers) == 6 and all(isinstance(m, VeraLinear) for m in layers.values())
    shared = {id(m.projections) for m in layers.values()}
    assert len(shared) == 1  # one pair for every layer
    proj = next(iter(layers.values())).projections
    assert torch.equal(proj.vera_A, ref.base_model.vera_A["default"])
    assert torch.equal(proj.vera_B, ref.base_model.vera_B["default"])
    assert proj.vera_A.shape == (RV, 32) and proj.vera_B.shape == (64, RV)  # the largest in / out among targets
    fresh = vera_pair(arch)[0]  # and again: the same key draws the same pair
    assert torch.equal(next(iter(injection.lora_layers(fresh)))[1].projections.vera_A, proj.vera_A)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_vera_steps_equal_peft(arch: str, bias: str) -> None:
    """Equal logits at init (lambda_b = 0 in both before randomising) and after 3 AdamW steps, dropout 0.1."""
    ours, ref, head, base = vera_pair(arch, dropout=0.1, bias=bias)
    ours.train(), ref.train()
    torch.manual_seed(123)
    start = ours(input_ids=ids()).logits
    torch.manual_seed(123)
    close(start, ref(input_ids=ids()).logits)
    names = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert {vera_peft_name(n, head) for n in names} == {n for n, p in ref.named_parameters() if p.requires_grad}
    ref_params = dict(ref.named_parameters())
    opt_ours = torch.optim.AdamW([dict(ours.named_parameters())[n] for n in names], lr=1e-2)
    opt_ref = torch.optim.AdamW([ref_params[vera_peft_name(n, head)] for n in names], lr=1e-2)
    labels = torch.tensor([0, 1, 1])
    for step in range(3):
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            torch.manual_seed(10 + step)
            loss = torch.nn.functional.cross_entropy(model(input_ids=ids(step)).logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    ours.eval(), ref.eval()
    with torch.no_grad():
        after = ours(input_ids=ids()).logits
        close(after, ref(input_ids=ids()).logits)
        assert not torch.allclose(after, base(input_ids=ids()).logits, atol=1e-3)


def test_vera_starts_as_the_base_model() -> None:
    base, head = tiny("bert")
    ours = copy.deepcopy(base)
    model_methods.apply_method(ours, "lora", head, ours_cfg("bert", variant="vera", r=RV, vera={"d_initial": D_INIT}))
    for _, m in injection.lora_layers(ours):
        assert torch.equal(m.vera_lambda_b, torch.zeros_like(m.vera_lambda_b))
        assert torch.equal(m.vera_lambda_d, torch.full((RV,), D_INIT))
    with torch.no_grad():
        close(ours(input_ids=ids()).logits, base(input_ids=ids()).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_vera_round_trips_through_peft(arch: str, tmp_path: Path) -> None:
    """Ours -> PEFT's VERA layout -> PeftModel.from_pretrained, and PEFT's save -> import_peft: equal logits."""
    ours, ref, head, base = vera_pair(arch)
    export_peft(ours, tmp_path / "ours", {"head_modules": head})
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert isinstance(loaded.peft_config["default"], VeraConfig)
    with torch.no_grad():
        close(loaded(input_ids=ids()).logits, ours.eval()(input_ids=ids()).logits)
    ref.save_pretrained(tmp_path / "ref")
    back = copy.deepcopy(base)
    import_peft(back, tmp_path / "ref", head)
    with torch.no_grad():
        close(back.eval()(input_ids=ids()).logits, ref.eval()(input_ids=ids()).logits)


def test_vera_saved_adapter_holds_the_projections(tmp_path: Path) -> None:
    """Our store saves the shared pair once; loading it overwrites a pair drawn from another key."""
    ours, _, head, base = vera_pair("bert")
    adapter_store.save_adapter(ours, tmp_path / "a", {"head_modules": head})
    meta, tensors = adapter_store.read_adapter(tmp_path / "a")
    assert meta["variant"] == "vera"
    assert sorted(k.rpartition(".")[2] for k in tensors if k.endswith((".vera_A", ".vera_B"))) == ["vera_A", "vera_B"]
    other = copy.deepcopy(base)
    model_methods.apply_method(other, "lora", head, ours_cfg("bert", variant="vera", r=RV, vera={"prng_key": KEY + 1}))
    adapter_store.load_into(other, tensors, "test")
    with torch.no_grad():
        close(other.eval()(input_ids=ids()).logits, ours.eval()(input_ids=ids()).logits)


def test_vera_merge_unmerge_and_counts() -> None:
    ours, _, head, _ = vera_pair("roberta")
    layers = dict(injection.lora_layers(ours))
    w0 = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    with torch.no_grad():
        before = ours.eval()(input_ids=ids()).logits
        injection.merge(ours)
        assert all(not torch.equal(m.base_layer.weight, w0[n]) for n, m in layers.items())
        close(ours(input_ids=ids()).logits, before)
        injection.unmerge(ours)
    for n, m in layers.items():
        torch.testing.assert_close(m.base_layer.weight, w0[n], atol=1e-6, rtol=1e-5)
    counts = model_methods.count_parameters(ours, head)
    per_block = (32 + RV) * 2 + (64 + RV)  # query, value: out 32; intermediate: out 64; each + r for lambda_d
    assert counts["adapter"] == 2 * per_block
    assert variant_counts(ours)["vera_vector_params"] == counts["adapter"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.variant=vera", "lora.init=pissa"], "lora.init=pissa does not apply to lora.variant=vera"),
        (["lora.variant=vera", "lora.rslora=true"], "lora.rslora=True does not apply to lora.variant=vera"),
        (["lora.variant=vera", "+lora.rank_pattern={query: 2}"], "lora.rank_pattern={'query': 2} does not apply"),
        (["lora.variant=vera", "lora.vera.d_initial=0"], "lora.vera.d_initial=0 must be != 0"),
        (["lora.vera.prng_key=-1"], "lora.vera.prng_key=-1 must be in [0, 2**63)"),
        (["+variant=vera", "optimizer.loraplus_lr_ratio=4"], "optimizer.loraplus_lr_ratio=4.0 cannot combine"),
    ],
)
def test_vera_bad_options_are_one_line(overrides: list[str], message: str) -> None:
    from lora_exp.config.checks import validate
    from lora_exp.errors import LoraExpError

    from .conftest import make_cfg

    with pytest.raises(LoraExpError) as err:
        validate(make_cfg(overrides))
    assert str(err.value).startswith(message) and len(str(err.value).splitlines()) == 1


def test_vera_options_hash_only_where_they_apply() -> None:
    """lora.vera.* is part of a VeRA job's identity and left out of every other job's (hashes of runs from
    before VeRA existed do not change)."""
    from lora_exp.config.identity import config_hash

    from .conftest import make_cfg

    assert config_hash(make_cfg(["lora.vera.prng_key=3"])) == config_hash(make_cfg([]))
    vera = ["+variant=vera"]
    assert config_hash(make_cfg([*vera, "lora.vera.prng_key=3"])) != config_hash(make_cfg(vera))
