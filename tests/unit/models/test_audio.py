"""Audio models: the tiny random Whisper encoder, its clip-length window, LoRA on it, PEFT parity, the
collator, the audio configs (the runs through train() are in tests/e2e/test_audio_runs.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_exp import inference
from lora_exp.adapters import targets as injection
from lora_exp.config import checks as config_checks
from lora_exp.data import audio as audio_data
from lora_exp.errors import LoraExpError
from lora_exp.models import audio as audio_models
from lora_exp.models import heads as model_heads
from lora_exp.models import methods as model_methods
from tests.helpers.audio import assert_audio_peft_round_trip, whisper_cfg
from tests.helpers.configs import make_cfg
from tests.helpers.models import LAYERS, H, R, lora_cfg, randomise_trainables


def features(fe, seconds: float, n: int = 3, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    clips = [rng.standard_normal(int(seconds * 2048)).astype(np.float32) for _ in range(n)]
    return audio_data.AudioCollator(fe, 2048).features(clips)["input_features"]


def test_tiny_whisper_runs_on_the_clip_length() -> None:
    fe, model, head = audio_models.build(whisper_cfg(), 2)
    table = model.encoder.embed_positions.weight.detach().clone()
    assert table.shape[0] == 1500 and fe.n_samples == 30 * 16000  # stock Whisper: 30 s
    full = features(fe, 2.0)
    assert full.shape == (3, 80, 3000)
    assert model.eval()(input_features=full).logits.shape == (3, 2)

    fe, model, head = audio_models.build(whisper_cfg(audio_max_seconds=2.0), 2)
    x = features(fe, 2.0)
    assert x.shape == (3, 80, 200)  # 2 s = 200 mel frames
    assert model.config.max_source_positions == 100 and model.encoder.embed_positions.num_embeddings == 100
    torch.testing.assert_close(model.encoder.embed_positions.weight, table[:100])  # the same first rows
    assert not model.encoder.embed_positions.weight.requires_grad
    assert model.eval()(input_features=x).logits.shape == (3, 2)
    assert sorted(head) == ["classifier", "projector"]


def test_shortened_window_survives_save_and_reload(tmp_path: Path) -> None:
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    fe, model, _ = audio_models.build(whisper_cfg(audio_max_seconds=6.0), 2, {0: "noise", 1: "signal"})
    fe.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    fe2, model2 = (
        AutoFeatureExtractor.from_pretrained(tmp_path),
        AutoModelForAudioClassification.from_pretrained(tmp_path),
    )
    assert fe2.n_samples == 96000 and model2.config.max_source_positions == 300
    x = features(fe2, 6.0)
    torch.testing.assert_close(model2.eval()(input_features=x).logits, model.eval()(input_features=x).logits)
    clip = np.random.default_rng(0).standard_normal(3 * 4096).astype(np.float32)
    ((label, prob),) = inference.predict_audio(model2, fe2, [clip], 2048)
    assert label in ("noise", "signal") and 0.5 <= prob <= 1.0


def test_window_must_be_whole_frames_and_fit_the_table() -> None:
    with pytest.raises(LoraExpError, match=r"model.audio_max_seconds=0.01 must be a positive multiple of 0.02"):
        audio_models.build(whisper_cfg(audio_max_seconds=0.01), 2)
    with pytest.raises(LoraExpError, match="needs 1550 positions; the encoder has 1500"):
        audio_models.build(whisper_cfg(audio_max_seconds=31.0), 2)


def test_weighted_layer_sum_parameter_is_part_of_the_head() -> None:
    _, model, _ = audio_models.build(whisper_cfg(), 2)
    model.config.use_weighted_layer_sum = True
    fresh = type(model)(model.config)
    assert sorted(model_heads.find_head(fresh)) == ["classifier", "layer_weights", "projector"]


def test_lora_injects_into_encoder_q_v_and_counts_follow_a_formula() -> None:
    _, model, head = audio_models.build(whisper_cfg(audio_max_seconds=2.0), 2)
    adapted = model_methods.apply_method(model, "lora", head, lora_cfg("q", "v"))
    assert sorted(adapted) == sorted(
        f"encoder.layers.{i}.self_attn.{p}_proj" for i in range(LAYERS) for p in ("q", "v")
    )
    counts = model_methods.count_parameters(model, head)
    head_params = sum(p.numel() for h in head for p in model.get_submodule(h).parameters())
    assert counts["adapter"] == LAYERS * 2 * R * (H + H)
    assert counts["head"] == head_params == (H * (H // 2) + H // 2) + (H // 2 * 2 + 2)
    assert counts["trainable"] == counts["adapter"] + counts["head"] and counts["other"] == 0


@pytest.mark.parametrize(("alias", "names"), [("k", ["k_proj"]), ("o", ["out_proj"]), ("ffn", ["fc1", "fc2"])])
def test_whisper_aliases_select_encoder_linears(alias: str, names: list[str]) -> None:
    _, model, head = audio_models.build(whisper_cfg(), 2)
    picked = injection.resolve_targets(model, [alias], head)
    prefix = {"k_proj": "self_attn.", "out_proj": "self_attn.", "fc1": "", "fc2": ""}
    assert sorted(picked) == sorted(f"encoder.layers.{i}.{prefix[n]}{n}" for i in range(LAYERS) for n in names)


def test_frozen_trains_the_head_only_and_full_everything() -> None:
    _, model, head = audio_models.build(whisper_cfg(audio_max_seconds=2.0), 2)
    model_methods.apply_method(model, "frozen", head)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.split(".")[0] in head}
    model_methods.apply_method(model, "full", head)
    assert all(p.requires_grad for p in model.parameters())


def test_peft_export_import_equal_logits_on_tiny_whisper(tmp_path: Path) -> None:

    fe, base, head = audio_models.build(whisper_cfg(audio_max_seconds=2.0), 2)
    x = features(fe, 2.0)
    ours = copy.deepcopy(base)
    model_methods.apply_method(ours, "lora", head, lora_cfg("q", "v", "ffn"))
    randomise_trainables(ours)
    assert_audio_peft_round_trip(ours, base, head, x, tmp_path / "peft", LAYERS * 4)


def test_collator_resamples_and_pads_to_the_window() -> None:
    fe, _, _ = audio_models.build(whisper_cfg(audio_max_seconds=6.0), 2)
    col = audio_data.AudioCollator(fe, 2048)
    rows = [
        {"audio": np.sin(2 * np.pi * 100 * np.arange(n) / 2048).astype(np.float32), "labels": lab}
        for n, lab in ((3 * 4096, 1), (4096, 0))
    ]
    batch = col(rows)
    assert set(batch) == {"input_features", "labels"}
    assert batch["input_features"].shape == (2, 80, 600) and batch["labels"].tolist() == [1, 0]
    assert audio_data.resample(np.zeros(4096), 2048, 16000).shape == (32000,)
    # a 100 Hz tone stays at 100 Hz: its energy sits in the lowest mel bands, not above 1 kHz
    spec = batch["input_features"][0, :, :500].mean(-1)
    assert spec[:10].max() > spec[40:].max() + 0.5


def test_read_audio_wav_and_npy(tmp_path: Path) -> None:
    from scipy.io import wavfile

    x = (np.sin(np.arange(800) / 5) * 20000).astype(np.int16)
    wavfile.write(tmp_path / "a.wav", 8000, x)
    y, rate = audio_data.read_audio(tmp_path / "a.wav")
    assert rate == 8000 and y.shape == (800,) and abs(y.max() - 20000 / 32767) < 1e-3
    np.save(tmp_path / "g.npy", np.ones((3, 10), np.float32))
    z, rate = audio_data.read_audio(tmp_path / "g.npy")
    assert rate is None and z.shape == (30,)
    with pytest.raises(LoraExpError, match="not a .wav or .npy"):
        audio_data.read_audio(tmp_path / "a.mp3")


@pytest.mark.parametrize("preset", ["gw_whisper", "gw_whisper_offline"])
def test_audio_presets_compose_and_validate(preset: str) -> None:
    cfg = make_cfg([f"experiment={preset}"])
    config_checks.validate(cfg)
    assert cfg.model.task == "audio" and cfg.trainer.monitor == "val/auc" and cfg.model.audio_max_seconds == 6.0
    assert cfg.lora.r == 8 and list(cfg.lora.targets) == ["q", "v"]


@pytest.mark.parametrize("preset", ["gw_whisper", "gw_whisper_offline"])
def test_gw_methods_sweep_gives_three_valid_jobs(preset: str) -> None:
    from hydra import compose, initialize_config_dir

    from lora_exp.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hydra_cfg = compose("config", overrides=["+sweep=gw_methods", f"experiment={preset}"], return_hydra_config=True)
    assert hydra_cfg.hydra.sweeper.params.method == "full,frozen,lora"
    for method in ("full", "frozen", "lora"):
        cfg = make_cfg(["+sweep=gw_methods", f"experiment={preset}", f"method={method}"])
        config_checks.validate(cfg)
        assert (cfg.sweep_name, cfg.method.name, cfg.trainer.monitor) == ("gw_methods", method, "val/auc")


def test_audio_config_errors_are_one_line_each() -> None:
    cfg = make_cfg(
        ["model=tiny_whisper", "trainer.monitor=val/precision", "model.audio_max_seconds=2.0", "data=gw_synthetic"]
    )
    with pytest.raises(LoraExpError) as err:
        config_checks.validate(cfg)
    lines = str(err.value).splitlines()
    assert any(li.startswith("trainer.monitor='val/precision' is not one of") for li in lines)
    assert any(li.startswith("model.audio_max_seconds=2.0 is shorter than the data's clips (6 s") for li in lines)
    with pytest.raises(LoraExpError, match="data.source=gw is audio: set model.task=audio"):
        config_checks.validate(make_cfg(["data=gw_synthetic"]))


# ---- end to end through train(): needs the loop integration (models.build / audio loaders / metrics) ----


def test_summary_shows_the_monitored_metric(capsys: pytest.CaptureFixture) -> None:
    from lora_exp.training.results import print_summary

    r = {
        "method": "lora",
        "trainable_params": 10,
        "trainable_pct": 1.0,
        "best_step": 7,
        "best_val_acc": 0.61,
        "best_val_loss": 0.4321,
        "best_val_auc": None,
        "test_acc": 0.6,
        "test_loss": 0.5,
        "test_auc": None,
        "train_seconds": 2.0,
        "samples_per_s": 5.0,
        "peak_vram_bytes": None,
        "peak_host_rss_bytes": 2**30,
    }
    for monitor, want in (("val/loss", ["best val loss", "test loss"]), ("val/acc", ["best val acc"])):
        print_summary({**r, "monitor": monitor}, Path("run"))
        keys = [line.strip().split("  ")[0] for line in capsys.readouterr().out.splitlines()]
        assert [k for k in keys if k.startswith(("best", "test"))] == [*want, "test acc"]
    print_summary({**r, "monitor": "val/auc"}, Path("run"))  # a one-class split: AUC undefined
    assert "best val auc      n/a (step 7, by val/auc)" in capsys.readouterr().out


def test_whisper_small_is_named_from_its_path() -> None:
    assert make_cfg(["experiment=gw_whisper"]).model.name == "whisper-small"  # openai/whisper-small
    local = make_cfg(["experiment=gw_whisper", "model.source=local", "model.path=/data/ckpt/my-whisper"])
    assert local.model.name == "my-whisper"
    assert make_cfg(["experiment=gw_whisper", "model.path=/x/my-whisper", "model.name=ws"]).model.name == "ws"
