"""A tiny ``lora-exp bench`` run: alternating contenders, equal settings, speedup as the ratio of medians, window
FLOPs per batch length."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from lora_exp.bench import run as bench


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
