"""The base fingerprint is taken from the pristine fp32 base (before PiSSA and base_dtype rewrite it)."""

from __future__ import annotations

import torch

from lora_exp.config.schema import typed_config
from lora_exp.training.job import build_model_for
from tests.helpers.configs import make_cfg


def test_fingerprint_is_the_pristine_fp32_base() -> None:
    """PiSSA rewrites W0 and base_dtype=bf16 stores it in bf16: the fingerprint is taken before both, so it
    equals the plain fp32 build's; the head's init does not enter it; another seed's weights give another."""

    def fingerprint(*overrides: str) -> str:
        return build_model_for(typed_config(make_cfg(["model=tiny_bert", *overrides])))[1].base_fingerprint

    plain = fingerprint()
    pissa_bf16 = build_model_for(
        typed_config(make_cfg(["model=tiny_bert", "lora.init=pissa", "model.base_dtype=bf16"]))
    )[1]
    assert pissa_bf16.base_fingerprint == plain
    layer = pissa_bf16.bert.encoder.layer[0].attention.self.query
    assert layer.base_layer.weight.dtype == torch.bfloat16  # really stored in bf16, really rewritten
    assert fingerprint("method=frozen") == fingerprint("method=full") == plain
    assert fingerprint("trainer.seed=1") != plain
