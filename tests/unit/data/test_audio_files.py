"""A researcher's own clips (``data=files`` with audio): reading .wav of any rate / channels / sample type,
resampling and cutting / padding, the audiofolder and path-table layouts, and every bad input as one line."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from lora_exp.config.checks import validate
from lora_exp.config.schema import typed_config
from lora_exp.data import audio_files, text
from lora_exp.errors import LoraExpError
from tests.helpers.audio import write_clip, write_clips
from tests.helpers.configs import make_cfg


def test_wav_of_any_sample_type_reads_as_mono_in_unit_range(tmp_path: Path) -> None:
    x = np.array([0.5, -0.5, 0.25, 0.0], np.float32)
    wavfile.write(tmp_path / "i16.wav", 8000, (x * 32767).astype(np.int16))
    wavfile.write(tmp_path / "u8.wav", 8000, (x * 128 + 128).astype(np.uint8))
    wavfile.write(tmp_path / "f32.wav", 8000, x)
    wavfile.write(tmp_path / "stereo.wav", 8000, np.stack([x, -x], axis=1))
    for name, tol in (("i16", 1e-4), ("u8", 1e-2), ("f32", 0)):
        got, rate = audio_files.read_wav(tmp_path / f"{name}.wav")
        assert rate == 8000 and got.dtype == np.float32
        np.testing.assert_allclose(got, x, atol=tol)
    np.testing.assert_allclose(audio_files.read_wav(tmp_path / "stereo.wav")[0], 0.0)  # channels averaged


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_reader_resamples_then_cuts_or_pads(tmp_path: Path, rate: int) -> None:
    short = write_clip(tmp_path / "short.wav", 440.0, 0.25, rate)
    long = write_clip(tmp_path / "long.wav", 440.0, 2.0, rate)
    reader = audio_files.ClipReader(16000, max_seconds=1.0)
    a, b = reader(short), reader(long)
    assert a.shape == b.shape == (16000,)
    assert np.abs(a[:3900]).max() > 0.3 and not a[4100:].any()  # 0.25 s of tone, then zero padding
    spectrum = np.abs(np.fft.rfft(b))  # the tone stays at 440 Hz after resampling (1 Hz bins)
    assert abs(int(spectrum.argmax()) - 440) <= 1
    assert audio_files.ClipReader(16000)(long).shape == (32000,)  # no max_seconds: as long as it is


def test_audiofolder_and_split_folders(tmp_path: Path) -> None:
    clips = write_clips(tmp_path / "flat", per_class=3)
    table = audio_files.folder_table(str(tmp_path / "flat"))
    assert sorted(table["label"]) == sorted(name for _, name in clips)
    assert set(table["audio"]) == {str(p) for p, _ in clips}
    for split in ("train", "dev", "test"):
        write_clips(tmp_path / "split" / split, per_class=2)
    splits = audio_files.folder_table(str(tmp_path / "split"))
    assert sorted(splits) == ["test", "train", "validation"] and len(splits["validation"]) == 6


def _data(**fields: object):
    from lora_exp.config.schema import DataConfig

    return typed_config({"name": "x", "source": "files", **fields}, DataConfig)


def test_path_table_splits_with_names_and_absolute_paths(tmp_path: Path) -> None:
    clips = write_clips(tmp_path / "clips", per_class=10)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clip", "word"])
        w.writerows((p.relative_to(tmp_path).as_posix(), name) for p, name in clips)
    splits = text.load_splits(
        _data(path=str(tmp_path / "t.csv"), audio_column="clip", label_column="word", num_labels=3)
    )
    assert sum(len(s) for s in splits.values()) == 30
    assert splits["train"].features["label"].names == ["high", "low", "mid"]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in splits["test"]["audio"])


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("empty", r"data.path='.*' holds no .wav clips in class subfolders \(FOLDER/<class>/<clip>.wav\)"),
        ("flac", r"data.path='.*': 1 clip\(s\) are .flac; only .wav is read"),
    ],
)
def test_folder_without_usable_clips_is_one_line(tmp_path: Path, layout: str, message: str) -> None:
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "a" / ("x.flac" if layout == "flac" else "notes.txt")).write_text("")
    with pytest.raises(LoraExpError, match=message) as err:
        cfg = make_cfg(["model=tiny_whisper", "data=files", f"data.path={tmp_path / 'd'}"])
        validate(cfg)
        text.load_splits(typed_config(cfg).data)
    assert "\n" not in str(err.value)


def test_table_problems_are_one_line(tmp_path: Path) -> None:
    write_clip(tmp_path / "a.wav", 300.0, 0.2, 8000)
    (tmp_path / "t.csv").write_text("clip,label\na.wav,x\nmissing.wav,y\n")
    with pytest.raises(LoraExpError, match=r"data.audio_column='clip': 1 of 2 clip path\(s\) do not exist \(first: "):
        text.load_splits(_data(path=str(tmp_path / "t.csv"), audio_column="clip"))
    with pytest.raises(LoraExpError, match=r"data.audio_column='path' is not a column of the data \(columns: \["):
        text.load_splits(_data(path=str(tmp_path / "t.csv"), audio_column="path"))
    (tmp_path / "e.csv").write_text("clip,label\na.wav,x\n,y\n")
    with pytest.raises(LoraExpError, match=r"data.audio_column='clip': 1 row\(s\) have no path"):
        text.load_splits(_data(path=str(tmp_path / "e.csv"), audio_column="clip"))


def test_unreadable_clip_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.wav").write_bytes(b"RIFF but not really")
    with pytest.raises(LoraExpError, match=r"audio clip '.*bad.wav' cannot be read as .wav \(") as err:
        audio_files.ClipReader(16000, 1.0)(tmp_path / "bad.wav")
    assert "\n" not in str(err.value)


def test_model_and_data_mismatches_are_one_line(tmp_path: Path) -> None:
    write_clips(tmp_path / "clips", per_class=2)
    (tmp_path / "t.csv").write_text("text,label\nfine,0\n")
    cases = {
        (
            "model=tiny_bert",
            f"data.path={tmp_path / 'clips'}",
        ): "data.path='.*clips' \\(audio clips\\) is audio: use an "
        "audio model \\(model=whisper_tiny_en or tiny_whisper, or model.task=audio with a local audio checkpoint\\)",
        ("model=tiny_whisper", f"data.path={tmp_path / 't.csv'}"): "model.task=audio needs audio data: data=files with "
        "data.path=a folder of class subfolders of .wav clips or a table with data.audio_column",
        ("model=tiny_whisper", f"data.path={tmp_path / 'clips'}", "data.max_seconds=0"): "data.max_seconds=0.0 must be "
        "> 0",
        ("model=tiny_whisper", f"data.path={tmp_path / 'clips'}", "data.max_seconds=3", "model.audio_max_seconds=2"): (
            "model.audio_max_seconds=2.0 is shorter than data.max_seconds=3.0"
        ),
        ("model=tiny_bert", f"data.path={tmp_path / 't.csv'}", "data.max_seconds=2"): "data.max_seconds=2.0 applies to "
        "audio clips",
    }
    for overrides, message in cases.items():
        with pytest.raises(LoraExpError) as err:
            validate(make_cfg(["data=files", *overrides]))
        assert len(str(err.value).splitlines()) == 1, str(err.value)
        assert re.match(message, str(err.value)), str(err.value)
    validate(make_cfg(["data=files", "model=tiny_whisper", f"data.path={tmp_path / 'clips'}", "data.max_seconds=1"]))
    validate(make_cfg(["model=whisper_tiny_en", "data=files", f"data.path={tmp_path / 'clips'}"]))  # the case


def test_predict_clips_of_a_folder(tmp_path: Path) -> None:
    clips = write_clips(tmp_path / "c", per_class=2)
    assert audio_files.clips_of(str(tmp_path / "c")) == sorted(str(p) for p, _ in clips)
    (tmp_path / "none").mkdir()
    with pytest.raises(LoraExpError, match=r"predict: audio='.*none' is not a .wav file nor a folder holding .wav"):
        audio_files.clips_of(str(tmp_path / "none"))
