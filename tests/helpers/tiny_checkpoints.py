"""Tiny local checkpoints of real architectures, saved WITH their classification head, plus a tokenizer.

What a researcher's own fine-tuned model folder looks like (``config.json``, ``model.safetensors`` holding
the head, tokenizer files), at seconds-on-CPU size. Encoders get the tiny WordPiece tokenizer (it has a pad
token); decoders get a word-level tokenizer with an EOS token and no pad token, as GPT-2 / Llama / Qwen2
ship. Every vocabulary covers the tokenizer's ids.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PreTrainedTokenizerFast

from lora_exp.config.schema import ModelConfig
from lora_exp.models.text import _tiny_tokenizer

from .configs import FILLER, NEGATIVE, POSITIVE

H, FFN, LAYERS, HEADS, LABELS, VOCAB, MAX_POS = 16, 32, 2, 2, 2, 256, 160
EOS = "<|endoftext|>"
DECODERS = ("gpt2", "llama", "qwen2")
# qwen2 is left out of the training runs: transformers 5 loads any folder of model_type qwen2 with its own
# byte-level Qwen2Tokenizer pipeline, which this word-level test tokenizer does not fit (it has aliases tests).
ARCHS = ("bert", "distilbert", "roberta", "electra", "deberta-v2", "modernbert", "gpt2", "llama")

_COMMON = dict(
    hidden_size=H,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=FFN,
    vocab_size=VOCAB,
    max_position_embeddings=MAX_POS,
    pad_token_id=0,  # the WordPiece tokenizer's [PAD]
)
_SPECIAL = dict(bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3)  # its [CLS] / [SEP]
_DECODER = dict(pad_token_id=None, bos_token_id=1, eos_token_id=1, num_key_value_heads=HEADS)  # 1: EOS
CONFIGS: dict[str, dict] = {
    "bert": _COMMON,
    "distilbert": dict(dim=H, hidden_dim=FFN, n_layers=LAYERS, n_heads=HEADS, vocab_size=VOCAB, pad_token_id=0),
    "roberta": _COMMON,
    "electra": dict(_COMMON, embedding_size=H),
    "deberta-v2": dict(  # DeBERTa-v3's own settings: relative attention, no absolute positions
        _COMMON,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        max_relative_positions=-1,
        position_buckets=32,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        type_vocab_size=0,
    ),
    "modernbert": dict(_COMMON, **_SPECIAL, global_attn_every_n_layers=1, local_attention=64),
    "gpt2": dict(n_embd=H, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, vocab_size=VOCAB, n_positions=MAX_POS)
    | dict(pad_token_id=None, bos_token_id=1, eos_token_id=1),
    "llama": dict(_COMMON, **_DECODER),
    "qwen2": dict(_COMMON, **_DECODER),
}


def config(arch: str):
    """The tiny transformers config of ``arch`` (2 labels)."""
    return AutoConfig.for_model(arch, num_labels=LABELS, **CONFIGS[arch])


def decoder_tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the test corpus' words: an EOS token (id 1) and no pad token."""
    words = sorted(set(POSITIVE + NEGATIVE + FILLER))
    vocab = {"<unk>": 0, EOS: 1, **{w: i + 2 for i, w in enumerate(words)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.normalizer = normalizers.Lowercase()
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", **({"eos_token": EOS} if eos else {})
    )


def save(arch: str, folder: Path, head: bool = True, eos: bool = True) -> Path:
    """Save a random-init ``arch`` checkpoint (with its head, or the base model alone) and its tokenizer."""
    conf = config(arch)
    model = AutoModelForSequenceClassification.from_config(conf) if head else AutoModel.from_config(conf)
    model.save_pretrained(folder)
    (decoder_tokenizer(eos) if arch in DECODERS else _tiny_tokenizer()).save_pretrained(folder)
    return folder


def save_pair(arch: str, root: Path) -> tuple[Path, Path]:
    """The same weights twice: a checkpoint with its head, and its base model alone (head missing)."""
    model = AutoModelForSequenceClassification.from_config(config(arch))
    with_head, base = root / f"{arch}-head", root / f"{arch}-base"
    model.save_pretrained(with_head)
    getattr(model, model.base_model_prefix).save_pretrained(base)
    for folder in (with_head, base):
        (decoder_tokenizer() if arch in DECODERS else _tiny_tokenizer()).save_pretrained(folder)
    return with_head, base


TARGETS = {  # the LoRA targets each architecture's tests adapt
    **{a: ["q", "v"] for a in ("bert", "distilbert", "roberta", "electra", "deberta-v2")},
    "modernbert": ["qkv", "o", "ffn"],
    "gpt2": ["qkv", "o", "ffn"],
    "llama": ["q", "v", "ffn"],
}


def model_cfg(path: Path, arch: str) -> ModelConfig:
    """A ``model`` config slice that loads the checkpoint saved at ``path``."""
    return ModelConfig(source="local", path=str(path), name=arch, trust_remote_code=False)


def local(path: Path, arch: str) -> list[str]:
    """Overrides for a 3-step run of the checkpoint saved at ``path`` on 24 training rows."""
    return [
        "model.source=local",
        f"model.path={path}",
        f"model.name={arch}",
        "trainer.max_steps=3",
        "trainer.epochs=1",
        "trainer.batch_size=8",
        "trainer.eval_batch_size=32",
        "data.limit=24",
        "data.eval_limit=16",
        "data.max_length=32",
    ]
