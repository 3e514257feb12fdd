"""The training loop through train(): unbiased logged loss under grad accumulation, base_dtype needs autocast,
the frozen-feature cache, gradient checkpointing, the deterministic option, the prefix cache."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_exp.errors import LoraExpError
from lora_exp.measure import tracking
from lora_exp.models import build as model_build
from lora_exp.training import job as job_setup
from lora_exp.training import loop
from tests.helpers.models import count_calls


class RecordingRun:
    """Stands in for a W&B run: keeps every ``log`` call."""

    disabled = True

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict[str, Any]]] = []
        self.summary: dict[str, Any] = {}

    def log(self, row: dict[str, Any], step: int) -> None:
        self.logs.append((step, dict(row)))


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> RecordingRun:
    run = RecordingRun()

    @contextlib.contextmanager
    def fake_run(*_: Any, **__: Any):
        yield run

    monkeypatch.setattr(tracking, "wandb_run", fake_run)
    return run


def test_logged_loss_is_unbiased_with_grad_accum(tiny_cfg, tmp_path: Path, recorded, monkeypatch) -> None:
    """grad_accum=4 over 10 batches an epoch (groups 4, 4, 2) and a constant loss of 1.0 must log 1.0.

    The old loop logged 0.6 when a window held the epoch's short last group.
    """
    build = model_build.build_model

    def constant_loss_model(*args: Any, **kwargs: Any):
        tokenizer, model, head, adapted = build(*args, **kwargs)
        forward = model.forward

        def patched(**batch: Any):
            out = forward(**batch)
            s = out.logits.sum()
            out.loss = 1.0 + (s - s.detach())  # value 1.0, gradients still reach the head
            return out

        model.forward = patched
        return tokenizer, model, head, adapted

    monkeypatch.setattr(job_setup, "build_model", constant_loss_model)
    cfg = tiny_cfg("method=frozen", "trainer.batch_size=13", "trainer.grad_accum=4", "trainer.log_every=3")
    res = loop.train(cfg, tmp_path / "run")
    losses = [row["train/loss"] for _, row in recorded.logs if "train/loss" in row]
    assert res["steps"] == 6 and len(losses) >= 2  # 2 epochs x 3 updates (10 batches in groups 4, 4, 2)
    assert all(math.isclose(v, 1.0, rel_tol=1e-6) for v in losses), losses


def test_base_dtype_needs_autocast_in_that_dtype(tiny_cfg, tmp_path: Path) -> None:
    with pytest.raises(LoraExpError, match=r"model.base_dtype=bf16 needs trainer.precision=bf16"):
        loop.train(tiny_cfg("model.base_dtype=bf16", "trainer.precision=fp32"), tmp_path / "run")
    res = loop.train(
        tiny_cfg("model.base_dtype=bf16", "trainer.precision=bf16", "trainer.max_steps=3"), tmp_path / "ok"
    )
    assert res["status"] == "ok" and res["base_dtype"] == "bf16"
    assert res["mem_params_bytes"] < 4 * res["total_params"]  # the frozen part is stored in 2 bytes


def test_frozen_feature_cache_runs_the_encoder_once(tiny_cfg, tmp_path: Path, monkeypatch) -> None:
    calls = count_calls(monkeypatch, "BertModel")
    res = loop.train(tiny_cfg("method=frozen", "trainer.epochs=3"), tmp_path / "run")
    assert res["status"] == "ok" and res["feature_cache"] is True
    examples = res["train_examples"] + 2 * 16  # validation and test splits of the small corpus: 16 each
    assert calls["n"] == math.ceil(res["train_examples"] / 128) + 2  # one pass per split, eval batch 128
    assert examples > calls["n"]
    uncached = loop.train(tiny_cfg("method=frozen", "trainer.feature_cache=false"), tmp_path / "plain")
    assert uncached["feature_cache"] is False and uncached["trainable_params"] == res["trainable_params"]


def test_gradient_checkpointing_option_trains_lora(tiny_cfg, tmp_path: Path) -> None:
    res = loop.train(tiny_cfg("trainer.gradient_checkpointing=true", "trainer.max_steps=12"), tmp_path / "run")
    assert res["status"] == "ok" and res["gradient_checkpointing"] is True  # LoRA moved (checked at step 10)


def test_deterministic_option_is_restored_after_the_job(tiny_cfg, tmp_path: Path) -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    res = loop.train(tiny_cfg("trainer.deterministic=true", "trainer.max_steps=2"), tmp_path / "run")
    assert res["status"] == "ok" and not torch.are_deterministic_algorithms_enabled()


def test_prefix_cache_trains_the_upper_layer(tiny_cfg, tmp_path: Path) -> None:
    targets = "lora.targets=['re:.*layer[.]1[.]attention[.]self[.](query|value)']"
    res = loop.train(tiny_cfg(targets, "trainer.max_steps=12"), tmp_path / "run")
    assert res["status"] == "ok" and res["feature_cache"] is True and res["lora_layers"] == 2
