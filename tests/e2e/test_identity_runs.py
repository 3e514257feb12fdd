"""Runs that resolve alike (auto vs explicit precision) pool in the report; an fp32 run of the same seed does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_exp import device as devices
from lora_exp.analysis import report


def test_auto_and_explicit_runs_that_resolve_alike_pool_and_fp32_does_not(
    tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lora_exp.training.loop import train

    quick = ("trainer.max_steps=2", "trainer.epochs=1", "save_weights=false")
    for name, native, precision, seed in (
        ("auto_bf16", True, "auto", 1),  # an AVX512-BF16 machine: auto -> bf16
        ("explicit_bf16", True, "bf16", 2),
        ("auto_avx2", False, "auto", 1),  # an AVX2 machine: auto -> fp32, same seed as the first
    ):
        monkeypatch.setattr(devices, "cpu_computes_bf16", lambda native=native: native)
        res = train(tiny_cfg(*quick, f"trainer.precision={precision}", f"trainer.seed={seed}"), tmp_path / name)
        assert res["precision"] == ("bf16" if native else "fp32") and res["device_type"] == "cpu"
    df = report.load_runs(tmp_path)
    assert len(df) == 3  # the AVX2 run is not taken for a rerun of the bf16 one (same seed)
    summary = report.summarize(df)
    assert sorted(zip(summary["precision"], summary["seeds"])) == [("bf16", 2), ("fp32", 1)]
