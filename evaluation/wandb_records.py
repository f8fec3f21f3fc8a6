"""Reads the records of an offline W&B run file (``run-<id>.wandb``): the LevelDB log format that
W&B writes (a 7-byte header, then 32 KiB blocks of records with 7-byte headers), each record a
``wandb_internal_pb2.Record``. With no network: what a run logged (the tests check what a run sent;
``benchmarks/survey_claims.py`` reads the held-out score's curve of a finished run)."""

import json
import struct

from wandb.proto import wandb_internal_pb2 as pb


def records(path: str):
    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            yield _parse(data)
        elif kind == 2:  # first
            pending = data
        elif kind == 3:  # middle
            pending += data
        elif kind == 4:  # last
            yield _parse(pending + data)


def _parse(data: bytes):
    record = pb.Record()
    record.ParseFromString(data)
    return record


def history_keys(path: str) -> set[str]:
    keys = set()
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            keys |= {i.key or "/".join(i.nested_key) for i in r.history.item}
    return keys


def history(path: str) -> list[dict[str, float]]:
    """Every history row of the run file as ``{key: number}`` (non-numeric values left out), in order."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in r.history.item:
            try:
                value = json.loads(item.value_json)
            except ValueError:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[item.key or "/".join(item.nested_key)] = float(value)
        rows.append(row)
    return rows
