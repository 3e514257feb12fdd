"""The bitsandbytes layers of a quantised frozen base (``model.base_dtype=nf4|fp4|int8``): the Linear layers
inside the encoder's blocks become bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` (``models.methods.
quantize_base``); here the layers, their sizes, and a dequantised copy for merging.

Which layers: every ``nn.Linear`` whose path has a block index (``...layer.3...``, ``...layers.3...``), outside
the head, including the ones a LoRA layer wraps (its ``base_layer``): the layers LoRA can target. Embeddings,
norms, the pooler and the head are left alone (fp32, as PEFT's ``prepare_model_for_kbit_training`` keeps them).
4-bit: blocks of 64 weights share one absmax; with double quantisation (``model.double_quant``) those absmax
are themselves 8-bit, in blocks of 256 with an fp32 absmax each (QLoRA's scheme). 8-bit: one int8 per weight
and one fp32 scale per output row (LLM.int8, outlier threshold 6.0 as transformers' ``llm_int8_threshold``).
The quantised weights are made on the CPU (``.to("cpu")`` quantises, what bitsandbytes does on any device) and
move with the model; on CUDA bitsandbytes then runs its GPU kernels, on a CPU its torch code.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lora_exp.device import QUANT_DTYPES
from lora_exp.errors import LoraExpError

INT8_THRESHOLD = 6.0  # transformers' BitsAndBytesConfig llm_int8_threshold default
EXTRA = "quant"  # pyproject's optional dependency group that brings bitsandbytes


def is_quant(base_dtype: str) -> bool:
    """Whether ``model.base_dtype`` names a bitsandbytes quantisation (nf4 | fp4 | int8)."""
    return base_dtype in QUANT_DTYPES


def logical_numel(p: torch.Tensor) -> int:
    """Elements a parameter stands for: a packed 4-bit weight holds two per byte (its ``quant_state.shape``)."""
    qs = getattr(p, "quant_state", None)
    return int(qs.shape.numel()) if qs is not None and hasattr(qs, "shape") else p.numel()


def bitsandbytes(option: str = "model.base_dtype") -> Any:
    """The ``bitsandbytes`` module, or one line naming the extra that installs it."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise LoraExpError(
            f"{option} needs bitsandbytes, which is not installed: pip install 'lora-exp[{EXTRA}]' "
            f"(or pip install bitsandbytes)"
        ) from err
    return bnb


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit Linear (no import of bitsandbytes when absent)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") and type(module).__module__.startswith(
        "bitsandbytes"
    )


def quantize_linear(linear: nn.Linear, kind: str, compute_dtype: torch.dtype, double_quant: bool) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight quantised as ``kind`` (its bias kept), on the CPU."""
    bnb = bitsandbytes()
    bias = linear.bias is not None
    if kind == "int8":
        # said by every eval batch on a CPU (its inference path casts to fp16 for the int8 quantisation)
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        q = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False, threshold=INT8_THRESHOLD
        )
    else:
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=kind,
        )
    with torch.no_grad():
        q.load_state_dict({k: v.detach().float().cpu() for k, v in linear.state_dict().items()})
    q = q.to("cpu")  # quantises
    return q.requires_grad_(False)


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """The 4-bit layers' compute dtype (the run's precision: the dequantised weight and the matmul)."""
    for m in model.modules():
        if is_quantized(m) and hasattr(m, "compute_dtype"):
            m.compute_dtype = dtype


def int8_scales(module: nn.Module) -> torch.Tensor:
    """The per-row absmax of a ``Linear8bitLt`` (on the weight before the first forward, in its state after)."""
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else module.state.SCB


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """W0 as (out, in) fp32 from a bitsandbytes layer (what its forward multiplies with, before the cast)."""
    if type(module).__name__ == "Linear8bitLt":
        return module.weight.data.float() * int8_scales(module).float().view(-1, 1) / 127.0
    bnb = bitsandbytes()
    w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return w.float().reshape(module.out_features, module.in_features)


def dequantize(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A plain ``nn.Linear`` in ``dtype`` with the quantised layer's (dequantised) weight and its bias."""
    w = dequantized_weight(module)
    out = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(w.to(dtype))
        if module.bias is not None:
            out.bias.copy_(module.bias.to(dtype))
    return out.requires_grad_(False).to(w.device)


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every quantised layer (also inside LoRA layers) by its dequantised ``nn.Linear``; returns how many."""
    names = [n for n, m in model.named_modules() if is_quantized(m)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, dequantize(getattr(parent, child), dtype))
    return len(names)


def state_bytes(module: nn.Module) -> int:
    """Bytes a quantised layer holds besides its packed weight (not parameters, so ``model.parameters()`` misses
    them): 4-bit absmax (8-bit with double quantisation, plus the nested fp32 absmax and both code tables), or
    8-bit's per-row fp32 scales."""
    if type(module).__name__ == "Linear8bitLt":
        return _nbytes(int8_scales(module))
    qs = module.weight.quant_state
    total = _nbytes(qs.absmax) + _nbytes(qs.code)
    if getattr(qs, "nested", False) and qs.state2 is not None:
        total += _nbytes(qs.state2.absmax) + _nbytes(qs.state2.code) + _nbytes(qs.offset)
    return total


def dequant_buffer_bytes(module: nn.Module) -> int:
    """The transient full-size weight a quantised layer builds in each forward and backward (bitsandbytes saves
    only the packed weight for backward and dequantises it again there): out x in in fp32, plus its cast when the
    layer computes in 16 bits (a 4-bit layer's ``compute_dtype``)."""
    dtype = getattr(module, "compute_dtype", None) or torch.float32
    cast = 0 if dtype == torch.float32 else torch.finfo(dtype).bits // 8
    return module.out_features * module.in_features * (4 + cast)


def keeps_input(module: nn.Module) -> bool:
    """Whether a layer's bitsandbytes autograd function keeps its input alive for backward as a plain attribute,
    out of sight of ``saved_tensors_hooks``: ``Linear8bitLt`` (``MatMul8bitFp`` on a CPU: ``ctx.A``, kept even
    when only the input's gradient is needed; ``MatMul8bitLt`` on CUDA: ``ctx.tensors``). The 4-bit
    ``MatMul4Bit`` keeps only the packed weight."""
    return is_quantized(module) and type(module).__name__ == "Linear8bitLt"


def watch_kept_inputs(model: nn.Module, record: Callable[[torch.Tensor], Any]) -> list[Any]:
    """Forward pre-hooks on every layer that ``keeps_input``: ``record(x)`` for each input the graph will keep
    (grad enabled and ``x`` requiring grad: the autograd node exists then, and lives until backward reaches it,
    with gradient checkpointing too). Returns the hook handles (``.remove()`` each)."""

    def hook(_: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if torch.is_tensor(x) and x.requires_grad and torch.is_grad_enabled():
            record(x)

    return [m.register_forward_pre_hook(hook) for m in model.modules() if keeps_input(m)]


def quant_summary(model: nn.Module) -> dict[str, int]:
    """``mem_quant_state_bytes`` (absmax, scales, code tables: held besides the packed weights, which are
    parameters) and ``mem_dequant_buffer_bytes`` (the largest layer's transient dequantised weight: one layer
    runs at a time); both 0 without a quantised layer."""
    layers = [m for m in model.modules() if is_quantized(m)]
    return {
        "mem_quant_state_bytes": sum(state_bytes(m) for m in layers),
        "mem_dequant_buffer_bytes": max((dequant_buffer_bytes(m) for m in layers), default=0),
    }


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()
