"""Audio models (``model.task=audio``): build the model + feature extractor, the clip-length window, collate.

``build`` returns ``(feature_extractor, model, head)`` like ``models.build`` for text:
``AutoModelForAudioClassification`` + ``AutoFeatureExtractor`` from a Hub id / local folder, or a small
randomly initialised ``WhisperForAudioClassification`` (``model.source=tiny``, ``model.arch=whisper``).

Whisper's encoder insists on 30 s of input (3,000 mel frames, 1,500 positions; transformers#25744): a 2 s
clip padded to 30 s spends >90% of the encoder on padding. ``model.audio_max_seconds=S`` runs it on S
seconds instead: the sinusoidal/learned positional table is cut to its first ``S * 50`` rows (one position
per 2 mel frames of 10 ms), ``config.max_source_positions`` follows, and the feature extractor pads every
clip to S seconds only. The first rows of the table are exactly what a short clip padded to 30 s would
use, so pretrained weights keep their meaning; what changes is that attention no longer sees the padded
tail (the mean-pooled head then averages the clip, not mostly silence).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from scipy.signal import resample_poly
from torch import nn
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModelForAudioClassification,
    PreTrainedModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForAudioClassification,
)

from lora_exp.errors import LoraExpError
from lora_exp.hub import from_hub

TINY_BANNER = (
    "[lora-exp] model.source=tiny: a small RANDOMLY INITIALISED Whisper encoder (no pretrained audio model "
    "is available offline). This is a pipeline check, not the seed's science."
)


def tiny_whisper(cfg: DictConfig, num_labels: int) -> WhisperForAudioClassification:
    """``WhisperForAudioClassification`` from a ``WhisperConfig`` (real module names, random weights)."""
    conf = WhisperConfig(
        num_mel_bins=80,
        d_model=cfg.hidden_size,
        encoder_layers=cfg.layers,
        encoder_attention_heads=cfg.heads,
        encoder_ffn_dim=cfg.ffn_size,
        decoder_layers=1,  # unused by the classifier; WhisperConfig needs one
        decoder_attention_heads=cfg.heads,
        decoder_ffn_dim=cfg.ffn_size,
        classifier_proj_size=max(cfg.hidden_size // 2, 8),
        num_labels=num_labels,
    )
    return WhisperForAudioClassification(conf)


def head_modules(model: nn.Module) -> list[str]:
    """Everything outside the pretrained encoder (``models.find_head``: Whisper's ``projector``, ``classifier``
    and, with a weighted layer sum, the bare ``layer_weights``)."""
    from lora_exp.models import find_head

    return find_head(model)


def build(
    cfg: DictConfig, num_labels: int, id2label: dict[int, str] | None = None
) -> tuple[Any, PreTrainedModel, list[str]]:
    """Feature extractor, fp32 audio-classification model (its window set), head module paths."""
    if cfg.source == "tiny":
        if cfg.arch != "whisper":
            raise LoraExpError(f"model.arch={cfg.arch!r}: model.task=audio with model.source=tiny needs arch=whisper")
        print(TINY_BANNER)
        model, fe = tiny_whisper(cfg, num_labels), WhisperFeatureExtractor(feature_size=80)
    else:
        where = cfg.path
        if cfg.source == "package":
            raise LoraExpError("model.source=package has no audio model; use model.source=hub|local|tiny")
        kw = dict(trust_remote_code=bool(cfg.trust_remote_code))

        def load() -> tuple:
            config = AutoConfig.from_pretrained(where, num_labels=num_labels, **kw)
            m = AutoModelForAudioClassification.from_pretrained(where, config=config, dtype=torch.float32, **kw)
            return AutoFeatureExtractor.from_pretrained(where, **kw), m

        if cfg.source == "hub":
            fe, model = from_hub("model.path", where, load)
        else:
            try:
                fe, model = load()
            except (OSError, ValueError, RuntimeError) as err:
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise LoraExpError(f"model.path={where!r}: cannot load the audio model ({first})") from err
    if id2label:
        model.config.id2label = dict(id2label)
        model.config.label2id = {v: k for k, v in id2label.items()}
    if cfg.get("audio_max_seconds") is not None:
        set_window(model, fe, float(cfg.audio_max_seconds))
    return fe, model, head_modules(model)


def window_frames(fe: Any, seconds: float) -> int:
    """Mel frames in ``seconds`` (``seconds * rate / hop``); an error unless whole and even (conv stride 2)."""
    frames = seconds * fe.sampling_rate / fe.hop_length
    if abs(frames - round(frames)) > 1e-6 or round(frames) % 2 or frames <= 0:
        raise LoraExpError(
            f"model.audio_max_seconds={seconds} must be a positive multiple of "
            f"{2 * fe.hop_length / fe.sampling_rate:g} s (two mel frames)"
        )
    return int(round(frames))


@torch.no_grad()
def set_window(model: PreTrainedModel, fe: Any, seconds: float) -> None:
    """Run a Whisper encoder on ``seconds`` of input: cut the positional table, pad features to ``seconds``."""
    if not isinstance(fe, WhisperFeatureExtractor) or not hasattr(model, "encoder"):
        raise LoraExpError("model.audio_max_seconds applies to Whisper encoders only; leave it null for this model")
    positions = window_frames(fe, seconds) // 2
    enc = model.encoder
    if positions > enc.embed_positions.num_embeddings:
        raise LoraExpError(
            f"model.audio_max_seconds={seconds} needs {positions} positions; the encoder has "
            f"{enc.embed_positions.num_embeddings} ({enc.embed_positions.num_embeddings / 50:g} s)"
        )
    old = enc.embed_positions
    new = nn.Embedding(positions, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    new.weight.copy_(old.weight[:positions])
    new.requires_grad_(old.weight.requires_grad)
    enc.embed_positions = new
    enc.max_source_positions = positions
    model.config.max_source_positions = positions  # the encoder checks input length against this
    fe.chunk_length = int(seconds) if float(seconds).is_integer() else seconds  # saved; reloads give n_samples
    fe.n_samples = int(round(seconds * fe.sampling_rate))
    fe.nb_max_frames = fe.n_samples // fe.hop_length


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
    from torch.utils.data import DataLoader, RandomSampler

    from lora_exp.data import Loaders

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


@torch.inference_mode()
def predict(
    model: PreTrainedModel, fe: Any, signals: list[np.ndarray], source_rate: int, batch_size: int = 32
) -> list[tuple[str, float]]:
    """``(label, probability)`` per mono signal at ``source_rate`` (e.g. from ``read_audio`` or a generated clip)."""
    collate, out = AudioCollator(fe, source_rate), []
    device = next(model.parameters()).device
    model.eval()
    for i in range(0, len(signals), batch_size):
        batch = {k: v.to(device) for k, v in collate.features(signals[i : i + batch_size]).items()}
        probs = torch.softmax(model(**batch).logits.float(), -1)
        conf, idx = probs.max(-1)
        out += [(model.config.id2label[int(j)], float(c)) for j, c in zip(idx, conf)]
    return out
