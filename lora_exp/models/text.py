"""Text classifiers: the tokenizer and fp32 ``*ForSequenceClassification`` model from ``cfg.model`` (the
offline MiniLM, a Hub id, a local folder, or a tiny random model for tests), with pad-token handling."""

from __future__ import annotations

import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
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

from lora_exp.data.hub import from_hub
from lora_exp.errors import LoraExpError
from lora_exp.models.heads import find_head
from lora_exp.models.location import model_location

if TYPE_CHECKING:
    from lora_exp.config.schema import ModelConfig

TINY_VOCAB = 1000


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


def _tiny_model(cfg: ModelConfig, num_labels: int) -> PreTrainedModel:
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


def build(
    cfg: ModelConfig, num_labels: int, id2label: dict[int, str] | None = None
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, list[str]]:
    """Tokenizer, fp32 model and the head (module paths or bare parameter names, trained in full by
    frozen/lora)."""
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
