"""The sampled memory step is the run's longest batch; figures show one memory quantity on every device."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from lora_exp.analysis import figures
from lora_exp.measure import timing
from lora_exp.training import job as job_setup
from lora_exp.training import loop


def test_planning_the_probe_leaves_the_data_order_alone(tiny_cfg, tmp_path: Path) -> None:
    job = job_setup.setup(tiny_cfg(), tmp_path / "run", False, timing.RssPeak())
    before = job.generator.get_state()
    first = [b["input_ids"] for b in job.loaders.train]
    job.generator.set_state(before)
    assert loop.plan_probe(job) is not None
    assert torch.equal(job.generator.get_state(), before)
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(first, job.loaders.train))


def test_figures_show_the_predicted_peak_when_any_run_lacks_a_gpu_measurement() -> None:
    mixed = pd.DataFrame(
        {"peak_vram_gib": [2.0, float("nan")], "predicted_peak_gib": [1.5, 0.5], "peak_host_rss_gib": [9, 9]}
    )
    values, label = figures.peak_memory(mixed)
    assert list(values) == [1.5, 0.5] and "predicted" in label and "every device" in label
