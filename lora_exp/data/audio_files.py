"""A researcher's own audio clips (``data=files``): a folder with one subfolder per class (the ``datasets``
audiofolder layout, optionally under ``train`` / ``validation`` / ``test`` folders), or a table of clip paths and
labels (``data.audio_column``: a path per row, relative to the table's folder or absolute).

The splits carry each clip's path (column ``audio``) and its label; ``lora_exp.data.text`` splits them and encodes
the labels as for text. ``ClipReader`` decodes a clip when its features are computed (``lora_exp.data.audio``):
``.wav`` of any sample rate (PCM or float, any channels: averaged), resampled to the feature extractor's rate
and cut or zero-padded to ``data.max_seconds``. ``datasets``' own audiofolder builder needs torchcodec to decode;
this reads ``.wav`` with scipy and nothing else, and says so in one line for other formats.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
from scipy.signal import resample_poly

from lora_exp.errors import LoraExpError

if TYPE_CHECKING:
    from lora_exp.config.schema import DataConfig

AUDIO_EXTENSIONS = (".wav",)  # what scipy.io.wavfile reads
OTHER_AUDIO = (".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".wma", ".aif", ".aiff", ".webm")
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation"}
SPLIT_FOLDERS |= {"dev": "validation", "test": "test"}


def _clips_under(folder: Path) -> list[Path]:
    """The audio files below ``folder`` (any depth, hidden ones skipped), sorted."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root) / n for n in sorted(names) if not n.startswith(".") and _is_audio_name(n)]
    return out


def _is_audio_name(name: str) -> bool:
    return name.lower().endswith(AUDIO_EXTENSIONS + OTHER_AUDIO)


def is_audio_folder(path: str | None) -> bool:
    """A folder whose subfolders hold audio files (the audiofolder layout), checked without reading them."""
    if not path or not os.path.isdir(path):
        return False
    subs = [Path(path) / d for d in os.listdir(path) if not d.startswith(".") and (Path(path) / d).is_dir()]
    return any(_is_audio_name(n) for sub in subs for _, _, names in os.walk(sub) for n in names)


def is_audio_data(cfg: DataConfig) -> bool:
    """Whether ``data`` names audio clips: a table with ``data.audio_column``, or an audiofolder."""
    return cfg.source in ("files", "csv") and (bool(cfg.audio_column) or is_audio_folder(cfg.path))


def _refuse_other_formats(clips: list[Path], where: str) -> None:
    other = sorted({c.suffix.lower() for c in clips if not c.name.lower().endswith(AUDIO_EXTENSIONS)})
    if other:
        n = sum(not c.name.lower().endswith(AUDIO_EXTENSIONS) for c in clips)
        raise LoraExpError(
            f"{where}: {n} clip(s) are {'/'.join(other)}; only .wav is read (convert them, e.g. "
            "ffmpeg -i in.flac out.wav)"
        )


def _class_table(folder: Path, where: str) -> datasets.Dataset:
    """``audio`` (paths) and ``label`` (the class subfolder's name) of every clip under ``folder``."""
    paths, labels = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        clips = _clips_under(sub)
        _refuse_other_formats(clips, where)
        paths += [str(c) for c in clips]
        labels += [sub.name] * len(clips)
    loose = [p for p in folder.iterdir() if p.is_file() and _is_audio_name(p.name)]
    if loose:
        raise LoraExpError(
            f"{where}: {len(loose)} clip(s) lie directly in the folder ({loose[0].name}); put each clip in its "
            "class's subfolder (FOLDER/<class>/<clip>.wav)"
        )
    if not paths:
        raise LoraExpError(f"{where} holds no .wav clips (expected FOLDER/<class>/<clip>.wav, one subfolder per class)")
    return datasets.Dataset.from_dict({"audio": paths, "label": labels})


def folder_table(path: str) -> datasets.Dataset | datasets.DatasetDict:
    """An audiofolder as a table of clip paths and class names: one subfolder per class, or ``train`` /
    ``validation`` / ``test`` folders (valid / val / dev count as validation) each holding class subfolders."""
    root = Path(path)
    subs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    where = f"data.path={path!r}"
    if subs and all(p.name.lower() in SPLIT_FOLDERS for p in subs):
        if "train" not in {p.name.lower() for p in subs}:
            raise LoraExpError(f"{where}: split folders {sorted(p.name for p in subs)} but no train folder")
        return datasets.DatasetDict(
            {SPLIT_FOLDERS[p.name.lower()]: _class_table(p, f"{where} ({p.name})") for p in sorted(subs)}
        )
    return _class_table(root, where)


def resolve_paths(ds: datasets.Dataset, base: str, column: str, where: str = "") -> datasets.Dataset:
    """Clip paths made absolute (relative ones against ``base``, the table's folder); one line for an empty
    path, a path that does not exist or a clip that is not ``.wav``."""
    paths = [str(p) if p is not None else "" for p in ds["audio"]]
    full = [p if not p or os.path.isabs(p) else os.path.normpath(os.path.join(base, p)) for p in paths]
    option = f"data.audio_column={column!r}"
    where = f" {where}" if where else ""
    empty = [i for i, p in enumerate(paths) if not p.strip()]
    if empty:
        raise LoraExpError(f"{option}: {len(empty)} row(s){where} have no path (first: row {empty[0]})")
    missing = [p for p in full if not os.path.isfile(p)]
    if missing:
        raise LoraExpError(
            f"{option}: {len(missing)} of {len(full)} clip path(s){where} do not exist (first: {missing[0]!r}; "
            f"relative paths are read from {base})"
        )
    _refuse_other_formats([Path(p) for p in full], option)
    return ds.map(lambda _, i: {"audio": full[i]}, with_indices=True, input_columns="audio")


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased) along the last axis, float32."""
    if rate == target:
        return np.asarray(x, np.float32)
    g = gcd(int(rate), int(target))
    return resample_poly(x, target // g, rate // g, axis=-1).astype(np.float32)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A mono float32 signal and its rate from a ``.wav`` (integer PCM scaled to [-1, 1], channels averaged);
    one line when the file cannot be read."""
    from scipy.io import wavfile

    try:
        rate, x = wavfile.read(path)
    except (ValueError, OSError, EOFError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoraExpError(f"audio clip {str(path)!r} cannot be read as .wav ({first})") from err
    if x.size == 0:
        raise LoraExpError(f"audio clip {str(path)!r} holds no samples")
    if np.issubdtype(x.dtype, np.unsignedinteger):  # 8-bit PCM: unsigned around 128
        x = (x.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / np.iinfo(x.dtype).max
    x = np.asarray(x, np.float32)
    return (x.mean(axis=1) if x.ndim == 2 else x), int(rate)


@dataclass(frozen=True)
class ClipReader:
    """Reads one clip for the model: mono, resampled to ``rate`` (the feature extractor's), cut or zero-padded to
    ``max_seconds`` (None: as long as it is; the extractor's window then pads or cuts it)."""

    rate: int
    max_seconds: float | None = None

    def __call__(self, path: str | Path) -> np.ndarray:
        x, rate = read_wav(path)
        x = resample(x, rate, self.rate)
        if self.max_seconds is None:
            return x
        n = int(round(self.max_seconds * self.rate))
        return x[:n] if len(x) >= n else np.pad(x, (0, n - len(x)))

    def digest(self, paths: list[str]) -> hashlib._Hash:
        """A hash of what the clips read as: this reader's settings and each file's path, size and mtime."""
        h = hashlib.sha256(f"{self.rate}|{self.max_seconds}".encode())
        for p in paths:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h


def clips_of(path: str) -> list[str]:
    """``predict``'s clips: the file itself, or every ``.wav`` below a folder (sorted); one line if none."""
    if os.path.isfile(path):
        return [path]
    clips = _clips_under(Path(path)) if os.path.isdir(path) else []
    _refuse_other_formats(clips, f"predict: audio={path!r}")
    if not clips:
        raise LoraExpError(f"predict: audio={path!r} is not a .wav file nor a folder holding .wav clips")
    return [str(c) for c in clips]
