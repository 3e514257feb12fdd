"""`lora-exp bench`: both contenders on the same work, alternated, with equal recorded settings (a real bench run:
tests/e2e/test_bench_runs.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from lora_exp.bench import run as bench
from lora_exp.errors import LoraExpError


def test_step_window_times_only_its_steps_and_counts_its_batches() -> None:
    window = bench.StepWindow(2, 3, torch.device("cpu"))
    collate = window.collate(lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    masks = [torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), torch.tensor([[1] * 8, [1] * 8])] * 3
    start = time.perf_counter()
    for i, mask in enumerate(masks[:5]):
        collate([{"input_ids": m, "attention_mask": m, "labels": torch.tensor(i)} for m in mask])
        if i >= 2:
            time.sleep(0.05)  # only the window's steps take time
        window.step()
    got, wall = window.result(), time.perf_counter() - start
    assert got["samples"] == 6 and got["real_tokens"] == 5 + 16 + 5 and got["padded_tokens"] == 8 + 16 + 8
    assert got["batch_shapes"] == [[2, 4], [2, 8], [2, 4]]
    assert 0.15 <= got["seconds"] <= wall  # the three timed steps' sleeps, nothing of the two warm-up steps'


def test_peak_flops_by_gpu_model_and_precision() -> None:
    from lora_exp.bench.contenders import matmul_precision, peak_flops

    assert peak_flops("NVIDIA H200 NVL", "bf16") == 835e12 < peak_flops("NVIDIA H200", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 NVL", "fp16") == 835e12 and peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "tf32") == 494.5e12 and peak_flops("NVIDIA H200", "fp32") == 67e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12 and peak_flops(None, "bf16") is None
    assert matmul_precision("bf16") == "bf16"
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert matmul_precision("fp32") == "fp32"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert matmul_precision("fp32") == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_peak_table() -> None:
    assert bench.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.peak_bf16_flops("NVIDIA H200") == 989e12
    assert bench.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench.peak_bf16_flops("NVIDIA GeForce GTX 1080") is None
    assert bench.peak_bf16_flops(None) is None


def test_too_few_repetitions_is_a_one_line_error() -> None:
    with pytest.raises(LoraExpError, match=r"--reps=2 must be >= 3"):
        bench.main("--reps", "2")


def test_imdb_like_texts_have_imdb_lengths(tmp_path: Path) -> None:
    from lora_exp.bench.gpu_acceptance import write_imdb_like
    from lora_exp.models.text import _tiny_tokenizer

    shape = write_imdb_like(tmp_path / "r.csv", n=400)
    texts = [line.rsplit(",", 1)[0] for line in (tmp_path / "r.csv").read_text().splitlines()[1:]]
    lengths = sorted(len(ids) for ids in _tiny_tokenizer()(texts, truncation=True, max_length=512)["input_ids"])
    assert 200 <= lengths[200] <= 260  # IMDB's median is ~230 tokens
    assert lengths[200] == shape["median_tokens_after_cut"]
    assert 0.01 < sum(n == 512 for n in lengths) / 400 < 0.2  # a long tail, cut at 512


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_gpu_acceptance_without_cuda_is_a_one_line_error(tmp_path: Path) -> None:
    from lora_exp.bench import gpu_acceptance

    with pytest.raises(LoraExpError, match="no CUDA device is visible"):
        gpu_acceptance.main(["--out", str(tmp_path / "s.json")])
    assert not (tmp_path / "s.json").exists()


def test_gpu_acceptance_summary_targets_from_the_stages() -> None:
    """The one JSON's targets, from stage outputs shaped as the stages write them."""
    from lora_exp.bench.gpu_acceptance import targets

    def spread(v: float) -> dict:
        return {"median": v, "min": v, "max": v}

    bench_summary = [
        {"method": "lora", "compile": c, "contender": "lora_exp", "mfu": spread(m)}
        for c, m in ((False, 0.2), (True, 0.35))
    ]
    sweep = [
        {"method": "lora", "status": "ok", "peak_vram_bytes": 3, "peak_vram_reserved_bytes": 4, "base_dtype": "bf16"},
        {"method": "full", "status": "ok", "peak_vram_bytes": 10, "peak_vram_reserved_bytes": 16, "base_dtype": "fp32"},
    ]
    for row, ratio in zip(sweep, (0.9, 1.2)):
        row.update(mem_predicted_peak_bytes=row["peak_vram_bytes"], mem_measured_over_predicted=ratio)
    summary = {
        "bench": {"summary": bench_summary, "speedup": {"lora": 1.5, "lora+compile": 2.0}, "equal_precision": True},
        "sweep": {"rows": sweep},
        "latency": {"merged_over_base": {"batch_1": 1.01, "batch_32": 1.2}},
    }
    got = targets(summary)
    assert (got["lora_mfu"], got["lora_mfu_compiled"], got["lora_speedup_vs_hf_peft_compiled"]) == (0.2, 0.35, 2.0)
    assert got["lora_over_full_measured_peak"] == 0.3 and got["lora_over_full_reserved_peak"] == 0.25
    assert got["base_dtype"] == {"lora": "bf16", "full": "fp32"}
    assert got["met"] == {
        "speedup_at_least_3x": False,
        "mfu_at_least_30pct": False,
        "lora_peak_at_most_half_of_full": True,
        "measured_over_predicted_within_15pct": False,  # full at 1.2
        "qlora_measured_over_predicted_within_15pct": None,  # the QLoRA stage did not run
        "merged_adds_no_latency": False,  # batch 32 at 1.2
    }
    assert targets({"bench": {}, "sweep": {}})["met"]["lora_peak_at_most_half_of_full"] is None  # nothing ran


def test_gpu_acceptance_qlora_stage_targets_and_jobs() -> None:
    from lora_exp.bench.gpu_acceptance import QLORA_BASES, qlora_command, targets
    from lora_exp.config.checks import validate
    from tests.helpers.configs import make_cfg

    rows = [
        {"status": "ok", "base_dtype": b, "peak_vram_bytes": p, "mem_measured_over_predicted": r}
        for b, p, r in (("bf16", 400, 1.05), ("nf4", 300, 1.1), ("int8", 500, 0.9))
    ]
    got = targets({"bench": {}, "sweep": {}, "qlora": {"rows": rows}})
    assert got["qlora_peak_over_bf16_base"] == {"bf16": 1.0, "nf4": 0.75, "int8": 1.25}
    assert got["met"]["qlora_measured_over_predicted_within_15pct"] is True
    rows[1]["mem_measured_over_predicted"] = 1.3
    assert (
        targets({"bench": {}, "sweep": {}, "qlora": {"rows": rows}})["met"][
            "qlora_measured_over_predicted_within_15pct"
        ]
        is False
    )
    cmd = qlora_command(Path("/tmp/q"), 60, ["data.cache_dir=/tmp/hf"])
    overrides = cmd[cmd.index("+sweep=qlora") :]
    assert f"model.base_dtype={','.join(QLORA_BASES)}" in overrides
    for base in QLORA_BASES:  # each job of the stage composes and validates
        job = [o for o in overrides if not o.startswith(("model.base_dtype=", "hydra."))] + [f"model.base_dtype={base}"]
        cfg = make_cfg(job)
        validate(cfg)
        assert (cfg.method.name, cfg.trainer.max_steps, cfg.trainer.precision) == ("lora", 60, "bf16")
