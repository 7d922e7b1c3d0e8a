"""Read the metric history of an offline W&B run (``.../wandb/offline-run-*/run-*.wandb``) without a server.

The file is W&B's record log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then 32 KiB blocks of
records, each ``crc32 (4) | length (2) | type (1) | data``, where a protobuf ``Record`` may be split over
blocks (types FULL=1, FIRST=2, MIDDLE=3, LAST=4). History rows are ``Record.history.item`` lists.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (missing the ':W&B' header)")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # the block's tail is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if pos + HEADER + length > len(data):  # the last record of a run killed while writing it
            return
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
        elif kind == 0 and length == 0:  # zero fill at the end of a file still being written
            return


def run_files(run_dir: Path) -> list[Path]:
    """The ``run-*.wandb`` files of a run, oldest first: a resumed run adds one offline run per start."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb")) or sorted(run_dir.glob("**/offline-run-*/run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no offline W&B run file (run-*.wandb) under {run_dir}")
    return files


def read_history(run_dir: Path) -> list[dict]:
    """Every logged history row, across all starts of the run, as dicts of metric name -> value."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in run_files(run_dir):
        for raw in _records(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") != "history":
                continue
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows
