"""Saved tiny checkpoints of every architecture train with each method through train(); a truncated safetensors
file is one line and a failed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from lora_exp import cli
from lora_exp.errors import LoraExpError
from lora_exp.models import text as text_models
from lora_exp.training import loop
from tests.helpers import tiny_checkpoints as tc
from tests.helpers.tiny_checkpoints import FFN as F
from tests.helpers.tiny_checkpoints import LABELS as C
from tests.helpers.tiny_checkpoints import LAYERS as L
from tests.helpers.tiny_checkpoints import H

R = 4


ADAPTER = {  # sum of r (in + out) over the adapted layers, from the architecture's shapes
    **{a: L * 2 * R * (H + H) for a in ("bert", "distilbert", "roberta", "electra", "deberta-v2")},
    "modernbert": L * R * ((H + 3 * H) + (H + H) + (H + 2 * F) + (F + H)),  # Wqkv, Wo, Wi (GLU: 2F), mlp.Wo
    "gpt2": L * R * ((H + 3 * H) + (H + H) + (H + F) + (F + H)),  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    "llama": L * R * ((H + H) + (H + H) + 3 * (H + F)),  # q, v, gate, up, down
}


LAYERS_ADAPTED = {**{a: 2 for a in ADAPTER}, "modernbert": 4, "gpt2": 4, "llama": 5}  # per block


_DENSE, _OUT = ["weight", "bias"], ["weight", "bias"]


HEAD_KEYS = {  # the head's tensors, as the architecture defines them outside its base
    "bert": ["classifier.weight", "classifier.bias"],
    "distilbert": ["pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"],
    "roberta": [f"classifier.dense.{x}" for x in _DENSE] + [f"classifier.out_proj.{x}" for x in _OUT],
    "electra": [f"classifier.dense.{x}" for x in _DENSE] + [f"classifier.out_proj.{x}" for x in _OUT],
    "deberta-v2": ["pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"],
    "modernbert": ["head.dense.weight", "head.norm.weight", "classifier.weight", "classifier.bias"],
    "gpt2": ["score.weight"],
    "llama": ["score.weight"],
}


HEAD_PARAMS = {
    "bert": H * C + C,
    **{a: (H * H + H) + (H * C + C) for a in ("distilbert", "roberta", "electra", "deberta-v2")},
    "modernbert": H * H + H + (H * C + C),  # dense and norm without bias (ModernBERT's defaults)
    "gpt2": H * C,
    "llama": H * C,
}


@pytest.mark.parametrize("method", ["lora", "frozen", "full"])
@pytest.mark.parametrize("arch", tc.ARCHS)
def test_checkpoint_with_head_trains_each_method(arch: str, method: str, checkpoint, tiny_cfg, tmp_path: Path) -> None:
    ckpt = checkpoint(arch)
    cfg = tiny_cfg(
        *tc.local(ckpt, arch), f"method={method}", f"lora.targets=[{','.join(tc.TARGETS[arch])}]", f"lora.r={R}"
    )
    res = loop.train(cfg, tmp_path / "run")
    assert res["status"] == "ok" and res["steps"] == 3
    total = sum(p.numel() for p in AutoModelForSequenceClassification.from_config(tc.config(arch)).parameters())
    assert res["total_params"] == total + res["adapter_params"]
    assert res["head_params"] == HEAD_PARAMS[arch]
    if method == "full":
        assert res["trainable_params"] == total and res["adapter_params"] == 0
        return
    assert res["adapter_params"] == (ADAPTER[arch] if method == "lora" else 0)
    assert res["trainable_params"] == res["adapter_params"] + HEAD_PARAMS[arch] and res["other_trainable_params"] == 0
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    assert sorted(k for k in saved if ".lora_" not in k) == sorted(HEAD_KEYS[arch])
    assert sum(saved[k].numel() for k in HEAD_KEYS[arch]) == HEAD_PARAMS[arch]
    stored = load_file(str(ckpt / "model.safetensors"))
    assert not torch.equal(saved[HEAD_KEYS[arch][0]], stored[HEAD_KEYS[arch][0]])  # re-initialised, trained
    adapted = [k for k in saved if ".lora_B." in k]
    assert len(adapted) == res["lora_layers"] == (L * LAYERS_ADAPTED[arch] if method == "lora" else 0)


def test_truncated_safetensors_is_one_line_and_a_failed_run(checkpoint, tiny_cfg, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    for f in checkpoint("bert").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut short
    line = (
        f"model.path={str(folder)!r}: cannot load the model "
        "(Error while deserializing header: incomplete metadata, file not fully covered)"
    )
    with pytest.raises(LoraExpError) as err:
        text_models.build(tc.model_cfg(folder, "bert"), 2)
    assert str(err.value) == line
    with pytest.raises(SystemExit) as exit_:  # as the CLI runs a job: one line, status failed
        cli.run_job(tiny_cfg(*tc.local(folder, "bert")), tmp_path / "run")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {line}"
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "failed" and saved["reason"] == line
