"""Labels of any task in one place: classes (integers, names, a ``ClassLabel``) or scores (regression).

Every data path (text files, Hub datasets, audio folders and tables) calls ``encode`` on its parts once they
have a ``label`` column, and reads what the model needs back from the result with ``describe``:

* ``data.problem_type=single_label_classification`` (the default): labels become a ``ClassLabel``. Names
  (pos / neg) map to ids in sorted order of the names; integers stay as they are; a ``ClassLabel`` keeps its
  names. ``data.num_labels`` is inferred from the training part (the number of names, or the largest id + 1)
  unless given. Labels that are neither integers in range nor names, decimal numbers (a score column read
  without ``problem_type=regression``) included, are one ``LoraExpError`` line naming ``data.label_column``
  and its distinct values.
* ``data.problem_type=regression``: labels become float32 scores (one model output, MSE loss, no class map);
  a column of names is one line.

The names are transformers' own (``PretrainedConfig.problem_type``), so a model config takes them unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import datasets
import numpy as np
from datasets import ClassLabel, Value

from lora_exp.errors import LoraExpError

CLASSIFICATION = "single_label_classification"
REGRESSION = "regression"
PROBLEM_TYPES = (CLASSIFICATION, REGRESSION)
_SHOWN = 10  # distinct values listed in a message
_STRINGS = ("string", "large_string")


@dataclass(frozen=True)
class Labels:
    """What a model needs to know of a task's labels: transformers' ``problem_type``, its number of outputs
    (``num_labels``: 1 for a score) and the class names in id order (None for scores and bare integer ids)."""

    problem_type: str
    num_labels: int
    names: list[str] | None = None

    @property
    def id2label(self) -> dict[int, str] | None:
        """``{id: name}`` when the classes have names (not just their ids written as digits), else None."""
        if not self.names or all(n.isdigit() for n in self.names):
            return None
        return dict(enumerate(self.names))


def describe(feature: datasets.features.features.FeatureType) -> Labels:
    """The ``Labels`` of an encoded ``label`` feature: a ``ClassLabel`` (classes) or a float (scores)."""
    if isinstance(feature, ClassLabel):
        return Labels(CLASSIFICATION, feature.num_classes, list(feature.names))
    return Labels(REGRESSION, 1)


def _shown(values: list) -> str:
    """Distinct values for a message: sorted, the first few, with ``...`` when there are more."""
    try:
        values = sorted(values)
    except TypeError:  # mixed types
        values = sorted(values, key=str)
    head = ", ".join(repr(v) if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    if len(values) > _SHOWN:
        head = ", ".join(head.split(", ")[:_SHOWN]) + ", ..."
    return f"{len(values)} distinct: {head}"


def _distinct(parts: Mapping[str, datasets.Dataset]) -> list:
    return list({v for p in parts.values() for v in p.unique("label")})


def encode(
    parts: Mapping[str, datasets.Dataset],
    problem_type: str = CLASSIFICATION,
    num_labels: int | None = None,
    column: str = "label",
) -> tuple[dict[str, datasets.Dataset], Labels]:
    """``parts`` (e.g. train / validation / test, ``train`` first; or one table) with their ``label`` column
    encoded for ``problem_type`` (``data.problem_type``), and the task's ``Labels``.

    ``num_labels`` is ``data.num_labels`` (None: inferred from the first part, the training data; names count
    over every part, so a name seen only in the test split is still a class). ``column`` is the user's name of
    the label column (``data.label_column``), for messages. Every refusal is one ``LoraExpError`` line.
    """
    if problem_type == REGRESSION:
        return _as_scores(parts, column)
    return _as_classes(parts, num_labels, column)


def _as_scores(parts: Mapping[str, datasets.Dataset], column: str) -> tuple[dict[str, datasets.Dataset], Labels]:
    """Labels as float32 scores; names or a ``ClassLabel`` of names are refused."""
    out = {}
    for name, part in parts.items():
        feature = part.features["label"]
        if getattr(feature, "dtype", None) in _STRINGS or (
            isinstance(feature, ClassLabel) and not all(n.isdigit() for n in feature.names)
        ):
            raise LoraExpError(
                f"data.label_column={column!r}: data.problem_type=regression needs numbers, not names "
                f"({_shown(_distinct({name: part}) if not isinstance(feature, ClassLabel) else feature.names)}); "
                "for classes leave data.problem_type=single_label_classification"
            )
        out[name] = part.cast_column("label", Value("float32"))
    first = next(iter(out.values()))
    if len(first.unique("label")) < 2:
        raise LoraExpError(
            f"data.label_column={column!r}: every score in the training data is the same "
            f"({first[0]['label']:g}); a regression needs at least two values"
        )
    return out, Labels(REGRESSION, 1)


def single_class(column: str, where: str, name: str) -> LoraExpError:
    """The one-line refusal of data whose labels are all one class (it would train to 100% and say nothing)."""
    return LoraExpError(
        f"data.label_column={column!r}: the {where} holds a single class ({name!r}); a classifier needs at least two"
    )


def _kind(feature: datasets.features.features.FeatureType) -> str:
    """``classlabel``, ``names`` (strings), ``ids`` (integers), ``decimals`` (floats) or the feature's own type."""
    if isinstance(feature, ClassLabel):
        return "classlabel"
    dtype = str(getattr(feature, "dtype", "") or type(feature).__name__)
    if dtype in _STRINGS:
        return "names"
    if dtype.startswith(("int", "uint")):
        return "ids"
    return "decimals" if dtype.startswith("float") else dtype


def _class_names(parts: Mapping[str, datasets.Dataset], column: str) -> list[str] | None:
    """The classes' names when the labels have them (a ``ClassLabel`` of the first part, or strings in every
    part: sorted), None for integer ids; decimal numbers and other types are one line."""
    first = next(iter(parts.values())).features["label"]
    kinds = {_kind(p.features["label"]) for p in parts.values()}
    if kinds == {"names"}:
        return sorted({str(v) for v in _distinct(parts)})
    if isinstance(first, ClassLabel) and kinds <= {"classlabel", "ids"}:
        return list(first.names)
    if kinds == {"ids"}:
        return None
    values = _distinct(parts)
    if "decimals" in kinds:
        raise LoraExpError(
            f"data.label_column={column!r} holds decimal numbers ({_shown(values)}); for a score per row set "
            "data.problem_type=regression, for classes write integers 0..N-1 or names"
        )
    raise LoraExpError(
        f"data.label_column={column!r}: labels must be integers 0..N-1 or names (found {', '.join(sorted(kinds))}: "
        f"{_shown([str(v) for v in values])})"
    )


def _as_classes(
    parts: Mapping[str, datasets.Dataset], num_labels: int | None, column: str
) -> tuple[dict[str, datasets.Dataset], Labels]:
    """Labels as a ``ClassLabel`` of ``num_labels`` classes (inferred when None)."""
    names = _class_names(parts, column)
    train = next(iter(parts.values()))
    if names is not None:
        if len(names) == 1:
            raise single_class(column, "data", names[0])
        if num_labels is not None and len(names) != num_labels:
            raise LoraExpError(
                f"data.num_labels={num_labels} but data.label_column={column!r} has {len(names)} classes "
                f"({_shown(names)}); leave data.num_labels null to take it from the data"
            )
        n = len(names)
    else:  # integer ids
        values = _distinct(parts)
        bad = [v for v in values if v is None or int(v) < 0 or (num_labels is not None and int(v) >= num_labels)]
        if bad:
            allowed = f"0..{num_labels - 1}" if num_labels is not None else "0..N-1"
            raise LoraExpError(
                f"data.label_column={column!r}: labels must be integers {allowed} or names ({_shown(values)})"
            )
        n = num_labels if num_labels is not None else int(np.max(train.unique("label"))) + 1
        outside = sorted(v for v in values if int(v) >= n)
        if outside:
            raise LoraExpError(
                f"data.label_column={column!r}: the training data has ids 0..{n - 1} but other splits hold "
                f"{outside[:_SHOWN]}; set data.num_labels or fix the splits ({_shown(values)})"
            )
        if n < 2:
            raise single_class(column, "data", "0")
    feature = ClassLabel(num_classes=n, names=names)
    index = {v: i for i, v in enumerate(names or [])}
    out = {}
    for name, part in parts.items():
        if names is not None and getattr(part.features["label"], "dtype", None) in _STRINGS:
            part = part.map(lambda y: {"label": index[str(y)]}, input_columns="label")
        elif _kind(part.features["label"]) == "ids" and any(not 0 <= int(v) < n for v in part.unique("label")):
            raise LoraExpError(
                f"data.label_column={column!r}: the {name} split's ids are not the classes 0..{n - 1} "
                f"({_shown(part.unique('label'))})"
            )
        elif isinstance(part.features["label"], ClassLabel) and list(part.features["label"].names) != names:
            raise LoraExpError(
                f"data.label_column={column!r}: the {name} split's classes {part.features['label'].names[:_SHOWN]} "
                f"are not the training data's {names[:_SHOWN]}"
            )
        out[name] = part.cast_column("label", feature)
    return out, Labels(CLASSIFICATION, n, list(feature.names))
