"""`lora-exp bench`: both contenders on the same work, alternated, with equal recorded settings."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest
import torch

from lora_exp.bench import run as bench
from lora_exp.errors import LoraExpError


@pytest.fixture(scope="module")
def result(reviews: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    code = bench.main(
        "--warmup", "2", "--steps", "3", "--batch", "8", "--reps", "3", "--methods", "lora",
        "--out", str(out),
        "model=tiny_distilbert", f"data.path={reviews}", f"data.cache_dir={tmp / 'hf'}", "trainer.device=cpu",
        "trainer.precision=bf16",
    )  # fmt: skip
    assert code == 0
    return json.loads(out.read_text())


def test_contenders_alternate_over_three_repetitions(result: dict) -> None:
    order = [(r["rep"], r["contender"]) for r in result["rows"]]
    assert order == [(i, c) for i in range(3) for c in ("lora_exp", "hf_trainer")]


def test_both_sides_record_the_same_settings(result: dict) -> None:
    ours = [r for r in result["rows"] if r["contender"] == "lora_exp"]
    hf = [r for r in result["rows"] if r["contender"] == "hf_trainer"]
    for a, b in zip(ours, hf):
        # precision flags as each side actually ran them (ours from results.json, HF from its TrainingArguments)
        assert a["precision_flags"] == b["precision_flags"] == {"bf16": True, "fp16": False}
        assert a["batch_size"] == b["batch_size"] == 8
        assert a["pad_to_multiple_of"] == b["pad_to_multiple_of"] == 8
        assert a["group_by_length"] == b["group_by_length"] is True
        assert a["device"] == b["device"] == "cpu"
        # the same trainable set: PEFT's LoRA on our resolved targets + our head list (DistilBERT's two modules)
        assert a["trainable_params"] == b["trainable_params"]
        assert a["batches_digest"] == b["batches_digest"]  # the same batches in the same order (one sampler)
        assert a["batch_shapes"] == b["batch_shapes"]
        assert a["non_blocking"] is b["non_blocking"] is True  # host-to-device copies on both sides
        for r in (a, b):  # the window holds exactly `steps` full batches, each padded to a multiple of 8
            assert r["steps_timed"] == 3 and r["samples"] == 3 * 8
            assert r["padded_length_gcd"] % 8 == 0
            assert 0 < r["real_tokens"] <= r["padded_tokens"] == sum(n * length for n, length in r["batch_shapes"])
            assert r["warmup_steps"] == 10  # --warmup 2 raised: our one-off checks (updates 1 and 10) stay outside


def test_speedup_is_the_ratio_of_medians(result: dict) -> None:
    def median(name: str) -> float:
        return statistics.median(r["samples_per_s"] for r in result["rows"] if r["contender"] == name)

    assert result["speedup"]["lora"] == pytest.approx(median("lora_exp") / median("hf_trainer"))
    spread = next(s for s in result["summary"] if s["contender"] == "hf_trainer")["samples_per_s"]
    assert spread["min"] <= spread["median"] <= spread["max"]
    assert result["peak_bf16_flops"] is None and result["rows"][0]["mfu"] is None  # CPU: no MFU


def test_window_flops_count_each_batch_at_its_own_length(result: dict, reviews: Path) -> None:
    """Each row's FLOPs equal FlopCounterMode's count of every window batch at its own shape, counted here."""
    from torch.utils.flop_counter import FlopCounterMode

    from lora_exp.config.schema import typed_config
    from lora_exp.training.job import build_model_for

    cfg = bench.job_config("lora", 10, 3, 8, ["model=tiny_distilbert", f"data.path={reviews}", "trainer.device=cpu"])
    _, model, _, _ = build_model_for(typed_config(cfg))
    counted: dict[tuple[int, int], int] = {}
    for n, length in {tuple(s) for r in result["rows"] for s in r["batch_shapes"]}:
        ids = torch.randint(5, 100, (n, length))
        with FlopCounterMode(display=False) as counter, torch.autocast("cpu", dtype=torch.bfloat16):
            model(
                input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(n, dtype=torch.long)
            ).loss.backward()
        counted[(n, length)] = counter.get_total_flops()
    for r in result["rows"]:
        assert r["flops"] == sum(counted[tuple(s)] for s in r["batch_shapes"])
    lengths = {length for r in result["rows"] for _, length in r["batch_shapes"]}
    assert len(lengths) > 1  # batches of several lengths: a single mean length would not give these counts


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
        "merged_adds_no_latency": False,  # batch 32 at 1.2
    }
    assert targets({"bench": {}, "sweep": {}})["met"]["lora_peak_at_most_half_of_full"] is None  # nothing ran
