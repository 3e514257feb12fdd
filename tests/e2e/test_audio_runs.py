"""Tiny Whisper end to end through train(): each method trains, the AUC monitor picks its step, predict on a clip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.configs import make_cfg

E2E = [
    "experiment=gw_whisper_offline",
    "model=tiny_whisper",  # the preset's pretrained tiny.en is tested in test_whisper_tiny_en.py
    "logger=none",
    "trainer.device=cpu",
    "trainer.epochs=2",
    "trainer.batch_size=16",
    "trainer.log_every=2",
    "optimizer.warmup_ratio=0.0",
    "data.gw.n_train=64",
    "data.gw.n_validation=32",
    "data.gw.n_test=32",
    "model.hidden_size=32",
    "model.heads=2",
    "model.ffn_size=64",
]


@pytest.mark.parametrize("method", ["lora", "frozen", "full"])
def test_tiny_whisper_trains_each_method(method: str, lora_exp_cache: Path, tmp_path: Path) -> None:
    from lora_exp.training.loop import train

    r = train(make_cfg([*E2E, f"method={method}"]), tmp_path / method)
    assert r["status"] == "ok"
    assert r["head_params"] == (32 * 16 + 16) + (16 * 2 + 2)  # projector + classifier, trained for every method
    if method == "lora":
        assert r["adapter_params"] == 2 * 2 * 8 * (32 + 32)
        assert r["trainable_params"] == r["adapter_params"] + r["head_params"]
    if method == "frozen":
        assert r["trainable_params"] == r["head_params"]
    steps_per_epoch = math.ceil(64 / 16)
    assert r["steps"] == 2 * steps_per_epoch
    assert r["samples_per_s"] * r["train_seconds"] == pytest.approx(64 * 2)  # samples counted from labels
    assert 0.0 <= r["best_val_auc"] <= 1.0 and 0.0 <= r["test_auc"] <= 1.0


def test_monitor_auc_picks_the_best_auc_step(
    lora_exp_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from lora_exp.training.loop import train

    r = train(make_cfg([*E2E, "method=lora", "trainer.eval_every=1", "trainer.monitor=val/auc"]), tmp_path / "m")
    printed = {line.split("  ")[0]: line for line in (li.strip() for li in capsys.readouterr().out.splitlines())}
    assert f"{r['best_val_auc']:.4f} (step {r['best_step']}, by val/auc)" in printed["best val auc"]
    assert printed["test auc"].endswith(f"{r['test_auc']:.4f}") and "best val acc" not in printed
    history = r["history"]  # one row per evaluation: step, epoch, time_s, val_acc, val_f1, val_auc, val_loss
    aucs = [h["val_auc"] for h in history]
    assert len(aucs) == r["steps"]  # eval_every=1: every step evaluated
    best = history[int(np.nanargmax(aucs))]  # the first of equal maxima, as is_better keeps ties
    assert r["best_step"] == best["step"] and r["best_val_auc"] == pytest.approx(max(aucs))


def test_predict_on_a_generated_clip(lora_exp_cache: Path, tmp_path: Path) -> None:
    from lora_exp.data import gw as gw_data
    from lora_exp.inference import predict
    from lora_exp.training.loop import train

    train(make_cfg([*E2E, "method=lora"]), tmp_path / "p")
    clip = gw_data.to_audio(gw_data.simulate(gw_data.GwOptions(), 1, seed=9)["strain"], "concat")[0]
    np.save(tmp_path / "clip.npy", clip)
    ((label, prob),) = predict(tmp_path / "p", [str(tmp_path / "clip.npy")])
    assert label in ("noise", "signal") and 0.5 <= prob <= 1.0
