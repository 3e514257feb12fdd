"""A researcher's own data through the real CLI: every format, what was dropped (printed and in results.json),
rows without a label, the data=csv alias, an unknown extension."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from lora_exp.config.identity import config_hash, resolved_dict
from tests.helpers.configs import make_cfg
from tests.helpers.processes import cli

N = 60  # distinct, labelled rows in every file: split 48 / 6 / 6 when the file has no splits
RUN = ["model=tiny_bert", "logger=none", "trainer.max_steps=2", "trainer.device=cpu", "trainer.batch_size=16"]
COLUMNS = ["data.text_column=review", "data.label_column=sentiment"]


def frame(n: int = N, start: int = 0) -> pd.DataFrame:
    """``n`` reviews labelled pos / neg by their words (columns review, sentiment)."""
    rows = [
        (f"{'good great fun' if i % 2 else 'bad dull boring'} film number {i}", "pos" if i % 2 else "neg")
        for i in range(start, start + n)
    ]
    return pd.DataFrame(rows, columns=["review", "sentiment"])


def with_dirt(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` plus 2 rows with an empty text (one blank, one missing) and 3 repeats of earlier texts."""
    dirt = pd.DataFrame({"review": ["  ", None, *df["review"][:3]], "sentiment": ["pos", "neg", "neg", "pos", "neg"]})
    return pd.concat([df, dirt], ignore_index=True)


def write_files(tmp: Path) -> dict[str, Path]:
    """One data set per format, as a researcher would write it (pandas / datasets writers)."""
    dirty = with_dirt(frame())
    out = {name: tmp / name for name in ("tsv_set.tsv", "jsonl_set.jsonl", "parquet_set.parquet", "gz_set.csv.gz")}
    dirty.to_csv(out["tsv_set.tsv"], sep="\t", index=False)
    dirty.to_json(out["jsonl_set.jsonl"], orient="records", lines=True)
    dirty.to_parquet(out["parquet_set.parquet"])
    out["gz_set.csv.gz"].write_bytes(gzip.compress(dirty.to_csv(index=False).encode()))
    # A DatasetDict with its own splits: train 40 (+1 empty text, +2 repeats kept), validation 8 (+1 empty), test 10.
    train = pd.concat([frame(40), pd.DataFrame({"review": ["", *frame(2)["review"]], "sentiment": ["pos"] * 3})])
    validation = pd.concat([frame(8, start=100), pd.DataFrame({"review": [None], "sentiment": ["neg"]})])
    parts = {"train": train, "validation": validation, "test": frame(10, start=200)}
    saved = datasets.DatasetDict({k: datasets.Dataset.from_pandas(v, preserve_index=False) for k, v in parts.items()})
    saved.save_to_disk(str(tmp / "disk_set"))
    out["disk_set"] = tmp / "disk_set"
    # Three rows without a label (an empty cell, two blanks): dropped with data.drop_missing=true.
    gaps, unlabelled = frame(), pd.DataFrame({"review": ["x one", "x two", "x three"], "sentiment": [None, "", " "]})
    gaps = pd.concat([gaps.iloc[:3], unlabelled, gaps.iloc[3:]], ignore_index=True)  # data rows 4, 5, 6
    gaps.to_csv(tmp / "gaps_set.csv", index=False)
    out["gaps_set.csv"] = tmp / "gaps_set.csv"
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict], str]:
    """One multirun over the files (one process: the imports once), drop_missing on; results by data name."""
    tmp = tmp_path_factory.mktemp("formats")
    paths = write_files(tmp)
    args = ["-m", *RUN, "data=files", *COLUMNS, "data.drop_missing=true", f"data.cache_dir={tmp / 'hf'}"]
    args += [f"data.path={','.join(str(p) for p in paths.values())}", f"hydra.sweep.dir={tmp / 'sweep'}"]
    proc = cli(args, tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(p.read_text()) for p in sorted((tmp / "sweep").glob("*/results.json"))]
    return {r["data"]: r for r in got}, proc.stdout


SINGLE_TABLES = ["tsv_set", "jsonl_set", "parquet_set", "gz_set"]


@pytest.mark.parametrize("name", SINGLE_TABLES)
def test_each_format_trains_with_empty_and_repeated_texts_dropped(sweep, name: str) -> None:
    res = sweep[0][name]
    assert res["status"] == "ok"
    assert res["data_dropped"] == {"missing_label": 0, "empty_text": 2, "duplicate": 3}
    assert res["train_examples"] == 48 and sum(res["test_pred_counts"]) == 6  # the 60 clean rows, 80/10/10


def test_save_to_disk_splits_are_used_as_given(sweep) -> None:
    res = sweep[0]["disk_set"]
    assert res["status"] == "ok"
    assert res["train_examples"] == 42  # 40 + the 2 repeats (given splits keep them), the empty text dropped
    assert sum(res["test_pred_counts"]) == 10  # the given test split, not 10% carved
    assert res["data_dropped"] == {"missing_label": 0, "empty_text": 2, "duplicate": 0}


def test_drop_missing_drops_and_counts(sweep) -> None:
    res = sweep[0]["gaps_set"]
    assert res["status"] == "ok" and res["train_examples"] == 48
    assert res["data_dropped"] == {"missing_label": 3, "empty_text": 0, "duplicate": 0}


def test_each_reason_prints_one_line(sweep) -> None:
    lines = [line for line in sweep[1].splitlines() if line.startswith("[lora-exp] data:")]
    assert lines.count("[lora-exp] data: dropped 2 rows with an empty text") == 5  # 4 single tables + the dict
    assert lines.count("[lora-exp] data: dropped 3 duplicate texts (first kept)") == 4
    assert lines.count("[lora-exp] data: dropped 3 rows without a label (data.drop_missing=true)") == 1
    assert len(lines) == 10


def test_missing_labels_are_one_line_and_exit_2_under_the_csv_alias(tmp_path: Path) -> None:
    paths = write_files(tmp_path)
    run = tmp_path / "run"
    args = [*RUN, "data=csv", f"data.path={paths['gaps_set.csv']}", *COLUMNS, f"hydra.run.dir={run}"]
    proc = cli([*args, f"data.cache_dir={tmp_path / 'hf'}"], tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == [
        "error: data.label_column='sentiment': 3 rows have no label (data rows 4, 5, 6; data row 1 is the first row "
        "after any header); fix the file or set data.drop_missing=true"
    ]
    saved = json.loads((run / "results.json").read_text())
    assert saved["status"] == "failed" and saved["failure"] == "config" and saved["reason"] == errors[0][7:]


def test_unknown_extension_is_one_line_before_the_run_dir(tmp_path: Path) -> None:
    (tmp_path / "reviews.xlsx").write_bytes(b"PK\x03\x04")
    run = tmp_path / "run"
    proc = cli([*RUN, "data=files", f"data.path={tmp_path / 'reviews.xlsx'}", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: data.path={str(tmp_path / 'reviews.xlsx')!r}: unknown file format '.xlsx'; ")
    assert "supported: .csv .tsv .tab .json .jsonl .ndjson .parquet .pq .arrow .feather" in errors[0]
    assert not run.exists()


def test_csv_alias_is_files_under_its_old_name(tmp_path: Path) -> None:
    path = tmp_path / "reviews.tsv"
    frame().to_csv(path, sep="\t", index=False)
    old, new = (make_cfg(["model=tiny_bert", group, f"data.path={path}"]) for group in ("data=csv", "data=files"))
    assert resolved_dict(old)["data"] == resolved_dict(new)["data"] and new.data.source == "files"
    legacy = resolved_dict(new)
    legacy["data"]["source"] = "csv"  # what data=csv recorded before the rename: the same job
    assert config_hash(legacy) == config_hash(new)
