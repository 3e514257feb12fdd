"""Parity with the reference implementation: our LoRA exported to PEFT, and PEFT adapters imported, give
equal logits (atol 1e-5) on tiny DistilBERT / BERT. peft is a test-only dependency."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lora_exp.adapters.peft_format import export_peft, import_peft
from lora_exp.errors import LoraExpError
from lora_exp.models import heads as model_heads
from lora_exp.models import methods as model_methods
from tests.helpers.models import lora_cfg, randomise_trainables, tiny_text

TARGETS = {"distilbert": ["q_lin", "v_lin", "lin1"], "bert": ["query", "value", "intermediate.dense"]}
ALIASES = ("q", "v")


def _ids() -> torch.Tensor:
    return torch.randint(5, 100, (3, 13), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["distilbert", "bert"])
def test_export_to_peft_gives_equal_logits(arch: str, tmp_path: Path) -> None:
    _, base, head = tiny_text(arch)
    ours = copy.deepcopy(base)
    model_methods.apply_method(ours, "lora", head, lora_cfg(*ALIASES, "ffn"))
    randomise_trainables(ours)
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
    _, base, head = tiny_text(arch)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[arch], task_type="SEQ_CLS", modules_to_save=head, use_rslora=rslora
    )
    ref = get_peft_model(copy.deepcopy(base), config)
    randomise_trainables(ref)
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
    _, base, head = tiny_text("distilbert")
    ref = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_lin"], task_type="SEQ_CLS")
    )
    ref.save_pretrained(tmp_path / "ref")
    with pytest.raises(LoraExpError, match=r"saves no weights for the head \['pre_classifier'\]"):
        import_peft(copy.deepcopy(base), tmp_path / "ref", head)


def test_export_keys_follow_peft_layout(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _, base, head = tiny_text("bert")
    model_methods.apply_method(base, "lora", head, lora_cfg("q"))
    export_peft(base, tmp_path / "p", {"head_modules": head})
    keys = set(load_file(str(tmp_path / "p" / "adapter_model.safetensors")))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.classifier.weight" in keys and "base_model.model.classifier.bias" in keys
    assert len(keys) == 2 * 2 + 2


def _tiny_gpt2() -> tuple[torch.nn.Module, list[str]]:
    from transformers import AutoModelForSequenceClassification

    from tests.helpers.tiny_checkpoints import config

    torch.manual_seed(0)
    conf = config("gpt2")
    conf.pad_token_id = 1
    base = AutoModelForSequenceClassification.from_config(conf).eval()
    return base, model_heads.find_head(base)


def test_gpt2_conv1d_parity_with_peft(tmp_path: Path) -> None:
    """GPT-2's Conv1D layers (fan_in_fan_out): PEFT built from our tensors, export, import, merge."""
    import json

    from lora_exp.adapters import targets as injection

    base, head = _tiny_gpt2()
    assert head == ["score"]
    ours = copy.deepcopy(base)
    adapted = model_methods.apply_method(ours, "lora", head, lora_cfg("qkv", "o", "ffn"))
    assert len(adapted) == 2 * 4 and all(m.fan_in_fan_out for _, m in injection.lora_layers(ours))
    randomise_trainables(ours)
    ours.eval()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        task_type="SEQ_CLS",
        modules_to_save=head,
    )
    ref = get_peft_model(copy.deepcopy(base), config)
    mine = dict(ours.named_parameters())
    with torch.no_grad():  # the same tensors, placed by PEFT's names
        copied = 0
        for name, p in ref.named_parameters():
            if p.requires_grad:
                key = name.removeprefix("base_model.model.").replace(".default.", ".")
                p.copy_(mine[key.replace(".modules_to_save.", ".")])
                copied += 1
        assert copied == 2 * 2 * 4 + 1  # A and B of 8 layers + score
        expected = ours(input_ids=_ids()).logits
        assert not torch.allclose(expected, base(input_ids=_ids()).logits)  # the adapter matters
        torch.testing.assert_close(ref.eval()(input_ids=_ids()).logits, expected, atol=1e-5, rtol=1e-5)

        export_peft(ours, tmp_path / "peft", {"head_modules": head})
        assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
        torch.testing.assert_close(loaded(input_ids=_ids()).logits, expected, atol=1e-5, rtol=1e-5)

        back = copy.deepcopy(base)
        assert sorted(import_peft(back, tmp_path / "peft", head)) == sorted(adapted)
        torch.testing.assert_close(back.eval()(input_ids=_ids()).logits, expected, atol=1e-5, rtol=1e-5)

        w0 = base.transformer.h[0].attn.c_attn.weight.clone()
        assert injection.merge(ours) == 8
        torch.testing.assert_close(ours(input_ids=_ids()).logits, expected, atol=1e-5, rtol=1e-5)
        injection.unmerge(ours)
        torch.testing.assert_close(ours.transformer.h[0].attn.c_attn.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_export_refuses_a_mix_of_conv1d_and_linear(tmp_path: Path) -> None:
    base, head = _tiny_gpt2()
    base.transformer.h[0].attn.c_attn = torch.nn.Linear(16, 48)  # a Linear among Conv1D layers
    model_methods.apply_method(base, "lora", head, lora_cfg("qkv", "o"))
    with pytest.raises(LoraExpError) as err:
        export_peft(base, tmp_path / "p", {"head_modules": head})
    assert str(err.value) == (
        "export_peft(): the adapter mixes transformers Conv1D layers (fan_in_fan_out) with nn.Linear ones; "
        "PEFT takes one fan_in_fan_out per adapter"
    )
