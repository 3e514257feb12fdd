"""A quantised base's bytes at their real size: counted (packed weights + absmax / scales + double-quant
constants) and measured as the host RSS that quantising frees, in a fresh process (Linux)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_exp.measure import memory
from lora_exp.quantize import dequant_buffer_bytes, quant_summary, quantize_linear

pytest.importorskip("bitsandbytes")

ROOT = Path(__file__).resolve().parents[3]

# A tiny BERT large enough for its weights to show in RSS: 2 blocks of 384 wide, FFN 1536 (3.5M block weights).
PROBE = """
import gc, json, sys, torch
from lora_exp.config.schema import ModelConfig, typed_config
from lora_exp.measure import memory, timing
from lora_exp.models import methods, text
torch.manual_seed(0)
cfg = typed_config({"name": "t", "source": "tiny", "hidden_size": 384, "ffn_size": 1536, "layers": 2, "heads": 6},
                   ModelConfig)
model = text._tiny_model(cfg, 2).requires_grad_(False)
small = typed_config({"name": "t", "source": "tiny", "hidden_size": 64, "ffn_size": 128, "layers": 1, "heads": 2},
                     ModelConfig)
methods.quantize_base(text._tiny_model(small, 2), sys.argv[1], ["classifier"], "fp32", True)  # imports, warm-up
def rss():
    gc.collect()
    timing.open_rss_window()  # malloc_trim: freed pages back to the OS
    return timing.proc_status_bytes("VmRSS")
before, counted_before = rss(), memory.static_bytes(model)["mem_params_bytes"]
methods.quantize_base(model, sys.argv[1], ["classifier"], "fp32", True)
after, counted_after = rss(), memory.static_bytes(model)["mem_params_bytes"]
print(json.dumps({"freed": before - after, "counted": counted_before - counted_after}))
"""


@pytest.mark.e2e  # a subprocess quantising a 3.5M-weight model: the full tier
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc needed for RSS")
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_the_rss_quantising_frees_is_the_counted_saving(kind: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, kind], capture_output=True, text=True, cwd=ROOT, check=True, timeout=600
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    block_fp32 = 2 * (4 * 384 * 384 + 2 * 384 * 1536) * 4  # the weights quantised (biases stay fp32)
    saving = block_fp32 * (1 - (0.5 if kind == "int8" else 0.25) / 2)  # before the absmax / scales
    assert got["counted"] < saving  # the state is counted on top of the packed weights
    assert got["freed"] == pytest.approx(got["counted"], rel=0.05), got


def test_counted_state_of_a_4bit_and_an_8bit_layer() -> None:
    lin = nn.Linear(256, 512)
    nf4 = quantize_linear(lin, "nf4", torch.float32, double_quant=True)
    plain = quantize_linear(lin, "nf4", torch.float32, double_quant=False)
    int8 = quantize_linear(lin, "int8", torch.float32, double_quant=True)
    blocks = 256 * 512 // 64
    # double quant: one uint8 absmax per block of 64, an fp32 absmax per 256 of those, two code tables, the offset
    assert quant_summary(nf4)["mem_quant_state_bytes"] == blocks + 4 * (blocks // 256) + 4 * 16 + 4 * 256 + 4
    assert quant_summary(plain)["mem_quant_state_bytes"] == 4 * blocks + 4 * 16  # fp32 absmax, the nf4 code
    assert quant_summary(int8)["mem_quant_state_bytes"] == 4 * 512  # one fp32 scale per output row
    counted = memory.static_bytes(nf4)["mem_params_bytes"]
    assert counted == 256 * 512 // 2 + 4 * 512 + quant_summary(nf4)["mem_quant_state_bytes"]  # packed + bias + state
    assert dequant_buffer_bytes(nf4) == 256 * 512 * 4
    nf4.compute_dtype = torch.bfloat16
    assert dequant_buffer_bytes(nf4) == 256 * 512 * (4 + 2)  # dequantised fp32, then its bf16 cast


def test_predicted_peak_carries_one_dequantised_layer() -> None:
    plain = memory.predicted_peak_bytes(100, 10, 20, 50, 0)
    assert memory.predicted_peak_bytes(100, 10, 20, 50, 0, dequant_buffer=7) == plain + 7


def _int8_kept_inputs(loss: torch.Tensor) -> list[torch.Tensor]:
    """The inputs bitsandbytes' int8 autograd nodes hold as ``ctx.A``, found by walking the graph (the node of a
    custom autograd Function is its ctx)."""
    kept, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in ("MatMul8bitFpBackward", "MatMul8bitLtBackward") and node.A is not None:
            kept.append(node.A)
        stack.extend(f for f, _ in node.next_functions)
    return kept


@pytest.mark.parametrize("checkpointing", [False, True])
def test_meter_counts_the_inputs_an_int8_base_keeps_for_backward(tiny_cfg, checkpointing: bool) -> None:  # noqa: ANN001
    from torch.multiprocessing.reductions import StorageWeakRef

    from lora_exp.config.schema import typed_config
    from lora_exp.training.job import build_model_for

    _, model, _, _ = build_model_for(typed_config(tiny_cfg("method=lora", "model.base_dtype=int8")))
    if checkpointing:
        memory.enable_gradient_checkpointing(model)
    model.train()
    batch = {"input_ids": torch.randint(5, 100, (8, 24), generator=torch.Generator().manual_seed(0))}
    frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:  # autograd's saved tensors, by storage, as the meter counts them
        if t.untyped_storage().data_ptr() not in frozen:
            saved[StorageWeakRef(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch, labels=torch.zeros(8, dtype=torch.long)).loss
    kept = {StorageWeakRef(t.untyped_storage()): t.untyped_storage().nbytes() for t in _int8_kept_inputs(loss)}
    assert len(kept) >= 2 * 3  # per block at least: the attention output's, the FFN's two inputs
    hooks_only = sum(n for ref, n in saved.items() if not ref.expired())
    expected = sum(n for ref, n in {**saved, **kept}.items() if not ref.expired())
    del loss
    with memory.SavedTensorMeter(model) as meter:
        loss = model(**batch, labels=torch.zeros(8, dtype=torch.long)).loss
    loss.backward()
    assert meter.activations_bytes == expected > hooks_only  # int8's kept inputs are real, and now counted
    with memory.SavedTensorMeter(exclude=[*model.parameters(), *model.buffers()]) as blind:  # no model: as before
        loss = model(**batch, labels=torch.zeros(8, dtype=torch.long)).loss
    assert blind.activations_bytes == hooks_only
