"""Injection on tiny DistilBERT / BERT: the exact modules matched, trainable sets and counts per method.

Count formula: each adapted Linear(k -> d) adds r * (k + d) parameters; the head trains in full.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lora_exp.adapters import targets as injection
from lora_exp.errors import LoraExpError
from lora_exp.models import methods as model_methods
from tests.helpers.models import FFN, LAYERS, H, R, lora_cfg, tiny_text

EXPECTED = {
    ("distilbert", "q"): ["distilbert.transformer.layer.{i}.attention.q_lin"],
    ("distilbert", "ffn"): ["distilbert.transformer.layer.{i}.ffn.lin1", "distilbert.transformer.layer.{i}.ffn.lin2"],
    ("distilbert", "o"): ["distilbert.transformer.layer.{i}.attention.out_lin"],
    ("bert", "v"): ["bert.encoder.layer.{i}.attention.self.value"],
    ("bert", "o"): ["bert.encoder.layer.{i}.attention.output.dense"],
    ("bert", "ffn"): ["bert.encoder.layer.{i}.intermediate.dense", "bert.encoder.layer.{i}.output.dense"],
}


@pytest.mark.parametrize(("arch", "alias"), list(EXPECTED))
def test_alias_matches_exactly_the_expected_modules(arch: str, alias: str) -> None:
    _, model, _ = tiny_text(arch)
    got = injection.resolve_targets(model, [alias])
    want = [p.format(i=i) for i in range(LAYERS) for p in EXPECTED[(arch, alias)]]
    assert sorted(got) == sorted(want)


def test_head_alias_only_where_it_names_a_pretrained_module() -> None:
    assert injection.resolve_targets(tiny_text("bert")[1], ["head"]) == ["bert.pooler.dense"]  # pretrained pooler
    _, model, head = tiny_text("distilbert")  # pre_classifier is head (trained in full): no alias can reach it
    with pytest.raises(LoraExpError) as err:
        model_methods.apply_method(model, "lora", head, lora_cfg("q", "head"))
    assert str(err.value) == (
        "lora.targets: alias 'head' is not defined for model_type 'distilbert' (its classification head trains "
        "in full and is never a target); its aliases: ffn k o q v"
    )
    for model_type in ("roberta", "xlm-roberta"):
        assert "head" not in injection.ALIASES[model_type]
    with pytest.raises(LoraExpError, match="part of the classification head"):  # by name, still refused
        model_methods.apply_method(model, "lora", head, lora_cfg("pre_classifier"))


@pytest.mark.parametrize("arch", ["distilbert", "bert"])
@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v", "o"), ("q", "v", "ffn")])
def test_lora_trainable_count_formula(arch: str, targets: tuple[str, ...]) -> None:
    _, model, head = tiny_text(arch)
    head_params = sum(p.numel() for h in head for p in model.get_submodule(h).parameters())
    adapted = model_methods.apply_method(model, "lora", head, lora_cfg(*targets))
    per_layer = {"q": R * (H + H), "k": R * (H + H), "v": R * (H + H), "o": R * (H + H), "ffn": 2 * R * (H + FFN)}
    expected_adapter = LAYERS * sum(per_layer[t] for t in targets)
    counts = model_methods.count_parameters(model, head)
    assert counts["adapter"] == expected_adapter
    assert counts["head"] == head_params
    assert counts["other"] == 0
    assert counts["trainable"] == expected_adapter + head_params
    assert len(adapted) == LAYERS * sum(2 if t == "ffn" else 1 for t in targets)


def test_head_modules_per_architecture() -> None:
    """Tiny models go through the structural rule too (all of their weights are newly initialised)."""
    assert tiny_text("distilbert")[2] == ["pre_classifier", "classifier"]
    assert tiny_text("bert")[2] == ["classifier"]


@pytest.mark.parametrize("arch", ["distilbert", "bert"])
def test_trainable_sets_per_method(arch: str) -> None:
    _, model, head = tiny_text(arch)
    total = sum(p.numel() for p in model.parameters())
    head_params = sum(p.numel() for h in head for p in model.get_submodule(h).parameters())
    model_methods.apply_method(model, "full", head)
    assert model_methods.count_parameters(model, head)["trainable"] == total
    model_methods.apply_method(model, "frozen", head)
    frozen = model_methods.count_parameters(model, head)
    assert frozen["trainable"] == frozen["head"] == head_params and frozen["adapter"] == 0
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(any(n.startswith(h + ".") for h in head) for n in names)


def test_suffix_and_regex_targets() -> None:
    _, model, _ = tiny_text("bert")
    assert injection.resolve_targets(model, ["attention.self.query"]) == [
        f"bert.encoder.layer.{i}.attention.self.query" for i in range(LAYERS)
    ]
    assert injection.resolve_targets(model, [r"re:.*layer\.0\.attention\.self\.(query|key)"]) == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.key",
    ]


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["nothing_here"], "'nothing_here' matches no module"),
        (["attention.self"], "not an nn.Linear"),
        (["classifier"], "part of the classification head"),
        ([], "lora.targets is empty"),
    ],
)
def test_bad_targets(targets: list[str], message: str) -> None:
    _, model, head = tiny_text("bert")
    with pytest.raises(LoraExpError, match=message):
        model_methods.apply_method(model, "lora", head, lora_cfg(*targets))


def test_alias_unknown_for_architecture() -> None:
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = OmegaConf.create({"model_type": "custom"})
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(LoraExpError, match="alias 'q' is not defined for model_type 'custom'"):
        injection.resolve_targets(Custom(), ["q"])
    assert injection.resolve_targets(Custom(), ["proj"]) == ["proj"]


def test_rank_larger_than_layer_is_an_error() -> None:
    _, model, head = tiny_text("bert")
    with pytest.raises(LoraExpError, match=r"lora.r=40 must be in \[1, min\(out, in\)=32\]"):
        model_methods.apply_method(model, "lora", head, lora_cfg("q", r=40))


def test_model_unchanged_at_step0_and_merge_roundtrip() -> None:
    _, model, head = tiny_text("distilbert")
    model.eval()
    ids = torch.randint(5, 100, (3, 11))
    before = model(input_ids=ids).logits
    model_methods.apply_method(model, "lora", head, lora_cfg("q", "v", "ffn"))
    torch.testing.assert_close(model(input_ids=ids).logits, before)  # B = 0: unchanged
    for _, layer in injection.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, before)
    assert injection.merge(model) == LAYERS * 4
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-4)
    injection.unmerge(model)
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-4)


def test_best_snapshot_is_a_copy_not_the_live_parameters() -> None:
    """On CPU `.to("cpu")` returns the tensor itself: a 'best' snapshot must not follow later updates."""
    from lora_exp.adapters.store import trainable_state

    _, model, head = tiny_text("bert")
    model_methods.apply_method(model, "lora", head, lora_cfg("q"))
    snap = trainable_state(model)
    params = dict(model.named_parameters())
    assert all(snap[k].data_ptr() != params[k].data_ptr() for k in snap)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert not torch.equal(snap["classifier.weight"], model.classifier.weight)
