"""LoRA-GA against PEFT's ``preprocess_loraga`` + ``init_lora_weights="lora_ga"`` on tiny BERT, DistilBERT and
RoBERTa: the mean gradient, A, B and the residual W0 equal PEFT's from the same batches (the randomized SVD's
test matrix drawn under the same seed in both); equal logits after 3 AdamW steps; the export (converted to a
plain rank-2r LoRA, as PEFT converts) loads in PEFT on the pristine base; merge / unmerge; counts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraGAConfig, get_peft_model, preprocess_loraga

from lora_exp.adapters import lora_ga
from lora_exp.adapters import targets as injection
from lora_exp.adapters.peft_format import import_peft
from lora_exp.errors import LoraExpError
from lora_exp.models import methods as model_methods
from tests.helpers import parity
from tests.helpers.parity import ARCHS, R, eval_logits, ours_cfg, peft_cfg, tiny_model

SEED, N_BATCHES = 3, 4


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(5, 1000, (6, 12), generator=g),
            "attention_mask": torch.ones(6, 12, dtype=torch.long),
            "labels": torch.randint(0, 2, (6,), generator=g),
        }
        for _ in range(N_BATCHES)
    ]


@pytest.fixture(scope="module", params=ARCHS)
def ga_pair(request: pytest.FixtureRequest):
    """(arch, ours, PEFT's, head, base, grads): both initialised by LoRA-GA from the same batches and dropout."""
    arch = request.param
    base, head = tiny_model(arch)
    conf = peft_cfg(arch, head, 0.1, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    ref = copy.deepcopy(base)

    def train_step() -> None:
        for b in batches():
            ref(**b).loss.backward()

    torch.manual_seed(11)  # the same dropout masks in both gradient passes
    preprocess_loraga(ref, conf, train_step)
    svd_lowrank = torch.svd_lowrank

    def seeded(x: torch.Tensor, q: int, niter: int = 4) -> tuple:  # PEFT draws the test matrix from the global RNG
        return _seeded_svd(svd_lowrank, x, q, niter)

    torch.svd_lowrank = seeded
    try:
        ref = get_peft_model(ref, conf)
    finally:
        torch.svd_lowrank = svd_lowrank
    ours = copy.deepcopy(base)
    model_methods.apply_method(ours, "lora", head, ours_cfg(arch, 0.1, init="lora_ga"))
    layers = dict(injection.lora_layers(ours))
    torch.manual_seed(11)
    grads, used = lora_ga.estimate_gradients(ours, layers, batches(), N_BATCHES)
    assert used == N_BATCHES
    for name, layer in layers.items():
        lora_ga.apply_residual(layer, *lora_ga.factors(grads[name], layer, seed=SEED))
    return arch, ours, ref, head, base, grads


def _seeded_svd(fn, x: torch.Tensor, q: int, niter: int) -> tuple:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return fn(x, q=q, niter=niter)


def test_factors_and_residual_equal_peft(ga_pair) -> None:
    arch, ours, ref, head, base, grads = ga_pair
    layers = parity.assert_factors_equal_peft(ours, ref, base)  # W0 adjusted; W0 - s B A + s B A: unchanged at init
    assert len(layers) == 6
    for n, m in layers.items():
        assert m.lora_B.weight.abs().sum() > 0 and grads[n].abs().sum() > 0


def test_lora_ga_steps_equal_peft(ga_pair) -> None:
    arch, ours, ref, head, base, _ = ga_pair
    parity.assert_steps_equal_peft(copy.deepcopy(ours), copy.deepcopy(ref), head, base)


def test_export_is_a_plain_lora_on_the_pristine_base(ga_pair, tmp_path: Path) -> None:
    """PEFT loads our export onto the original W0 (rank 2r: [A; A0], [B, -B0]) and gives our logits; it imports
    back through import_peft; PEFT's own unconverted lora_ga save is refused in one line."""
    arch, ours, ref, head, base, _ = ga_pair
    ours = copy.deepcopy(ours)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if ".lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)  # trained-looking
    loaded = parity.assert_peft_loads(ours, head, base, tmp_path / "ours")
    assert loaded.peft_config["default"].r == 2 * R and loaded.peft_config["default"].lora_alpha == 16.0
    parity.assert_imports(tmp_path / "ours", head, base, eval_logits(ours))
    ref.save_pretrained(tmp_path / "ref")
    with pytest.raises(LoraExpError, match="init_lora_weights='lora_ga' needs the residual base"):
        import_peft(copy.deepcopy(base), tmp_path / "ref", head)


def test_lora_ga_merge_unmerge_and_counts(ga_pair) -> None:
    arch, ours, _, head, _, _ = ga_pair
    ours = copy.deepcopy(ours)
    parity.assert_merge_unmerge(ours)
    counts = model_methods.count_parameters(ours, head)
    assert counts["adapter"] == 2 * R * ((32 + 32) * 2 + (32 + 64))  # LoRA's count: 2 blocks x (q, v, ffn up)


test_lora_ga_bad_options_are_one_line = parity.one_line_error_test(
    [
        (["lora.init=lora_ga", "lora.lora_ga.batches=0"], "lora.lora_ga.batches=0 must be >= 1"),
        (["lora.init=lora_ga", "lora.lora_ga.direction=up"], "lora.lora_ga.direction='up' is not one of ArB2r"),
        (["lora.init=lora_ga", "lora.lora_ga.scale=big"], "lora.lora_ga.scale='big' is not one of stable"),
        (["lora.init=lora_ga", "lora.variant=dora"], "lora.init=lora_ga needs lora.variant=lora (not dora)"),
    ]
)


def test_rank_too_large_for_a_layer_is_one_line_before_any_gradient() -> None:
    base, head = tiny_model("bert")
    model_methods.apply_method(base, "lora", head, ours_cfg("bert", init="lora_ga", r=20))
    with pytest.raises(LoraExpError, match=r"needs 2 x lora.r <= min\(out, in\) .* is 32x32 at r=20"):
        lora_ga.check_ranks(dict(injection.lora_layers(base)))
