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
