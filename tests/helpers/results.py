"""Hand-written ``results.json`` files: the report and pairing tests build sweep folders without training."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(tmp: Path, name: str, **fields) -> None:
    """``tmp/name/results.json``: a finished LoRA run's fields, overridden by ``fields``."""
    base = {
        "status": "ok",
        "method": "lora",
        "targets": "q+v",
        "rslora": False,
        "lr": 1e-3,
        "seed": 1,
        "trainable_params": 100,
        "trainable_pct": 1.0,
        "peak_vram_bytes": None,
        "peak_host_rss_bytes": 2**30,
        "train_seconds": 10.0,
        "samples_per_s": 5.0,
        "best_val_acc": 0.8,
        "test_acc": 0.8,
        "history": [],
    }
    (tmp / name).mkdir(parents=True)
    (tmp / name / "results.json").write_text(json.dumps({**base, **fields}))
