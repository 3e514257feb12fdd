"""`lora-exp bench`: both contenders on the same work, alternated, with equal recorded settings."""

from __future__ import annotations

import json
import statistics
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
        for r in (a, b):  # the window holds exactly `steps` full batches, each padded to a multiple of 8
            assert r["steps_timed"] == 3 and r["samples"] == 3 * 8
            assert r["padded_length_gcd"] % 8 == 0
            assert 0 < r["real_tokens"] <= r["padded_tokens"]
            assert r["samples_per_s"] == pytest.approx(r["samples"] / r["seconds"])


def test_speedup_is_the_ratio_of_medians(result: dict) -> None:
    def median(name: str) -> float:
        return statistics.median(r["samples_per_s"] for r in result["rows"] if r["contender"] == name)

    assert result["speedup"]["lora"] == pytest.approx(median("lora_exp") / median("hf_trainer"))
    spread = next(s for s in result["summary"] if s["contender"] == "hf_trainer")["samples_per_s"]
    assert spread["min"] <= spread["median"] <= spread["max"]
    assert result["flops"]["lora"]["flops_per_step"] > 0
    assert result["peak_bf16_flops"] is None and result["rows"][0]["mfu"] is None  # CPU: no MFU


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
