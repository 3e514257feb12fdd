"""The GPU stage's pack bench (``lora_exp.bench.pack_bench``) on its CPU path: packs of 1 and 2 on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

from lora_exp.bench import gpu_acceptance, pack_bench


def test_pack_bench_writes_one_row_per_pack_size(reviews: Path, tmp_path: Path) -> None:
    out = tmp_path / "packs.json"
    overrides = ["model=tiny_bert", f"data.path={reviews}", f"data.cache_dir={tmp_path / 'hf'}", "trainer.device=cpu"]
    assert (
        pack_bench.main(["--sizes", "1,2", "--steps", "2", "--out", str(out), *overrides, "trainer.batch_size=8"]) == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["pack"], r["ok"]) for r in rows] == [(1, 1), (2, 2)]
    for r in rows:
        assert r["samples_per_s_per_job"] > 0 and r["peak_host_rss_gib"] > 0
        assert r["mfu"] is None and r["peak_vram_gib"] is None  # CPU: no peak FLOP/s, no VRAM
    assert rows[1]["predicted_pack_peak_gib"] >= rows[0]["predicted_pack_peak_gib"]
    assert gpu_acceptance.STAGE_CAPS["packs"] <= 240
