"""Audio batches: clips resampled to the feature extractor's rate, its features (log-mel for Whisper),
DataLoaders over ``audio`` + ``label`` splits, and reading ``.wav`` / ``.npy`` files for ``predict``."""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.signal import resample_poly
from torch.utils.data import DataLoader, RandomSampler

from lora_exp.data.text import Loaders
from lora_exp.errors import LoraExpError


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased) along the last axis, float32."""
    if rate == target:
        return np.asarray(x, np.float32)
    g = gcd(int(rate), int(target))
    return resample_poly(x, target // g, rate // g, axis=-1).astype(np.float32)


@dataclass
class AudioCollator:
    """Rows ``{"audio": 1-D array at source_rate, "labels": int}`` -> model inputs.

    Resampled to the extractor's rate, then the extractor pads/truncates to its window (``fe.n_samples``:
    30 s for stock Whisper, ``model.audio_max_seconds`` after ``set_window``).
    """

    feature_extractor: Any
    source_rate: int

    def features(self, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Inputs for a list of mono signals (no labels): what ``predict`` feeds the model."""
        fe = self.feature_extractor
        wav = [resample(np.asarray(a, np.float32), self.source_rate, fe.sampling_rate) for a in arrays]
        kw: dict[str, Any] = {"padding": "max_length", "max_length": getattr(fe, "n_samples", None)}
        if kw["max_length"] is None:  # extractors without a fixed window (wav2vec2): pad to the longest
            kw = {"padding": "longest"}
        enc = fe(wav, sampling_rate=fe.sampling_rate, truncation=True, return_tensors="pt", **kw)
        return {k: v for k, v in enc.items() if k in (fe.model_input_names[0], "attention_mask")}

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = self.features([r["audio"] for r in rows])
        out["labels"] = torch.as_tensor(np.array([int(r["labels"]) for r in rows]), dtype=torch.long)
        return out


def make_loaders(
    splits: Any,
    feature_extractor: Any,
    source_rate: int,
    batch_size: int,
    eval_batch_size: int,
    generator: torch.Generator,
) -> Any:
    """Train (shuffled from ``generator``) / validation / test DataLoaders over ``audio`` + ``label`` splits.

    ``splits`` is a ``DatasetDict`` (``data.load_splits`` for ``data.source=gw``). Features are computed per
    batch in the collator (30 s of Whisper features for 1,000 clips would hold ~1 GB).
    """

    collate = AudioCollator(feature_extractor, source_rate)
    own = {"generator": torch.Generator().manual_seed(0)}

    def rows(split: Any) -> Any:
        return split.rename_column("label", "labels").with_format("numpy")

    train = rows(splits["train"])
    return Loaders(
        train=DataLoader(
            train, batch_size=batch_size, sampler=RandomSampler(train, generator=generator), collate_fn=collate, **own
        ),
        validation=DataLoader(rows(splits["validation"]), batch_size=eval_batch_size, collate_fn=collate, **own),
        test=DataLoader(rows(splits["test"]), batch_size=eval_batch_size, collate_fn=collate, **own),
    )


def read_audio(path: str | Path) -> tuple[np.ndarray, int | None]:
    """A mono signal from ``.wav`` (its rate) or ``.npy`` (rate None: the caller states it); channels averaged."""
    path = Path(path)
    if path.suffix.lower() == ".wav":
        from scipy.io import wavfile

        rate, x = wavfile.read(path)
        x = x.astype(np.float32) / (np.iinfo(x.dtype).max if np.issubdtype(x.dtype, np.integer) else 1.0)
        return (x.mean(axis=1) if x.ndim == 2 else x), int(rate)
    if path.suffix.lower() == ".npy":
        x = np.load(path).astype(np.float32)
        return x.reshape(-1) if x.ndim > 1 else x, None
    raise LoraExpError(f"predict: {str(path)!r} is not a .wav or .npy file")
