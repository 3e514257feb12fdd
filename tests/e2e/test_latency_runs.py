"""``lora-exp bench`` latency mode: the JSON holds every batch size, model and statistic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_exp.bench import run as bench
from lora_exp.errors import LoraExpError


def test_latency_json_has_every_batch_model_and_statistic(reviews: Path, tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    args = ["--latency", "--reps", "3", "--warmup", "1", "--out", str(out), "model=tiny_bert"]
    args += [
        f"data.path={reviews}",
        f"data.cache_dir={tmp_path / 'hf'}",
        "trainer.device=cpu",
        "trainer.precision=fp32",
    ]
    assert bench.main(*args) == 0
    result = json.loads(out.read_text())
    for batch in ("batch_1", "batch_32"):
        for model in ("base", "unmerged", "merged"):
            row = result["latency"][batch][model]
            assert row["reps"] == 3 and 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert result["merged_max_abs_logit_diff"][batch] < 1e-4  # merged computes what unmerged does
        assert result["merged_over_base"][batch] == pytest.approx(
            result["latency"][batch]["merged"]["median_ms"] / result["latency"][batch]["base"]["median_ms"]
        )
    assert result["seq_len"]["batch_32"] % 8 == 0 and result["seq_len"]["batch_1"] <= result["seq_len"]["batch_32"]
    assert result["precision"] == "fp32" and result["device"] == "cpu"
    with pytest.raises(LoraExpError, match="already exists"):  # never overwritten
        bench.main(*args)
