"""``lora-exp bench --latency``: inference latency of the base model, LoRA unmerged and LoRA merged.

The three models share one seeded base and head (``build_model``: ``method=frozen`` is the base without
adapters); LoRA gets the config's adapters with B drawn small and non-zero (an adapter that has trained), and
the merged copy folds them into W0 and drops the wrappers (``merge_and_unload``: the base model's own
modules). Each batch size times one forward per model in turn (base, unmerged, merged, base, ...) on the same
inputs (the first validation texts, padded as the loaders pad), after warm-up forwards, under
``inference_mode`` and the run's autocast; CUDA is synchronised around each forward. Median and [min, max] in
milliseconds per batch size and model; the promise of merging is that ``merged`` equals ``base``.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from lora_exp.adapters import targets as injection
from lora_exp.device import autocast, pick_device, pick_precision
from lora_exp.errors import LoraExpError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from lora_exp.config.schema import Config

MODELS = ("base", "unmerged", "merged")
BATCH_SIZES = (1, 32)


def build_models(cfg: Config) -> tuple[Any, dict[str, torch.nn.Module]]:
    """Tokenizer and the three eval-mode models (same base and head; LoRA B small and non-zero)."""
    from lora_exp.training.job import build_model_for

    tokenizer, base, _, _ = build_model_for(replace(cfg, method=replace(cfg.method, name="frozen")))
    _, lora, _, adapted = build_model_for(replace(cfg, method=replace(cfg.method, name="lora")))
    if not adapted:
        raise LoraExpError("bench --latency: lora.targets adapt no layer of this model")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in injection.lora_layers(lora):
            w = layer.lora_B.weight
            w.copy_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * 0.01)
    merged = copy.deepcopy(lora)
    injection.merge_and_unload(merged)
    return tokenizer, {"base": base.eval(), "unmerged": lora.eval(), "merged": merged.eval()}


def batches(cfg: Config, tokenizer: Any) -> dict[int, dict[str, torch.Tensor]]:
    """The first 1 and 32 validation texts (then test, train), tokenised and padded as the loaders pad them."""
    from transformers import DataCollatorWithPadding

    from lora_exp.data import text as text_data

    splits, texts = text_data.load_splits(cfg.data), []
    for name in ("validation", "test", "train"):  # validation first; a small one is filled up from the others
        split = splits[name]
        texts += list(split.select(range(min(max(BATCH_SIZES) - len(texts), len(split))))["text"])
    if len(texts) < max(BATCH_SIZES):
        raise LoraExpError(f"bench --latency: the data holds {len(texts)} texts, fewer than {max(BATCH_SIZES)}")
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8, return_tensors="pt")
    enc = tokenizer(texts, truncation=True, max_length=cfg.data.max_length, return_token_type_ids=False)
    rows = [{k: enc[k][i] for k in enc} for i in range(len(texts))]
    return {n: dict(collate(rows[:n])) for n in BATCH_SIZES}


def _spread(ms: list[float]) -> dict[str, float | int]:
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "reps": len(ms)}


def time_models(
    models: dict[str, torch.nn.Module],
    batch: dict[str, torch.Tensor],
    device: torch.device,
    precision: str,
    reps: int,
    warmup: int,
) -> dict[str, dict[str, float | int]]:
    """Milliseconds of one forward per model, alternated over ``reps`` rounds after ``warmup`` rounds."""
    batch = {k: v.to(device) for k, v in batch.items()}
    cuda = device.type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode(), autocast(device, precision):
        for round_ in tqdm(range(warmup + reps), desc=f"batch {len(batch['input_ids'])}", leave=False):
            for name, model in models.items():
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                model(**batch)
                if cuda:
                    torch.cuda.synchronize(device)
                if round_ >= warmup:
                    times[name].append((time.perf_counter() - start) * 1000)
    return {name: _spread(ms) for name, ms in times.items()}


def run(composed: DictConfig, reps: int, warmup: int) -> dict[str, Any]:
    """Latency per batch size and model, the merged model's largest logit difference to the unmerged one, and
    the settings it ran under (``composed``: the validated config, turned into the schema's dataclasses here)."""
    from lora_exp.config.schema import typed_config

    cfg = typed_config(composed)
    device = pick_device(cfg.trainer.device)
    precision = pick_precision(cfg.trainer.precision, device)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    tokenizer, models = build_models(cfg)
    for model in models.values():
        model.to(device)
    inputs = batches(cfg, tokenizer)
    latency, diff = {}, {}
    for n, batch in inputs.items():
        latency[f"batch_{n}"] = time_models(models, batch, device, precision, reps, warmup)
        with torch.inference_mode(), autocast(device, precision):
            on_device = {k: v.to(device) for k, v in batch.items()}
            logits = {name: models[name](**on_device).logits.float() for name in ("unmerged", "merged")}
        diff[f"batch_{n}"] = (logits["merged"] - logits["unmerged"]).abs().max().item()
    return {
        "latency": latency,
        "merged_over_base": {b: v["merged"]["median_ms"] / v["base"]["median_ms"] for b, v in latency.items()},
        "merged_max_abs_logit_diff": diff,
        "seq_len": {f"batch_{n}": int(b["input_ids"].shape[1]) for n, b in inputs.items()},
        "model": cfg.model.name,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets)},
        "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "settings": {"reps": reps, "warmup": warmup, "order": list(MODELS)},
        "torch": torch.__version__,
    }


def table(result: dict[str, Any]) -> str:
    """Markdown: median [min, max] ms per batch size and model."""
    lines = ["| batch | base ms | LoRA unmerged ms | LoRA merged ms |", "|---|---|---|---|"]
    for batch, row in result["latency"].items():
        cells = [f"{row[m]['median_ms']:.2f} [{row[m]['min_ms']:.2f}, {row[m]['max_ms']:.2f}]" for m in MODELS]
        lines.append(f"| {batch.split('_')[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
