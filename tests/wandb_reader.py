"""Read an offline W&B run back, so tests assert on what was logged rather than on "no exception".

wandb (0.31) ships no reader for its ``run-<id>.wandb`` log. The format: a 7-byte header
``<4sHB>`` (``b":W&B"``, 0xBEE1, version), then 32 KiB blocks of chunks, each with a header
``<IHB>`` (CRC-32 of type byte + data, length, type 1-4 = FULL/FIRST/MIDDLE/LAST); a block's tail
shorter than a header is padding. Reassembled chunks are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[Any]:
    """All records of a ``.wandb`` log, checking every chunk's CRC."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    magic, ident, _version = HEADER.unpack_from(data, 0)
    if magic != b":W&B" or ident != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run log (header {magic!r}, {ident:#x}).")
    records, parts, position = [], [], HEADER.size
    while position + CHUNK.size <= len(data):
        left = BLOCK - position % BLOCK
        if left < CHUNK.size:
            position += left
            continue
        checksum, length, kind = CHUNK.unpack_from(data, position)
        if kind == 0 and length == 0:  # zero padding up to the block end
            position += left
            continue
        if position + CHUNK.size + length > len(data):  # a chunk still being written
            break
        body = data[position + CHUNK.size : position + CHUNK.size + length]
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: bad checksum at byte {position}.")
        position += CHUNK.size + length
        parts.append(body)
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


@dataclass
class OfflineRun:
    """What a finished offline run logged: history values by key, summary, artifacts, tables."""

    directory: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, directory: str | Path, timeout: float = 60.0) -> OfflineRun:
        """Read a finished run. ``run.finish()`` returns before wandb's service has written the whole
        log, so wait (up to ``timeout`` seconds) for the run's exit record."""
        directory = Path(directory)
        deadline = time.monotonic() + timeout
        while not (logs := list(directory.glob("run-*.wandb"))) and time.monotonic() < deadline:
            time.sleep(0.2)
        if len(logs) != 1:
            raise FileNotFoundError(f"Expected one run-*.wandb in {directory}, found {logs}.")
        while True:
            records = read_records(logs[0])
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{logs[0]} has no exit record after {timeout} s: the run was not finished.")
            time.sleep(0.2)
        run = cls(directory)
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "history":
                run.history.append(_items(record.history.item))
            elif kind == "summary":
                run.summary.update(_items(record.summary.update))
            elif kind == "artifact":
                a = record.artifact
                run.artifacts.append(
                    {
                        "name": a.name,
                        "type": a.type,
                        "metadata": json.loads(a.metadata) if a.metadata else {},
                        "files": {entry.path: entry for entry in a.manifest.contents},
                    }
                )
        return run

    def logged(self, key: str) -> dict[str, Any]:
        """The last value logged under ``key`` (nested dicts like ``{"_type": "table-file", ...}``)."""
        for step in reversed(self.history):
            if key in step:
                return step[key]
        raise KeyError(f"{key!r} was never logged; logged keys: {sorted({k for s in self.history for k in s})}")

    def table(self, key: str) -> dict[str, Any]:
        """The table JSON (``columns``, ``data``) logged under ``key``."""
        meta = self.logged(key)
        if meta.get("_type") != "table-file":
            raise TypeError(f"{key!r} is a {meta.get('_type')}, not a table.")
        return json.loads((self.directory / "files" / meta["path"]).read_text())

    def artifact(self, type_: str) -> dict[str, Any]:
        for artifact in self.artifacts:
            if artifact["type"] == type_:
                return artifact
        raise KeyError(f"No artifact of type {type_!r}; have {[(a['name'], a['type']) for a in self.artifacts]}.")


def _items(items: Any) -> dict[str, Any]:
    """History/summary items as a dict. An item's ``nested_key`` is a path: ``["tda/x/queries", "nrows"]``
    is the ``nrows`` field of the object logged under ``tda/x/queries``, so paths are rebuilt into dicts."""
    out: dict[str, Any] = {}
    for item in items:
        path = list(item.nested_key) or [item.key]
        target = out
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = json.loads(item.value_json)
    return out


def find_runs(root: str | Path) -> list[Path]:
    """Offline run directories under ``root`` (``.../wandb/offline-run-*``)."""
    return sorted(Path(root).rglob("offline-run-*"))
