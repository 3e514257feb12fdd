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

from .test_models import lora_cfg, tiny


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
    _, base, head = tiny("bert")
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


@pytest.mark.parametrize("method", ["lora", "full"])
def test_predict_prints_string_label_names(tiny_cfg, tmp_path: Path, method: str) -> None:
    """A csv labelled neg/pos trains with ids 0/1 (sorted names) and predict answers with the names."""
    import json

    from lora_exp.training import loop

    from .test_data import write_string_labels
    from .test_train import cli

    path = write_string_labels(tmp_path / "reviews.csv", ("pos", "neg"), n=80)
    cfg = tiny_cfg(
        "data=csv",
        f"data.path={path}",
        "data.text_column=review",
        "data.label_column=sentiment",
        f"method={method}",
        "trainer.max_steps=3",
    )
    run = tmp_path / "run"
    loop.train(cfg, run)
    if method == "lora":
        assert json.loads((run / "adapter" / "adapter_config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    proc = cli(["predict", f"adapter={run}", "text=good great film", "text=bad dull film"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert lines and all(label in ("neg", "pos") for label, _, _ in lines)
