"""Small tables in the Hub GLUE dataset's own layout (nyu-mll/glue: columns, ClassLabel names, an ``idx`` column,
hidden test labels of -1, MNLI's matched / mismatched splits), and a stub of ``datasets.load_dataset`` serving them:
the Hub cannot be reached from the tests."""

from __future__ import annotations

from typing import Any

import datasets
from datasets import ClassLabel, Value

NAMES = {
    "cola": ["unacceptable", "acceptable"],
    "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qqp": ["not_duplicate", "duplicate"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
    "stsb": None,  # a float score 0..5
}
COLUMNS = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
}
WORDS = ["good", "great", "fun", "bad", "dull", "boring", "film", "story", "plot", "acting"]


def table(task: str, n: int, start: int, hidden: bool = False) -> datasets.Dataset:
    """``n`` rows of ``task`` in GLUE's layout; ``hidden``: a test split (labels -1)."""
    names = NAMES[task]
    k = len(names) if names else 0
    rows: dict[str, list[Any]] = {c: [] for c in COLUMNS[task]}
    labels = []
    for i in range(start, start + n):
        y = i % k if names else round((i % 6) * 5 / 5, 1)
        for j, c in enumerate(COLUMNS[task]):
            rows[c].append(f"{WORDS[(i + j) % len(WORDS)]} {WORDS[int(y) % len(WORDS)]} {c} {i}")
        labels.append(-1 if hidden and names else (-1.0 if hidden else y))
    feature = ClassLabel(names=names) if names else Value("float32")
    features = datasets.Features({**{c: Value("string") for c in rows}, "label": feature, "idx": Value("int32")})
    return datasets.Dataset.from_dict({**rows, "label": labels, "idx": list(range(n))}, features=features)


def glue(task: str, n_train: int = 60, n_eval: int = 12) -> datasets.DatasetDict:
    """The task's splits as the Hub has them (MNLI: validation / test matched and mismatched)."""
    if task == "mnli":
        return datasets.DatasetDict(
            train=table(task, n_train, 0),
            validation_matched=table(task, n_eval, 1000),
            validation_mismatched=table(task, n_eval, 2000),
            test_matched=table(task, n_eval, 3000, hidden=True),
            test_mismatched=table(task, n_eval, 4000, hidden=True),
        )
    return datasets.DatasetDict(
        train=table(task, n_train, 0), validation=table(task, n_eval, 1000), test=table(task, n_eval, 3000, hidden=True)
    )


def stub_load_dataset(calls: list | None = None):
    """A ``datasets.load_dataset`` stand-in: ``(path, name, **kw)`` -> ``glue(name)``, the calls recorded."""

    def load(path: str, name: str | None = None, **kw: Any) -> datasets.DatasetDict:
        if calls is not None:
            calls.append((path, name))
        return glue(str(name))

    return load
