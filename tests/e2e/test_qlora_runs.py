"""QLoRA through train(): a LoRA run on an nf4 base (gradient checkpointing on) exports to PEFT's layout and
PEFT's own LoRA on bitsandbytes layers gives our logits; predict says merged or unmerged; the base fingerprint still
refuses another base; frozen on int8 uses the feature cache; tiny Whisper trains on nf4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lora_exp import inference
from lora_exp.commands import export_peft
from lora_exp.config.schema import typed_config
from lora_exp.errors import LoraExpError
from lora_exp.training import loop
from lora_exp.training.job import build_model_for
from lora_exp.training.rundir import recorded_config
from tests.helpers.configs import make_cfg, tiny_run
from tests.helpers.quant import quantise_like_a_client

bnb = pytest.importorskip("bitsandbytes")

# Measured on this project's CPU (bitsandbytes 0.50.2, torch 2.13.0+cpu): PEFT on the same nf4 layers differs from
# ours by < 1e-6 in the logits (the same dequantised W0, the update computed the same way); the bound leaves room.
PEFT_ATOL = 1e-5
TEXTS = ["good great fun film", "bad boring dull plot", "the acting was rotten"]


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory: pytest.TempPathFactory, reviews: Path) -> Path:
    """A LoRA run on an nf4 base (q, v and the FFN), 6 updates at a high lr so B moves, checkpointing on."""
    root = tmp_path_factory.mktemp("qlora")
    overrides = tiny_run(reviews, root, "logger=none", "trainer.epochs=1", "trainer.max_steps=6")
    overrides += ["model.base_dtype=nf4", "optimizer.lr=2e-2", "lora.targets=[q,v,ffn]"]
    overrides += ["trainer.gradient_checkpointing=true", "optimizer.warmup_ratio=0.0"]
    result = loop.train(make_cfg(overrides), root / "run")
    assert result["status"] == "ok" and result["base_dtype"] == "nf4"
    return root / "run"


def test_export_peft_of_a_qlora_run_equals_peft_on_bitsandbytes_layers(qlora_run: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    assert export_peft.main(str(qlora_run), str(tmp_path / "peft")) == 0
    exported = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA" and len(exported["target_modules"]) == 2 * 4
    # the client's base: the same seeded fp32 weights (method=frozen builds exactly those), quantised by hand
    cfg = OmegaConf.merge(recorded_config(qlora_run), {"method": {"name": "frozen"}, "model": {"base_dtype": "fp32"}})
    _, client, _, _ = build_model_for(typed_config(cfg))
    assert quantise_like_a_client(client) == 2 * 6
    theirs = PeftModel.from_pretrained(client, tmp_path / "peft").eval()
    assert sum(isinstance(m, PeftLinear4bit) for m in theirs.modules()) == 2 * 4  # PEFT's LoRA on bnb layers
    tokenizer, ours = inference.load_trained(qlora_run, merge=False)
    _, merged = inference.load_trained(qlora_run, merge=True)
    ids = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref, got, folded = theirs(**ids).logits, ours(**ids).logits, merged(**ids).logits
    base = build_model_for(typed_config(OmegaConf.merge(recorded_config(qlora_run), {"method": {"name": "frozen"}})))
    with torch.no_grad():
        plain = base[1].eval()(**ids).logits  # the nf4 base without the adapter: the update is not negligible
    assert (got - plain).abs().max() > 100 * PEFT_ATOL
    torch.testing.assert_close(got, ref, atol=PEFT_ATOL, rtol=0)
    torch.testing.assert_close(folded, ref, atol=PEFT_ATOL, rtol=0)  # merged into the fp32 copy: the same function


def test_predict_says_merged_or_unmerged(qlora_run: Path, capsys: pytest.CaptureFixture) -> None:
    merged = inference.predict(qlora_run, TEXTS, progress=False)
    said = capsys.readouterr().err
    assert "the nf4 base is dequantised into an fp32 copy and the adapter merged into it" in said
    unmerged = inference.predict(qlora_run, TEXTS, progress=False, merge=False)
    assert "the adapter runs unmerged on the nf4 base" in capsys.readouterr().err
    assert [label for label, _ in merged] == [label for label, _ in unmerged]
    assert [p for _, p in merged] == pytest.approx([p for _, p in unmerged], abs=1e-5)


def test_base_fingerprint_refuses_another_quantised_base(qlora_run: Path) -> None:
    cfg = typed_config(OmegaConf.merge(recorded_config(qlora_run), {"trainer": {"seed": 7}}))  # other random base
    _, other, _, _ = build_model_for(cfg)
    bank = inference.AdapterBank(other)
    with pytest.raises(LoraExpError, match=r"was trained on base .* other weights of the same shapes"):
        bank.add("theirs", qlora_run / "adapter")
    _, same, _, _ = build_model_for(typed_config(recorded_config(qlora_run)))
    inference.AdapterBank(same).add("ours", qlora_run / "adapter")  # its own base: accepted


def test_frozen_int8_uses_the_feature_cache(tiny_cfg, tmp_path: Path) -> None:  # noqa: ANN001
    r = loop.train(tiny_cfg("method=frozen", "model.base_dtype=int8", "trainer.max_steps=3"), tmp_path / "run")
    assert r["status"] == "ok" and r["feature_cache"] and r["base_dtype"] == "int8"
    assert r["mem_quant_state_bytes"] > 0 and r["mem_dequant_buffer_bytes"] == 64 * 32 * 4  # FFN: out x in fp32


def test_tiny_whisper_trains_lora_on_nf4(lora_exp_cache: Path, tmp_path: Path) -> None:
    from tests.e2e.test_audio_runs import E2E

    r = loop.train(make_cfg([*E2E, "model.base_dtype=nf4", "trainer.max_steps=2"]), tmp_path / "run")
    assert r["status"] == "ok" and r["base_dtype"] == "nf4"
    assert r["adapter_params"] == 2 * 2 * 8 * (32 + 32)  # LoRA on q, v of the two encoder layers
    assert r["mem_quant_state_bytes"] > 0
