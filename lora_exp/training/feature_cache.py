"""A frozen encoder is a feature extractor: run the frozen part once per example, then train the rest.

With ``method=frozen`` nothing inside the base model (``model.<base_model_prefix>``) trains, so its outputs
for an example never change. ``FeatureCache`` runs the base once over every split (eval mode: no dropout in
the frozen part; no grad; the run's autocast), keeps each example's outputs at its real length, and puts a
``CachedBase`` in the base's place: the model's own head code (dropout, pooling, the classifier) runs as
before on the looked-up outputs, so each further epoch costs only the head.

The same holds for any run whose layers below the first trainable one are frozen (LoRA on the upper layers
only): the inputs of that layer are computed once (``PrefixCache``), the frozen layers below it are skipped,
and training runs from that layer up. ``trainer.feature_cache=false`` turns both off (the frozen part then runs
in train mode every step, dropout included).

The stored outputs live in host memory (pinned on CUDA): on the GPU they would cost as much as the frozen
encoder's activations that caching saves. Examples are found by their position in the splits (the ``row``
column the loaders carry: text and audio alike), never by their inputs: the loaders' collate looks the rows up
on the host and the outputs join the batch (``cached.<field>``), so they are pinned and copied to the device
with it, and the step never waits on the host. A pre-hook on the model hands them to the look-up module in the
base's place. Samplers and the data order are untouched.
"""

from __future__ import annotations

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

from lora_exp.data.text import ROW
from lora_exp.models.heads import base_path

SEQUENCE, VECTOR = "sequence", "vector"


TEXT_INPUTS = ("input_ids", "attention_mask")
SEGMENT_IDS = "token_type_ids"  # sentence pairs, for models that have segment embeddings
AUDIO_INPUTS = ("input_features", "input_values")  # Whisper's log-mels; wav2vec2-style raw samples


def input_names(columns: list[str]) -> tuple[str, ...] | None:
    """The inputs the frozen part runs on: token ids + mask (text; + segment ids of sentence pairs), or the audio
    input; None if neither."""
    if "input_ids" in columns:
        return (*TEXT_INPUTS, SEGMENT_IDS) if SEGMENT_IDS in columns else TEXT_INPUTS
    return next(((name,) for name in AUDIO_INPUTS if name in columns), None)


PREFIX = "cached."  # batch keys of the looked-up outputs (popped by the model's pre-hook)


class Rows:
    """Per-example outputs by row position, in host memory: sequence fields (text) back to back at each example's
    real length (``lengths[row]`` tokens), vector fields (audio outputs: whole) one per row. ``gather`` fills
    pinned buffers when ``pin`` (CUDA): the loader's pinning keeps them and the copy to the device is
    asynchronous."""

    def __init__(self, kinds: dict[str, str], lengths: torch.Tensor, pin: bool = False):
        self.kinds, self.lengths, self.pin = kinds, lengths.long(), pin
        self.offsets = torch.cumsum(self.lengths, 0) - self.lengths
        self.data: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def rows(self) -> range:
        """The row positions held: every example of every split."""
        return range(len(self))

    def add(self, rows: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Store one batch (``rows``: the examples' positions; ``values``: batch-first, on any device)."""
        for name, kind in self.kinds.items():
            value = values[name].detach().to("cpu")
            seq = kind == SEQUENCE
            if name not in self.data:
                size = (int(self.lengths.sum()) if seq else len(self), *value.shape[2 if seq else 1 :])
                self.data[name] = torch.zeros(size, dtype=value.dtype)
            for i, row in enumerate(rows.tolist()):
                start, n = int(self.offsets[row]), int(self.lengths[row])
                if seq:
                    self.data[name][start : start + n] = value[i, :n]
                else:
                    self.data[name][row] = value[i]

    def gather(self, rows: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
        """The stored tensors of ``rows`` (host), sequence fields zero-padded to ``length`` tokens."""
        out = {}
        steps = torch.arange(length)
        valid = steps[None, :] < self.lengths[rows][:, None]
        positions = torch.where(valid, self.offsets[rows][:, None] + steps[None, :], 0)
        for name, kind in self.kinds.items():
            data, index = self.data[name], rows if kind == VECTOR else positions.reshape(-1)
            picked = torch.empty((len(index), *data.shape[1:]), dtype=data.dtype, pin_memory=self.pin)
            torch.index_select(data, 0, index, out=picked)
            if kind == SEQUENCE:
                picked = picked.view(*positions.shape, *data.shape[1:])
                picked[~valid] = 0
            out[name] = picked
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(t.numel() * t.element_size() for t in self.data.values())


class CachedBase(nn.Module):
    """Stands in for the frozen base model: returns the outputs the batch brought along for its examples."""

    def __init__(self, original: nn.Module, output_type: type, kinds: dict[str, str], lengths: torch.Tensor, pin=False):
        super().__init__()
        self.__dict__["original"] = original  # not a submodule: its parameters stay out of this model
        self.output_type, self.store, self.pending = output_type, Rows(kinds, lengths, pin), None

    def add(self, rows: torch.Tensor, out: Any) -> None:
        """Store the outputs of one batch."""
        self.store.add(rows, {name: getattr(out, name) for name in self.store.kinds})

    def forward(self, *_: Any, **__: Any):
        """The looked-up outputs of this batch's examples (its token ids are not read)."""
        return self.output_type(**take(self))


def take(lookup: nn.Module) -> dict[str, torch.Tensor]:
    """The outputs the model's pre-hook handed to ``lookup`` for this forward (once)."""
    values, lookup.pending = lookup.pending, None
    if values is None:
        raise RuntimeError(
            "the feature cache needs the batch's cached outputs: call the model on a batch of the job's loaders"
        )
    return values


class SkippedLayer(nn.Module):
    """A frozen layer below the cached one: passes the hidden states through (they are replaced anyway)."""

    def forward(self, hidden_states: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        return hidden_states


class CachedLayerOutput(nn.Module):
    """Stands in for the last frozen layer: returns its stored output for the examples of the batch."""

    def __init__(self, lengths: torch.Tensor, pin: bool = False, kind: str = SEQUENCE) -> None:
        super().__init__()
        self.store, self.pending = Rows({"hidden": kind}, lengths, pin), None

    def forward(self, hidden_states: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        return take(self)["hidden"]


class FeatureCache:
    """Swaps the cached part in for the frozen modules; ``restore`` puts the real modules back."""

    def __init__(
        self, swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]], lookup: nn.Module, seconds: float, what: str
    ):
        self.swaps, self.lookup, self.store, self.seconds, self.what = swaps, lookup, lookup.store, seconds, what
        self.hooks: list[Any] = []
        for parent, name, _, replacement in swaps:
            _set(parent, name, replacement)

    def batch_values(self, rows: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
        """The stored outputs of ``rows`` as batch entries (``cached.<field>``), for the loaders' collate."""
        return {PREFIX + name: t for name, t in self.store.gather(rows, length).items()}

    def feed(self, collate: Any, model: nn.Module) -> None:
        """Let the loaders' collate (``data.text.PaddedBatches``) add each batch's stored outputs, and the
        model hand them to the look-up: a pre-hook that takes the ``cached.*`` inputs out of its call. The hook
        stays after ``restore`` (the loaders keep adding them; the real modules then ignore them)."""
        collate.extra = self.batch_values
        lookup = self.lookup

        def hand_over(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            values = {k[len(PREFIX) :]: kwargs.pop(k) for k in [k for k in kwargs if k.startswith(PREFIX)]}
            if values:
                lookup.pending = values
            return args, kwargs

        model.register_forward_pre_hook(hand_over, with_kwargs=True)

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
    if names[:2] == TEXT_INPUTS:
        tokens = sum(sum(split.with_format(None)["length"]) for split in splits.values())
        return 4 * hidden * (tokens + examples)
    positions = getattr(model.config, "max_source_positions", None)
    return 4 * hidden * positions * examples if positions else None


@dataclass
class Source:
    """What the frozen part runs over: the tokenised (or featurized) splits, batched and placed as for evaluation."""

    splits: Any
    tokenizer: Any
    names: tuple[str, ...]  # the model inputs (``input_names``)
    batch_size: int
    device: torch.device
    amp: Callable[[], AbstractContextManager]
    lengths: torch.Tensor | None = None  # tokens of each row (``row`` column; audio: 0, outputs kept whole)

    @property
    def pin(self) -> bool:
        """Pinned host memory: the copies to a CUDA device run asynchronously."""
        return self.device.type == "cuda"


def row_lengths(splits: Any) -> torch.Tensor:
    """Each row's token count (0 where examples have no ``length``: audio), indexed by its ``row`` position
    (``data.text.number_rows``)."""
    rows, lengths = [], []
    for split in splits.values():
        columns = [ROW, *(["length"] if "length" in split.column_names else [])]
        table = split.with_format(None).select_columns(columns).to_dict()
        rows += table[ROW]
        lengths += table.get("length", [0] * len(table[ROW]))
    out = torch.zeros(max(rows) + 1, dtype=torch.long)
    out[torch.tensor(rows)] = torch.tensor(lengths)
    return out


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
    splits (``input_features``), numbered (``row``); ``max_gib``: above this estimated size the frozen part runs
    every step; ``amp``: the run's autocast context. The outputs are kept in host memory;
    ``FeatureCache.feed`` then makes the loaders bring them along.
    """
    columns = splits["train"].column_names
    names, path = input_names(columns), base_path(model)
    if not enabled or names is None or path is None or ROW not in columns:
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
    src, clock = Source(splits, tokenizer, names, batch_size, device, amp, row_lengths(splits)), {}
    cache = _cache_base(src, model, base, path, clock) if whole else _cache_prefix(src, base, k, clock)
    if cache is None:
        return None
    cache.seconds = clock.get("train", 0.0)  # charged to training; the evaluation splits' share is not
    n = len(cache.store)
    print(
        f"[lora-exp] {cache.what} run once over {n:,} examples in {sum(clock.values()):.1f} s "
        f"({cache.nbytes / 2**20:.0f} MiB kept); training runs on top of them (trainer.feature_cache=false: off)"
    )
    return cache


def _split_batches(src: Source, clock: dict[str, float]) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """The inputs (``src.names``, on the device) and the rows (host) of every example of every split, in
    eval-sized batches.

    ``clock["train"]`` gets the seconds spent on the training split: only that is training cost (encoding the
    evaluation splits replaces work the uncached run does at evaluation, which is not in ``train_seconds``)."""
    for name, split in src.splits.items():
        start = time.perf_counter()
        part = split.select_columns([*src.names, ROW])
        if src.names[:2] == TEXT_INPUTS:
            collate = DataCollatorWithPadding(src.tokenizer, pad_to_multiple_of=8, return_tensors="pt")
            loader = DataLoader(part, batch_size=src.batch_size, collate_fn=collate)
        else:  # fixed-size audio inputs: one read of the Arrow file per batch
            batches = BatchSampler(SequentialSampler(part), src.batch_size, drop_last=False)
            loader = DataLoader(part.with_format("numpy"), sampler=batches, batch_size=None, collate_fn=_as_tensors)
        for batch in loader:
            yield {k: batch[k].to(src.device) for k in src.names}, torch.as_tensor(batch[ROW])
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
        for inputs, rows in _split_batches(src, clock):
            with src.amp():
                out = base(**inputs)
            if cached is None:
                first = inputs[src.names[0]]
                kinds = _describe(out, first.shape[0], first.shape[1] if src.names[:2] == TEXT_INPUTS else None)
                if not kinds:
                    print("[lora-exp] feature cache off: this base model's outputs cannot be cached")
                    return None
                cached = CachedBase(base, type(out), kinds, src.lengths, src.pin)
            cached.add(rows, out)
    finally:
        base.train(was_training)
    parent, _, name = path.rpartition(".")
    return FeatureCache([(model.get_submodule(parent), name, base, cached)], cached, 0.0, "frozen encoder")


@torch.inference_mode()
def _cache_prefix(src: Source, base: nn.Module, k: int, clock: dict[str, float]) -> FeatureCache | None:
    layers = layer_stack(base)
    kind = SEQUENCE if src.names[:2] == TEXT_INPUTS else VECTOR
    lookup, captured = CachedLayerOutput(src.lengths, src.pin, kind), {}

    def capture(_: nn.Module, __: Any, out: Any) -> None:
        captured["hidden"] = out
        raise _Stop

    was_training = base.training
    base.eval()
    hook = layers[k - 1].register_forward_hook(capture)
    try:
        for inputs, rows in _split_batches(src, clock):
            try:
                with src.amp():
                    base(**inputs)
            except _Stop:
                pass
            if not torch.is_tensor(captured.get("hidden")):
                print("[lora-exp] feature cache off: this model's layers do not return a plain tensor")
                return None
            lookup.store.add(rows, captured)
    finally:
        hook.remove()
        base.train(was_training)
    swaps = [(layers, str(i), layers[i], SkippedLayer()) for i in range(k - 1)]
    swaps.append((layers, str(k - 1), layers[k - 1], lookup))
    return FeatureCache(swaps, lookup, 0.0, f"frozen embeddings + layers 0..{k - 1}")
