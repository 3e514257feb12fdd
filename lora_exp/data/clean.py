"""Rows a classifier cannot use, found with Arrow compute (no per-row Python): rows without a label (an error
listing them, or dropped with ``data.drop_missing``), empty texts and duplicate texts or pairs (dropped, counted)."""

from __future__ import annotations

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from lora_exp.errors import LoraExpError

_SHOWN_ROWS = 5  # row numbers listed in a missing-label message


def _column(ds: datasets.Dataset, name: str, option: str) -> pa.ChunkedArray:
    """One column as Arrow (row order as the Dataset shows it); one line when it is not a column."""
    if name not in ds.column_names:
        raise LoraExpError(f"{option}={name!r} is not a column of the data (columns: {ds.column_names})")
    col = ds.data.column(name)
    indices = getattr(ds, "_indices", None)  # select / filter / shuffle leave a row mapping over ds.data
    # the mapping applied with one take: ``with_format("arrow")[:]`` gathers it into one chunk per row (slow)
    return col if indices is None else col.take(indices.column(0))


def _blank(col: pa.ChunkedArray) -> np.ndarray:
    """Per row: null, NaN or an empty / whitespace-only string."""
    mask = col.is_null()
    if pa.types.is_floating(col.type):
        mask = pc.or_(mask, pc.fill_null(pc.is_nan(col), False))
    elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        mask = pc.or_(mask, pc.fill_null(pc.equal(pc.utf8_trim_whitespace(col), ""), False))
    return mask.to_numpy(zero_copy_only=False).astype(bool)


def check_label_column(
    ds: datasets.Dataset, label_column: str, drop_missing: bool, where: str = ""
) -> tuple[datasets.Dataset, int]:
    """Rows whose label is None, NaN or an empty string: a one-line ``LoraExpError`` or, with ``drop_missing``,
    dropped. Returns the dataset and the number dropped. ``where`` names the part in messages ("in the test split").

    Row numbers in the message are 1-based data rows of ``ds`` (a csv header is not a row), so call this on the
    table as loaded. Label types are left alone: an int column with empty csv cells stays float (1.0), which
    ``ClassLabel`` casts as it would ints; casting here would rewrite the whole table.
    """
    missing = _blank(_column(ds, label_column, "data.label_column"))
    n, where = int(missing.sum()), f" {where}" if where else ""
    if n == len(ds):
        raise LoraExpError(f"data.label_column={label_column!r}: no row has a label{where} ({n} rows)")
    if n and not drop_missing:
        rows = [str(i + 1) for i in np.flatnonzero(missing)[:_SHOWN_ROWS]] + (["..."] if n > _SHOWN_ROWS else [])
        has = "1 row has" if n == 1 else f"{n} rows have"
        raise LoraExpError(
            f"data.label_column={label_column!r}: {has} no label{where} (data row{'s' if n > 1 else ''} "
            f"{', '.join(rows)}; data row 1 is the first row after any header); fix the file or set "
            "data.drop_missing=true"
        )
    if n:
        ds = ds.select(np.flatnonzero(~missing))
    return ds, n


def drop_counts(
    ds: datasets.Dataset, text_columns: str | list[str], dedupe: bool = True
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Drop rows with an empty / whitespace-only text, then (``dedupe``) exact duplicate rows, the first kept.

    ``text_columns`` is the text column, or the columns of a sentence pair: a row is empty when any of its
    texts is, and a duplicate only when all of its texts equal an earlier row's. Texts compare with surrounding
    whitespace stripped (a duplicate on both sides of a split leaks test rows into training), vectorised with
    Arrow and pandas hashing. None counts as an empty text. Returns the dataset (order kept) and
    ``{"empty_text": n1, "duplicate": n2}``.
    """
    names = [text_columns] if isinstance(text_columns, str) else list(text_columns)
    options = {0: "data.text_column", 1: "data.text_pair_column"}
    cols = [_column(ds, name, options.get(i, "data.text_column")) for i, name in enumerate(names)]
    empty = np.logical_or.reduce([_blank(col) for col in cols])
    duplicate = np.zeros(len(ds), dtype=bool)
    if dedupe:
        keys = []
        for col in cols:
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                col = pc.cast(col, pa.large_string())
            keys.append(pc.utf8_trim_whitespace(col).to_pandas())
        frame = pd.concat(keys, axis=1, ignore_index=True)
        duplicate[~empty] = frame[~empty].duplicated(keep="first").to_numpy()
    counts = {"empty_text": int(empty.sum()), "duplicate": int(duplicate.sum())}
    if counts["empty_text"] or counts["duplicate"]:
        ds = ds.select(np.flatnonzero(~(empty | duplicate)))
    return ds, counts
