"""The command line before Hydra: a closed config (one line, exit 2, naming the option and what it can be) and
``--cfg job`` with only the fields that apply. Through the CLI's entry point (``lora_exp.cli.main``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_exp import cli
from lora_exp.config.identity import TINY_ONLY

MODELS = (
    "bert_base, distilbert, minilm, roberta_base, tiny_bert, tiny_distilbert, tiny_whisper, whisper_small, "
    "whisper_tiny_en"
)
CLOSED = "; the config is closed: + only adds a config group, e.g. +sweep=NAME"


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``lora-exp ARGS`` in this process: exit code, stdout, stderr."""
    monkeypatch.setattr("sys.argv", ["lora-exp", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out, err = capsys.readouterr()
    return exited.value.code, out, err


REFUSED = [
    (["lora.rank=8"], "error: lora.rank=8: no such option (did you mean lora.r?)"),
    (["+lora.rank=8"], f"error: +lora.rank=8: no such option (did you mean lora.r?){CLOSED}"),
    (["++lora.rank=8"], f"error: ++lora.rank=8: no such option (did you mean lora.r?){CLOSED}"),
    (["+trainer.epoch=5"], f"error: +trainer.epoch=5: no such option (did you mean trainer.epochs?){CLOSED}"),
    (["data.gw.snrr=[1,2]"], "error: data.gw.snrr=[1,2]: no such option (did you mean data.gw.snr?)"),
    (
        ["lora.foo=1"],
        "error: lora.foo=1: no such option (lora has r, alpha, targets, dropout, rslora, variant, use_dora, init, "
        "bias, layers, rank_pattern, alpha_pattern, vera, eva, adalora, lora_ga)",
    ),
    (["+lora.r=4"], "error: +lora.r=4: lora.r already exists; write lora.r=4"),
    (["model=minlm"], f"error: model=minlm: no such option; model is one of {MODELS} (did you mean minilm?)"),
    (
        ["-m", "model=tiny_bert,minlm"],
        f"error: model=minlm: no such option; model is one of {MODELS} (did you mean minilm?)",
    ),
    (
        ["hydra/launcher=jobilb"],
        "error: hydra/launcher=jobilb: no such option; hydra/launcher is one of basic, joblib, packed, slurm, "
        "submitit_local, submitit_slurm (did you mean joblib?)",
    ),
    (["sweep=quick"], "error: sweep=quick: sweep is not chosen by default; write +sweep=quick"),
    (["+model=tiny_bert"], "error: +model=tiny_bert: model is already chosen by default; write model=tiny_bert"),
    (["trainer.epochs=abc"], "error: trainer.epochs=abc must be an integer"),
    (["trainer.max_steps=x"], "error: trainer.max_steps=x must be an integer or null"),
    (["trainer.keep_checkpoint=maybe"], "error: trainer.keep_checkpoint=maybe must be true or false"),
    (["trainer.memory_probe=3"], "error: trainer.memory_probe=3 must be true or false"),  # OmegaConf: True
    (["-m", "trainer.compile=false,yes"], "error: trainer.compile=yes must be true or false"),
    (["lora.targets=q"], "error: lora.targets=q must be a list like [a,b]"),
    (["-m", "lora.r=4,x"], "error: lora.r=x must be an integer"),
    (["lora.r=[1,"], "error: lora.r=[1,: cannot be parsed (no viable alternative at input '[1,')"),
]


@pytest.mark.parametrize(("args", "line"), REFUSED)
def test_override_outside_the_schema_is_one_line(args, line, monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(monkeypatch, capsys, *args, "logger=none")
    assert (code, err.splitlines()) == (2, [line])
    assert list(tmp_path.iterdir()) == []  # refused before Hydra: no run or sweep dir


def show(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> dict:
    code, out, err = run_main(monkeypatch, capsys, *args, "--cfg", "job")
    assert code == 0, err
    return yaml.safe_load(out)


@pytest.mark.parametrize(
    ("args", "where", "value"),
    [
        (["+sweep=quick"], "data.limit", 2000),
        (["+preset=dora"], "lora.variant", "dora"),
        (["++lora.r=4"], "lora.r", 4),
        (["lora.rank_pattern={query:4}"], "lora.rank_pattern", {"query": 4}),
        (["experiment=quick"], "data.limit", 2000),
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=tiny_bert"], "model.source", "tiny"),
        (["+sweep=fair", "lr_index=1"], "lr_index", 1),
    ],
)
def test_legitimate_overrides_still_compose(args, where, value, monkeypatch, capsys) -> None:
    node = show(monkeypatch, capsys, *args)
    for part in where.split("."):
        node = node[part]
    assert node == value


def test_cfg_job_shows_only_what_applies(monkeypatch, capsys) -> None:
    minilm = show(monkeypatch, capsys, "model=minilm")
    assert not set(TINY_ONLY) & set(minilm["model"]) and "audio_max_seconds" not in minilm["model"]
    assert "gw" not in minilm["data"] and minilm["data"]["text_column"] == "text" and "path" in minilm["model"]
    assert "lr_grid" not in minilm["method"] and "lr_index" not in minilm
    tiny = show(monkeypatch, capsys, "model=tiny_bert", "method=full")
    assert tiny["model"]["hidden_size"] == 32 and "path" not in tiny["model"] and "lora" not in tiny
    gw = show(monkeypatch, capsys, "data=gw_synthetic", "model=tiny_whisper")
    assert gw["data"]["gw"]["sample_rate"] == 2048 and "audio_max_seconds" in gw["model"]
    assert not {"text_column", "label_column", "encoding", "max_length", "path"} & set(gw["data"])
    code, out, _ = run_main(monkeypatch, capsys, "model=minilm", "--cfg", "job", "--resolve", "-p", "model")
    assert code == 0 and out.startswith("# @package model\nname: minilm\n") and "hidden_size" not in out
