"""``data=glue data.task=...`` on a stubbed ``datasets.load_dataset`` serving GLUE's own layout: each task's
columns and label kind, its validation split (MNLI: matched) as the test split, validation carved from train."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from lora_exp.config.schema import typed_config
from lora_exp.data import text as text_data
from tests.helpers.configs import make_cfg
from tests.helpers.glue import NAMES, stub_load_dataset


@pytest.mark.parametrize("task", sorted(NAMES))
def test_every_glue_task_loads_from_the_stub(task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    monkeypatch.setattr(datasets, "load_dataset", stub_load_dataset(calls))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no reachability probe: the stub is all there is
    cfg = typed_config(make_cfg(["data=glue", f"data.task={task}", f"data.cache_dir={tmp_path}"]))
    splits = text_data.load_splits(cfg.data)
    assert calls == [("nyu-mll/glue", task)]
    assert {k: len(v) for k, v in splits.items()} == {"train": 54, "validation": 6, "test": 12}
    assert all(t.endswith(f" {i}") for t, i in zip(splits["test"]["text"], range(1000, 1012)))  # validation(_matched)
    pair = "text_pair" in splits["train"].column_names
    assert pair == (task not in ("cola", "sst2"))
    feature = splits["train"].features["label"]
    if NAMES[task] is None:
        assert feature.dtype == "float32" and max(splits["train"]["label"]) == 5.0
    else:
        assert feature.names == NAMES[task] and -1 not in splits["test"]["label"]
