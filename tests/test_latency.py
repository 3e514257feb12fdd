"""`lora-exp bench --latency`: base / LoRA unmerged / LoRA merged at batch 1 and 32; merged is the base's structure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_exp.adapters import targets as injection
from lora_exp.bench import latency
from lora_exp.bench import run as bench
from lora_exp.errors import LoraExpError
from tests.helpers.configs import make_cfg


def test_latency_json_has_every_batch_model_and_statistic(reviews: Path, tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    args = ["--latency", "--reps", "3", "--warmup", "1", "--out", str(out), "model=tiny_bert"]
    args += [
        f"data.path={reviews}",
        f"data.cache_dir={tmp_path / 'hf'}",
        "trainer.device=cpu",
        "trainer.precision=fp32",
    ]
    assert bench.main(*args) == 0
    result = json.loads(out.read_text())
    for batch in ("batch_1", "batch_32"):
        for model in ("base", "unmerged", "merged"):
            row = result["latency"][batch][model]
            assert row["reps"] == 3 and 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert result["merged_max_abs_logit_diff"][batch] < 1e-4  # merged computes what unmerged does
        assert result["merged_over_base"][batch] == pytest.approx(
            result["latency"][batch]["merged"]["median_ms"] / result["latency"][batch]["base"]["median_ms"]
        )
    assert result["seq_len"]["batch_32"] % 8 == 0 and result["seq_len"]["batch_1"] <= result["seq_len"]["batch_32"]
    assert result["precision"] == "fp32" and result["device"] == "cpu"
    with pytest.raises(LoraExpError, match="already exists"):  # never overwritten
        bench.main(*args)


def test_merged_model_has_the_base_structure_and_the_lora_outputs(reviews: Path) -> None:
    cfg = make_cfg(["model=tiny_bert", f"data.path={reviews}", "lora.targets=[q,v,ffn]", "trainer.device=cpu"])
    _, models = latency.build_models(cfg)
    base, unmerged, merged = models["base"], models["unmerged"], models["merged"]
    assert [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    assert not list(injection.lora_layers(merged)) and list(injection.lora_layers(unmerged))
    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora_out, merged_out, base_out = (m(input_ids=ids).logits for m in (unmerged, merged, base))
    torch.testing.assert_close(merged_out, lora_out, atol=1e-5, rtol=1e-5)
    assert not torch.equal(merged_out, base_out)  # the adapter is non-trivial: merged weights differ from W0
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(k.endswith("weight") and ("query" in k or "value" in k or "dense" in k) for k in changed)
