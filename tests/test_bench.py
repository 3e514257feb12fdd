"""`lora-exp bench` runs every contender on the same work and reports comparable rows."""

from __future__ import annotations

import json
from pathlib import Path

from .test_train import cli


def test_bench_runs_hf_peft_and_ours_side_by_side(reviews: Path, tmp_path: Path) -> None:
    proc = cli(
        [
            "bench",
            "--steps",
            "3",
            "--batch",
            "8",
            "--methods",
            "lora",
            "--out",
            str(tmp_path / "b"),
            "model=tiny_bert",
            f"data.path={reviews}",
            f"data.cache_dir={tmp_path / 'hf'}",
            "trainer.device=cpu",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "b" / "bench.jsonl").read_text().splitlines()]
    assert [r["contender"] for r in rows] == ["hf_trainer_peft", "hf_trainer_peft_grouped", "lora_exp"]
    assert all(r["samples_per_s"] > 0 and r["steps"] == 3 for r in rows)
    # the same trainable set: PEFT's LoRA (r=8 on query/value) + classifier equals ours
    assert rows[0]["trainable_params"] == rows[2]["trainable_params"]
    assert "vs HF Trainer defaults" in (tmp_path / "b" / "bench.md").read_text()
