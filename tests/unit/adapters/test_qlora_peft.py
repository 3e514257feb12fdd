"""Parity with PEFT on bitsandbytes layers for every LoRA variant we allow on a quantised base that PEFT supports
there: our adapter, trained a few steps on an nf4 / int8 base, saved, reloaded onto a rebuilt base and exported to
PEFT's layout (what ``lora-exp export-peft`` does), then loaded by ``PeftModel.from_pretrained`` onto the same fp32
weights quantised by hand with bitsandbytes, gives our reloaded model's logits.

PEFT 0.21.2's layers there: LoRA, rsLoRA, LoRA-FA (a plain LoRA adapter to PEFT) and DoRA ->
``peft.tuners.lora.bnb.Linear4bit`` / ``Linear8bitLt``; AdaLoRA -> ``peft.tuners.adalora.bnb.SVDLinear4bit`` /
``SVDLinear8bitLt``; VeRA -> its generic ``vera.layer.Linear`` around the bitsandbytes layer.

Tolerance, measured on this project's CPU (bitsandbytes 0.50.2, torch 2.13.0+cpu, peft 0.21.2) with these tests:
the largest |logit difference| of our unmerged model against PEFT's was 7.5e-9 (AdaLoRA, nf4; 0 or < 6e-9 for the
others), so ``PEFT_ATOL = 1e-6`` leaves two orders of magnitude. Our model merged into the dequantised fp32 copy
differs from PEFT by < 2e-8 on nf4 (asserted with the same bound) and by up to 2.1e-5 on int8 (not asserted: in
eval mode LLM.int8 also quantises the activations, which the fp32 copy does not).

PEFT's model runs one forward only: with DoRA on a CPU ``Linear8bitLt`` a second eval forward fails inside
bitsandbytes (the layer's ``state.SCB`` is None by then; PEFT 0.21.2 / bitsandbytes 0.50.2), and so does the first
one if the client's int8 layers ran a forward before PEFT wrapped them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lora_exp.adapters import store
from lora_exp.adapters.peft_format import export_peft
from lora_exp.adapters.targets import merge_and_unload
from lora_exp.config.schema import typed_config
from lora_exp.quantize import is_quantized
from lora_exp.training.job import build_model_for
from tests.helpers.quant import quantise_like_a_client

pytest.importorskip("bitsandbytes")

PEFT_ATOL = 1e-6
BATCH = {"input_ids": torch.randint(5, 100, (4, 16), generator=torch.Generator().manual_seed(0))}
BATCH["attention_mask"] = torch.ones(4, 16, dtype=torch.long)
LABELS = torch.tensor([0, 1, 0, 1])
VARIANTS = {  # our overrides; PEFT's layer class around a bitsandbytes base
    "dora": (["lora.variant=dora"], "lora.bnb"),
    "rslora": (["lora.rslora=true"], "lora.bnb"),
    "lora_fa": (["lora.variant=lora_fa"], "lora.bnb"),
    "adalora": (["lora.variant=adalora"], "adalora.bnb"),
    "vera": (["lora.variant=vera", "lora.vera.r=16"], "vera.layer"),
}


def trained(cfg, steps: int = 3) -> tuple[torch.nn.Module, list[str], list[str]]:  # noqa: ANN001
    """The adapted model after ``steps`` AdamW steps at a high lr (B, magnitudes, VeRA's vectors move), its head
    and its LoRA layers' paths."""
    _, model, head, adapted = build_model_for(cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(**BATCH, labels=LABELS).loss.backward()
        opt.step()
    return model.eval(), head, adapted


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_adapter_on_a_quantised_base_equals_peft_on_bitsandbytes_layers(
    tiny_cfg,  # noqa: ANN001
    tmp_path: Path,
    variant: str,
    kind: str,
) -> None:
    from peft import PeftModel

    overrides, peft_layer = VARIANTS[variant]
    raw = tiny_cfg("method=lora", f"model.base_dtype={kind}", "lora.targets=[q,v,ffn]", *overrides)
    cfg = typed_config(raw)
    model, head, adapted = trained(cfg)
    # saved and reloaded onto a rebuilt quantised base, then exported: the export-peft command's steps
    store.save_adapter(model, tmp_path / "adapter", {"head_modules": head, "dropout": 0.0, "base_model": "tiny"})
    meta, tensors = store.read_adapter(tmp_path / "adapter")
    _, ours, _, _ = build_model_for(cfg)
    store.load_into(ours, tensors, "adapter")
    export_peft(ours, tmp_path / "peft", meta)
    # the client's base: the same seeded fp32 weights (method=frozen builds exactly those), quantised by hand
    _, client, _, _ = build_model_for(
        typed_config(OmegaConf.merge(raw, {"method": {"name": "frozen"}, "model": {"base_dtype": "fp32"}}))
    )
    assert quantise_like_a_client(client, kind) == 2 * 6
    theirs = PeftModel.from_pretrained(client, tmp_path / "peft").eval()  # one forward only: see the docstring
    _, plain, _, _ = build_model_for(typed_config(OmegaConf.merge(raw, {"method": {"name": "frozen"}})))
    plain.eval()
    wrappers = [m for m in theirs.modules() if type(m).__module__ == f"peft.tuners.{peft_layer}"]
    assert len(wrappers) == len(adapted) == 2 * 4 and all(is_quantized(m.get_base_layer()) for m in wrappers)
    with torch.no_grad():
        ref, got, live = theirs(**BATCH).logits, ours.eval()(**BATCH).logits, model(**BATCH).logits
        base = plain(**BATCH).logits  # the quantised base alone: the adapter's effect is not negligible
        merge_and_unload(ours)  # into the dequantised fp32 copy, in place
        folded = ours(**BATCH).logits
    assert torch.equal(got, live)
    assert (got - base).abs().max() > 100 * PEFT_ATOL
    torch.testing.assert_close(got, ref, atol=PEFT_ATOL, rtol=0)
    if kind == "nf4":  # int8's eval path quantises activations; the dequantised fp32 copy does not
        torch.testing.assert_close(folded, ref, atol=PEFT_ATOL, rtol=0)


def test_pissa_on_a_quantised_base_is_allowed_but_peft_refuses_it_on_bitsandbytes_layers(
    tiny_cfg,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    """Ours follows PEFT's advice (PiSSA on the fp32 W0, then the residual quantised); PEFT's own PiSSA refuses a
    bitsandbytes layer, so the export loads in PEFT onto a 16/32-bit base only (docs/methods.md says so)."""
    from peft import PeftModel

    raw = tiny_cfg("method=lora", "model.base_dtype=nf4", "lora.init=pissa")
    _, ours, head, _ = build_model_for(typed_config(raw))
    export_peft(ours, tmp_path / "peft", {"head_modules": head})
    _, client, _, _ = build_model_for(
        typed_config(OmegaConf.merge(raw, {"method": {"name": "frozen"}, "model": {"base_dtype": "fp32"}}))
    )
    quantise_like_a_client(client, "nf4")
    with pytest.raises(TypeError, match="Please initialize PiSSA under float32"):
        PeftModel.from_pretrained(client, tmp_path / "peft")
