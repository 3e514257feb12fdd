"""A researcher's own data file in any common table format, loaded through ``datasets`` itself.

``detect_format`` names the format (``data.format`` when given, else the extension or the folder's contents),
``load_table`` loads it as a ``Dataset`` (one file, or the files of a folder) or a ``DatasetDict`` (a
``DatasetDict.save_to_disk`` folder, or a folder of ``train`` / ``validation`` / ``test`` files), and every
failure is one ``LoraExpError`` line naming ``data.path`` and the format. ``lora_exp.data.clean`` then finds
the rows a classifier cannot use; ``lora_exp.data.text`` turns the table into splits.

What ``datasets`` reads (checked against datasets 5.2 / pyarrow 26):

* csv, tsv and json (records array or JSON Lines) plain or compressed as .gz .bz2 .xz .zip (one file inside)
  and .zst (needs the ``zstandard`` package); ``encoding`` applies to these text formats only.
* parquet and arrow (Arrow IPC stream or file, so Feather v2 too) only uncompressed: both compress internally,
  and ``datasets`` does not unwrap an outer .gz around them.
* no ``text`` format: one line per row gives no label column, so it cannot feed a classifier.

A folder that is not a ``save_to_disk`` folder but holds data files of one format (or of ``data.format``) loads
them all, sorted by name, as one table; when their names are split names (train.csv, validation.csv, test.csv;
valid / val / dev count as validation) they load as those splits instead.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import gzip
import importlib.util
import io
import json
import lzma
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from unittest import mock

import datasets

from lora_exp.errors import LoraExpError

FORMATS: dict[str, tuple[str, ...]] = {
    "csv": (".csv",),
    "tsv": (".tsv", ".tab"),
    "json": (".json", ".jsonl", ".ndjson"),
    "parquet": (".parquet", ".pq"),
    "arrow": (".arrow", ".feather"),
    "disk": (),  # a folder written by Dataset.save_to_disk / DatasetDict.save_to_disk
}
COMPRESSIONS: dict[str, str | None] = {".gz": None, ".bz2": None, ".xz": None, ".zst": "zstandard", ".zip": None}
"""Outer compression suffixes ``datasets`` decompresses, with the extra package one needs (else None)."""
TEXT_FORMATS = ("csv", "tsv", "json")  # the formats that may be compressed and that take an encoding
ALIASES = {"jsonl": "json", "ndjson": "json", "feather": "arrow"}
SPLIT_NAMES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}
_BUILDERS: dict[str, tuple[str, dict]] = {
    "csv": ("csv", {}),
    "tsv": ("csv", {"delimiter": "\t"}),
    "json": ("json", {}),
    "parquet": ("parquet", {}),
    "arrow": ("arrow", {}),
}
DataFiles = str | list[str] | dict[str, list[str]]  # what load_dataset takes as data_files
_EXTENSIONS = {ext: fmt for fmt, exts in FORMATS.items() for ext in exts}


def _supported() -> str:
    """The supported extensions and formats, for an error message."""
    exts, comps, names = " ".join(_EXTENSIONS), " ".join(COMPRESSIONS), "|".join(FORMATS)
    return f"supported: {exts} (csv/tsv/json optionally compressed: {comps}) or a save_to_disk folder; " + (
        f"or set data.format={names}"
    )


def _split_name(name: str) -> tuple[str, str, str]:
    """``(stem, data extension, compression suffix)`` of a file name, lower-cased: a.CSV.gz -> (a, .csv, .gz)."""
    stem, ext = os.path.splitext(name.lower())
    comp = ""
    if ext in COMPRESSIONS:
        comp = ext
        stem, ext = os.path.splitext(stem)
    return stem, ext, comp


def _format_of(name: str) -> str | None:
    """The format a file name says (its extension after any compression suffix), else None."""
    _, ext, comp = _split_name(name)
    fmt = _EXTENSIONS.get(ext)
    return None if fmt is None or (comp and fmt not in TEXT_FORMATS) else fmt


def _zip_members(path: str) -> list[str]:
    """The files in a .zip archive (folders left out); one line when it is not a readable archive."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [m.filename for m in zf.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, OSError) as err:
        raise LoraExpError(f"data.path={path!r}: not a readable .zip archive ({err})") from err


def _file_format(path: str) -> str:
    """The format of a file from its name (a .zip without a data extension: from the one file inside)."""
    _, ext, comp = _split_name(os.path.basename(path))
    fmt = _EXTENSIONS.get(ext)
    if fmt is None and comp == ".zip" and not ext:
        inner = _zip_members(path)
        fmt = _format_of(inner[0]) if len(inner) == 1 else None
    if fmt is not None and comp and fmt not in TEXT_FORMATS:
        raise LoraExpError(
            f"data.path={path!r}: a {fmt} file cannot be read through an outer {comp} ({fmt} compresses "
            "internally); decompress it"
        )
    if fmt is None:
        shown = (ext + comp) or "(no extension)"
        raise LoraExpError(f"data.path={path!r}: unknown file format {shown!r}; {_supported()}")
    return fmt


def _is_disk_folder(path: str) -> bool:
    """A folder written by ``save_to_disk``; one line saying what is missing when it is half of one."""
    names = set(os.listdir(path))
    if "dataset_dict.json" in names:
        return True
    marks = {"dataset_info.json", "state.json"} & names
    if len(marks) == 1:
        (lacking,) = {"dataset_info.json", "state.json"} - marks
        raise LoraExpError(
            f"data.path={path!r}: a save_to_disk folder needs dataset_info.json and state.json, it lacks {lacking}"
        )
    return bool(marks)


def _folder_files(path: str, fmt: str | None = None) -> dict[str, list[str]]:
    """The data files directly in a folder (hidden ones skipped) by format, names sorted; only ``fmt`` if given."""
    found: dict[str, list[str]] = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.startswith((".", "_")) or not os.path.isfile(full):
            continue
        of = _format_of(name)
        if of is not None and fmt in (None, of):
            found.setdefault(of, []).append(full)
    return found


def _folder_format(path: str) -> str:
    """``disk`` for a save_to_disk folder, else the one format of the data files it holds."""
    if _is_disk_folder(path):
        return "disk"
    found = _folder_files(path)
    if len(found) == 1:
        return next(iter(found))
    lacks = "no dataset_dict.json, no dataset_info.json + state.json"
    if not found:
        raise LoraExpError(
            f"data.path={path!r} is a folder but not a save_to_disk folder ({lacks}) and holds no data files; "
            f"{_supported()}"
        )
    kinds = ", ".join(f"{f}: {len(v)}" for f, v in found.items())
    raise LoraExpError(
        f"data.path={path!r} is a folder ({lacks}) holding data files of several formats ({kinds}); "
        f"set data.format={'|'.join(found)} to read one, or point data.path at one file"
    )


def format_name(given: str) -> str:
    """``data.format`` as one of ``FORMATS`` (any case; jsonl / ndjson / feather as aliases); one line if unknown."""
    fmt = ALIASES.get(given.lower(), given.lower())
    if fmt not in FORMATS:
        raise LoraExpError(f"data.format={given!r} is not a known format; use one of {'|'.join(FORMATS)}")
    return fmt


def detect_format(path: str, given: str | None = None) -> str:
    """The format of ``path``: ``given`` (``data.format``) when set, else from the extension(s) or the folder.

    A compression suffix (.gz .bz2 .xz .zst .zip) is stripped before the extension is looked up. Raises a
    one-line ``LoraExpError`` for an unknown ``given``, a missing path, an unknown extension or a folder that
    is neither a ``save_to_disk`` folder nor holds data files of one format.
    """
    fmt = format_name(given) if given else None
    if not os.path.exists(path):
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        hub = not os.path.isabs(path) and path.count("/") <= 1 and not _split_name(os.path.basename(path))[1]
        where += "; a Hub dataset id needs data.source=hub" if hub else ""
        raise LoraExpError(f"data.path={path!r}: no such file or folder{where}")
    if not given:
        return _folder_format(path) if os.path.isdir(path) else _file_format(path)
    if fmt == "disk" and not (os.path.isdir(path) and _is_disk_folder(path)):
        raise LoraExpError(
            f"data.format='disk' needs a folder written by save_to_disk (dataset_dict.json, or dataset_info.json + "
            f"state.json); data.path={path!r} is not one"
        )
    return fmt


def _data_files(path: str, fmt: str) -> DataFiles:
    """``data_files`` for ``load_dataset``: the file, a folder's files, or those files by split name."""
    if not os.path.isdir(path):
        return path
    files = _folder_files(path, fmt).get(fmt, [])
    if not files:
        raise LoraExpError(f"data.path={path!r}: the folder holds no {fmt} files ({' '.join(FORMATS[fmt])})")
    splits = [SPLIT_NAMES.get(_split_name(os.path.basename(f))[0]) for f in files]
    if "train" in splits and None not in splits and len(set(splits)) == len(splits):
        return {split: [f] for split, f in zip(splits, files)}
    return files


def _check_compression(path: str, files: list[str]) -> None:
    """One line, before ``datasets`` fails obscurely: a missing decompressor, a .zip of several files."""
    for f in files:
        comp = _split_name(f)[2]
        package = COMPRESSIONS.get(comp)
        if package and importlib.util.find_spec(package) is None:
            raise LoraExpError(f"data.path={path!r}: {comp} files need the {package} package (pip install {package})")
        if comp == ".zip" and len(members := _zip_members(f)) != 1:
            raise LoraExpError(
                f"data.path={path!r}: {f} holds {len(members)} files {members[:5]}; a .zip must hold one data file "
                "(unzip it and point data.path at the folder)"
            )


def _open_binary(path: str) -> io.BufferedIOBase:
    """A file's bytes, decompressed by its suffix (as ``datasets`` reads it)."""
    comp = _split_name(path)[2]
    if comp == ".zip":
        zf = zipfile.ZipFile(path)
        return zf.open(_zip_members(path)[0])
    if comp == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))  # noqa: SIM115
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(comp, open)
    return opener(path, "rb")


def _codec(encoding: str) -> str:
    """The codec to read with: utf-8 as utf-8-sig (a BOM skipped, and ``datasets`` then checks json bytes)."""
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def _lines(path: str, encoding: str) -> Iterator[tuple[int, str]]:
    """Numbered lines, undecodable bytes replaced (this only hunts syntax errors)."""
    with io.TextIOWrapper(_open_binary(path), encoding=_codec(encoding), errors="replace") as f:
        yield from enumerate(f, 1)


def _decode_problem(files: list[str], encoding: str) -> tuple[int, int] | None:
    """``(byte, offset)`` of the first undecodable byte in ``files`` (offset into the decompressed file)."""
    for path in files:
        decoder, offset = codecs.getincrementaldecoder(_codec(encoding))("strict"), 0
        with _open_binary(path) as f:
            while chunk := f.read(1 << 20):
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:
                    return err.object[err.start], offset - pending + err.start
                offset += len(chunk)
    return None


def _first_line_of(path: str, encoding: str) -> str:
    """The first non-blank line of a text file, stripped ("" when there is none)."""
    for _, line in _lines(path, encoding):
        if line.strip():
            return line.strip()
    return ""


def _json_problem(files: list[str], encoding: str) -> str | None:
    """Where a JSON / JSON Lines file first breaks (file, line, reason), or None when every file parses."""
    for path in files:
        where = f"{os.path.basename(path)} " if len(files) > 1 else ""
        first = _first_line_of(path, encoding)
        if first.startswith("[") or first == "{":  # one JSON value (a records array), maybe over many lines
            try:
                json.loads("".join(line for _, line in _lines(path, encoding)))
            except json.JSONDecodeError as err:
                return f"{where}line {err.lineno} column {err.colno}: {err.msg}"
            continue
        for n, line in _lines(path, encoding):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return f"{where}line {n} is not valid JSON, column {err.colno}: {err.msg}"
            if not isinstance(value, dict):
                return f"{where}line {n} is a JSON {type(value).__name__}, not an object (one record per line)"
    return None


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or during, outermost first."""
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def _first_line(err: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for a one-line error."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else 'no message'}"


def _empty_parquet(files: list[str]) -> bool:
    """Whether every parquet file holds no rows (``datasets`` fails on those with a pyarrow batch-size error)."""
    import pyarrow.parquet as pq

    try:
        return all(pq.read_metadata(f).num_rows == 0 for f in files)
    except Exception:  # not readable as parquet at all: not "empty"
        return False


def _read_error(err: Exception, path: str, fmt: str, encoding: str, files: list[str]) -> LoraExpError:
    """The one-line ``LoraExpError`` for a failure of ``load_dataset`` on ``files`` (from ``path``)."""
    causes = _chain(err)
    decode = next((c for c in causes if isinstance(c, UnicodeDecodeError)), None)
    try:
        bad = _decode_problem(files, encoding) if fmt in TEXT_FORMATS else None  # also what ujson calls "octet"
    except Exception as broken:  # a truncated / corrupted compressed file (EOFError, zlib / lzma errors)
        return LoraExpError(f"data.path={path!r}: cannot be read as {fmt} ({_first_line(broken)})")
    if bad is None and decode is not None and fmt in TEXT_FORMATS:
        bad = decode.object[decode.start], decode.start
    if bad is not None:
        return LoraExpError(
            f"data.path={path!r} does not decode as data.encoding={encoding!r} (byte {bad[0]:#04x} at position "
            f"{bad[1]}); set data.encoding to the file's encoding, e.g. latin-1 or cp1252"
        )
    blank = any(type(c).__name__ in ("EmptyDataError", "StopIteration") for c in causes)  # not even a header
    if blank or any("corresponds to no data" in str(c) for c in causes):
        what = ("no header, " if blank else "a header, ") if fmt in ("csv", "tsv") else ""
        return LoraExpError(f"data.path={path!r} is empty ({what}no rows)")
    if fmt == "parquet" and _empty_parquet(files):
        return LoraExpError(f"data.path={path!r} is empty (no rows)")
    problem = _json_problem(files, encoding) if fmt == "json" else None
    if problem is None:  # the innermost message of pyarrow / pandas, not the generic one of datasets
        inner = [c for c in causes if not type(c).__module__.startswith("datasets")]
        problem = _first_line(inner[0] if inner else err)
    return LoraExpError(f"data.path={path!r}: cannot be read as {fmt} ({problem})")


def _check_loaded(out: datasets.Dataset | datasets.DatasetDict, path: str, fmt: str) -> None:
    """One line for a table that loaded but holds nothing usable: no rows, or JSON columns instead of records."""
    parts = list(out.values()) if isinstance(out, datasets.DatasetDict) else [out]
    if sum(len(p) for p in parts) == 0:
        what = "a header, no rows" if fmt in ("csv", "tsv") and parts[0].column_names else "no rows"
        raise LoraExpError(f"data.path={path!r} is empty ({what})")
    if fmt == "json" and all(
        len(p) == 1 and all(isinstance(f, (datasets.List, datasets.LargeList)) for f in p.features.values())
        for p in parts
    ):  # {"text": [...], "label": [...]} or {"data": [...]} loads as one row of lists
        raise LoraExpError(
            f"data.path={path!r}: cannot be read as json (one object of lists, not records); write a list of "
            "records [{...}, ...] or JSON Lines (one object per line)"
        )


def load_table(
    path: str, fmt: str | None = None, encoding: str = "utf-8", cache_dir: str | None = None
) -> datasets.Dataset | datasets.DatasetDict:
    """``path`` loaded through ``datasets``: a ``Dataset``, or a ``DatasetDict`` with the splits it was given.

    ``fmt`` is ``data.format`` (None: detected, see ``detect_format``); ``encoding`` applies to csv / tsv / json
    only; ``cache_dir`` is the ``datasets`` cache for the converted Arrow files (None: HF_DATASETS_CACHE).
    Every failure is one ``LoraExpError`` line naming ``data.path`` and the format.
    """
    fmt = detect_format(path, fmt)
    if fmt == "disk":
        try:
            out = datasets.load_from_disk(path)
        except Exception as err:  # a damaged folder: missing shards, bad json
            raise LoraExpError(
                f"data.path={path!r}: cannot be read as a save_to_disk folder ({_first_line(err)})"
            ) from err
        _check_loaded(out, path, fmt)
        return out
    return _load_files(path, fmt, encoding, cache_dir)


def _utf8_copies(data_files: DataFiles, encoding: str, tmp: str) -> DataFiles:
    """JSON files transcoded from ``encoding`` to UTF-8 under ``tmp`` (same shape as ``data_files``).

    ``datasets`` parses a JSON array's raw bytes before it decodes them, so only UTF-8 arrays load as such.
    """

    def copy(f: str) -> str:
        """``f`` decompressed and transcoded into ``tmp``; the new path."""
        out = os.path.join(tmp, f"{len(os.listdir(tmp))}.json")
        with io.TextIOWrapper(_open_binary(f), encoding=encoding) as src, open(out, "w", encoding="utf-8") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return out

    if isinstance(data_files, str):
        return copy(data_files)
    if isinstance(data_files, dict):
        return {split: [copy(f) for f in fs] for split, fs in data_files.items()}
    return [copy(f) for f in data_files]


def _local_only() -> contextlib.AbstractContextManager:
    """No network while a local file loads: ``load_dataset`` of a packaged builder otherwise pings the Hub to
    count the download (a 3 s timeout, longer when DNS hangs, on every load of an offline machine)."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False))
    stack.enter_context(mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True))
    return stack


def _load_files(path: str, fmt: str, encoding: str, cache_dir: str | None) -> datasets.Dataset | datasets.DatasetDict:
    """``load_table`` for file formats: ``load_dataset`` of the file or the folder's files, errors as one line."""
    data_files = _data_files(path, fmt)
    listed = data_files.values() if isinstance(data_files, dict) else [data_files]
    files = [data_files] if isinstance(data_files, str) else [f for fs in listed for f in fs]
    _check_compression(path, files)
    builder, kw = _BUILDERS[fmt]
    try:  # json as utf-8-sig: datasets reads utf-8 JSON Lines without checking the bytes
        codec = _codec(encoding) if fmt in TEXT_FORMATS else None
    except LookupError as err:
        raise LoraExpError(f"data.encoding={encoding!r} is not a known encoding (e.g. utf-8, latin-1)") from err
    with tempfile.TemporaryDirectory(prefix="lora-exp-json-") as tmp:
        try:
            if fmt == "json" and codec != "utf-8-sig":
                data_files, codec = _utf8_copies(data_files, codec, tmp), "utf-8-sig"
            if codec is not None:
                kw = {**kw, "encoding": codec if fmt == "json" else encoding}
            split = None if isinstance(data_files, dict) else "train"
            with _local_only():
                out = datasets.load_dataset(builder, data_files=data_files, split=split, cache_dir=cache_dir, **kw)
        except Exception as err:  # datasets raises many types for unreadable / corrupted files
            raise _read_error(err, path, fmt, encoding, files) from err
    _check_loaded(out, path, fmt)
    return out
