"""The fair_variants sweep: each new variant composes over its own learning-rate grid at its rank."""

from __future__ import annotations

import pytest

from lora_exp.adapters.params import layer_rank
from lora_exp.config.schema import LoraConfig, typed_config


@pytest.mark.parametrize(("variant", "r"), [("lora_fa", 8), ("vera", 256), ("eva", 8), ("lora_ga", 8), ("adalora", 12)])
def test_fair_variants_grid_of_new_variants(variant: str, r: int) -> None:
    from tests.helpers.configs import make_cfg
    from tests.helpers.sweeps import label

    cfgs = [make_cfg(["+sweep=fair_variants", f"+preset={variant}", f"lr_index={i}"]) for i in range(3)]
    assert [c.optimizer.lr for c in cfgs] == list(cfgs[0].method.lr_grid)
    shape = [
        (layer_rank(typed_config(c.lora, LoraConfig)), list(c.lora.targets)) for c in cfgs
    ]  # VeRA: its own rank; AdaLoRA: its start
    assert all(label(c) == variant for c in cfgs) and shape == [(r, ["q", "v"])] * 3
