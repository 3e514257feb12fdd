"""``trainer.compile=true``: plain parameter paths in checkpoints and adapters, resume and export work, and the
compiled model computes what the eager one does.

The training tests compile with dynamo's ``aot_eager`` backend (the same graph capture, AOT autograd and
in-place ``nn.Module.compile`` as inductor, without the minutes of C++ code generation a CPU needs); one test
compiles with inductor itself."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from lora_exp import inference
from lora_exp.commands import export_peft
from lora_exp.config.schema import typed_config
from lora_exp.training import job as job_setup
from lora_exp.training.loop import train
from tests.helpers.interrupts import train_until_update

QUICK = ("trainer.epochs=1", "trainer.precision=fp32", "trainer.checkpoint_every=1", "trainer.keep_checkpoint=true")


@pytest.fixture
def aot_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job_setup, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("aot_eager")
def test_compiled_run_resumes_exports_and_matches_eager(tiny_cfg, tmp_path: Path) -> None:
    cfg = tiny_cfg(*QUICK, "trainer.compile=true")
    eager = train(tiny_cfg(*QUICK), tmp_path / "eager")
    train_until_update(cfg, tmp_path / "compiled", 4)
    saved = load_file(str(tmp_path / "compiled" / "checkpoint" / "trainable.safetensors"))
    assert saved and not any("_orig_mod" in k for k in saved)
    compiled = train(cfg, tmp_path / "compiled", resume=True)
    assert counters["stats"]["unique_graphs"] > 0  # dynamo captured the model's graphs: it did compile
    assert compiled["status"] == "ok" and compiled["resumed"] is True and compiled["steps"] == eager["steps"]
    adapter = json.loads((tmp_path / "compiled" / "adapter" / "adapter_config.json").read_text())
    assert adapter["keys"] and not any("_orig_mod" in k for k in adapter["keys"])
    assert compiled["test_loss"] == pytest.approx(eager["test_loss"], abs=1e-4)  # the same training, compiled
    assert export_peft.main(str(tmp_path / "compiled"), str(tmp_path / "peft")) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert [p for _, p in inference.predict(tmp_path / "compiled", ["good fun"])] == pytest.approx(
        [p for _, p in inference.predict(tmp_path / "eager", ["good fun"])], abs=1e-4
    )


@pytest.mark.usefixtures("aot_eager")
def test_compiled_frozen_run_with_the_feature_cache(tiny_cfg, tmp_path: Path) -> None:
    res = train(tiny_cfg(*QUICK, "method=frozen", "trainer.compile=true"), tmp_path / "run")
    assert counters["stats"]["unique_graphs"] > 0
    plain = train(tiny_cfg(*QUICK, "method=frozen"), tmp_path / "plain")
    assert res["feature_cache"] is True and res["test_loss"] == pytest.approx(plain["test_loss"], abs=1e-5)


def test_inductor_logits_equal_eager(tiny_cfg) -> None:
    torch._dynamo.reset()
    _, model, _, _ = job_setup.build_model_for(typed_config(tiny_cfg("lora.targets=[q,v,ffn]")))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)  # a trained-looking adapter and head
    eager = copy.deepcopy(model).eval()
    model.eval()
    job_setup.compile_model(model)
    batch = {"input_ids": torch.randint(5, 100, (4, 16), generator=torch.Generator().manual_seed(0))}
    batch["attention_mask"] = torch.ones(4, 16, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, eager(**batch).logits, atol=1e-4, rtol=1e-4)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in eager.named_parameters()]
    torch._dynamo.reset()


@pytest.mark.usefixtures("aot_eager")
def test_bench_compiles_both_sides(reviews: Path, tmp_path: Path) -> None:
    from lora_exp.bench import run as bench

    out = tmp_path / "bench.json"
    code = bench.main(
        "--warmup", "10", "--steps", "2", "--batch", "8", "--methods", "lora", "--compile", "on", "--out", str(out),
        "model=tiny_bert", f"data.path={reviews}", f"data.cache_dir={tmp_path / 'hf'}", "trainer.device=cpu",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert {(r["contender"], r["compile"], r["compiled"]) for r in result["rows"]} == {
        ("lora_exp", True, True),
        ("hf_trainer", True, True),
    }
    assert set(result["speedup"]) == {"lora+compile"} and result["settings"]["compile"] == [True]
    with pytest.raises(Exception, match="--compile='sometimes' is not one of off, on, both"):
        bench.main("--compile", "sometimes")
