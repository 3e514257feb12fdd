"""Sentence pairs (``data.text_pair_column``): read from any file, cleaned as pairs (a duplicate only when both
texts repeat; an empty second text is an empty text), encoded with the tokenizer's pair encoding (segment ids,
``longest_first`` truncation), batched with their segment ids, and scores / many classes through the same path."""

from __future__ import annotations

from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch

from lora_exp.config.schema import DataConfig, typed_config
from lora_exp.data import clean
from lora_exp.data import text as text_data
from lora_exp.errors import LoraExpError
from lora_exp.models.text import _tiny_tokenizer


def cfg_for(path: Path, tmp_path: Path, **kw) -> DataConfig:
    base = {"name": "t", "source": "files", "path": str(path), "cache_dir": str(tmp_path / "hf"), "max_length": 32}
    return typed_config({**base, **kw}, DataConfig)


def pairs_file(tmp_path: Path) -> Path:
    """60 distinct pairs (a, b) labelled same / other, plus: a repeated first text with another second text
    (kept), a repeated pair (dropped), an empty second text and a blank one (dropped)."""
    rows = [
        (f"good film {i}", f"good film {i}" if i % 2 else f"dull plot {i}", "same" if i % 2 else "other")
        for i in range(60)
    ]
    rows += [("good film 1", "another second text", "other"), ("good film 3", "good film 3", "same")]
    rows += [("lonely first text", "", "same"), ("other first text", "   ", "other")]
    path = tmp_path / "pairs.csv"
    pd.DataFrame(rows, columns=["s1", "s2", "y"]).to_csv(path, index=False)
    return path


def test_pairs_are_cleaned_as_pairs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = cfg_for(pairs_file(tmp_path), tmp_path, text_column="s1", text_pair_column="s2", label_column="y")
    splits, dropped = text_data.load_splits_counted(cfg)
    assert dropped == {"missing_label": 0, "empty_text": 2, "duplicate": 1}
    assert sum(len(s) for s in splits.values()) == 61  # the repeated first text with a new second text stays
    assert set(splits["train"].column_names) == {"text", "text_pair", "label"}
    assert splits["train"].features["label"].names == ["other", "same"]  # inferred: 2 named classes
    out = capsys.readouterr().out
    assert "dropped 1 duplicate pair (both texts equal; first kept)" in out
    assert "dropped 2 rows with an empty text (either of the pair)" in out
    with pytest.raises(LoraExpError, match=r"^data.text_pair_column='s3' is not a column of the data \(columns: "):
        text_data.load_splits(
            cfg_for(pairs_file(tmp_path), tmp_path, text_column="s1", text_pair_column="s3", label_column="y")
        )


def test_drop_counts_of_a_pair() -> None:
    ds = datasets.Dataset.from_dict({"a": ["x", "x", " x ", "y", None], "b": ["1", "2", "1", "", "z"]})
    out, counts = clean.drop_counts(ds, ["a", "b"])
    assert counts == {"empty_text": 2, "duplicate": 1}  # (" x ", "1") repeats ("x", "1"); "y" has no second text
    assert out["b"] == ["1", "2"]


def test_pair_encoding_segments_truncation_and_batches() -> None:
    tok = _tiny_tokenizer()
    long, short = "a " * 40, "good film"
    enc = text_data.encode_texts(tok, [long], [short], max_length=16)
    ids, segments = enc["input_ids"][0], enc["token_type_ids"][0]
    assert len(ids) == 16 and tok.convert_ids_to_tokens(ids[-3:]) == ["good", "film", "[SEP]"]  # longest first
    assert segments == [0] * 13 + [1] * 3 and ids.count(tok.sep_token_id) == 2
    assert "token_type_ids" not in text_data.encode_texts(tok, [short], None, max_length=16)  # one text: as before
    splits = datasets.DatasetDict(
        {
            k: datasets.Dataset.from_dict({"text": [long, short], "text_pair": [short, long], "label": [0, 1]})
            for k in text_data.SPLITS
        }
    )
    encoded = text_data.tokenize(splits, tok, max_length=16)
    assert encoded["train"].with_format(None)["length"] == [16, 16]  # the pair's length: what batches group by
    loaders = text_data.make_loaders(encoded, tok, 2, 2, True, torch.Generator().manual_seed(0))
    batch = next(iter(loaders.train))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["token_type_ids"].sum() > 0


def test_scores_split_unstratified_and_keep_floats(tmp_path: Path) -> None:
    path = tmp_path / "scores.jsonl"
    pd.DataFrame({"text": [f"film {i}" for i in range(50)], "score": [i / 10 for i in range(50)]}).to_json(
        path, orient="records", lines=True
    )
    splits = text_data.load_splits(cfg_for(path, tmp_path, label_column="score", problem_type="regression"))
    assert [len(s) for s in splits.values()] == [40, 5, 5]
    assert splits["train"].features["label"].dtype == "float32"
    with pytest.raises(LoraExpError, match=r"^data.label_column='score' holds decimal numbers \(50 distinct: 0, 0.1"):
        text_data.load_splits(cfg_for(path, tmp_path, label_column="score"))
