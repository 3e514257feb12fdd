"""`lora-exp bench --latency`: base / LoRA unmerged / LoRA merged at batch 1 and 32; merged is the base's structure."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_exp.adapters import targets as injection
from lora_exp.bench import latency
from lora_exp.config.schema import typed_config
from tests.helpers.configs import make_cfg


def test_merged_model_has_the_base_structure_and_the_lora_outputs(reviews: Path) -> None:
    cfg = make_cfg(["model=tiny_bert", f"data.path={reviews}", "lora.targets=[q,v,ffn]", "trainer.device=cpu"])
    _, models = latency.build_models(typed_config(cfg))
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
