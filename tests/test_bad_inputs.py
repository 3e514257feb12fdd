"""The rest of the bad-input catalogue (config values are in test_config.py, targets in test_models.py,
data files in test_data.py): one-line errors naming what is wrong, before expensive work; and security."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lora_exp import adapter, checkpoint, inference, models, train
from lora_exp.errors import LoraExpError

from .test_models import lora_cfg, tiny
from .test_train import cli

PACKAGE = Path(__file__).resolve().parent.parent / "lora_exp"


@pytest.fixture
def saved_adapter(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    _, model, head = tiny("bert")
    models.apply_method(model, "lora", head, lora_cfg("q", "v"))
    adapter.save_adapter(model, tmp_path / "a", {"num_labels": 2})
    return model, tmp_path / "a"


def test_missing_adapter_file(saved_adapter, tmp_path: Path) -> None:
    (saved_adapter[1] / "adapter.safetensors").unlink()
    with pytest.raises(LoraExpError, match="adapter.safetensors is missing"):
        adapter.read_adapter(saved_adapter[1])


def test_corrupted_adapter_file(saved_adapter) -> None:
    path = saved_adapter[1] / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(LoraExpError, match="adapter.safetensors is corrupted"):
        adapter.read_adapter(saved_adapter[1])


def test_corrupted_adapter_config(saved_adapter) -> None:
    (saved_adapter[1] / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoraExpError, match="adapter_config.json is not valid JSON"):
        adapter.read_adapter(saved_adapter[1])


def test_adapter_with_other_rank_is_refused(saved_adapter) -> None:
    _, model, head = tiny("bert")
    models.apply_method(model, "lora", head, lora_cfg("q", "v", r=2))
    _, tensors = adapter.read_adapter(saved_adapter[1])
    with pytest.raises(LoraExpError, match=r"lora_A.weight has shape \(4, 32\), the model \(2, 32\)"):
        adapter.load_into(model, tensors, str(saved_adapter[1]))


def test_adapter_for_other_targets_is_refused(saved_adapter) -> None:
    _, model, head = tiny("bert")
    models.apply_method(model, "lora", head, lora_cfg("k"))
    _, tensors = adapter.read_adapter(saved_adapter[1])
    with pytest.raises(LoraExpError, match="has tensors this model lacks"):
        adapter.load_into(model, tensors, str(saved_adapter[1]))
    bank = inference.AdapterBank(model)
    with pytest.raises(LoraExpError, match="has tensors this model lacks"):
        bank.add("other", saved_adapter[1])


def test_saving_a_merged_adapter_is_refused(saved_adapter, tmp_path: Path) -> None:
    from lora_exp import lora

    lora.merge(saved_adapter[0])
    with pytest.raises(LoraExpError, match="unmerge\\(\\) before saving"):
        adapter.save_adapter(saved_adapter[0], tmp_path / "b", {})


def test_corrupted_checkpoint_is_one_line(tiny_cfg, tmp_path: Path) -> None:
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "progress.json").write_text("{}")
    (tmp_path / "checkpoint" / "state.pt").write_bytes(b"garbage")
    _, model, head = tiny("bert")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(LoraExpError, match="the checkpoint is unreadable"):
        checkpoint.load(tmp_path, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), None)


def test_unwritable_output_dir(tiny_cfg, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LoraExpError, match="is not writable"):
        train.train(tiny_cfg(), blocker / "run")


def test_precision_and_device_checks() -> None:
    with pytest.raises(LoraExpError, match="trainer.precision=fp16 needs CUDA"):
        train.pick_precision("fp16", torch.device("cpu"))
    assert train.pick_precision("auto", torch.device("cpu")) == "fp32"
    assert train.pick_precision("bf16", torch.device("cpu")) == "bf16"  # CPU autocast supports bf16
    if not torch.cuda.is_available():
        with pytest.raises(LoraExpError, match="trainer.device=cuda but no CUDA device is available"):
            train.pick_device("cuda")


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        (["model=distilbert"], "model.path='distilbert-base-uncased'"),
        (["data=imdb", "model=tiny_bert"], "data.path='imdb'"),
    ],
)
def test_hub_preset_offline_is_one_line(overrides: list[str], option: str, tmp_path: Path) -> None:
    from lora_exp import hub

    if hub.hub_reachable():
        pytest.skip("the Hugging Face Hub is reachable from here")
    proc = cli(
        [*overrides, "logger=none", f"data.cache_dir={tmp_path / 'hf'}", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {option}: cannot load")
    assert "model=minilm data=rotten_tomatoes_offline" in errors[0]


def test_predict_usage_errors(tmp_path: Path) -> None:
    proc = cli(["predict", "text=hello"], tmp_path)
    assert proc.returncode == 2 and "predict: usage" in proc.stderr
    proc = cli(["predict", f"adapter={tmp_path}", "text=hello"], tmp_path)
    assert proc.returncode == 2 and "has no config.yaml" in proc.stderr


def test_wandb_api_key_never_written(tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    train.train(tiny_cfg("logger=wandb", "trainer.max_steps=2"), tmp_path / "run")
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_no_pickle_loading_and_no_remote_code_by_default() -> None:
    from .conftest import make_cfg

    assert make_cfg().model.trust_remote_code is False
    for path in PACKAGE.glob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_failed_run_never_overwrites_a_finished_result(tmp_path: Path) -> None:
    from lora_exp.cli import _record_failure

    from .conftest import make_cfg

    (tmp_path / "results.json").write_text(json.dumps({"status": "ok", "test_acc": 0.9}))
    _record_failure(make_cfg(), tmp_path, "error", "boom")
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "ok"
