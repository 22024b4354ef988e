"""Helpers shared by the log unit tests (imported by name: pytest puts this folder on sys.path)."""
from __future__ import annotations

import os

from fake_clock import FakeClock  # noqa: F401  (re-exported for the log tests)

from shmbroker import records
from shmbroker.log import PartitionLog


def batch(values, timestamp: int = 1_700_000_000_000, **kwargs) -> bytes:
    """One batch of ``values`` (bytes or None), all at ``timestamp`` unless timestamps= given."""
    return records.encode_batch(list(values), timestamp=timestamp, **kwargs)


def values_of(log: PartitionLog, start: int | None = None, max_bytes: int = 1 << 20) -> list:
    """Every (offset, value) from ``start`` to the log end, read slice by slice."""
    offset = log.log_start_offset if start is None else start
    out = []
    # Bounded by the log: each read returns at least one batch until the end.
    while offset < log.log_end_offset:
        piece = log.read(offset, max_bytes)
        assert piece.length > 0
        out.extend((r.offset, r.value) for r in records.decode_records(piece.data) if r.offset >= offset)
        offset = piece.next_offset
    return out


def file_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def dir_snapshot(directory) -> dict[str, bytes]:
    return {name: file_bytes(os.path.join(directory, name)) for name in sorted(os.listdir(directory))}
