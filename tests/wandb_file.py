"""Read a W&B offline run file (`run-<id>.wandb`) back, for tests.

wandb 0.31 ships no reader. The file is a 7-byte header (":W&B" ...) followed by LevelDB's log
format: 32 KiB blocks of records (crc32, uint16 length, uint8 type: 1 full, 2 first, 3 middle,
4 last); each payload is a `wandb_internal_pb2.Record` protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    payloads, pending, offset = [], b"", HEADER
    while offset + 7 <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < 7:
            offset += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        chunk = data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            payloads.append(pending)
            pending = b""
    parsed = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        parsed.append(record)
    return parsed


def history(path: Path) -> list[dict]:
    """Each logged step as {name: value}, in file order (with wandb's own _step, _runtime, _timestamp)."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def run_id(path: Path) -> str:
    runs = [r.run for r in records(path) if r.WhichOneof("record_type") == "run"]
    return runs[0].run_id
