"""EVA against PEFT's ``initialize_lora_eva_weights`` on tiny BERT, DistilBERT and RoBERTa: the incremental PCA,
the redistributed ranks and alphas and A equal PEFT's from the same batches; equal logits after 3 AdamW steps;
PEFT round trips; merge / unmerge; counts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import EvaConfig, get_peft_model, initialize_lora_eva_weights
from peft.utils.incremental_pca import IncrementalPCA as PeftIncrementalPCA

from lora_exp.adapters import eva
from lora_exp.adapters import targets as injection
from lora_exp.adapters.ipca import IncrementalPCA
from lora_exp.models import methods as model_methods
from tests.helpers import parity
from tests.helpers.parity import ARCHS, R, ours_cfg, peft_cfg, tiny_model

TAU = 0.95  # PEFT's default 0.99 converges in more batches; the same code path, a faster test
# Targets whose inputs differ in spectrum (FFN output, attention output), so the ranks are redistributed.
EVA_TARGETS = {
    "bert": ["query", "value", "output.dense"],
    "roberta": ["query", "value", "output.dense"],
    "distilbert": ["q_lin", "v_lin", "out_lin", "lin2"],
}


def batches(n: int = 40) -> list[dict[str, torch.Tensor]]:
    """Padded batches (the last positions of some rows are padding)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        input_ids = torch.randint(5, 1000, (8, 16), generator=g)
        mask = torch.ones_like(input_ids)
        mask[:, 12:] = (torch.rand(8, 4, generator=g) > 0.5).long()
        out.append({"input_ids": input_ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="module", params=ARCHS)
def eva_pair(request: pytest.FixtureRequest):
    """(arch, ours, PEFT's, head, base, EvaResult): both initialised by EVA from the same batches."""
    arch = request.param
    base, head = tiny_model(arch)
    eva_config = EvaConfig(rho=2.0, tau=TAU)
    conf = peft_cfg(arch, head, 0.1, target_modules=EVA_TARGETS[arch], init_lora_weights="eva", eva_config=eva_config)
    ref = get_peft_model(copy.deepcopy(base), conf)
    initialize_lora_eva_weights(ref, dataloader=batches(), show_progress_bar=False)
    ours = copy.deepcopy(base)
    model_methods.apply_method(ours, "lora", head, ours_cfg(arch, 0.1, init="eva", targets=EVA_TARGETS[arch]))
    layers = dict(injection.lora_layers(ours))
    result = eva.eva_components(ours, layers, batches(), rho=2.0, tau=TAU)
    eva.apply_init(ours, layers, result.components, eva.eva_alphas(layers, result.ranks))
    return arch, ours, ref, head, base, result


def test_incremental_pca_equals_peft() -> None:
    """Bitwise: the fp32 first batch and the fp64 later ones, components and explained-variance ratios."""
    torch.manual_seed(0)
    ours, ref = IncrementalPCA(6), PeftIncrementalPCA(n_components=6, copy=True, lowrank=True, lowrank_seed=42)
    for _ in range(4):
        x = torch.randn(40, 32) @ torch.randn(32, 32)
        ours.partial_fit(x), ref.partial_fit(x)
        assert torch.equal(ours.components_, ref.components_)
        assert torch.equal(ours.explained_variance_ratio_, ref.explained_variance_ratio_)
    assert ours.components_.dtype == torch.float64


@pytest.mark.e2e  # eva_pair runs PEFT's EVA initialisation per architecture (~30 s): the full tier
def test_eva_ranks_alphas_and_a_equal_peft(eva_pair) -> None:
    arch, ours, ref, head, base, result = eva_pair
    config = ref.peft_config["default"]
    layers = parity.assert_factors_equal_peft(ours, ref, base, residual=False)  # and B = 0: unchanged at init
    ref_layers = {n.removeprefix("base_model.model.") for n, m in ref.named_modules() if hasattr(m, "lora_A")}
    assert set(layers) == ref_layers and len(layers) == len(ranks_of := [m.r for m in layers.values()])
    for name, m in layers.items():
        assert m.r == config.rank_pattern.get(name, R) and m.alpha == config.alpha_pattern.get(name, 8.0), name
        assert not m.lora_B.weight.any()
    assert sum(ranks_of) == R * len(ranks_of) and len(set(ranks_of)) > 1  # the budget, redistributed
    assert result.batches > 2 and result.tokens > 0


@pytest.mark.e2e  # eva_pair runs PEFT's EVA initialisation per architecture (~30 s): the full tier
def test_eva_steps_equal_peft(eva_pair) -> None:
    arch, ours, ref, head, base, _ = eva_pair
    parity.assert_steps_equal_peft(copy.deepcopy(ours), copy.deepcopy(ref), head, base)


@pytest.mark.e2e  # eva_pair runs PEFT's EVA initialisation per architecture (~30 s): the full tier
def test_eva_round_trips_through_peft(eva_pair, tmp_path: Path) -> None:
    """Per-layer ranks / alphas travel as PEFT's rank_pattern / alpha_pattern, both ways."""
    arch, ours, ref, head, base, _ = eva_pair
    ours, ref = copy.deepcopy(ours), copy.deepcopy(ref)
    with torch.no_grad():
        for m in (ours, ref):
            for n, p in m.named_parameters():
                if ".lora_B." in n:
                    p.normal_(std=0.1)
    _, back = parity.assert_peft_round_trip(ours, ref, head, base, tmp_path)
    assert {n: m.r for n, m in injection.lora_layers(back)} == {n: m.r for n, m in injection.lora_layers(ours)}


@pytest.mark.e2e  # eva_pair runs PEFT's EVA initialisation per architecture (~30 s): the full tier
def test_eva_merge_unmerge_and_counts(eva_pair) -> None:
    arch, ours, _, head, _, _ = eva_pair
    ours = copy.deepcopy(ours)
    with torch.no_grad():
        for _, m in injection.lora_layers(ours):
            m.lora_B.weight.normal_(std=0.1)
    layers = parity.assert_merge_unmerge(ours)
    counts = model_methods.count_parameters(ours, head)
    assert counts["adapter"] == sum(
        m.r * (m.base_layer.in_features + m.base_layer.out_features) for m in layers.values()
    )


def test_rank_zero_layer_gets_its_base_layer_back() -> None:
    """As PEFT: a layer the redistribution leaves at rank 0 loses its adapter."""
    base, head = tiny_model("bert")
    model_methods.apply_method(base, "lora", head, ours_cfg("bert", init="eva"))
    layers = dict(injection.lora_layers(base))
    first = next(iter(layers))
    a = {n: torch.randn(0 if n == first else R, 32) for n in layers}
    kept = eva.apply_init(base, layers, a, {n: 8.0 for n in layers})
    assert first not in kept and isinstance(base.get_submodule(first), torch.nn.Linear)
    assert set(dict(injection.lora_layers(base))) == set(kept)


test_eva_bad_options_are_one_line = parity.one_line_error_test(
    [
        (["lora.init=eva", "lora.variant=dora"], "lora.init=eva needs lora.variant=lora (not dora)"),
        (["lora.init=eva", "lora.eva.rho=0.5"], "lora.eva.rho=0.5 must be >= 1"),
        (["lora.init=eva", "lora.eva.tau=2"], "lora.eva.tau=2.0 must be in [0, 1]"),
        (["lora.init=eva", "lora.eva.max_batches=0"], "lora.eva.max_batches=0 must be >= 1"),
    ]
)


def test_eva_under_bf16_autocast() -> None:
    """Layer inputs in bf16 (autocast, as on a bf16 run) are hashed and decomposed (in fp32) like fp32 ones."""
    base, head = tiny_model("bert")
    model_methods.apply_method(base, "lora", head, ours_cfg("bert", init="eva", targets=EVA_TARGETS["bert"]))
    layers = dict(injection.lora_layers(base))
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    result = eva.eva_components(base, layers, batches(), tau=TAU, amp=amp)
    assert sum(result.ranks.values()) == R * len(layers) and result.batches > 2
    assert all(c.dtype in (torch.float32, torch.float64) for c in result.components.values())
