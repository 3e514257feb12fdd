"""The restructured loop: logged loss with gradient accumulation, frozen base dtype, feature cache, levers."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_exp import device as devices
from lora_exp.errors import LoraExpError
from lora_exp.measure import timing, tracking
from lora_exp.models import build as model_build
from lora_exp.models import methods as model_methods
from lora_exp.training import checks, features, loop
from lora_exp.training import job as job_setup
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


def test_base_dtype_halves_frozen_parameter_bytes(tiny_cfg) -> None:
    _, fp32, head, _ = model_build.build_model(tiny_cfg("method=lora"))
    _, bf16, _, _ = model_build.build_model(tiny_cfg("method=lora", "model.base_dtype=bf16"))

    def frozen_bytes(model: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)

    assert frozen_bytes(bf16) * 2 == frozen_bytes(fp32)
    assert all(p.dtype == torch.float32 for p in bf16.parameters() if p.requires_grad)  # fp32 master weights
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters() if not p.requires_grad)
    batch = {"input_ids": torch.randint(5, 100, (4, 16)), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
    fp32.eval(), bf16.eval()
    with torch.no_grad():
        ref = fp32(**batch).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = bf16(**batch).logits.float()
    assert torch.allclose(low, ref, atol=0.05), (low - ref).abs().max()


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


def test_cached_outputs_equal_the_encoder_in_eval_mode(tiny_cfg) -> None:
    tokenizer, model, head, _ = model_build.build_model(tiny_cfg("method=frozen"))
    model.eval()
    enc = tokenizer(["a good film", "the worst plot of the movie"], padding=True, return_tensors="pt")
    with torch.no_grad():
        real = model.bert(**enc)
        kinds = features._describe(real, *enc["input_ids"].shape)
        cached = features.CachedBase(model.bert, type(real), kinds, enc["attention_mask"].sum(-1))
        cached.add(torch.arange(2), real)  # rows 0 and 1
        # the same examples in another order and padded longer
        ids = torch.nn.functional.pad(enc["input_ids"].flip(0), (0, 5))
        mask = torch.nn.functional.pad(enc["attention_mask"].flip(0), (0, 5))
        cached.pending = cached.store.gather(torch.tensor([1, 0]), ids.shape[1])
        out = cached(ids, attention_mask=mask)
    assert torch.equal(out.pooler_output, real.pooler_output.flip(0))
    n = int(enc["attention_mask"][1].sum())
    assert torch.equal(out.last_hidden_state[0, :n], real.last_hidden_state[1, :n])
    assert out.last_hidden_state.shape[1] == ids.shape[1] and out.last_hidden_state[0, n:].abs().sum() == 0


def test_gradient_checkpointing_option_trains_lora(tiny_cfg, tmp_path: Path) -> None:
    res = loop.train(tiny_cfg("trainer.gradient_checkpointing=true", "trainer.max_steps=12"), tmp_path / "run")
    assert res["status"] == "ok" and res["gradient_checkpointing"] is True  # LoRA moved (checked at step 10)


def test_deterministic_option_is_restored_after_the_job(tiny_cfg, tmp_path: Path) -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    res = loop.train(tiny_cfg("trainer.deterministic=true", "trainer.max_steps=2"), tmp_path / "run")
    assert res["status"] == "ok" and not torch.are_deterministic_algorithms_enabled()


def test_store_frozen_in_leaves_trainables_alone(tiny_cfg) -> None:
    _, model, _, _ = model_build.build_model(tiny_cfg("method=full"))
    assert model_methods.store_frozen_in(model, "bf16") == 0  # full: nothing is frozen


@pytest.mark.parametrize(
    "overrides",
    [
        ("method=frozen",),
        ("method=lora", "lora.targets=['re:.*layer[.]1[.]attention[.]self[.](query|value)']"),  # layer 0 is a prefix
    ],
    ids=["frozen-encoder", "frozen-prefix"],
)
def test_cached_model_gives_the_same_logits(tiny_cfg, tmp_path: Path, overrides: tuple[str, ...]) -> None:
    """In eval mode the model with its frozen part cached computes what the real model computes."""
    # fp32: the cache is computed in the run's precision; the comparison below runs without autocast
    job = job_setup.setup(tiny_cfg(*overrides, "trainer.precision=fp32"), tmp_path / "run", False, timing.RssPeak())
    assert job.cache is not None
    batch = next(iter(job.loaders.validation))
    job.model.eval()
    with torch.no_grad():
        cached = job.model(**batch).logits
        job.cache.restore()
        job.model.eval()  # the real modules were out of the model when it was switched to eval
        real = job.model(**batch).logits
    assert torch.allclose(cached, real, atol=1e-5), (cached - real).abs().max()


def test_prefix_cache_trains_the_upper_layer(tiny_cfg, tmp_path: Path) -> None:
    targets = "lora.targets=['re:.*layer[.]1[.]attention[.]self[.](query|value)']"
    res = loop.train(tiny_cfg(targets, "trainer.max_steps=12"), tmp_path / "run")
    assert res["status"] == "ok" and res["feature_cache"] is True and res["lora_layers"] == 2


def test_rerun_tolerance_only_for_cuda_without_determinism() -> None:
    from lora_exp.cli import rerun_tolerance, same_metric

    assert rerun_tolerance({"device": "cpu"}) == 0
    assert rerun_tolerance({"device": "cuda:0", "deterministic": True}) == 0
    tol = rerun_tolerance({"device": "cuda:0", "deterministic": False})
    assert tol > 0 and same_metric(0.801, 0.805, tol) and not same_metric(0.80, 0.85, tol)
    assert not same_metric(0.801, 0.805, 0.0) and same_metric("abc", "abc", tol)


def test_cuda_rng_restore_takes_what_fits(monkeypatch) -> None:
    from lora_exp.training import checkpoint

    restored = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.append(index))
    checkpoint.restore_cuda_rng([torch.zeros(4, dtype=torch.uint8)] * 3)  # saved on 3 GPUs, resumed on 1
    assert restored == [0]


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch, native: bool, expected: str) -> None:
    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: native)
    assert devices.pick_precision("auto", torch.device("cpu")) == expected
    assert devices.pick_precision("fp32", torch.device("cpu")) == "fp32"  # an explicit choice always wins


def test_zero_bias_gradient_is_excused_only_when_its_weight_moves() -> None:
    from lora_exp.errors import TrainingFailure

    w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.zeros(2))
    w.grad, b.grad = torch.ones(2, 2), torch.zeros(2)  # a balanced batch at p = 0.5: bias gradient exactly 0
    checks.check_gradients([("head.weight", w), ("head.bias", b)])
    w.grad = torch.zeros(2, 2)  # nothing reaches the module: a broken graph
    with pytest.raises(TrainingFailure, match="head.weight"):
        checks.check_gradients([("head.weight", w), ("head.bias", b)])
