"""The restructured loop: logged loss with gradient accumulation, frozen base dtype, feature cache, levers (runs
through train() are in tests/e2e/test_loop_runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_exp import device as devices
from lora_exp.config.schema import typed_config
from lora_exp.measure import timing
from lora_exp.models import methods as model_methods
from lora_exp.training import checks, feature_cache
from lora_exp.training import job as job_setup


def test_base_dtype_halves_frozen_parameter_bytes(tiny_cfg) -> None:
    _, fp32, head, _ = job_setup.build_model_for(typed_config(tiny_cfg("method=lora")))
    _, bf16, _, _ = job_setup.build_model_for(typed_config(tiny_cfg("method=lora", "model.base_dtype=bf16")))

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


def test_cached_outputs_equal_the_encoder_in_eval_mode(tiny_cfg) -> None:
    tokenizer, model, head, _ = job_setup.build_model_for(typed_config(tiny_cfg("method=frozen")))
    model.eval()
    enc = tokenizer(["a good film", "the worst plot of the movie"], padding=True, return_tensors="pt")
    with torch.no_grad():
        real = model.bert(**enc)
        kinds = feature_cache._describe(real, *enc["input_ids"].shape)
        cached = feature_cache.CachedBase(model.bert, type(real), kinds, enc["attention_mask"].sum(-1))
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


def test_store_frozen_in_leaves_trainables_alone(tiny_cfg) -> None:
    _, model, _, _ = job_setup.build_model_for(typed_config(tiny_cfg("method=full")))
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


def test_rerun_tolerance_only_for_cuda_without_determinism() -> None:
    from lora_exp.commands.rerun import rerun_tolerance, same_metric

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
