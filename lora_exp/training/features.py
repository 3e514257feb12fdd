"""A frozen encoder is a feature extractor: run the frozen part once per example, then train the rest.

With ``method=frozen`` nothing inside the base model (``model.<base_model_prefix>``) trains, so its outputs
for an example never change. ``FeatureCache`` runs the base once over every split (eval mode: no dropout in
the frozen part; no grad; the run's autocast), keeps each example's outputs at its real length, and puts a
``CachedBase`` in the base's place: the model's own head code (dropout, pooling, the classifier) runs as
before on the looked-up outputs, so each further epoch costs only the head.

The same holds for any run whose layers below the first trainable one are frozen (LoRA on the upper layers
only): the inputs of that layer are computed once (``PrefixCache``), the frozen layers below it are skipped,
and training runs from that layer up. Examples are found by their inputs (text: the token ids; audio: a
digest of the clip's features, whose encoder output has a fixed length), so loaders, samplers and the data
order are untouched. ``trainer.feature_cache=false`` turns both off (the frozen part then runs in train mode
every step, dropout included).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from transformers import DataCollatorWithPadding

from lora_exp.models.heads import base_path

SEQUENCE, VECTOR = "sequence", "vector"


TEXT_INPUTS = ("input_ids", "attention_mask")
AUDIO_INPUTS = ("input_features", "input_values")  # Whisper's log-mels; wav2vec2-style raw samples


def input_names(columns: list[str]) -> tuple[str, ...] | None:
    """The model inputs an example is found by: token ids + mask (text), or the audio input; None if neither."""
    if "input_ids" in columns:
        return TEXT_INPUTS
    return next(((name,) for name in AUDIO_INPUTS if name in columns), None)


def example_keys(inputs: dict[str, torch.Tensor]) -> list[tuple[bytes, int | None]]:
    """(key, real length) per example: the token ids up to the mask's length, or (audio, length None: the
    output is kept whole) a 16-byte BLAKE2 digest of the example's input features."""
    if "input_ids" in inputs:
        lengths = inputs["attention_mask"].sum(-1).tolist()
        ids = inputs["input_ids"].cpu().numpy()
        return [(ids[i, :n].tobytes(), n) for i, n in enumerate(lengths)]
    (x,) = inputs.values()
    rows = x.detach().cpu().contiguous().numpy().reshape(x.shape[0], -1)
    return [(hashlib.blake2b(row.tobytes(), digest_size=16).digest(), None) for row in rows]


class Rows:
    """Per-example tensors keyed by the example's inputs (``example_keys``), sequences at their real length."""

    def __init__(self, kinds: dict[str, str]):
        self.kinds, self.rows = kinds, {}

    def add(self, inputs: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
        """Store one batch: sequence fields cut to each example's length, vector fields as they are."""
        for i, (key, n) in enumerate(example_keys(inputs)):
            self.rows[key] = {
                name: (values[name][i, :n] if kind == SEQUENCE else values[name][i]).detach().clone()
                for name, kind in self.kinds.items()
            }

    def gather(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The stored tensors of a batch, sequence fields padded with zeros to the batch's length."""
        rows = [self.rows[key] for key, _ in example_keys(inputs)]
        out = {}
        for name, kind in self.kinds.items():
            if kind == VECTOR:
                out[name] = torch.stack([r[name] for r in rows])
                continue
            first, length = rows[0][name], next(iter(inputs.values())).shape[1]
            padded = first.new_zeros((len(rows), length, *first.shape[1:]))
            for i, r in enumerate(rows):
                padded[i, : len(r[name])] = r[name]
            out[name] = padded
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(t.numel() * t.element_size() for row in self.rows.values() for t in row.values())


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, torch.Tensor | None]:
    """The inputs ``names`` of a call, positional (in that order) or by keyword."""
    bound = dict(zip(names, args))
    bound.update({n: kwargs[n] for n in names if n in kwargs})
    return {n: bound.get(n) for n in names}


class CachedBase(nn.Module):
    """Stands in for the frozen base model: returns the outputs stored for each example of the batch."""

    def __init__(
        self, original: nn.Module, output_type: type, kinds: dict[str, str], names: tuple[str, ...] = TEXT_INPUTS
    ):
        super().__init__()
        self.__dict__["original"] = original  # not a submodule: its parameters stay out of this model
        self.output_type, self.store, self.names = output_type, Rows(kinds), tuple(names)

    def add(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, out: Any) -> None:
        """Store the outputs of one text batch."""
        self.add_batch({"input_ids": input_ids, "attention_mask": attention_mask}, out)

    def add_batch(self, inputs: dict[str, torch.Tensor], out: Any) -> None:
        """Store the outputs of one batch, found by ``inputs`` (named as in ``self.names``)."""
        self.store.add(inputs, {name: getattr(out, name) for name in self.store.kinds})

    def forward(self, *args: Any, **kwargs: Any):
        """The stored outputs of these examples (text: padded with zeros to the batch's length)."""
        inputs = _bind(self.names, args, kwargs)
        if any(v is None for v in inputs.values()):
            raise RuntimeError(f"the feature cache needs {' and '.join(self.names)}")
        return self.output_type(**self.store.gather(inputs))


class SkippedLayer(nn.Module):
    """A frozen layer below the cached one: passes the hidden states through (they are replaced anyway)."""

    def forward(self, hidden_states: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        return hidden_states


class CachedLayerOutput(nn.Module):
    """Stands in for the last frozen layer: returns its stored output for the examples of the batch."""

    def __init__(self, kind: str = SEQUENCE) -> None:
        super().__init__()
        self.store, self.batch = Rows({"hidden": kind}), None

    def forward(self, hidden_states: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        return self.store.gather(self.batch)["hidden"]


class FeatureCache:
    """Swaps the cached part in for the frozen modules; ``restore`` puts the real modules back."""

    def __init__(
        self, swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]], store: Rows, seconds: float, what: str
    ):
        self.swaps, self.store, self.seconds, self.what = swaps, store, seconds, what
        self.hooks: list[Any] = []
        for parent, name, _, replacement in swaps:
            _set(parent, name, replacement)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored outputs."""
        return self.store.nbytes

    def restore(self, model: nn.Module | None = None) -> None:
        """Put the real modules back (before saving or measuring the model)."""
        for parent, name, original, _ in self.swaps:
            _set(parent, name, original)
        for hook in self.hooks:
            hook.remove()
        self.swaps, self.hooks = [], []


def _set(parent: nn.Module, name: str, module: nn.Module) -> None:
    if isinstance(parent, nn.ModuleList):
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def _describe(out: Any, batch: int, length: int | None) -> dict[str, str] | None:
    """Which output fields are per-example tensors; None when an output the head may read cannot be cached.

    ``length``: the batch's padded token length (text: those fields are cut to each example's length);
    None (audio): every per-example field is kept whole."""
    kinds = {}
    for name, value in out.items():
        if not torch.is_tensor(value):
            if isinstance(value, tuple | list):  # hidden states of every layer (weighted layer sums): not cached
                return None
            continue  # e.g. a decoder's key/value cache: the classification head does not read it
        if length is not None and value.shape[:2] == (batch, length):
            kinds[name] = SEQUENCE
        elif value.shape[0] == batch:
            kinds[name] = VECTOR
        else:
            return None
    return kinds


def layer_stack(base: nn.Module) -> nn.ModuleList | None:
    """The base model's transformer layers: its longest ``nn.ModuleList``."""
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    return max(lists, key=len) if lists else None


def frozen_prefix(base: nn.Module) -> int:
    """How many layers at the bottom of the stack are frozen while some above train, with everything else of
    the base outside the trained layers frozen too (0: no such prefix, or no layer trains)."""
    layers = layer_stack(base)
    if layers is None:
        return 0
    trains = [any(p.requires_grad for p in layer.parameters()) for layer in layers]
    if not any(trains):
        return 0
    k = trains.index(True)
    upper = {id(p) for layer in list(layers)[k:] for p in layer.parameters()}
    if any(p.requires_grad for p in base.parameters() if id(p) not in upper):
        return 0
    return k


def estimated_bytes(model: nn.Module, splits: Any, names: tuple[str, ...]) -> int | None:
    """fp32 bytes the cache would hold: text, real tokens of every split x hidden size (+ a pooled vector
    each); audio, every example's encoder positions (``max_source_positions``) x hidden size. None when
    unknown (an audio encoder without a fixed output length)."""
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "d_model", 0)
    examples = sum(len(split) for split in splits.values())
    if names == TEXT_INPUTS:
        tokens = sum(sum(split.with_format(None)["length"]) for split in splits.values())
        return 4 * hidden * (tokens + examples)
    positions = getattr(model.config, "max_source_positions", None)
    return 4 * hidden * positions * examples if positions else None


@dataclass
class Source:
    """What the frozen part runs over: the tokenised (or featurized) splits, batched and placed as for evaluation."""

    splits: Any
    tokenizer: Any
    names: tuple[str, ...]  # the model inputs examples are found by (``input_names``)
    batch_size: int
    device: torch.device
    amp: Callable[[], AbstractContextManager]


def maybe_cache(
    model: nn.Module,
    splits: Any,
    tokenizer: Any,
    *,
    enabled: bool,
    max_gib: float,
    batch_size: int,
    device: torch.device,
    amp: Callable[[], AbstractContextManager],
) -> FeatureCache | None:
    """A ``FeatureCache`` when the whole base (frozen) or its bottom layers (a frozen prefix) are frozen.

    ``splits``: the tokenised splits (``input_ids``, ``attention_mask``, ``length``) or the featurized audio
    splits (``input_features``); ``max_gib``: above this estimated size the frozen part runs every step;
    ``amp``: the run's autocast context.
    """
    names, path = input_names(splits["train"].column_names), base_path(model)
    if not enabled or names is None or path is None:
        return None
    base = model.get_submodule(path)
    whole = not any(p.requires_grad for p in base.parameters())
    k = 0 if whole else frozen_prefix(base)
    if not whole and k == 0:
        return None
    need = estimated_bytes(model, splits, names)
    if need is None or need > max_gib * 2**30:
        size = "an unknown size" if need is None else f"{need / 2**30:.1f} GiB > trainer.feature_cache_max_gib"
        print(f"[lora-exp] feature cache off: it would hold {size}={max_gib:g}; the frozen part runs at every step")
        return None
    src, clock = Source(splits, tokenizer, names, batch_size, device, amp), {}
    cache = _cache_base(src, model, base, path, clock) if whole else _cache_prefix(src, base, k, clock)
    if cache is None:
        return None
    cache.seconds = clock.get("train", 0.0)  # charged to training; the evaluation splits' share is not
    n = len(cache.store.rows)
    print(
        f"[lora-exp] {cache.what} run once over {n:,} examples in {sum(clock.values()):.1f} s "
        f"({cache.nbytes / 2**20:.0f} MiB kept); training runs on top of them (trainer.feature_cache=false: off)"
    )
    return cache


def _split_batches(src: Source, clock: dict[str, float]) -> Iterator[dict[str, torch.Tensor]]:
    """The inputs (``src.names``) of every example of every split, on the device, in eval-sized batches.

    ``clock["train"]`` gets the seconds spent on the training split: only that is training cost (encoding the
    evaluation splits replaces work the uncached run does at evaluation, which is not in ``train_seconds``)."""
    for name, split in src.splits.items():
        start = time.perf_counter()
        part = split.select_columns(list(src.names))
        if src.names == TEXT_INPUTS:
            collate = DataCollatorWithPadding(src.tokenizer, pad_to_multiple_of=8, return_tensors="pt")
            loader = DataLoader(part, batch_size=src.batch_size, collate_fn=collate)
        else:  # fixed-size audio inputs: one read of the Arrow file per batch
            batches = BatchSampler(SequentialSampler(part), src.batch_size, drop_last=False)
            loader = DataLoader(part.with_format("numpy"), sampler=batches, batch_size=None, collate_fn=_as_tensors)
        for batch in loader:
            yield {k: batch[k].to(src.device) for k in src.names}
        if src.device.type == "cuda":
            torch.cuda.synchronize(src.device)
        clock[name] = clock.get(name, 0.0) + time.perf_counter() - start


def _as_tensors(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}


class _Stop(Exception):
    """Raised by the capture hook: nothing above the cached layer needs computing."""


@torch.inference_mode()
def _cache_base(
    src: Source, model: nn.Module, base: nn.Module, path: str, clock: dict[str, float]
) -> FeatureCache | None:
    was_training, cached = base.training, None
    base.eval()
    try:
        for inputs in _split_batches(src, clock):
            with src.amp():
                out = base(**inputs)
            if cached is None:
                first = inputs[src.names[0]]
                kinds = _describe(out, first.shape[0], first.shape[1] if src.names == TEXT_INPUTS else None)
                if not kinds:
                    print("[lora-exp] feature cache off: this base model's outputs cannot be cached")
                    return None
                cached = CachedBase(base, type(out), kinds, src.names)
            cached.add_batch(inputs, out)
    finally:
        base.train(was_training)
    parent, _, name = path.rpartition(".")
    return FeatureCache([(model.get_submodule(parent), name, base, cached)], cached.store, 0.0, "frozen encoder")


@torch.inference_mode()
def _cache_prefix(src: Source, base: nn.Module, k: int, clock: dict[str, float]) -> FeatureCache | None:
    layers = layer_stack(base)
    lookup, captured = CachedLayerOutput(SEQUENCE if src.names == TEXT_INPUTS else VECTOR), {}

    def capture(_: nn.Module, __: Any, out: Any) -> None:
        captured["hidden"] = out
        raise _Stop

    was_training = base.training
    base.eval()
    hook = layers[k - 1].register_forward_hook(capture)
    try:
        for inputs in _split_batches(src, clock):
            try:
                with src.amp():
                    base(**inputs)
            except _Stop:
                pass
            if not torch.is_tensor(captured.get("hidden")):
                print("[lora-exp] feature cache off: this model's layers do not return a plain tensor")
                return None
            lookup.store.add(inputs, captured)
    finally:
        hook.remove()
        base.train(was_training)
    swaps = [(layers, str(i), layers[i], SkippedLayer()) for i in range(k - 1)]
    swaps.append((layers, str(k - 1), layers[k - 1], lookup))
    cache = FeatureCache(swaps, lookup.store, 0.0, f"frozen embeddings + layers 0..{k - 1}")

    def remember_batch(_: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = _bind(src.names, args, kwargs)
        if src.names == TEXT_INPUTS and inputs["attention_mask"] is None:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        lookup.batch = inputs

    cache.hooks.append(base.register_forward_pre_hook(remember_batch, with_kwargs=True))
    return cache
