"""A frozen encoder is a feature extractor: run it once per example, then train the head on its outputs.

With ``method=frozen`` nothing inside the base model (``model.<base_model_prefix>``) trains, so its outputs
for an example never change. ``FeatureCache`` runs the base once over every split (eval mode: no dropout in
the frozen part; no grad; the run's autocast), keeps each example's outputs at its real length, and puts a
``CachedBase`` in the base's place: the model's own head code (dropout, pooling, the classifier) runs as
before on the looked-up outputs, so each further epoch costs only the head. Examples are found by their
token ids, so loaders, samplers and the data order are untouched. ``trainer.feature_cache=false`` turns it
off (the encoder then runs in train mode every step, dropout included).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

if TYPE_CHECKING:
    from lora_exp.train import Job

SEQUENCE, VECTOR = "sequence", "vector"


def _key(ids: torch.Tensor, n: int) -> bytes:
    return ids[:n].cpu().numpy().tobytes()


class CachedBase(nn.Module):
    """Stands in for the frozen base model: returns the outputs stored for each example of the batch."""

    def __init__(self, original: nn.Module, output_type: type, kinds: dict[str, str]):
        super().__init__()
        self.__dict__["original"] = original  # not a submodule: its parameters stay out of this model
        self.output_type, self.kinds = output_type, kinds
        self.rows: dict[bytes, dict[str, torch.Tensor]] = {}

    def add(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, out: Any) -> None:
        """Store the outputs of one batch, each example at its real length."""
        lengths = attention_mask.sum(-1).tolist()
        for i, n in enumerate(lengths):
            row = {}
            for name, kind in self.kinds.items():
                value = getattr(out, name)[i]
                row[name] = (value[:n] if kind == SEQUENCE else value).detach().clone()
            self.rows[_key(input_ids[i], n)] = row

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **_: Any):
        """The stored outputs of these examples, padded (with zeros) to the batch's length."""
        if input_ids is None or attention_mask is None:
            raise RuntimeError("the feature cache needs input_ids and attention_mask")
        lengths = attention_mask.sum(-1).tolist()
        rows = [self.rows[_key(input_ids[i], n)] for i, n in enumerate(lengths)]
        fields = {}
        for name, kind in self.kinds.items():
            if kind == VECTOR:
                fields[name] = torch.stack([r[name] for r in rows])
                continue
            first = rows[0][name]
            padded = first.new_zeros((len(rows), input_ids.shape[1], *first.shape[1:]))
            for i, r in enumerate(rows):
                padded[i, : len(r[name])] = r[name]
            fields[name] = padded
        return self.output_type(**fields)


class FeatureCache:
    """Builds the cache and swaps it in for the base model (``restore`` swaps the base back)."""

    def __init__(self, model: nn.Module, cached: CachedBase, seconds: float):
        self.prefix, self.cached, self.seconds = model.base_model_prefix, cached, seconds

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored outputs."""
        return sum(t.numel() * t.element_size() for row in self.cached.rows.values() for t in row.values())

    def restore(self, model: nn.Module) -> None:
        """Put the real base model back (before saving or measuring the model)."""
        if getattr(model, self.prefix) is self.cached:
            setattr(model, self.prefix, self.cached.original)


def _describe(out: Any, batch: int, length: int) -> dict[str, str] | None:
    """Which output fields are per-example tensors; None when an output the head may read cannot be cached."""
    kinds = {}
    for name, value in out.items():
        if not torch.is_tensor(value):
            if isinstance(value, tuple | list):  # hidden states of every layer (weighted layer sums): not cached
                return None
            continue  # e.g. a decoder's key/value cache: the classification head does not read it
        if value.shape[:2] == (batch, length):
            kinds[name] = SEQUENCE
        elif value.shape[0] == batch:
            kinds[name] = VECTOR
        else:
            return None
    return kinds


def estimated_bytes(job: Job) -> int:
    """fp32 bytes the cache would hold: real tokens of every split x hidden size (+ a pooled vector each)."""
    hidden = getattr(job.model.config, "hidden_size", None) or getattr(job.model.config, "d_model", 0)
    tokens = sum(sum(split.with_format(None)["length"]) for split in job.tok.values())
    examples = sum(len(split) for split in job.tok.values())
    return 4 * hidden * (tokens + examples)


def maybe_cache(job: Job) -> FeatureCache | None:
    """A ``FeatureCache`` for a run whose whole base model is frozen (``trainer.feature_cache``), else None."""
    cfg, model = job.cfg, job.model
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if not cfg.trainer.get("feature_cache", True) or base is None or cfg.method.name == "full":
        return None
    if any(p.requires_grad for p in base.parameters()) or "input_ids" not in job.tok["train"].column_names:
        return None
    limit = float(cfg.trainer.get("feature_cache_max_gib", 8.0)) * 2**30
    need = estimated_bytes(job)
    if need > limit:
        print(
            f"[lora-exp] feature cache off: it would hold {need / 2**30:.1f} GiB > trainer.feature_cache_max_gib="
            f"{cfg.trainer.get('feature_cache_max_gib', 8.0)}; the frozen encoder runs at every step"
        )
        return None
    return _build(job, base, prefix)


@torch.inference_mode()
def _build(job: Job, base: nn.Module, prefix: str) -> FeatureCache | None:
    start = time.perf_counter()
    collate = DataCollatorWithPadding(job.tokenizer, pad_to_multiple_of=8, return_tensors="pt")
    cols = ["input_ids", "attention_mask"]
    was_training = base.training
    base.eval()
    cached = None
    for split in job.tok.values():
        loader = DataLoader(split.select_columns(cols), batch_size=job.cfg.trainer.eval_batch_size, collate_fn=collate)
        for batch in loader:
            ids, mask = batch["input_ids"].to(job.device), batch["attention_mask"].to(job.device)
            with job.amp():
                out = base(input_ids=ids, attention_mask=mask)
            if cached is None:
                kinds = _describe(out, *ids.shape)
                if not kinds:
                    base.train(was_training)
                    print("[lora-exp] feature cache off: this base model's outputs cannot be cached")
                    return None
                cached = CachedBase(base, type(out), kinds)
            cached.add(ids, mask, out)
    base.train(was_training)
    if job.device.type == "cuda":
        torch.cuda.synchronize(job.device)
    cache = FeatureCache(job.model, cached, time.perf_counter() - start)
    setattr(job.model, prefix, cached)
    print(
        f"[lora-exp] frozen encoder run once over {len(cached.rows):,} examples in {cache.seconds:.1f} s "
        f"({cache.nbytes / 2**20:.0f} MiB of features); the head trains on them (trainer.feature_cache=false: off)"
    )
    return cache
