"""A frozen audio run computes the encoder once per clip (the frozen-feature cache), through train()."""

from __future__ import annotations

import math
from pathlib import Path

from lora_exp.training import loop
from tests.helpers.audio import GW_SMALL
from tests.helpers.configs import make_cfg
from tests.helpers.models import count_calls


def test_frozen_audio_runs_the_encoder_once_per_clip(lora_exp_cache: Path, tmp_path: Path, monkeypatch) -> None:
    calls = count_calls(monkeypatch, "WhisperEncoder")
    res = loop.train(make_cfg([*GW_SMALL, "method=frozen", "trainer.epochs=3"]), tmp_path / "run")
    assert res["status"] == "ok" and res["feature_cache"] is True
    assert calls["n"] == math.ceil(40 / 16) + math.ceil(20 / 16) * 2  # one pass per split, eval batch 16
    plain = loop.train(make_cfg([*GW_SMALL, "method=frozen", "trainer.feature_cache=false"]), tmp_path / "plain")
    assert plain["feature_cache"] is False and plain["trainable_params"] == res["trainable_params"]
