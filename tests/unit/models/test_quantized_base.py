"""model.base_dtype=nf4|fp4|int8: the block Linears quantised by bitsandbytes, the rest left alone, our LoRA layers
around the quantised base, the adapted model equal to the quantised base at step 0, merging into an fp32 copy,
and the one-line refusals."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from lora_exp.adapters import targets as injection
from lora_exp.adapters.layer import LoRALinear
from lora_exp.config import checks
from lora_exp.config.schema import typed_config
from lora_exp.errors import LoraExpError
from lora_exp.models.methods import block_linears, count_parameters
from lora_exp.quantize import dequantized_weight, is_quantized
from lora_exp.training import job as job_setup
from tests.helpers.configs import make_cfg

pytest.importorskip("bitsandbytes")

BATCH = {"input_ids": torch.randint(5, 100, (4, 16), generator=torch.Generator().manual_seed(0))}
BATCH["attention_mask"] = torch.ones(4, 16, dtype=torch.long)


def build(tiny_cfg, *overrides: str) -> tuple[nn.Module, list[str], list[str]]:
    _, model, head, adapted = job_setup.build_model_for(typed_config(tiny_cfg(*overrides)))
    return model.eval(), head, adapted


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_block_linears_are_quantised_the_rest_is_not(tiny_cfg, kind: str) -> None:
    fp32, head, _ = build(tiny_cfg, "method=lora")
    model, _, adapted = build(tiny_cfg, "method=lora", f"model.base_dtype={kind}")
    quantised = [n for n, m in model.named_modules() if is_quantized(m)]
    # every Linear inside a block: q, k, v, o, and both FFN layers of 2 layers (q and v inside their LoRA layer)
    assert len(quantised) == 2 * 6 and all(".layer." in n for n in quantised)
    assert {f"{n}.base_layer" for n in adapted} <= set(quantised)
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear and ".lora_" not in n]
    assert plain == ["bert.pooler.dense", "classifier"]  # pooler and head stay
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.float32
    for name in adapted:  # our LoRA layer around the quantised base, fp32 factors that train
        layer = model.get_submodule(name)
        assert isinstance(layer, LoRALinear) and layer.lora_A.weight.dtype == torch.float32
        assert layer.lora_A.weight.requires_grad and not any(p.requires_grad for p in layer.base_layer.parameters())
    assert count_parameters(model, head)["total"] == count_parameters(fp32, head)["total"]  # packed counts in full
    bits = {"nf4": 4, "fp4": 4, "int8": 8}[kind]
    w = model.get_submodule(quantised[0]).weight
    assert w.numel() * w.element_size() * 8 == 32 * 32 * bits  # the packed weight is its real size


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_adapters_leave_the_quantised_base_unchanged_at_step_0(tiny_cfg, variant: str) -> None:
    frozen, _, _ = build(tiny_cfg, "method=frozen", "model.base_dtype=nf4")
    lora, _, _ = build(
        tiny_cfg, "method=lora", "model.base_dtype=nf4", f"lora.variant={variant}", "lora.targets=[q,v,ffn]"
    )
    fp32, _, _ = build(tiny_cfg, "method=frozen")
    with torch.no_grad():
        ref, got, full = frozen(**BATCH).logits, lora(**BATCH).logits, fp32(**BATCH).logits
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert not torch.allclose(ref, full, atol=1e-5)  # the base really is quantised ...
    assert torch.allclose(ref, full, atol=0.1)  # ... and close to the fp32 one


def test_backward_reaches_the_adapters_only(tiny_cfg) -> None:
    model, _, adapted = build(tiny_cfg, "method=lora", "model.base_dtype=int8", "trainer.gradient_checkpointing=true")
    model.train()
    for name in adapted:
        torch.nn.init.normal_(model.get_submodule(name).lora_B.weight)
    model(**BATCH, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("classifier") for n in grads)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_and_unload_folds_into_an_fp32_copy(tiny_cfg, kind: str) -> None:
    model, _, adapted = build(tiny_cfg, "method=lora", f"model.base_dtype={kind}", "lora.targets=[q,v,ffn]")
    torch.manual_seed(1)
    for name in adapted:
        torch.nn.init.normal_(model.get_submodule(name).lora_B.weight, std=0.05)
    w0 = dequantized_weight(model.get_submodule(adapted[0]).base_layer)
    with torch.no_grad():
        unmerged = model(**BATCH).logits
        assert injection.merge_and_unload(model) == len(adapted)
        merged = model(**BATCH).logits
    assert not [n for n, m in model.named_modules() if is_quantized(m)]  # every block Linear is plain fp32 now
    assert torch.allclose(merged, unmerged, atol=1e-4), (merged - unmerged).abs().max()
    first = model.get_submodule(adapted[0])
    assert first.weight.dtype == torch.float32 and not torch.equal(first.weight, w0)


def test_merge_in_place_on_a_quantised_base_is_refused(tiny_cfg) -> None:
    model, _, adapted = build(tiny_cfg, "method=lora", "model.base_dtype=nf4")
    with pytest.raises(LoraExpError, match=r"merge\(\): the base layer is quantised \(Linear4bit\)"):
        model.get_submodule(adapted[0]).merge()


def test_block_linears_of_whisper_are_its_encoder_layers() -> None:
    from lora_exp.models import audio
    from tests.helpers.audio import whisper_cfg

    _, model, head = audio.build(whisper_cfg(), 2)
    names = block_linears(model, head)
    assert names and all(n.startswith("encoder.layers.") for n in names) and not any("projector" in n for n in names)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=full"], r"model.base_dtype=nf4 quantises the frozen base, but method=full trains every weight"),
        (["lora.init=lora_ga"], r"lora.init=lora_ga needs W0's full gradient and rewrites W0"),
        (["lora.init=olora"], r"^lora.init=olora on a quantised base .*differs from PEFT's"),
    ],
)
def test_refused_before_any_work(overrides: list[str], message: str) -> None:
    with pytest.raises(LoraExpError, match=message):
        checks.validate(make_cfg(["model.base_dtype=nf4", *overrides]))


def test_missing_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(
        LoraExpError, match=r"^model.base_dtype=int8 needs bitsandbytes.*pip install 'lora-exp\[quant\]'$"
    ):
        checks.validate(make_cfg(["model.base_dtype=int8"]))
