"""Read the records of an offline W&B run (`run-<id>.wandb`) back, as `wandb sync` would upload them.

The file is W&B's transaction log: a 7-byte header (`:W&B`, magic 0xBEE1, version) then LevelDB-log-format blocks of
32 KiB holding protobuf `Record`s, each chunk prefixed by crc32 (4 bytes), length (2, little-endian) and type (1:
full, 2: first, 3: middle, 4: last).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from wandb.proto.wandb_internal_pb2 import Record

BLOCK = 32 * 1024


def read_records(path: Path) -> list[Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # too little room left for a chunk header: the block is padded
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def run_contents(run_dir: Path, timeout: float = 60.0) -> tuple[str, list[dict], list[dict]]:
    """(run id, config updates as {key: value}, history rows as {key: value}) of one offline run folder.

    W&B's service process writes the file after the run finishes in Python, so wait for the run's `exit` record.
    """
    deadline = time.monotonic() + timeout
    while not _finished(run_dir):
        assert time.monotonic() < deadline, f"{run_dir} has no finished run log after {timeout} s"
        time.sleep(0.2)
    (log,) = run_dir.glob("run-*.wandb")
    configs, history, run_id = [], [], log.stem.removeprefix("run-")
    for record in read_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            configs.append({_key(item): json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
    return run_id, configs, history


def _finished(run_dir: Path) -> bool:
    logs = list(run_dir.glob("run-*.wandb"))
    return len(logs) == 1 and any(r.WhichOneof("record_type") == "exit" for r in read_records(logs[0]))


def _key(item) -> str:
    # Newer W&B versions write keys with a "/" as a nested key path instead of a flat key.
    return item.key or "/".join(item.nested_key)
