"""Build the HF model + tokenizer from ``cfg.model``, apply the method (full / frozen / lora), count.

The classification head is the set of modules the pretrained checkpoint does not contain (what
``from_pretrained`` reports as newly initialised) plus the architecture's known head modules, so a
frozen or LoRA run always trains (and saves) the whole head: DistilBERT's ``pre_classifier`` too.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig
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

from lora_exp import assets, lora
from lora_exp.errors import LoraExpError
from lora_exp.hub import from_hub

HEAD_MODULES = {
    "distilbert": ["pre_classifier", "classifier"],
    "bert": ["classifier"],
    "roberta": ["classifier"],
    "xlm-roberta": ["classifier"],
}

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
    """Tokenizer (feature extractor for ``task=audio``), fp32 model and the head module paths."""
    if cfg.get("task", "text") == "audio":  # lora_exp/audio.py: AutoModelForAudioClassification / tiny Whisper
        from lora_exp import audio

        return audio.build(cfg, num_labels, id2label)
    if cfg.source == "tiny":
        model = _tiny_model(cfg, num_labels)
        if id2label:
            model.config.id2label = dict(id2label)
            model.config.label2id = {v: k for k, v in id2label.items()}

        return _tiny_tokenizer(), model, list(HEAD_MODULES[model.config.model_type])  # a copy: callers mutate

    where = model_location(cfg)
    if cfg.source == "package" and not (Path(where) / "config.json").is_file():
        raise LoraExpError(f"model.path={where!r} holds no config.json (not a model folder)")
    kw = dict(trust_remote_code=bool(cfg.trust_remote_code))
    labels = dict(num_labels=num_labels, **({"id2label": id2label} if id2label else {}))

    def load() -> tuple:
        config = AutoConfig.from_pretrained(where, **labels, **kw)
        # dtype=fp32: transformers 5 keeps a checkpoint's stored dtype otherwise (fp16 copies would train
        # in fp16); master weights stay fp32 and autocast does the low precision.
        model, info = AutoModelForSequenceClassification.from_pretrained(
            where, config=config, dtype=torch.float32, output_loading_info=True, **kw
        )
        return AutoTokenizer.from_pretrained(where, **kw), model, info

    if cfg.source == "hub":
        tokenizer, model, info = from_hub("model.path", where, load)
    else:
        try:
            tokenizer, model, info = load()
        except (OSError, ValueError, RuntimeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise LoraExpError(f"model.path={where!r}: cannot load the model ({first})") from err
    new = {k.rsplit(".", 1)[0] for k in info["missing_keys"]}
    known = HEAD_MODULES.get(model.config.model_type, [])
    modules = dict(model.named_modules())
    head = sorted(
        {m for m in new | set(known) if m in modules} - {m for m in new if any(m.startswith(k + ".") for k in known)}
    )
    return tokenizer, model, head


def apply_method(model: nn.Module, method: str, head: list[str], lora_cfg: DictConfig | None = None) -> list[str]:
    """Set ``requires_grad`` for ``method``; for lora inject adapters. Returns the LoRA module paths."""
    if method == "full":
        model.requires_grad_(True)
        return []
    model.requires_grad_(False)
    adapted: list[str] = []
    if method == "lora":
        adapted = lora.inject(
            model,
            list(lora_cfg.targets),
            lora_cfg.r,
            lora_cfg.alpha,
            lora_cfg.dropout,
            lora_cfg.rslora,
            protected=head,  # newly initialised: a frozen random base + LoRA would cripple the model
        )
    for name in head:
        model.get_submodule(name).requires_grad_(True)
    for name in adapted:
        sub = model.get_submodule(name)
        sub.lora_A.requires_grad_(True)
        sub.lora_B.requires_grad_(True)
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
        if ".lora_A." in name or ".lora_B." in name:
            counts["adapter"] += p.numel()
        elif any(name.startswith(h + ".") for h in head):
            counts["head"] += p.numel()
        else:
            counts["other"] += p.numel()
    counts["trainable_pct"] = 100.0 * counts["trainable"] / counts["total"]
    return counts
