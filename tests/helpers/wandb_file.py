"""Read back an offline W&B run file (``run-<id>.wandb``) so tests can assert on what was logged.

wandb >= 0.2x no longer ships a Python reader; the file is the LevelDB log format that wandb's old
``datastore`` module read: a 7-byte header, then 32 KiB blocks of records
``crc32(4) | length(2, LE) | type(1) | payload`` where type 1 = full, 2 = first, 3 = middle, 4 = last.
Each reassembled payload is a serialised ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

HEADER_LEN, BLOCK, RECORD_HEADER = 7, 32768, 7


def records(path: Path) -> list[pb.Record]:
    """All protobuf records of one offline run file, in order."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, pos = [], b"", HEADER_LEN
    while pos + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER:  # block trailer is zero padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + RECORD_HEADER])
        if kind == 0 and length == 0:
            pos += left_in_block
            continue
        payload = data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def history(path: Path) -> list[dict]:
    """The rows passed to ``run.log`` (``_step`` included)."""
    return [
        {_item_key(i): json.loads(i.value_json) for i in r.history.item}
        for r in records(path)
        if r.WhichOneof("record_type") == "history"
    ]


def summary(path: Path) -> dict:
    """The run summary as last updated."""
    out: dict = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "summary":
            out.update({_item_key(i): json.loads(i.value_json) for i in r.summary.update})
    return out


def config(path: Path) -> dict:
    """The run config as last updated."""
    out: dict = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "config":
            out.update({_item_key(i): json.loads(i.value_json) for i in r.config.update})
    return out


def run_file(run_root: Path) -> Path:
    """The single ``run-*.wandb`` file below ``run_root``."""
    found = sorted(Path(run_root).rglob("run-*.wandb"))
    assert len(found) == 1, f"expected one W&B run file under {run_root}, found {found}"
    return found[0]


def finished_run_file(run_root: Path, timeout: float = 60.0) -> Path:
    """``run_file``, once wandb has written the run's last record (``exit``): ``run.finish()`` can return
    before wandb's service has flushed the file."""
    import time

    path, deadline = run_file(run_root), time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = records(path)
        if found and found[-1].WhichOneof("record_type") == "exit":
            return path
        time.sleep(0.2)
    raise AssertionError(f"{path}: no exit record within {timeout:.0f} s (the run did not finish)")


def media(path: Path, row: dict, key: str) -> Path:
    """The file that the media value logged as ``key`` in a ``history`` row points at (an image or a table:
    ``<key>/_type`` is ``image-file`` or ``table-file``, ``<key>/path`` is relative to the run's files)."""
    return Path(path).parent / "files" / row[f"{key}/path"]


def artifacts(path: Path) -> list:
    """The artifact records (``log_artifact``) of one offline run file."""
    return [r.artifact for r in records(path) if r.WhichOneof("record_type") == "artifact"]
