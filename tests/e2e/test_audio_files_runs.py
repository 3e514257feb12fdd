"""A researcher's own clips through the real CLI with tiny Whisper: an audiofolder and a table of clip paths of real
.wav files (8 / 16 / 22.05 / 44.1 kHz, mono / stereo, int16 / float32, 0.3-1.6 s), named classes, the features
cache and the frozen-feature cache, ``predict`` on a clip and on a folder, and an unreadable clip."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_exp.errors import LoraExpError
from tests.helpers.audio import TONES, write_clips
from tests.helpers.configs import make_cfg
from tests.helpers.processes import cli

TINY = [
    "model=tiny_whisper",
    "model.hidden_size=32",
    "model.heads=2",
    "model.ffn_size=64",
    "data=files",
    "data.num_labels=3",
    "logger=none",
    "trainer.device=cpu",
    "trainer.precision=fp32",
    "trainer.epochs=2",
    "trainer.batch_size=8",
    "trainer.eval_batch_size=16",
    "trainer.num_threads=1",
    "optimizer.warmup_ratio=0.0",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Clips written once; a LoRA run and then a frozen run on the folder (the second reads the features back),
    a full run on a table of relative clip paths: each a fresh ``lora-exp`` process."""
    root = tmp_path_factory.mktemp("audio")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_EXP_CACHE", str(root / "cache"))  # the features cache of these runs only
        yield _runs(root)


def _runs(root: Path) -> dict:
    from lora_exp.training.loop import train

    clips = write_clips(root / "clips", per_class=12)
    with open(root / "clips.csv", "w", newline="") as f:  # relative to the table's folder
        w = csv.writer(f)
        w.writerow(["file", "kind"])
        w.writerows((p.relative_to(root).as_posix(), name) for p, name in clips)
    folder = [f"data.path={root / 'clips'}", "data.max_seconds=1"]
    proc = cli([*TINY, *folder, "method=lora", f"hydra.run.dir={root / 'folder-lora'}"], root)  # as a user runs it
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {"root": root, "clips": clips}
    out["folder-lora"] = (proc.stdout, json.loads((root / "folder-lora" / "results.json").read_text()))
    table = [f"data.path={root / 'clips.csv'}", "data.audio_column=file", "data.label_column=kind"]
    for name, extra in (  # in this process: the same job, without a second start-up of the CLI
        ("folder-frozen", [*folder, "method=frozen"]),
        ("table-full", [*table, "method=full", "data.max_seconds=0.5", "model.audio_max_seconds=1"]),
    ):
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            res = train(make_cfg([*TINY, *extra]), root / name)
        out[name] = (printed.getvalue(), res)
    return out


def test_audiofolder_trains_on_named_classes_at_the_clip_window(runs: dict) -> None:
    printed, res = runs["folder-lora"]
    assert res["status"] == "ok" and res["train_examples"] == 36 - 4 - 4  # 10% of 36 (rounded up): test, validation
    # 1 s clips: Whisper's window follows data.max_seconds (100 mel frames, not 3,000), computed once
    assert "audio features (80 x 100 per clip) of 36 clips: computed once" in printed
    config = json.loads((runs["root"] / "folder-lora" / "adapter" / "adapter_config.json").read_text())
    assert config["id2label"] == {"0": "high", "1": "low", "2": "mid"}  # the subfolders' names, sorted
    assert 0.0 <= res["test_acc"] <= 1.0 and res["steps"] == 2 * 4


def test_a_second_run_reads_the_features_back_and_the_frozen_cache_works(runs: dict) -> None:
    printed, res = runs["folder-frozen"]
    assert "of 36 clips: read back (computed earlier)" in printed
    assert "frozen encoder run once over 36 examples" in printed
    assert res["status"] == "ok" and res["feature_cache"] is True


def test_path_table_with_relative_paths_trains_full(runs: dict) -> None:
    printed, res = runs["table-full"]
    assert res["status"] == "ok" and res["method"] == "full"
    # clips cut / padded to 0.5 s, in the 1 s window model.audio_max_seconds asks for
    assert "audio features (80 x 100 per clip) of 36 clips: computed once" in printed


def test_predict_on_a_clip_and_on_a_folder(runs: dict) -> None:
    root = runs["root"]
    clip = runs["clips"][0][0]
    one = cli(["predict", f"adapter={root / 'folder-lora'}", f"audio={clip}"], root)
    assert one.returncode == 0, one.stderr[-2000:]
    label, prob, path = one.stdout.strip().split("\t")
    assert label in TONES and 0 < float(prob) <= 1 and path == str(clip)
    many = cli(["predict", f"adapter={root / 'table-full'}", f"audio={root / 'clips' / 'mid'}"], root)
    assert many.returncode == 0, many.stderr[-2000:]
    lines = [line.split("\t") for line in many.stdout.strip().splitlines()]
    assert [Path(p).name for _, _, p in lines] == sorted(f"{i}.wav" for i in range(12))  # every clip, sorted
    assert all(label in TONES for label, _, _ in lines)


def test_an_unreadable_clip_is_one_line(lora_exp_cache: Path, tmp_path: Path) -> None:
    from lora_exp.training.loop import train

    bad = tmp_path / "clips"
    write_clips(bad, per_class=10)
    (bad / "low" / "broken.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(LoraExpError) as err:
        train(make_cfg([*TINY, f"data.path={bad}", "data.max_seconds=0.5"]), tmp_path / "run")
    assert re.fullmatch(r"audio clip '.*broken\.wav' cannot be read as \.wav \(.+\)", str(err.value))


def test_scores_per_clip_train_a_regression(lora_exp_cache: Path, tmp_path: Path) -> None:
    """A table of clips with a float score (the tone's pitch, 0 / 0.5 / 1 with jitter): one output, MSE, the
    regression metrics, and ``predict`` prints the score. Needs the shared label handling (``data/labels.py``, issue
    25's scores) that encodes float labels; skipped without it."""
    pytest.importorskip("lora_exp.data.labels")
    from lora_exp.inference import predict
    from lora_exp.training.loop import train

    clips = write_clips(tmp_path / "clips", per_class=10)
    score = {"low": 0.0, "mid": 0.5, "high": 1.0}
    with open(tmp_path / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clip", "pitch"])
        w.writerows((p.relative_to(tmp_path).as_posix(), score[n] + 0.01 * i) for i, (p, n) in enumerate(clips))
    extra = [f"data.path={tmp_path / 'scores.csv'}", "data.audio_column=clip", "data.label_column=pitch"]
    cfg = make_cfg([*[o for o in TINY if o != "data.num_labels=3"], *extra, "data.problem_type=regression"])
    cfg.data.max_seconds = 0.5
    res = train(cfg, tmp_path / "run")
    assert res["status"] == "ok" and res["head_params"] == (32 * 16 + 16) + (16 * 1 + 1)  # one output
    assert -1.0 <= res["test_pearson"] <= 1.0 and res["test_mse"] >= 0.0
    out = predict(tmp_path / "run", [str(clips[0][0]), str(clips[-1][0])], progress=False)
    assert [label for label, _ in out] == ["score", "score"] and all(isinstance(v, float) for _, v in out)
