"""``lora_exp.data.labels``: classes inferred from the training data, names recorded in id order, scores as
floats, and one line naming the label column and its distinct values for every label it cannot use."""

from __future__ import annotations

import datasets
import pytest
from datasets import ClassLabel

from lora_exp.data import labels
from lora_exp.errors import LoraExpError


def part(values: list) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(len(values))], "label": values})


def test_integer_classes_are_counted_from_the_training_part() -> None:
    out, task = labels.encode({"train": part([0, 1, 2, 4, 3, 0]), "test": part([1, 2])})
    assert task == labels.Labels(labels.CLASSIFICATION, 5, ["0", "1", "2", "3", "4"])
    assert task.id2label is None  # bare ids: no names to record
    assert out["test"].features["label"] == ClassLabel(num_classes=5)


def test_names_map_to_sorted_ids_and_are_recorded() -> None:
    out, task = labels.encode({"train": part(["neutral", "entail", "contra", "entail"]), "test": part(["neutral"])})
    assert task.names == ["contra", "entail", "neutral"] and task.num_labels == 3
    assert task.id2label == {0: "contra", 1: "entail", 2: "neutral"}
    assert out["train"]["label"] == [2, 1, 0, 1] and out["test"]["label"] == [2]
    assert labels.describe(out["train"].features["label"]) == task  # what a job reads back from the splits


def test_a_class_label_keeps_its_names_and_a_given_count_is_checked() -> None:
    train = part([0, 1, 1]).cast_column("label", ClassLabel(names=["no", "yes"]))
    _, task = labels.encode({"train": train}, num_labels=2)
    assert task.id2label == {0: "no", 1: "yes"}
    with pytest.raises(LoraExpError, match=r"^data.num_labels=3 but data.label_column='y' has 2 classes"):
        labels.encode({"train": train}, num_labels=3, column="y")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            [0.0, 1.0, 2.0, 1.0],
            r"^data.label_column='score' holds decimal numbers \(3 distinct: 0, 1, 2\); for a score per row set "
            r"data.problem_type=regression",
        ),
        ([0, 1, -1], r"^data.label_column='score': labels must be integers 0..N-1 or names \(3 distinct: -1, 0, 1\)$"),
        (["a", "a"], r"^data.label_column='score': the data holds a single class \('a'\)"),
    ],
)
def test_labels_it_cannot_use_are_one_line(values: list, message: str) -> None:
    with pytest.raises(LoraExpError, match=message) as err:
        labels.encode({"train": part(values)}, column="score")
    assert "\n" not in str(err.value)


def test_ids_beyond_a_given_count_or_the_training_ids_are_one_line() -> None:
    with pytest.raises(LoraExpError, match=r"labels must be integers 0..1 or names \(3 distinct: 0, 1, 2\)"):
        labels.encode({"train": part([0, 1, 2])}, num_labels=2, column="y")
    with pytest.raises(LoraExpError, match=r"the training data has ids 0..1 but other splits hold \[3\]"):
        labels.encode({"train": part([0, 1]), "test": part([0, 3])}, column="y")
    mixed = {"train": part(["a", "b"]), "test": part([0, 1])}
    with pytest.raises(LoraExpError, match=r"labels must be integers 0..N-1 or names \(found ids, names: "):
        labels.encode(mixed, column="y")


def test_scores_become_float32_and_names_are_refused() -> None:
    out, task = labels.encode({"train": part([0, 1, 2, 5]), "test": part([0.5])}, labels.REGRESSION)
    assert task == labels.Labels(labels.REGRESSION, 1) and task.id2label is None
    assert out["train"].features["label"].dtype == "float32" and out["test"]["label"] == [0.5]
    assert labels.describe(out["train"].features["label"]).problem_type == labels.REGRESSION
    with pytest.raises(LoraExpError, match=r"^data.label_column='s': data.problem_type=regression needs numbers"):
        labels.encode({"train": part(["low", "high"])}, labels.REGRESSION, column="s")
    with pytest.raises(LoraExpError, match=r"every score in the training data is the same \(1\)"):
        labels.encode({"train": part([1.0, 1.0])}, labels.REGRESSION, column="s")
