"""Runs with a bf16 base: full records fp32; predict after bf16-base training uses the run's precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_exp.training.loop import train


def test_base_dtype_with_full_is_said_and_recorded_as_fp32(
    tiny_cfg, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    quick = ("method=full", "trainer.max_steps=2", "trainer.epochs=1", "save_weights=false", "trainer.seed=1")
    said = train(tiny_cfg(*quick, "model.base_dtype=bf16", "trainer.precision=fp32"), tmp_path / "bf16")
    out = capsys.readouterr().out
    assert "model.base_dtype=bf16 has no effect with method=full" in out
    plain = train(tiny_cfg(*quick, "trainer.precision=fp32"), tmp_path / "fp32")
    assert said["base_dtype"] == plain["base_dtype"] == "fp32"
    assert said["group_hash"] == plain["group_hash"]  # the same computation: it pools
    assert said["test_loss"] == plain["test_loss"]
    saved = json.loads((tmp_path / "bf16" / "config.yaml").with_name("results.json").read_text())
    assert saved["base_dtype"] == "fp32"


def test_predict_after_bf16_base_training_runs_in_the_runs_precision(
    tiny_cfg, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from lora_exp import inference
    from lora_exp.device import autocast

    cfg = tiny_cfg("model.base_dtype=bf16", "trainer.precision=bf16", "trainer.max_steps=3", "trainer.epochs=1")
    run = tmp_path / "run"
    res = train(cfg, run)
    assert res["base_dtype"] == "bf16" and res["precision"] == "bf16"
    texts = ["good great fun", "bad boring dull", "the film"]
    predicted = inference.predict(run, texts)
    assert len(predicted) == 3 and all(label in ("rotten", "fresh") and 0.5 <= p <= 1 for label, p in predicted)
    tokenizer, unmerged = inference.load_trained(run, merge=False)
    assert next(p for n, p in unmerged.named_parameters() if "lora_A" in n).dtype == torch.float32
    assert any(p.dtype == torch.bfloat16 for p in unmerged.parameters())  # the base as stored in training
    enc = tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16"):
        probs = unmerged(**enc).logits.float().softmax(-1).max(-1).values
    assert [p for _, p in predicted] == pytest.approx(probs.tolist(), abs=0.02)  # merged in bf16 = unmerged
