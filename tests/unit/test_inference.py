"""Task switching: one base model, several adapters swapped in place; predictions match each adapter's model."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch

from lora_exp import inference
from lora_exp.adapters import store as adapter_store
from lora_exp.adapters import targets as injection
from lora_exp.models import methods as model_methods
from tests.helpers.models import lora_cfg, tiny_text


def _adapter_model(base, head, seed: int, folder: Path):
    model = copy.deepcopy(base)
    model_methods.apply_method(model, "lora", head, lora_cfg("q", "v", "ffn"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    adapter_store.save_adapter(model, folder, {"num_labels": 2})
    return model.eval()


def test_swap_adapters_matches_each_adapters_own_model(tmp_path: Path) -> None:
    _, base, head = tiny_text("bert")
    own = {name: _adapter_model(base, head, seed, tmp_path / name) for seed, name in ((1, "sst"), (2, "news"))}
    shared = copy.deepcopy(base)
    model_methods.apply_method(shared, "lora", head, lora_cfg("q", "v", "ffn"))
    shared.eval()
    bank = inference.AdapterBank(shared)
    for name in own:
        bank.add(name, tmp_path / name)
    ids = torch.randint(5, 100, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name in ("sst", "news", "sst"):
            start = time.perf_counter()
            bank.use(name)
            swap_ms = (time.perf_counter() - start) * 1000
            torch.testing.assert_close(shared(input_ids=ids).logits, own[name](input_ids=ids).logits)
            assert bank.active == name and swap_ms < 100
        assert not torch.allclose(own["sst"](input_ids=ids).logits, own["news"](input_ids=ids).logits)
    injection.merge(shared)
    with pytest.raises(Exception, match="unmerge"):
        bank.use("news")
