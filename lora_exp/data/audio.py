"""Audio inputs: clips resampled to the feature extractor's rate and its features (log-mel for Whisper),
computed once per clip into the cache (``featurize``: signals in the splits, as the GW generator makes them, or
clip paths read by ``data.audio_files.ClipReader``); DataLoaders over them; reading ``.wav`` / ``.npy`` files for
``predict``."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import scipy
import torch
import transformers
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from lora_exp.data import assets
from lora_exp.data.audio_files import ClipReader, resample
from lora_exp.data.text import ROW, Loaders
from lora_exp.errors import LoraExpError


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


FEATURES_FORMAT = 1  # bump when what a features file holds changes: older files are then never read


def features_key(split: Any, fe: Any, source_rate: int, reader: ClipReader | None = None) -> str:
    """What a split's features depend on, hashed: its clips and labels, their rate, every option of the
    extractor (its class, window and mel settings), the versions of the code that computes them
    (transformers' extractor, scipy's resampler) and the file format. 16 hex digits of sha256. With ``reader``
    the ``audio`` column holds paths: the reader's settings and each file's path, size and mtime count instead
    of the samples (no clip is read to find a cached file)."""
    opts = {
        "format": FEATURES_FORMAT,
        "source_rate": int(source_rate),
        "class": type(fe).__name__,
        "versions": [transformers.__version__, scipy.__version__],
        **fe.to_dict(),
    }
    digest = hashlib.sha256(json.dumps(opts, sort_keys=True, default=str).encode())
    if reader is not None:
        digest.update(reader.digest(split["audio"]).digest())
        labels = np.asarray(split["label"])
    else:
        rows = split.with_format("numpy")[:]  # every row, column by column
        audio, labels = rows["audio"], rows["label"]
        for clip in audio if audio.dtype == object else [audio]:  # object: clips of different lengths
            digest.update(np.ascontiguousarray(clip, np.float32).tobytes())
    floats = np.issubdtype(labels.dtype, np.floating)  # scores (regression) hash as floats
    digest.update(np.asarray(labels, np.float64 if floats else np.int64).tobytes())
    return digest.hexdigest()[:16]


def _feature_types(collate: AudioCollator, split: Any, reader: ClipReader | None) -> datasets.Features:
    """Arrow types of the model inputs (fixed shapes, from one clip) plus ``labels``."""
    types = {}
    first = reader(split[0]["audio"]) if reader is not None else split.with_format("numpy")[0]["audio"]
    for name, value in collate.features([first]).items():
        shape, dtype = tuple(value.shape[1:]), str(value.numpy().dtype)
        if len(shape) == 2:
            types[name] = datasets.Array2D(shape, dtype)
        else:
            types[name] = datasets.Sequence(datasets.Value(dtype), length=shape[0])
    types["labels"] = split.features["label"]
    return datasets.Features(types)


def _encode(audio: list, label: list, collate: AudioCollator, reader: ClipReader | None) -> dict[str, Any]:
    clips = [reader(path) for path in audio] if reader is not None else list(audio)
    return {**{k: v.numpy() for k, v in collate.features(clips).items()}, "labels": label}


@contextmanager
def _progress_bars() -> Iterator[None]:
    """datasets' progress bars on for a long map (data/text.py turns them off for its sub-second steps)."""
    was_off = datasets.are_progress_bars_disabled()
    datasets.enable_progress_bars()
    try:
        yield
    finally:
        if was_off:
            datasets.disable_progress_bars()


def featurize(
    splits: Any, fe: Any, source_rate: int, folder: Path | None = None, reader: ClipReader | None = None
) -> datasets.DatasetDict:
    """Every clip's model inputs (Whisper: log-mel ``input_features``) and ``labels``, computed once.

    ``audio`` holds signals at ``source_rate``, or with ``reader`` each clip's path (read, resampled to the
    extractor's rate, which is then ``source_rate``, and cut or padded by the reader).

    ``datasets.map`` writes one Arrow file per split into ``folder`` (``$LORA_EXP_CACHE/audio_features``),
    named by ``features_key``: later runs on the same clips with the same extractor (other methods, seeds,
    learning rates) read them back memory-mapped instead of resampling and computing log-mels per batch.
    """
    if reader is not None and reader.max_seconds is None and getattr(fe, "n_samples", None) is None:
        raise LoraExpError(
            f"data.max_seconds is needed for this model's {type(fe).__name__} (no fixed window): clips are cut "
            "or zero-padded to it, e.g. data.max_seconds=2"
        )
    folder = Path(folder) if folder is not None else assets.cache_dir() / "audio_features"
    folder.mkdir(parents=True, exist_ok=True)
    collate, out, computed = AudioCollator(fe, source_rate), {}, []
    start = time.perf_counter()
    for name, split in splits.items():
        key = features_key(split, fe, source_rate, reader)
        path = folder / f"{name}-{key}.arrow"
        if not path.exists():
            computed.append(name)
        with _progress_bars():
            out[name] = split.map(
                _encode,
                batched=True,
                batch_size=64,
                input_columns=["audio", "label"],
                remove_columns=split.column_names,
                features=_feature_types(collate, split, reader),
                fn_kwargs={"collate": collate, "reader": reader},
                cache_file_name=str(path),
                load_from_cache_file=True,
                new_fingerprint=key,  # what the file holds; datasets need not hash the extractor
                desc=f"audio features ({name})",
            )
    files = [f["filename"] for ds in out.values() for f in ds.cache_files]
    size = sum(Path(f).stat().st_size for f in files)
    how = f"computed once in {time.perf_counter() - start:.1f} s" if computed else "read back (computed earlier)"
    shape = " x ".join(map(str, np.shape(out["train"].with_format("numpy")[0][fe.model_input_names[0]])))
    print(
        f"[lora-exp] audio features ({shape} per clip) of {sum(len(d) for d in out.values()):,} clips: {how}, "
        f"{size / 2**20:.0f} MiB in {folder}"
    )
    return datasets.DatasetDict(out)


class ArrowBatches:
    """The loaders' collate for one Arrow read per batch: columns as tensors. A ``row`` column is taken out and,
    when ``extra`` is set (a frozen-feature cache's look-up), its stored outputs join the batch, as
    ``data.text.PaddedBatches`` does for text."""

    def __init__(self) -> None:
        self.extra: Any = None

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items() if k != ROW}
        if ROW in batch and self.extra is not None:
            out.update(self.extra(torch.as_tensor(np.asarray(batch[ROW])), 0))
        return out


def make_loaders(
    feats: datasets.DatasetDict, batch_size: int, eval_batch_size: int, generator: torch.Generator
) -> Loaders:
    """Train (shuffled from ``generator``) / validation / test DataLoaders over ``featurize``d splits.

    Each batch is one read of the Arrow file (a ``BatchSampler`` of indices, ``batch_size=None``): the same
    examples in the same order as a plain ``DataLoader(batch_size=...)`` over a ``RandomSampler``.
    """
    own = {"generator": torch.Generator().manual_seed(0)}  # the global RNG (dropout) is left alone
    collate = ArrowBatches()

    def loader(split: datasets.Dataset, sampler: Any, size: int) -> DataLoader:
        batches = BatchSampler(sampler, size, drop_last=False)
        return DataLoader(split.with_format("numpy"), sampler=batches, batch_size=None, collate_fn=collate, **own)

    train = feats["train"]
    return Loaders(
        train=loader(train, RandomSampler(train, generator=generator), batch_size),
        validation=loader(feats["validation"], SequentialSampler(feats["validation"]), eval_batch_size),
        test=loader(feats["test"], SequentialSampler(feats["test"]), eval_batch_size),
        collate=collate,
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
