"""The step sampled for the memory probe is the longest batch (and, among equals, one with optimizer state), in
real runs."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

from lora_exp.measure import timing
from lora_exp.training import job as job_setup
from lora_exp.training import loop


@pytest.fixture
def one_long_review(tmp_path: Path) -> Path:
    """128 short reviews (3-5 words) and one of 40 words: a single batch is much longer than the others."""
    rng, path = random.Random(0), tmp_path / "reviews.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(160):
            w.writerow([" ".join(rng.choices(["good", "bad", "film", "plot", "fun"], k=rng.randint(3, 5))), i % 2])
        w.writerow([" ".join(["long"] * 40), 1])
    return path


def _cfg(tiny_cfg, data: Path, *extra: str):  # noqa: ANN001, ANN202
    return tiny_cfg("data=csv", f"data.path={data}", "save_weights=false", *extra)


def _padded_tokens(cfg, tmp_path: Path) -> list[int]:  # noqa: ANN001
    """Every update's batch, as padded tokens, from the loaders the run builds (same data-order seed)."""
    job = job_setup.setup(cfg, tmp_path / "probe", False, timing.RssPeak())
    return [b["attention_mask"].numel() for _ in range(cfg.trainer.epochs) for b in job.loaders.train]


@pytest.mark.parametrize("epochs", [1, 2])
def test_the_sampled_step_is_the_longest_batch(tiny_cfg, tmp_path: Path, one_long_review: Path, epochs: int):
    cfg = _cfg(tiny_cfg, one_long_review, f"trainer.epochs={epochs}")
    tokens = _padded_tokens(cfg, tmp_path)
    res = loop.train(cfg, tmp_path / "run")
    longest = max(tokens)
    assert res["mem_sampled_tokens"] == longest == tokens[0] > 2 * sorted(tokens)[-epochs - 1]
    if epochs == 1:  # only the first update holds it: no optimizer state yet in that window
        assert res["mem_sampled_update"] == 0
        assert res["mem_predicted_peak_bytes"] - res["mem_window_predicted_bytes"] == res["mem_optimizer_bytes"]
    else:  # the second epoch starts with it too, with optimizer state: the run's real peak
        assert res["mem_sampled_update"] == len(tokens) // 2 and tokens[len(tokens) // 2] == longest
        assert res["mem_window_predicted_bytes"] == res["mem_predicted_peak_bytes"]


def test_of_equally_long_batches_one_with_optimizer_state_is_sampled(tiny_cfg, tmp_path: Path) -> None:
    cfg = tiny_cfg("trainer.epochs=1", "save_weights=false")  # the small corpus: several batches tie
    tokens = _padded_tokens(cfg, tmp_path)
    res = loop.train(cfg, tmp_path / "run")
    ties = [i for i, n in enumerate(tokens) if n == max(tokens)]
    assert len(ties) > 1 and ties[0] == 0 and res["mem_sampled_update"] == ties[1]
