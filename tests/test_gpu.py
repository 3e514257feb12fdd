"""Training on CUDA: bf16 and fp16 end to end, peak memory, predicted vs measured peak, resume, cuda:N.

Marked ``gpu`` and skipped without CUDA (``pytest -m gpu`` on a GPU machine; ``scripts/gpu_acceptance.sh``
runs them). Tiny models: seconds each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from lora_exp.bench import run as bench
from lora_exp.training.loop import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _bf16_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def gpu_overrides(*extra: str) -> tuple[str, ...]:
    return ("trainer.device=cuda", "trainer.checkpoint_every=0", *extra)


@pytest.mark.parametrize(
    "precision",
    [
        pytest.param("bf16", marks=pytest.mark.skipif(not _bf16_capable(), reason="bf16 needs capability >= 8.0")),
        "fp16",
    ],
)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_low_precision_training_ends_ok_with_peak_memory(tiny_cfg, tmp_path: Path, precision: str, method: str):
    res = train(tiny_cfg(*gpu_overrides(f"trainer.precision={precision}", f"method={method}")), tmp_path / "run")
    assert res["status"] == "ok" and res["precision"] == precision
    assert res["device"].startswith("cuda")
    assert res["peak_vram_bytes"] > 0
    assert res["best_val_loss"] == res["best_val_loss"]  # not NaN
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["peak_vram_bytes"] == res["peak_vram_bytes"]


@pytest.mark.parametrize("method", ["full", "lora", "frozen"])
def test_measured_peak_is_near_the_predicted_peak(tiny_cfg, tmp_path: Path, method: str) -> None:
    res = train(tiny_cfg(*gpu_overrides(f"method={method}", "trainer.batch_size=32")), tmp_path / "run")
    predicted, measured = res["mem_predicted_peak_bytes"], res["mem_measured_peak_bytes"]
    assert predicted > 0 and measured > 0
    assert res["mem_measured_over_predicted"] == pytest.approx(measured / predicted)
    assert 0.5 <= res["mem_measured_over_predicted"] <= 2.0  # a sanity bound; the target is 0.85-1.15


class Interrupt(Exception):
    """Raised from inside an optimizer step: the process 'dies' mid-run."""


def test_resume_on_gpu_finishes_like_the_straight_run(tiny_cfg, tmp_path: Path) -> None:
    cfg = tiny_cfg("trainer.device=cuda", "trainer.checkpoint_every=1", "trainer.epochs=3")
    straight = train(cfg, tmp_path / "straight")
    steps = {"n": 0}

    def die_at_step_5(*_: object) -> None:
        steps["n"] += 1
        if steps["n"] == 5:
            raise Interrupt

    hook = register_optimizer_step_post_hook(die_at_step_5)
    try:
        with pytest.raises(Interrupt):
            train(cfg, tmp_path / "resumed")
    finally:
        hook.remove()
    assert (tmp_path / "resumed" / "checkpoint").is_dir()
    resumed = train(cfg, tmp_path / "resumed", resume=True)
    assert resumed["status"] == "ok" and resumed["resumed"] is True
    assert resumed["steps"] == straight["steps"]
    assert resumed["data_order_digest"] == straight["data_order_digest"]
    # CUDA kernels are not bitwise deterministic unless trainer.deterministic: equal within a tolerance
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], abs=0.05)


def test_last_visible_gpu_is_used(tiny_cfg, tmp_path: Path) -> None:
    last = torch.cuda.device_count() - 1
    res = train(tiny_cfg(*gpu_overrides(f"trainer.device=cuda:{last}")), tmp_path / "run")
    assert res["status"] == "ok" and res["device"] == f"cuda:{last}"
    assert res["peak_vram_bytes"] > 0
    assert torch.cuda.max_memory_allocated(last) > 0


def test_bench_on_gpu_has_equal_precision_and_mfu(reviews: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    bench.main(
        "--warmup", "2", "--steps", "4", "--batch", "16", "--methods", "lora", "--out", str(out),
        "model=tiny_bert", f"data.path={reviews}", f"data.cache_dir={tmp_path / 'hf'}", "trainer.device=cuda",
    )  # fmt: skip
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert len({json.dumps(r["precision_flags"]) for r in rows}) == 1  # both sides, every repetition
    assert {r["device"] for r in rows} == {rows[0]["device"]} and rows[0]["device"].startswith("cuda")
    if result["peak_bf16_flops"]:
        assert all(0 < r["mfu"] < 1 for r in rows)
