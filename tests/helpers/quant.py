"""A PEFT user's quantised base on a CPU, made with bitsandbytes directly (transformers' ``from_pretrained(
quantization_config=...)`` fails there with bitsandbytes 0.50.2): each block Linear becomes a ``Linear4bit`` or
``Linear8bitLt`` loaded from the fp32 weights and quantised by ``.to("cpu")``."""

from __future__ import annotations

import torch
from torch import nn


def quantise_like_a_client(model: nn.Module, kind: str = "nf4") -> int:
    """Quantise every ``nn.Linear`` inside a block (``.layer.`` in its path) of ``model`` in place as ``kind``
    (nf4 / fp4: double quant, fp32 compute; int8: LLM.int8, threshold 6.0) and flag the model as transformers does
    (``is_loaded_in_4bit`` / ``_8bit``: PEFT then picks its bitsandbytes layers); returns how many."""
    import bitsandbytes as bnb

    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and ".layer." in n]
    for name in names:
        parent, _, child = name.rpartition(".")
        lin = model.get_submodule(name)
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(
                lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False, threshold=6.0
            )
        else:
            q = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=lin.bias is not None,
                compute_dtype=torch.float32,
                compress_statistics=True,
                quant_type=kind,
            )
        q.load_state_dict(lin.state_dict())
        setattr(model.get_submodule(parent), child, q.to("cpu"))
    if kind == "int8":
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True
    return len(names)
