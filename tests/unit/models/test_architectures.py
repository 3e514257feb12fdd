"""Any architecture's head trains: local checkpoints saved WITH their head, for 8 architectures, run lora / frozen /
full end to end (tests/e2e/test_architectures_runs.py); the head is found from the structure, trained, saved,
counted by formula.

Formulas (H hidden, F ffn, L layers, C labels, r rank): each adapted layer ``k -> d`` adds ``r (k + d)``;
the head is what the architecture puts outside its base model (e.g. RoBERTa: ``H H + H + H C + C``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

from lora_exp.adapters import targets as injection
from lora_exp.config.schema import LoraConfig, typed_config
from lora_exp.errors import LoraExpError
from lora_exp.models import heads as model_heads
from lora_exp.models import methods as model_methods
from lora_exp.models import text as text_models
from lora_exp.training.job import build_model_for
from tests.helpers import tiny_checkpoints as tc
from tests.helpers.tiny_checkpoints import LABELS as C
from tests.helpers.tiny_checkpoints import LAYERS as L
from tests.helpers.tiny_checkpoints import H

HEAD_MODULES = {
    "bert": ["classifier"],
    "distilbert": ["pre_classifier", "classifier"],
    "roberta": ["classifier"],
    "electra": ["classifier"],
    "deberta-v2": ["pooler", "classifier"],
    "modernbert": ["head", "classifier"],
    "gpt2": ["score"],
    "llama": ["score"],
}


@pytest.mark.parametrize("arch", tc.ARCHS)
def test_head_found_with_and_without_saved_head(arch: str, tmp_path: Path) -> None:
    """The structural rule gives the same head whether the checkpoint holds it or not."""
    with_head, base = tc.save_pair(arch, tmp_path)
    assert text_models.build(tc.model_cfg(with_head, arch), 2)[2] == HEAD_MODULES[arch]
    assert text_models.build(tc.model_cfg(base, arch), 2)[2] == HEAD_MODULES[arch]


@pytest.mark.parametrize("arch", ["distilbert", "gpt2"])
def test_checkpoint_with_head_builds_exactly_like_its_base(arch: str, tiny_cfg, tmp_path: Path) -> None:
    """Same base weights, head saved or not: the same model after build (head re-initialised per seed)."""
    with_head, base = tc.save_pair(arch, tmp_path)
    targets = f"lora.targets=[{','.join(tc.TARGETS[arch])}]"
    built = [
        build_model_for(typed_config(tiny_cfg(*tc.local(p, arch), "method=lora", targets)))[1]
        for p in (with_head, base)
    ]
    a, b = (dict(m.named_parameters()) for m in built)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_missing_pooler_inside_the_base_is_head(tmp_path: Path) -> None:
    conf = BertConfig(**tc.CONFIGS["bert"])
    BertModel(conf, add_pooling_layer=False).save_pretrained(tmp_path / "nopool")
    text_models._tiny_tokenizer().save_pretrained(tmp_path / "nopool")
    _, model, head = text_models.build(tc.model_cfg(tmp_path / "nopool", "bert"), 2)
    assert head == ["bert.pooler", "classifier"]
    model_methods.apply_method(model, "frozen", head)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    }


def test_bare_parameter_head_found_and_reinitialised() -> None:
    """Whisper's audio classifier: a bare ``layer_weights`` and a base named otherwise than its prefix."""
    from transformers import WhisperConfig, WhisperForAudioClassification

    conf = WhisperConfig(
        d_model=16,
        encoder_layers=2,
        encoder_attention_heads=2,
        decoder_layers=1,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        vocab_size=64,
        num_mel_bins=8,
        max_source_positions=16,
        use_weighted_layer_sum=True,
        classifier_proj_size=8,
    )
    model = WhisperForAudioClassification(conf)
    head = model_heads.find_head(model)
    assert head == ["layer_weights", "projector", "classifier"]
    with torch.no_grad():
        model.layer_weights.fill_(5.0)
        model.projector.weight.fill_(5.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model_heads.init_head(model, head)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {"layer_weights", "projector.weight", "classifier.weight"}  # biases were zero; encoder kept
    torch.testing.assert_close(model.layer_weights, torch.full((3,), 1 / 3))
    model_methods.apply_method(model, "frozen", head)
    assert model_methods.count_parameters(model, head)["head"] == 3 + (16 * 8 + 8) + (8 * 2 + 2)


@pytest.mark.parametrize("head", [[], ["dropout"]])
def test_head_without_parameters_is_refused(head: list[str], checkpoint) -> None:
    _, model, _ = text_models.build(tc.model_cfg(checkpoint("bert"), "bert"), 2)
    for method in ("lora", "frozen"):
        with pytest.raises(LoraExpError, match=f"method={method}: the model has no classification head") as err:
            model_methods.apply_method(model, method, head, LoraConfig(targets=["q"], r=4, alpha=8.0))
        assert "\n" not in str(err.value)
    assert model_methods.apply_method(model, "full", head) == []  # full needs no head


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_pads_with_eos(arch: str, checkpoint, capsys) -> None:
    tokenizer, model, _ = text_models.build(tc.model_cfg(checkpoint(arch), arch), 2)
    assert tokenizer.pad_token == tc.EOS and tokenizer.pad_token_id == model.config.pad_token_id == 1
    lines = [x for x in capsys.readouterr().out.splitlines() if "pad" in x]
    assert lines == [
        f"[lora-exp] {arch}: the tokenizer has no pad token; padding with its EOS token '{tc.EOS}' "
        "(id 1, also set as config.pad_token_id)"
    ]
    model.eval()
    batch = tokenizer(["good film", "the bad movie was dull"], padding=True, return_tensors="pt")
    alone = tokenizer(["good film"], return_tensors="pt")
    with torch.no_grad():  # the padded row pools its own last token, not a pad
        torch.testing.assert_close(model(**batch).logits[0], model(**alone).logits[0], atol=1e-5, rtol=1e-5)


def test_tokenizer_without_pad_and_eos_is_refused(tmp_path: Path) -> None:
    tc.save("gpt2", tmp_path / "g", eos=False)
    with pytest.raises(LoraExpError, match="the tokenizer has neither a pad nor an EOS token") as err:
        text_models.build(tc.model_cfg(tmp_path / "g", "gpt2"), 2)
    assert str(err.value).startswith(f"model.path={str(tmp_path / 'g')!r}: ") and "\n" not in str(err.value)


EXPECTED_ALIASES = {  # alias -> the module paths of layer {i}, real transformers names
    "electra": {
        "q": ["electra.encoder.layer.{i}.attention.self.query"],
        "o": ["electra.encoder.layer.{i}.attention.output.dense"],
        "ffn": ["electra.encoder.layer.{i}.intermediate.dense", "electra.encoder.layer.{i}.output.dense"],
    },
    "deberta-v2": {
        "q": ["deberta.encoder.layer.{i}.attention.self.query_proj"],
        "k": ["deberta.encoder.layer.{i}.attention.self.key_proj"],
        "v": ["deberta.encoder.layer.{i}.attention.self.value_proj"],
        "o": ["deberta.encoder.layer.{i}.attention.output.dense"],
        "ffn": ["deberta.encoder.layer.{i}.intermediate.dense", "deberta.encoder.layer.{i}.output.dense"],
    },
    "llama": {
        "k": ["model.layers.{i}.self_attn.k_proj"],
        "o": ["model.layers.{i}.self_attn.o_proj"],
        "ffn": [f"model.layers.{{i}}.mlp.{m}_proj" for m in ("gate", "up", "down")],
    },
    "qwen2": {"q": ["model.layers.{i}.self_attn.q_proj"], "v": ["model.layers.{i}.self_attn.v_proj"]},
    "gpt2": {
        "qkv": ["transformer.h.{i}.attn.c_attn"],
        "o": ["transformer.h.{i}.attn.c_proj"],
        "ffn": ["transformer.h.{i}.mlp.c_fc", "transformer.h.{i}.mlp.c_proj"],
    },
    "modernbert": {
        "qkv": ["model.layers.{i}.attn.Wqkv"],
        "o": ["model.layers.{i}.attn.Wo"],
        "ffn": ["model.layers.{i}.mlp.Wi", "model.layers.{i}.mlp.Wo"],
    },
}


@pytest.mark.parametrize(("arch", "alias"), [(a, x) for a, t in EXPECTED_ALIASES.items() for x in t])
def test_alias_matches_real_module_names(arch: str, alias: str) -> None:
    model = AutoModelForSequenceClassification.from_config(tc.config(arch))
    want = [p.format(i=i) for i in range(L) for p in EXPECTED_ALIASES[arch][alias]]
    assert sorted(injection.resolve_targets(model, [alias])) == sorted(want)


@pytest.mark.parametrize("model_type", ["mistral", "qwen3", "gemma", "gemma2"])
def test_llama_like_aliases(model_type: str) -> None:
    from transformers import AutoConfig

    conf = AutoConfig.for_model(model_type, **tc.CONFIGS["llama"], head_dim=8, num_labels=2)
    model = AutoModelForSequenceClassification.from_config(conf)
    got = injection.resolve_targets(model, ["q", "k", "v", "o", "ffn"])
    assert len(got) == L * 7 and all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in got)


@pytest.mark.parametrize(("arch", "fused"), [("gpt2", "attn.c_attn"), ("modernbert", "attn.Wqkv")])
@pytest.mark.parametrize("alias", ["q", "k", "v"])
def test_fused_qkv_families_point_to_qkv(arch: str, fused: str, alias: str) -> None:
    model = AutoModelForSequenceClassification.from_config(tc.config(arch))
    with pytest.raises(LoraExpError) as err:
        injection.resolve_targets(model, [alias])
    assert str(err.value) == (
        f"lora.targets: '{alias}' does not exist for model_type '{arch}': its attention projects q, k and v in "
        f"one fused layer ({fused}); use 'qkv'"
    )


def test_head_fine_tuned_for_other_labels_is_reinitialised(tmp_path: Path) -> None:
    conf = tc.config("roberta")
    conf.num_labels = 3
    AutoModelForSequenceClassification.from_config(conf).save_pretrained(tmp_path / "three")
    text_models._tiny_tokenizer().save_pretrained(tmp_path / "three")
    _, model, head = text_models.build(tc.model_cfg(tmp_path / "three", "roberta"), 2)
    assert head == ["classifier"] and model.classifier.out_proj.weight.shape == (C, H)
