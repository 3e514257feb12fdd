"""The tiny random Whisper config and the audio PEFT round trip, shared by the audio tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from lora_exp.adapters.peft_format import export_peft, import_peft
from lora_exp.config.schema import ModelConfig, typed_config

from .models import LAYERS, H

GW_SMALL = [  # a run on tiny Whisper and a little synthetic GW data (cached outputs compared in fp32)
    "experiment=gw_whisper_offline",
    "model=tiny_whisper",
    "model.hidden_size=32",
    "model.heads=2",
    "model.ffn_size=64",
    "logger=none",
    "trainer.device=cpu",
    "trainer.precision=fp32",  # cached outputs are compared with the real encoder outside autocast
    "trainer.batch_size=16",
    "trainer.eval_batch_size=16",
    "optimizer.warmup_ratio=0.0",
    "data.gw.n_train=40",
    "data.gw.n_validation=20",
    "data.gw.n_test=20",
]


def whisper_cfg(**extra: object) -> ModelConfig:
    """A ``model`` config slice of a tiny random Whisper encoder (hidden H, LAYERS layers), overridden by ``extra``."""
    base = {
        "name": "t",
        "task": "audio",
        "source": "tiny",
        "arch": "whisper",
        "hidden_size": H,
        "layers": LAYERS,
        "heads": 2,
        "ffn_size": 64,
        "trust_remote_code": False,
        "audio_max_seconds": None,
    }
    return typed_config({**base, **extra}, ModelConfig)


def assert_audio_peft_round_trip(
    ours: torch.nn.Module, base: torch.nn.Module, head: list[str], x: torch.Tensor, folder: Path, tensors: int
) -> None:
    """Ours -> PEFT's format -> ``PeftModel.from_pretrained`` and back through ``import_peft`` (``tensors`` LoRA
    tensors): the same logits as ours on ``x`` (atol 1e-5), which differ from the base's (the adapter matters)."""
    from peft import PeftModel

    export_peft(ours, folder, {"head_modules": head})
    with torch.no_grad():
        expected = ours.eval()(input_features=x).logits
        assert not torch.allclose(expected, base.eval()(input_features=x).logits)  # the adapter matters
        ref = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        torch.testing.assert_close(ref.get_base_model()(input_features=x).logits, expected, atol=1e-5, rtol=1e-5)
        back = copy.deepcopy(base)
        assert len(import_peft(back, folder, head)) == tensors
        torch.testing.assert_close(back.eval()(input_features=x).logits, expected, atol=1e-5, rtol=1e-5)


CLIP_RATES = (8000, 16000, 22050, 44100)  # every rate a researcher's recordings come in, each resampled to 16 kHz
TONES = {"low": 300.0, "mid": 900.0, "high": 2500.0}  # a class per pitch: a tiny encoder can tell them apart


def write_clip(path: Path, hz: float, seconds: float, rate: int, kind: str = "int16", seed: int = 0) -> Path:
    """A real .wav: a tone at ``hz`` with a little noise, ``seconds`` long at ``rate`` Hz; ``kind`` int16 (mono),
    float32 (mono) or stereo (int16, two channels)."""
    import numpy as np
    from scipy.io import wavfile

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * hz * t) + 0.05 * rng.standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "float32":
        wavfile.write(path, rate, x.astype(np.float32))
    else:
        pcm = (x * 32767).astype(np.int16)
        wavfile.write(path, rate, np.stack([pcm, pcm], axis=1) if kind == "stereo" else pcm)
    return path


def write_clips(root: Path, per_class: int = 10, classes: dict[str, float] = TONES) -> list[tuple[Path, str]]:
    """An audiofolder ``root/<class>/<i>.wav``: ``per_class`` clips per class of 0.3..1.6 s (cut to 1 s or padded),
    at each of ``CLIP_RATES`` in turn, int16 / float32 / stereo in turn. Returns (path, class) per clip."""
    out = []
    for c, (name, hz) in enumerate(classes.items()):
        for i in range(per_class):
            rate, kind = CLIP_RATES[i % len(CLIP_RATES)], ("int16", "float32", "stereo")[i % 3]
            seconds = 0.3 + 1.3 * i / max(per_class - 1, 1)
            out.append((write_clip(root / name / f"{i}.wav", hz, seconds, rate, kind, seed=100 * c + i), name))
    return out
