"""Parity with the reference implementation: our LoRA exported to PEFT, and PEFT adapters imported, give
equal logits (atol 1e-5) on tiny DistilBERT / BERT. peft is a test-only dependency."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lora_exp import models
from lora_exp.errors import LoraExpError
from lora_exp.peft_format import export_peft, import_peft

from .test_models import lora_cfg, tiny

TARGETS = {"distilbert": ["q_lin", "v_lin", "lin1"], "bert": ["query", "value", "intermediate.dense"]}
ALIASES = ("q", "v")


def _ids() -> torch.Tensor:
    return torch.randint(5, 100, (3, 13), generator=torch.Generator().manual_seed(1))


def _randomise_trainables(model: torch.nn.Module) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.2)


@pytest.mark.parametrize("arch", ["distilbert", "bert"])
def test_export_to_peft_gives_equal_logits(arch: str, tmp_path: Path) -> None:
    _, base, head = tiny(arch)
    ours = copy.deepcopy(base)
    models.apply_method(ours, "lora", head, lora_cfg(*ALIASES, "ffn"))
    _randomise_trainables(ours)
    export_peft(ours, tmp_path / "peft", {"head_modules": head})
    ref = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    ours.eval()
    with torch.no_grad():
        expected = ours(input_ids=_ids()).logits
        assert not torch.allclose(expected, base.eval()(input_ids=_ids()).logits)  # the adapter matters
        torch.testing.assert_close(ref(input_ids=_ids()).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["distilbert", "bert"])
@pytest.mark.parametrize("rslora", [False, True])
def test_import_from_peft_gives_equal_logits(arch: str, rslora: bool, tmp_path: Path) -> None:
    _, base, head = tiny(arch)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[arch], task_type="SEQ_CLS", modules_to_save=head, use_rslora=rslora
    )
    ref = get_peft_model(copy.deepcopy(base), config)
    _randomise_trainables(ref)
    ref.save_pretrained(tmp_path / "ref")
    ours = copy.deepcopy(base)
    adapted = import_peft(ours, tmp_path / "ref", head)
    assert len(adapted) == 2 * 3  # 2 layers x 3 targets
    with torch.no_grad():
        torch.testing.assert_close(
            ours.eval()(input_ids=_ids()).logits, ref.eval()(input_ids=_ids()).logits, atol=1e-5, rtol=1e-5
        )


def test_peft_adapter_without_the_head_is_refused(tmp_path: Path) -> None:
    """PEFT's SEQ_CLS default saves `classifier` but not DistilBERT's newly initialised `pre_classifier`."""
    _, base, head = tiny("distilbert")
    ref = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_lin"], task_type="SEQ_CLS")
    )
    ref.save_pretrained(tmp_path / "ref")
    with pytest.raises(LoraExpError, match=r"saves no weights for the head \['pre_classifier'\]"):
        import_peft(copy.deepcopy(base), tmp_path / "ref", head)


def test_export_keys_follow_peft_layout(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _, base, head = tiny("bert")
    models.apply_method(base, "lora", head, lora_cfg("q"))
    export_peft(base, tmp_path / "p", {"head_modules": head})
    keys = set(load_file(str(tmp_path / "p" / "adapter_model.safetensors")))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.classifier.weight" in keys and "base_model.model.classifier.bias" in keys
    assert len(keys) == 2 * 2 + 2
