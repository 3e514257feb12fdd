"""lora_exp.data.files / clean: every supported format round-trips through ``datasets``; errors are one line."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import io
import json
import lzma
import socket
import zipfile
from pathlib import Path

import datasets
import pandas as pd
import pytest

from lora_exp.data import files as data_files
from lora_exp.data.clean import check_label_column, drop_counts
from lora_exp.data.files import FORMATS, detect_format, load_table
from lora_exp.errors import LoraExpError

datasets.disable_progress_bars()

# Quotes, a comma, a tab-free apostrophe and a non-ASCII letter: what breaks a naive reader.
TEXTS = [f'review {i}: "fine", it\'s café-good' if i % 3 == 0 else f"plain review number {i}" for i in range(12)]
LABELS = [i % 2 for i in range(12)]
FRAME = pd.DataFrame({"text": TEXTS, "label": LABELS})


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "hf-cache")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch):
    """Loading a local file never resolves a host name (datasets would ping the Hub to count the load)."""
    lookups: list = []

    def refuse(*args, **kwargs):
        lookups.append(args[:2])
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert lookups == []


def _csv(sep: str = ",") -> bytes:
    return FRAME.to_csv(index=False, sep=sep).encode()


def _jsonl() -> bytes:
    return FRAME.to_json(orient="records", lines=True, force_ascii=False).encode()


def _zip(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(name, data)
    return buf.getvalue()


def _write(path: Path, kind: str) -> Path:
    """FRAME written as ``kind`` at ``path`` (pandas / datasets writers, as a researcher would)."""
    writers = {
        "csv": lambda: path.write_bytes(_csv()),
        "tsv": lambda: path.write_bytes(_csv("\t")),
        "jsonl": lambda: path.write_bytes(_jsonl()),
        "json": lambda: FRAME.to_json(path, orient="records", force_ascii=False),
        "parquet": lambda: FRAME.to_parquet(path),
        "arrow": lambda: FRAME.to_feather(path),  # an Arrow IPC file (Feather v2)
        "csv.gz": lambda: path.write_bytes(gzip.compress(_csv())),
        "jsonl.bz2": lambda: path.write_bytes(bz2.compress(_jsonl())),
        "tsv.xz": lambda: path.write_bytes(lzma.compress(_csv("\t"))),
        "csv.zip": lambda: path.write_bytes(_zip("reviews.csv", _csv())),
        "disk": lambda: datasets.Dataset.from_pandas(FRAME).save_to_disk(str(path)),
    }
    writers[kind]()
    return path


def _rows(ds: datasets.Dataset) -> tuple[list, list]:
    return list(ds["text"]), [int(y) for y in ds["label"]]


ROUND_TRIPS = [
    ("reviews.csv", "csv", "csv"),
    ("reviews.tsv", "tsv", "tsv"),
    ("reviews.jsonl", "jsonl", "json"),
    ("reviews.json", "json", "json"),
    ("reviews.parquet", "parquet", "parquet"),
    ("reviews.arrow", "arrow", "arrow"),
    ("reviews.csv.gz", "csv.gz", "csv"),
    ("reviews.jsonl.bz2", "jsonl.bz2", "json"),
    ("reviews.tsv.xz", "tsv.xz", "tsv"),
    ("reviews.csv.zip", "csv.zip", "csv"),
    ("saved", "disk", "disk"),
]


@pytest.mark.parametrize("name,kind,fmt", ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS])
def test_every_format_round_trips(tmp_path: Path, cache: str, name: str, kind: str, fmt: str) -> None:
    path = str(_write(tmp_path / name, kind))
    assert detect_format(path, None) == fmt
    ds = load_table(path, cache_dir=cache)
    assert isinstance(ds, datasets.Dataset)
    assert _rows(ds) == (TEXTS, LABELS)


def test_arrow_stream_written_by_datasets(tmp_path: Path, cache: str) -> None:
    """The .arrow shard inside a save_to_disk folder is an Arrow stream; it reads as arrow too."""
    datasets.Dataset.from_pandas(FRAME).save_to_disk(str(tmp_path / "saved"))
    (shard,) = (tmp_path / "saved").glob("*.arrow")
    assert _rows(load_table(str(shard), cache_dir=cache)) == (TEXTS, LABELS)


def test_dataset_dict_keeps_its_splits(tmp_path: Path, cache: str) -> None:
    parts = {"train": FRAME.iloc[:8], "validation": FRAME.iloc[8:10], "test": FRAME.iloc[10:]}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_pandas(v, preserve_index=False) for k, v in parts.items()})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert detect_format(str(tmp_path / "dd"), None) == "disk"
    out = load_table(str(tmp_path / "dd"), cache_dir=cache)
    assert isinstance(out, datasets.DatasetDict)
    assert list(out) == ["train", "validation", "test"]
    assert {k: len(v) for k, v in out.items()} == {"train": 8, "validation": 2, "test": 2}
    assert _rows(out["validation"]) == (TEXTS[8:10], LABELS[8:10])


def test_folder_of_split_files_loads_as_splits(tmp_path: Path, cache: str) -> None:
    (tmp_path / "d").mkdir()
    FRAME.iloc[:9].to_csv(tmp_path / "d" / "train.csv", index=False)
    FRAME.iloc[9:].to_csv(tmp_path / "d" / "test.csv", index=False)
    (tmp_path / "d" / "README.md").write_text("notes")
    out = load_table(str(tmp_path / "d"), cache_dir=cache)
    assert isinstance(out, datasets.DatasetDict)
    assert {k: _rows(v) for k, v in out.items()} == {
        "train": (TEXTS[:9], LABELS[:9]),
        "test": (TEXTS[9:], LABELS[9:]),
    }


def test_folder_of_shards_loads_as_one_table(tmp_path: Path, cache: str) -> None:
    (tmp_path / "d").mkdir()
    FRAME.iloc[:5].to_parquet(tmp_path / "d" / "part-0.parquet")
    FRAME.iloc[5:].to_parquet(tmp_path / "d" / "part-1.parquet")
    assert _rows(load_table(str(tmp_path / "d"), cache_dir=cache)) == (TEXTS, LABELS)


def test_folder_of_mixed_formats_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    FRAME.to_csv(tmp_path / "d" / "a.csv", index=False)
    FRAME.to_parquet(tmp_path / "d" / "b.parquet")
    with pytest.raises(LoraExpError, match="several formats") as err:
        detect_format(str(tmp_path / "d"), None)
    assert "\n" not in str(err.value) and "data.format=csv|parquet" in str(err.value)
    assert detect_format(str(tmp_path / "d"), "parquet") == "parquet"


def test_folder_without_data_says_what_it_lacks(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraExpError, match="dataset_dict.json") as err:
        detect_format(str(tmp_path / "empty"), None)
    assert "\n" not in str(err.value)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "state.json").write_text("{}")
    with pytest.raises(LoraExpError, match="it lacks dataset_info.json"):
        detect_format(str(tmp_path / "half"), None)


def test_format_override_reads_a_txt_as_tsv(tmp_path: Path, cache: str) -> None:
    path = tmp_path / "reviews.txt"
    path.write_bytes(_csv("\t"))
    with pytest.raises(LoraExpError, match="unknown file format '.txt'"):
        detect_format(str(path), None)
    assert detect_format(str(path), "tsv") == "tsv"
    assert _rows(load_table(str(path), fmt="tsv", cache_dir=cache)) == (TEXTS, LABELS)
    assert _rows(load_table(str(path), fmt="TSV", cache_dir=cache)) == (TEXTS, LABELS)  # case-insensitive


def test_bad_format_option(tmp_path: Path) -> None:
    with pytest.raises(LoraExpError, match=r"data.format='xlsx' is not a known format; use one of csv\|tsv"):
        detect_format(str(_write(tmp_path / "r.csv", "csv")), "xlsx")
    with pytest.raises(LoraExpError, match="data.format='disk' needs a folder"):
        detect_format(str(tmp_path / "r.csv"), "disk")
    assert detect_format(str(tmp_path / "r.csv"), "jsonl") == "json"  # alias


def test_unknown_extension_is_one_line_listing_the_formats(tmp_path: Path) -> None:
    (tmp_path / "x.foo").write_text("a,b\n")
    with pytest.raises(LoraExpError) as err:
        load_table(str(tmp_path / "x.foo"))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"data.path={str(tmp_path / 'x.foo')!r}: unknown file format '.foo'; supported: ")
    for ext in [e for exts in FORMATS.values() for e in exts] + [".gz", ".bz2", ".xz", ".zst", ".zip"]:
        assert f" {ext}" in msg
    assert "save_to_disk folder" in msg and "data.format=csv|tsv|json|parquet|arrow|disk" in msg


def test_missing_path_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(LoraExpError, match="no such file or folder") as err:
        load_table(str(tmp_path / "nope.csv"))
    assert "\n" not in str(err.value)


def test_compressed_parquet_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "r.parquet.gz"
    path.write_bytes(gzip.compress(b"PAR1"))
    with pytest.raises(LoraExpError, match="outer .gz.*decompress it"):
        detect_format(str(path), None)


def test_parquet_never_gets_encoding_advice(tmp_path: Path, cache: str) -> None:
    good = _write(tmp_path / "r.parquet", "parquet")
    assert _rows(load_table(str(good), encoding="latin-1", cache_dir=cache)) == (TEXTS, LABELS)
    bad = tmp_path / "broken.parquet"
    bad.write_bytes("not parquet at all: caf\xe9".encode("latin-1"))
    with pytest.raises(LoraExpError) as err:
        load_table(str(bad), encoding="latin-1", cache_dir=cache)
    msg = str(err.value)
    assert "\n" not in msg and "encoding" not in msg
    assert msg.startswith(f"data.path={str(bad)!r}: cannot be read as parquet (")


@pytest.mark.parametrize("name", ["latin.jsonl", "latin.json", "latin.csv.gz", "latin.tsv"])
def test_undecodable_text_names_the_encoding(tmp_path: Path, cache: str, name: str) -> None:
    """Also JSON Lines, which datasets itself would load as invalid UTF-8 strings that fail on first access."""
    frame = {".jsonl": _jsonl(), ".json": FRAME.to_json(orient="records", force_ascii=False).encode()}
    raw = frame.get(Path(name).suffix, _csv("\t" if name.endswith(".tsv") else ","))
    latin = raw.decode().encode("latin-1")
    path = tmp_path / name
    path.write_bytes(gzip.compress(latin) if name.endswith(".gz") else latin)
    with pytest.raises(LoraExpError) as err:
        load_table(str(path), cache_dir=cache)
    assert str(err.value) == (
        f"data.path={str(path)!r} does not decode as data.encoding='utf-8' (byte 0xe9 at position "
        f"{latin.index(0xE9)}); set data.encoding to the file's encoding, e.g. latin-1 or cp1252"
    )
    assert _rows(load_table(str(path), encoding="latin-1", cache_dir=cache)) == (TEXTS, LABELS)


def test_utf8_bom_and_unknown_encoding(tmp_path: Path, cache: str) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _jsonl())
    assert _rows(load_table(str(path), cache_dir=cache)) == (TEXTS, LABELS)
    with pytest.raises(LoraExpError, match="data.encoding='klingon' is not a known encoding"):
        load_table(str(path), encoding="klingon", cache_dir=cache)


@pytest.mark.parametrize(
    "name,body,where",
    [
        (
            "bad.jsonl",
            b'{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c", label: 0}\n',
            "line 3 is not valid JSON, column 15: Expecting property name",
        ),
        ("bad.json", b'[{"text": "a", "label": 0},\n {"text": "b" "label": 1}]\n', "line 2 column"),
        ("list.jsonl", b'{"text": "a", "label": 0}\n[1, 2]\n', "line 2 is a JSON list"),
    ],
)
def test_malformed_json_names_the_line(tmp_path: Path, cache: str, name: str, body: bytes, where: str) -> None:
    path = tmp_path / name
    path.write_bytes(body)
    with pytest.raises(LoraExpError) as err:
        load_table(str(path), cache_dir=cache)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"data.path={str(path)!r}: cannot be read as json (")
    assert where in msg


def test_json_of_columns_is_refused(tmp_path: Path, cache: str) -> None:
    path = tmp_path / "cols.json"
    path.write_text(json.dumps(FRAME.to_dict("list")))  # {"text": [...], "label": [...]}
    with pytest.raises(LoraExpError, match="one object of lists, not records"):
        load_table(str(path), cache_dir=cache)


def test_empty_files(tmp_path: Path, cache: str) -> None:
    (tmp_path / "e.jsonl").write_bytes(b"")
    (tmp_path / "h.csv").write_text("text,label\n")
    FRAME.iloc[:0].to_parquet(tmp_path / "z.parquet")
    for name in ("e.jsonl", "h.csv", "z.parquet"):
        with pytest.raises(LoraExpError, match="is empty"):
            load_table(str(tmp_path / name), cache_dir=cache)


def test_zip_of_two_files_is_refused(tmp_path: Path, cache: str) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.csv", _csv())
        zf.writestr("b.csv", _csv())
    (tmp_path / "two.zip").write_bytes(buf.getvalue())
    with pytest.raises(LoraExpError, match="unknown file format"):  # no data extension, not one file inside
        detect_format(str(tmp_path / "two.zip"), None)
    with pytest.raises(LoraExpError, match="holds 2 files"):
        load_table(str(tmp_path / "two.zip"), fmt="csv", cache_dir=cache)


def test_zip_named_by_its_one_member(tmp_path: Path, cache: str) -> None:
    (tmp_path / "export.zip").write_bytes(_zip("reviews.jsonl", _jsonl()))
    assert detect_format(str(tmp_path / "export.zip"), None) == "json"
    assert _rows(load_table(str(tmp_path / "export.zip"), cache_dir=cache)) == (TEXTS, LABELS)


def test_zstd(tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.csv.zst"
    if importlib.util.find_spec("zstandard") is not None:
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(_csv()))
        assert _rows(load_table(str(path), cache_dir=cache)) == (TEXTS, LABELS)
    else:
        path.write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(data_files.COMPRESSIONS, ".zst", "zstandard_missing_for_this_test")
    with pytest.raises(LoraExpError, match=r"\.zst files need the zstandard_missing_for_this_test package"):
        load_table(str(path), cache_dir=cache)


def _with_missing_labels(tmp_path: Path, cache: str) -> datasets.Dataset:
    frame = FRAME.astype({"label": "object"})
    for row, value in ((1, None), (6, ""), (8, ""), (11, None)):  # 0-based; CSV data rows 2, 7, 9, 12
        frame.loc[row, "label"] = value
    frame.to_csv(tmp_path / "gaps.csv", index=False)
    return load_table(str(tmp_path / "gaps.csv"), cache_dir=cache)


def test_missing_labels_are_one_line_with_rows(tmp_path: Path, cache: str) -> None:
    ds = _with_missing_labels(tmp_path, cache)  # pandas reads empty cells as NaN: a float column
    with pytest.raises(LoraExpError) as err:
        check_label_column(ds, "label", drop_missing=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("data.label_column='label': 4 rows have no label (data rows 2, 7, 9, 12; ")
    assert msg.endswith("fix the file or set data.drop_missing=true")


def test_missing_labels_dropped_and_counted(tmp_path: Path, cache: str) -> None:
    out, dropped = check_label_column(_with_missing_labels(tmp_path, cache), "label", drop_missing=True)
    keep = [i for i in range(12) if i not in (1, 6, 8, 11)]
    assert dropped == 4
    assert list(out["text"]) == [TEXTS[i] for i in keep]
    assert list(out["label"]) == [LABELS[i] for i in keep]  # floats (pandas: NaN in an int column), equal to ints


def test_missing_labels_list_at_most_five_and_string_labels() -> None:
    labels = ["pos", None, "", "neg", "  ", None, None, "pos", "neg", None]
    ds = datasets.Dataset.from_dict({"text": [str(i) for i in range(10)], "label": labels})
    with pytest.raises(LoraExpError, match=r"6 rows have no label \(data rows 2, 3, 5, 6, 7, \.\.\.; "):
        check_label_column(ds, "label", drop_missing=False)
    nan = datasets.Dataset.from_dict({"label": [0.0, float("nan"), 1.0]})
    with pytest.raises(LoraExpError, match=r"1 row has no label \(data row 2; "):
        check_label_column(nan, "label", drop_missing=False)
    clean, n = check_label_column(datasets.Dataset.from_dict({"label": ["a", "b"]}), "label", drop_missing=False)
    assert n == 0 and list(clean["label"]) == ["a", "b"]
    with pytest.raises(LoraExpError, match="data.label_column='y' is not a column of the data"):
        check_label_column(clean, "y", drop_missing=True)
    with pytest.raises(LoraExpError, match="no row has a label"):
        check_label_column(datasets.Dataset.from_dict({"label": [None, ""]}), "label", drop_missing=True)


def test_drop_counts() -> None:
    texts = ["a", "b", "  ", "a", None, " b ", "c", "", "c", "None"]
    ds = datasets.Dataset.from_dict({"text": texts, "label": list(range(len(texts)))})
    out, counts = drop_counts(ds, "text")
    assert counts == {"empty_text": 3, "duplicate": 3}
    assert list(out["text"]) == ["a", "b", "c", "None"]  # first kept; None is empty, not the text 'None'
    assert list(out["label"]) == [0, 1, 6, 9]
    same, none = drop_counts(out, "text")
    assert none == {"empty_text": 0, "duplicate": 0} and same is out


def _deduplicated_reference(texts: list[str]) -> list[str]:
    """What the text data module kept before drop_counts (first of identical stripped texts), row by row."""
    first: dict[str, int] = {}
    return [t for i, t in enumerate(texts) if first.setdefault(str(t).strip(), i) == i]


def test_drop_counts_matches_the_row_by_row_deduplication() -> None:
    texts = [f"text {i % 700}" + (" " if i % 3 else "") for i in range(5000)]
    ds = datasets.Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(5000)]})
    out, counts = drop_counts(ds, "text")
    assert counts == {"empty_text": 0, "duplicate": 4300}
    assert list(out["text"]) == _deduplicated_reference(texts)


def test_cleaning_follows_a_row_mapping() -> None:
    """After a select / shuffle the Dataset shows rows through an indices mapping: row numbers follow it."""
    base = datasets.Dataset.from_dict({"text": ["x", "a", "", "a", "b"], "label": [1, None, 0, 1, 0]})
    shown = base.select([4, 3, 2, 1, 0])  # b a '' a x
    with pytest.raises(LoraExpError, match=r"1 row has no label \(data row 4; "):
        check_label_column(shown, "label", drop_missing=False)
    out, counts = drop_counts(shown, "text")
    assert counts == {"empty_text": 1, "duplicate": 1}
    assert list(out["text"]) == ["b", "a", "x"] and list(out["label"]) == [0, 1, 1]
