"""Build the HF model + tokenizer from ``cfg.model``, apply the method (full / frozen / lora), count.

The classification head is found from the model's structure, for any architecture: every parameter of
the ``*ForSequenceClassification`` model outside its base model (``getattr(model, base_model_prefix)``),
plus every parameter ``from_pretrained`` reports as newly initialised (a missing pooler inside the base).
So a frozen or LoRA run trains (and saves) the whole head, DistilBERT's ``pre_classifier`` and
DeBERTa's ``pooler`` too, whether the checkpoint already holds head weights or not.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertTokenizerFast,
    DistilBertConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import logging as hf_logging

from lora_exp import assets, lora, variants
from lora_exp.errors import LoraExpError
from lora_exp.hub import from_hub

TINY_VOCAB = 1000
hf_logging.set_verbosity_error()  # the load report is replaced by our own line naming the head modules


def _tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A WordPiece tokenizer over characters + common words: tiny, offline, real special tokens."""
    words = [
        "the",
        "a",
        "an",
        "and",
        "but",
        "not",
        "no",
        "is",
        "was",
        "film",
        "movie",
        "good",
        "bad",
        "great",
        "best",
        "worst",
        "boring",
        "fun",
        "funny",
        "story",
        "plot",
        "acting",
        "actor",
        "love",
        "hate",
        "dull",
        "bright",
        "dark",
        "fresh",
        "rotten",
        "it",
        "this",
        "that",
        "of",
        "to",
        "in",
    ]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *words]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("\n".join(vocab) + "\n")
        return BertTokenizerFast(str(Path(tmp) / "vocab.txt"), model_max_length=512)


def _tiny_model(cfg: DictConfig, num_labels: int) -> PreTrainedModel:
    if cfg.arch == "distilbert":
        conf = DistilBertConfig(
            vocab_size=TINY_VOCAB,
            dim=cfg.hidden_size,
            hidden_dim=cfg.ffn_size,
            n_layers=cfg.layers,
            n_heads=cfg.heads,
            num_labels=num_labels,
        )
    else:
        conf = BertConfig(
            vocab_size=TINY_VOCAB,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.ffn_size,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_labels=num_labels,
        )
    return AutoModelForSequenceClassification.from_config(conf)


def model_location(cfg: DictConfig) -> str:
    """Hub id or local folder the model loads from (the offline MiniLM by default)."""
    if cfg.source == "package":
        return cfg.path or str(assets.minilm_dir())
    return cfg.path


def build(
    cfg: DictConfig, num_labels: int, id2label: dict[int, str] | None = None
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, list[str]]:
    """Tokenizer (feature extractor for ``task=audio``), fp32 model and the head (module paths or bare
    parameter names, trained in full by frozen/lora)."""
    if cfg.get("task", "text") == "audio":  # lora_exp/audio.py: AutoModelForAudioClassification / tiny Whisper
        from lora_exp import audio

        return audio.build(cfg, num_labels, id2label)
    if cfg.source == "tiny":
        model = _tiny_model(cfg, num_labels)
        if id2label:
            model.config.id2label = dict(id2label)
            model.config.label2id = {v: k for k, v in id2label.items()}
        return _tiny_tokenizer(), model, find_head(model)  # random init everywhere: structure alone

    where = model_location(cfg)
    if cfg.source == "package" and not (Path(where) / "config.json").is_file():
        raise LoraExpError(f"model.path={where!r} holds no config.json (not a model folder)")
    kw = dict(trust_remote_code=bool(cfg.trust_remote_code))
    labels = dict(num_labels=num_labels, **({"id2label": id2label} if id2label else {}))

    def load() -> tuple:
        config = AutoConfig.from_pretrained(where, **labels, **kw)
        # dtype=fp32: transformers 5 keeps a checkpoint's stored dtype otherwise (fp16 copies would train
        # in fp16); master weights stay fp32 and autocast does the low precision. ignore_mismatched_sizes:
        # a head fine-tuned for another number of labels is re-initialised (reported as mismatched).
        model, info = AutoModelForSequenceClassification.from_pretrained(
            where, config=config, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True, **kw
        )
        return AutoTokenizer.from_pretrained(where, **kw), model, info

    if cfg.source == "hub":
        tokenizer, model, info = from_hub("model.path", where, load)
    else:
        try:
            tokenizer, model, info = load()
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # SafetensorError: truncated file
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise LoraExpError(f"model.path={where!r}: cannot load the model ({first})") from err
    set_padding(tokenizer, model, where)
    new = set(info["missing_keys"]) | {k[0] for k in info.get("mismatched_keys", ())}
    return tokenizer, model, find_head(model, new)


def set_padding(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, where: str) -> None:
    """Decoders ship without a pad token: pad with EOS (tokenizer and ``config.pad_token_id``), and say so.

    Sequence classification pools the last non-pad token, found through ``config.pad_token_id``.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LoraExpError(
                f"model.path={where!r}: the tokenizer has neither a pad nor an EOS token, so batches cannot be "
                "padded; save a tokenizer with a pad_token in the model folder"
            )
        tokenizer.pad_token = tokenizer.eos_token
        print(
            f"[lora-exp] {model.config.model_type}: the tokenizer has no pad token; padding with its EOS token "
            f"{tokenizer.eos_token!r} (id {tokenizer.pad_token_id}, also set as config.pad_token_id)"
        )
        model.config.pad_token_id = tokenizer.pad_token_id
    elif getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def find_head(model: nn.Module, new_keys: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The classification head: module paths (or bare parameter names) that train in full with frozen/lora.

    A parameter belongs to the head when it lies outside the base (``getattr(model, base_model_prefix)``) or
    is in ``new_keys`` (newly initialised by ``from_pretrained``); a parameter whose storage is shared with
    a pretrained one is not. The list is minimal: each head parameter is named through its largest
    enclosing module whose parameters are all head (``classifier``, ``pre_classifier``, ``bert.pooler``),
    or by its own name where no such module exists (a bare ``layer_weights``).
    """
    base_path = _base_path(model)
    named = list(model.named_parameters(remove_duplicate=False))
    outside = {n for n, _ in named if base_path is None or not lora.is_under(n, [base_path])}
    head = outside | (set(new_keys) & {n for n, _ in named})
    shared = {p.data_ptr() for n, p in named if n not in head}
    head = {n for n, p in named if n in head and p.data_ptr() not in shared}
    mixed = {n.rsplit(".", i)[0] for n in {n for n, _ in named} - head for i in range(1, n.count(".") + 1)}
    out = set()
    for name in head:
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]  # outermost first, the model root excluded
        out.add(next((m for m in prefixes if m not in mixed), name))
    return _ordered(model, out)


def _base_path(model: nn.Module) -> str | None:
    """Path of the pretrained base inside the task model: ``base_model_prefix``, else the largest child.

    The fallback covers task models that name their base otherwise (``WhisperForAudioClassification``
    keeps ``encoder`` although its prefix is ``model``).
    """
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module) and base is not model:
        return next((n for n, m in model.named_modules() if m is base and n), None)
    sizes = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_children()}
    return max(sizes, key=sizes.__getitem__) if sizes else None


def _ordered(model: nn.Module, paths: set[str]) -> list[str]:
    """``paths`` in the model's own definition order (parameters first seen)."""
    order = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    first = {p: next(i for i, n in enumerate(order) if lora.is_under(n, [p])) for p in paths}
    return sorted(paths, key=first.__getitem__)


def head_parameters(model: nn.Module, head: list[str]) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every head parameter (deduplicated), modules and bare parameters alike."""
    return [(n, p) for n, p in model.named_parameters() if lora.is_under(n, head)]


@torch.no_grad()
def init_head(model: PreTrainedModel, head: list[str]) -> None:
    """Re-initialise the head with the model's own ``_init_weights`` (from the caller's RNG state).

    transformers 5 marks loaded tensors ``_is_hf_initialized`` and its init functions skip them, so a
    checkpoint that already holds a head would silently keep it: the marks are lifted on the head first,
    and the rest of the model is marked while a bare parameter's owner is initialised, so only the head
    changes.
    """
    params = head_parameters(model, head)
    marks = {n: getattr(p, "_is_hf_initialized", None) for n, p in model.named_parameters()}
    for _, p in params:
        p._is_hf_initialized = False
    modules = dict(model.named_modules())
    bare = [h for h in head if h not in modules]
    for name in head:
        if name in modules:
            modules[name].apply(model._init_weights)
    if bare:
        heads = {n for n, _ in params}
        for n, p in model.named_parameters():
            if n not in heads:
                p._is_hf_initialized = True
        for owner in dict.fromkeys(h.rpartition(".")[0] for h in bare):
            model._init_weights(modules[owner])
    for n, p in model.named_parameters():  # restore the loader's marks
        if marks[n] is None:
            p.__dict__.pop("_is_hf_initialized", None)
        else:
            p._is_hf_initialized = marks[n]


def apply_method(model: nn.Module, method: str, head: list[str], lora_cfg: DictConfig | None = None) -> list[str]:
    """Set ``requires_grad`` for ``method``; for lora inject adapters. Returns the LoRA module paths.

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
        get = lora_cfg.get
        adapted = lora.inject(
            model,
            list(lora_cfg.targets),
            lora_cfg.r,
            lora_cfg.alpha,
            lora_cfg.dropout,
            lora_cfg.rslora,
            protected=head,  # newly initialised: a frozen random base + LoRA would cripple the model
            variant=variants.variant_of(lora_cfg),
            init=get("init", "default"),
            layers=None if get("layers") is None else list(get("layers")),
            rank_pattern=dict(get("rank_pattern") or {}),
            alpha_pattern=dict(get("alpha_pattern") or {}),
        )
    for _, p in params:
        p.requires_grad_(True)
    for name in adapted:
        sub = model.get_submodule(name)
        sub.lora_A.requires_grad_(True)
        sub.lora_B.requires_grad_(True)
        if isinstance(sub, variants.DoRALinear):
            sub.lora_magnitude_vector.requires_grad_(True)
    bias = "all" if method == "bitfit" else (lora_cfg.get("bias", "none") if method == "lora" else "none")
    params = dict(model.named_parameters())
    for name in variants.bias_parameters(model, bias, adapted):
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
        counts["total"] += p.numel()
        if not p.requires_grad:
            continue
        counts["trainable"] += p.numel()
        if variants.is_adapter_param(name):  # LoRA A/B and DoRA's lora_magnitude_vector
            counts["adapter"] += p.numel()
        elif lora.is_under(name, head):
            counts["head"] += p.numel()
        else:
            counts["other"] += p.numel()
    counts["trainable_pct"] = 100.0 * counts["trainable"] / counts["total"]
    return counts


BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_base_dtype(base_dtype: str, precision: str) -> None:
    """A low-precision frozen base needs autocast in that dtype (plain fp32 matmuls would mix dtypes)."""
    if base_dtype != "fp32" and base_dtype != precision:
        raise LoraExpError(
            f"model.base_dtype={base_dtype} needs trainer.precision={base_dtype} (autocast in that dtype); "
            f"this run computes in {precision}"
        )


def store_frozen_in(model: nn.Module, base_dtype: str) -> int:
    """Store frozen parameters in ``base_dtype`` (``model.base_dtype``); trainable ones stay fp32 master weights.

    What PEFT users do with a bf16 base: the frozen weights take half the memory, autocast computes in
    bf16 anyway. Returns how many parameter tensors were converted.
    """
    dtype = BASE_DTYPES[base_dtype]
    if dtype == torch.float32:
        return 0
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


SUB_SEEDS = ("model", "head", "lora", "data", "dropout")


def sub_seeds(seed: int) -> dict[str, int]:
    """Independent seeds for each random stream, derived from ``trainer.seed`` (recorded in results)."""
    states = np.random.SeedSequence(seed).generate_state(len(SUB_SEEDS))
    return {k: int(s) for k, s in zip(SUB_SEEDS, states)}


def build_model(cfg: DictConfig, id2label: dict[int, str] | None = None) -> tuple[Any, torch.nn.Module, list, list]:
    """Tokenizer, model with the method applied, head and LoRA module paths; deterministic per seed.

    The head is re-initialised from its own sub-seed so every method of one seed starts from the same
    head (a paired comparison); LoRA A from another, so adding LoRA does not shift the head's init.
    Frozen parameters are then stored in ``model.base_dtype``; trainable ones stay fp32 (master weights).
    """
    seeds = sub_seeds(cfg.trainer.seed)
    torch.manual_seed(seeds["model"])  # random-init (tiny) models and anything from_pretrained draws
    tokenizer, model, head = build(cfg.model, cfg.data.num_labels, id2label)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.data.max_length > max_pos:
        raise LoraExpError(f"data.max_length={cfg.data.max_length} exceeds the model's maximum of {max_pos}")
    torch.manual_seed(seeds["head"])
    init_head(model, head)
    torch.manual_seed(seeds["lora"])
    adapted = apply_method(model, cfg.method.name, head, cfg.lora)
    store_frozen_in(model, cfg.model.get("base_dtype", "fp32"))
    return tokenizer, model, head, adapted
