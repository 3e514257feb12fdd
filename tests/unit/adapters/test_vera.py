"""VeRA against PEFT's ``VeraConfig`` on tiny BERT, DistilBERT and RoBERTa: the shared projections drawn equal
(not copied), equal logits before and after 3 AdamW steps, PEFT round trips, merge / unmerge, counts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import VeraConfig

from lora_exp.adapters import store as adapter_store
from lora_exp.adapters import targets as injection
from lora_exp.adapters.params import variant_counts
from lora_exp.adapters.vera import VeraLinear
from lora_exp.models import methods as model_methods
from tests.helpers import parity
from tests.helpers.parity import ARCHS, TARGETS, close, eval_logits, ours_cfg, tiny_model

RV, D_INIT, KEY = 48, 0.2, 7  # r above the hidden size (32): VeRA's r is the shared projections' rank


def vera_peft_name(name: str, head: list[str]) -> str:
    """Our VeRA parameter path -> the PEFT model's."""
    for part in ("vera_lambda_b", "vera_lambda_d"):
        if name.endswith("." + part):
            name += ".default"
    return parity.in_peft(name, head)


def vera_pair(arch: str, dropout: float = 0.0, bias: str = "none"):
    """(ours, PEFT's, head, base): projections drawn by each from the same key; vectors randomised, copied."""
    base, head = tiny_model(arch)
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
    over = {"variant": "vera", "r": RV, "vera": {"d_initial": D_INIT, "prng_key": KEY}, "bias": bias}
    randomise = lambda p: p.add_(torch.randn_like(p) * 0.3)  # noqa: E731
    ours_conf = ours_cfg(arch, dropout, **over)
    ours, ref = parity.build_pair(base, head, conf, ours_conf, ".vera_lambda_", randomise, vera_peft_name)
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
    parity.assert_steps_equal_peft(*vera_pair(arch, dropout=0.1, bias=bias), to_peft=vera_peft_name)


def test_vera_starts_as_the_base_model() -> None:
    base, head = tiny_model("bert")
    ours = copy.deepcopy(base)
    model_methods.apply_method(ours, "lora", head, ours_cfg("bert", variant="vera", r=RV, vera={"d_initial": D_INIT}))
    for _, m in injection.lora_layers(ours):
        assert torch.equal(m.vera_lambda_b, torch.zeros_like(m.vera_lambda_b))
        assert torch.equal(m.vera_lambda_d, torch.full((RV,), D_INIT))
    close(eval_logits(ours), eval_logits(base))


@pytest.mark.parametrize("arch", ARCHS)
def test_vera_round_trips_through_peft(arch: str, tmp_path: Path) -> None:
    """Ours -> PEFT's VERA layout -> PeftModel.from_pretrained, and PEFT's save -> import_peft: equal logits."""
    loaded, _ = parity.assert_peft_round_trip(*vera_pair(arch), tmp_path)
    assert isinstance(loaded.peft_config["default"], VeraConfig)


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
    close(eval_logits(other), eval_logits(ours))


def test_vera_merge_unmerge_and_counts() -> None:
    ours, _, head, _ = vera_pair("roberta")
    parity.assert_merge_unmerge(ours, moves=True)
    counts = model_methods.count_parameters(ours, head)
    per_block = (32 + RV) * 2 + (64 + RV)  # query, value: out 32; intermediate: out 64; each + r for lambda_d
    assert counts["adapter"] == 2 * per_block
    assert variant_counts(ours)["vera_vector_params"] == counts["adapter"]


test_vera_bad_options_are_one_line = parity.one_line_error_test(
    [
        (["lora.variant=vera", "lora.init=pissa"], "lora.init=pissa does not apply to lora.variant=vera"),
        (["lora.variant=vera", "lora.rslora=true"], "lora.rslora=True does not apply to lora.variant=vera"),
        (["lora.variant=vera", "+lora.rank_pattern={query: 2}"], "lora.rank_pattern={'query': 2} does not apply"),
        (["lora.variant=vera", "lora.vera.d_initial=0"], "lora.vera.d_initial=0 must be != 0"),
        (["lora.vera.prng_key=-1"], "lora.vera.prng_key=-1 must be in [0, 2**63)"),
        (["lora.vera.r=0"], "lora.vera.r=0 must be an integer >= 1"),
        (["+preset=vera", "optimizer.loraplus_lr_ratio=4"], "optimizer.loraplus_lr_ratio=4.0 cannot combine"),
    ]
)


def test_vera_options_hash_only_where_they_apply() -> None:
    """lora.vera.* is part of a VeRA job's identity and left out of every other job's (hashes of runs from
    before VeRA existed do not change)."""
    from lora_exp.config.identity import config_hash
    from tests.helpers.configs import make_cfg

    assert config_hash(make_cfg(["lora.vera.prng_key=3"])) == config_hash(make_cfg([]))
    vera = ["+preset=vera"]
    assert config_hash(make_cfg([*vera, "lora.vera.prng_key=3"])) != config_hash(make_cfg(vera))
