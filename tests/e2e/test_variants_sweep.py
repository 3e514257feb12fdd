"""`lora-exp -m +sweep=variants` through the CLI: every arm trains and is labelled (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers.sweeps import VARIANT_LABELS, label, sweep_jobs


@pytest.mark.slow
def test_variants_sweep_runs_each_job(reviews: Path, tmp_path: Path) -> None:
    """`lora-exp -m +sweep=variants` on the tiny model, 2 steps per job: every arm trains and is counted."""
    import json

    from tests.helpers.configs import tiny_run
    from tests.helpers.processes import cli

    sweep = tmp_path / "sweep"
    # hidden 64: LoRA-GA at r=32 needs 2r <= min(out, in) of every layer (tiny_bert's 32 is too small)
    wide = ["model.hidden_size=64", "model.ffn_size=128"]
    args = ["-m", "+sweep=variants", *tiny_run(reviews, tmp_path), *wide, "trainer.max_steps=2", "logger=none"]
    proc = cli([*args, "trainer.eval_every=2", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = []
    for res_path in sorted(sweep.glob("*/results.json")):
        res = json.loads(res_path.read_text())
        cfg = OmegaConf.load(res_path.parent / "config.yaml")
        runs.append((label(cfg), cfg, res))
    assert len(runs) == 41 and all(res["status"] == "ok" for _, _, res in runs), [r for *_, r in runs][:1]
    assert proc.stderr.count("skip: this job already finished") == 52 - 41  # VeRA's r, the references' r, targets
    arms = {o.split("=", 1)[1] for o, *_ in sweep_jobs("variants")}
    assert {p.parent.name.split("_", 1)[1] for p in sweep.glob("*/results.json")} == arms  # dirs named by preset
    by = {(lab, cfg.lora.r, tuple(cfg.lora.targets)): res for lab, cfg, res in runs}
    qv = ("q", "v")
    # DoRA = LoRA's A/B + one magnitude per output row of each adapted layer (2 layers, hidden 64 here).
    assert by[("dora", 8, qv)]["adapter_params"] == by[("lora", 8, qv)]["adapter_params"] + 2 * 2 * 64
    assert by[("lora", 32, qv)]["adapter_params"] == 4 * by[("lora", 8, qv)]["adapter_params"]
    assert by[("pissa", 8, qv)]["adapter_params"] == by[("lora", 8, qv)]["adapter_params"]
    bitfit = by[("bitfit", 8, qv)]
    assert bitfit["adapter_params"] == 0 and bitfit["other_trainable_params"] > 0
    assert by[("frozen", 8, qv)]["other_trainable_params"] == 0
    saved = json.loads(next(sweep.glob("*/adapter/adapter_config.json")).read_text())
    assert "variant" in saved and "init" in saved
    assert {res["variant"] for *_, res in runs} == VARIANT_LABELS
