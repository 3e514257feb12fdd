"""The methods: which parameters train (full / frozen / lora / bitfit), LoRA injection with the config's
options, the frozen base's storage dtype, one counting function for every method, facts of the loaded model."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lora_exp.adapters import params as adapter_params
from lora_exp.adapters import targets as injection
from lora_exp.adapters.dora import DoRALinear
from lora_exp.adapters.targets import is_under, layer_index
from lora_exp.device import DTYPES, QUANT_DTYPES
from lora_exp.errors import LoraExpError
from lora_exp.models.heads import head_parameters
from lora_exp.quantize import logical_numel, quantize_linear

if TYPE_CHECKING:
    from lora_exp.config.schema import LoraConfig


def apply_method(model: nn.Module, method: str, head: list[str], lora_cfg: LoraConfig | None = None) -> list[str]:
    """Set ``requires_grad`` for ``method``; for lora inject adapters (``lora_cfg``: the ``lora`` options, needed
    for ``method=lora`` only). Returns the LoRA module paths.

    bitfit: every bias + the head; lora: ``lora.bias`` (none | lora_only | all) biases train too.
    """
    if method == "full":
        model.requires_grad_(True)
        return []
    params = head_parameters(model, head)
    if not params:
        raise LoraExpError(
            f"method={method}: the model has no classification head parameter to train (head: "
            f"{'+'.join(head) or 'none found'}; nothing outside its base model nor newly initialised); use method=full"
        )
    model.requires_grad_(False)
    adapted: list[str] = []
    if method == "lora":
        if lora_cfg is None:
            raise LoraExpError("method=lora needs the lora options (apply_method's lora_cfg)")
        adapted = injection.inject(
            model,
            list(lora_cfg.targets),
            adapter_params.layer_rank(lora_cfg),  # VeRA: its own; AdaLoRA: its initial rank
            lora_cfg.alpha,
            lora_cfg.dropout,
            lora_cfg.rslora,
            protected=head,  # newly initialised: a frozen random base + LoRA would cripple the model
            variant=adapter_params.variant_of(lora_cfg),
            init=lora_cfg.init,
            layers=None if lora_cfg.layers is None else list(lora_cfg.layers),
            rank_pattern=dict(lora_cfg.rank_pattern or {}),
            alpha_pattern=dict(lora_cfg.alpha_pattern or {}),
            options=adapter_params.variant_options(lora_cfg),
        )
    for _, p in params:
        p.requires_grad_(True)
    for name in adapted:  # each layer class names what trains (LoRA-FA: B only; DoRA: + magnitude)
        sub = model.get_submodule(name).requires_grad_(False)
        for p in sub.trainable_parameters():
            p.requires_grad_(True)
    bias = "all" if method == "bitfit" else (lora_cfg.bias if method == "lora" and lora_cfg else "none")
    params = dict(model.named_parameters())
    for name in adapter_params.bias_parameters(model, bias, adapted):
        params[name].requires_grad_(True)
    return adapted


def count_parameters(model: nn.Module, head: list[str]) -> dict[str, int | float]:
    """One counting function for every method: adapter / head / other trainable, total (dedup by storage)."""
    seen: set[int] = set()
    counts = {"adapter": 0, "head": 0, "other": 0, "trainable": 0, "total": 0}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        counts["total"] += logical_numel(p)  # a packed 4-bit weight counts the weights it stands for
        if not p.requires_grad:
            continue
        counts["trainable"] += p.numel()
        if adapter_params.is_adapter_param(name):  # LoRA A/B and DoRA's lora_magnitude_vector
            counts["adapter"] += p.numel()
        elif is_under(name, head):
            counts["head"] += p.numel()
        else:
            counts["other"] += p.numel()
    counts["trainable_pct"] = 100.0 * counts["trainable"] / counts["total"]
    return counts


def store_frozen_in(model: nn.Module, base_dtype: str) -> int:
    """Store frozen parameters in ``base_dtype`` (``model.base_dtype``); trainable ones stay fp32 master weights.

    What PEFT users do with a bf16 base: the frozen weights take half the memory, autocast computes in
    bf16 anyway. DoRA's magnitudes are then taken again from the stored (cast) W0, so the model is still
    unchanged at step 0 (from the fp32 W0 they would not match the norm forward computes). Returns how many
    parameter tensors were converted.
    """
    dtype = DTYPES.get(base_dtype, torch.float32)  # nf4 / fp4 / int8: the rest stays fp32 (quantize_base)
    if dtype == torch.float32:
        return 0
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    for module in model.modules():
        if isinstance(module, DoRALinear) and n:
            module.reset_magnitude()
    return n


def block_linears(model: nn.Module, head: list[str]) -> list[str]:
    """Paths of the ``nn.Linear`` layers inside the blocks (a block index in the path: every layer LoRA can
    target), outside ``head``; inside a LoRA layer, its ``base_layer``."""
    return [
        n
        for n, m in model.named_modules()
        if type(m) is nn.Linear and layer_index(n) is not None and not is_under(n, head) and ".lora_" not in n
    ]


def quantize_base(model: nn.Module, kind: str, head: list[str], compute_dtype: str, double_quant: bool) -> list[str]:
    """``model.base_dtype=nf4|fp4|int8``: every block Linear (``block_linears``) replaced by its bitsandbytes
    layer (``lora_exp.quantize``) in place, computing in ``compute_dtype`` (the run's precision); returns their
    paths. Embeddings, norms, the pooler and the head stay fp32 (PEFT's ``prepare_model_for_kbit_training``).

    Called after LoRA injection: a LoRA layer's ``base_layer`` is quantised, its adapter (initialised on the
    full-precision W0, as PiSSA / OLoRA need) stays fp32, and DoRA's magnitudes are taken again from the
    dequantised W0, so the adapted model equals the quantised base at step 0.
    """
    if kind not in QUANT_DTYPES:
        raise LoraExpError(f"model.base_dtype={kind!r} is not one of {', '.join(QUANT_DTYPES)}")
    names = block_linears(model, head)
    if not names:
        raise LoraExpError(
            f"model.base_dtype={kind}: this {type(model).__name__} has no nn.Linear inside numbered blocks to "
            "quantise; use fp32 or bf16"
        )
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, quantize_linear(getattr(parent, child), kind, DTYPES[compute_dtype], double_quant))
    for module in model.modules():
        if isinstance(module, DoRALinear):
            module.reset_magnitude()
    return names


def model_facts(model: Any) -> dict[str, Any]:
    """Facts read from the loaded model (not the config): type, hidden size, layers, parameter count.

    The count is of the model's own tensors (LoRA A/B left out), deduplicated by storage (tied embeddings).
    """
    c = model.config

    def first(*names: str) -> Any:
        return next((getattr(c, n) for n in names if getattr(c, n, None) is not None), None)

    seen, n = set(), 0
    for name, p in model.named_parameters():
        if ".lora_" not in name and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += logical_numel(p)
    return {
        "model_type": getattr(c, "model_type", None),
        "hidden_size": first("hidden_size", "dim", "d_model", "n_embd"),
        "num_layers": first("num_hidden_layers", "n_layers", "num_layers", "n_layer"),
        "num_params": n,
    }


def base_fingerprint(model: nn.Module, head: list[str]) -> str:
    """sha256 of the base weights: every parameter outside ``head``, in name order (name, shape, fp32 bytes).

    ``build_model`` takes it before the head is re-initialised, LoRA injected (PiSSA / OLoRA rewrite W0) and the
    frozen weights stored in ``model.base_dtype``: the pristine fp32 base, so rebuilding a run (same init, same
    dtype) gives the same value and any other weights of the same shapes another. Every byte is hashed (0.08 s
    for MiniLM's 22.7M parameters): a sample would let two bases that differ elsewhere collide.
    """
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if is_under(name, head):
            continue
        t = p.detach()
        t = (t.float() if t.is_floating_point() else t).cpu().contiguous().reshape(-1)
        digest.update(f"{name}{tuple(p.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()
