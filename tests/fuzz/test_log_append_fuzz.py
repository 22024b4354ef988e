"""Fuzz PartitionLog.append with damaged batches: all or nothing, every time.

Each case (the mutations of ``batch_mutations``: flipped bytes, cuts, absurd length fields,
varints replaced by runs of 0xff, wrong records_count, several batches with one damaged, and
undamaged ones) is appended to a live log that already holds data and rolls segments. Then:

* if the bytes are a valid append (the pure-Python reference's strict scan accepts them and
  the log's own rules hold: 1 <= records_count <= BATCH_RECORDS_MAX, no control batch, no
  batch above batch_bytes_max), the append succeeds, and reading back gives exactly those
  bytes, with the base offsets the log assigned and its leader epoch;
* otherwise it raises an exception from shmbroker.errors and the log is unchanged: the same
  log_end_offset and size, the same files with the same sizes; and a valid append right after
  works and reads back.

At the end the log is closed and reopened (clean), then abandoned and reopened (recovery
validates every batch), and each time it holds exactly the bytes of the accepted appends.
"""
from __future__ import annotations

import os
import random
import struct

import numpy as np
import pytest

from shmbroker import errors
from shmbroker.config import BATCH_RECORDS_MAX, LogConfig
from shmbroker.layout import record_batch as L
from shmbroker.log import PartitionLog
from shmbroker.records import reference

import batch_mutations as bm

pytestmark = pytest.mark.timeout(120)

CASES_PER_CHUNK = 300
CHUNKS = 3
LEADER_EPOCH = 3
#: Small segments so that appends roll; a batch limit some valid batches exceed.
CONFIG = LogConfig(segment_bytes=16 * 1024, batch_bytes_max=6 * 1024, index_interval_bytes=512,
                   index_bytes_max=4096, segment_ms=1 << 62, retention_ms=-1)


class Clock:
    """A fixed clock: no time-based roll or flush interferes with what is tested here."""

    def __call__(self) -> int:
        return 1_700_000_000_000


def acceptable(buf: bytes) -> bool:
    """Whether ``buf`` is an append the log must accept (see module doc)."""
    if not buf:
        return False
    scan = reference.scan_batches(buf, True, True, CONFIG.batch_bytes_max)
    if scan.status != 0:
        return False
    for position, *_rest, count in scan.batches:
        attributes, = struct.unpack_from(">h", buf, position + L.OFFSETS["attributes"])
        if not 1 <= count <= BATCH_RECORDS_MAX or attributes & L.CONTROL_MASK:
            return False
    return True


def as_written(buf: bytes, first_offset: int) -> bytes:
    """``buf`` as the log stores it: each batch's base offset assigned, our leader epoch."""
    out = bytearray(buf)
    scan = reference.scan_batches(buf, True, True)
    offset = first_offset
    for position, base, last, _max_ts, _count in scan.batches:
        struct.pack_into(">q", out, position, offset)
        struct.pack_into(">i", out, position + L.OFFSETS["partition_leader_epoch"], LEADER_EPOCH)
        offset += last - base + 1
    return bytes(out)


def snapshot(log: PartitionLog, directory: str):
    sizes = {name: os.stat(os.path.join(directory, name)).st_size for name in os.listdir(directory)}
    return log.log_end_offset, log.size_bytes, len(log.segments), sizes


def read_from(log: PartitionLog, offset: int) -> bytes:
    """Every byte from the batch at ``offset`` to the log end (reads are bounded per segment)."""
    out = bytearray()
    for _ in range(10_000):
        if offset >= log.log_end_offset:
            return bytes(out)
        piece = log.read(offset, 1 << 20)
        assert piece.length > 0 and piece.first_offset == offset, (piece, offset)
        out += piece.data
        offset = piece.next_offset
    raise AssertionError("read_from did not reach the log end")


def as_input(buf: bytes, i: int):
    """The bytes as a different buffer type per case; the log must accept any of them."""
    form = i % 3
    if form == 0:
        return buf
    if form == 1:
        return bytearray(buf)
    return np.frombuffer(buf, dtype=np.uint8)


def append_checked(log: PartitionLog, directory: str, buf: bytes, label: str, i: int,
                   written: list[bytes]) -> None:
    before = snapshot(log, directory)
    valid = acceptable(buf)
    data = as_input(buf, i)
    try:
        info = log.append(data)
    except errors.ShmbrokerError as exc:
        assert not valid, f"{label}: valid append rejected: {exc!r}"
        assert str(exc), label
        assert snapshot(log, directory) == before, f"{label}: failed append changed the log ({exc!r})"
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{label}: append raised {type(exc).__name__} (not a shmbroker error): {exc}")
    assert valid, f"{label}: damaged bytes were appended as offsets {info.base_offset}..{info.last_offset}"
    assert bytes(memoryview(data).cast("B")) == buf, f"{label}: append modified its input"
    start = before[0]
    assert info.base_offset == start, label
    expected = as_written(buf, start)
    assert read_from(log, start) == expected, f"{label}: the log holds other bytes than appended"
    assert log.log_end_offset == info.last_offset + 1, label
    written.append(expected)


def valid_append(log: PartitionLog, directory: str, rng: random.Random, written: list[bytes], label: str):
    batch = bm.random_batch(rng, records_max=4)
    while len(batch.data) > CONFIG.batch_bytes_max:
        batch = bm.random_batch(rng, records_max=2)
    append_checked(log, directory, batch.data, f"{label} (valid follow-up)", 0, written)


def kind_for(i: int) -> str:
    kinds = [k for k in bm.KINDS if k != "random"] + ["random"]
    return kinds[i % len(kinds)]


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_append_of_damaged_batches_is_all_or_nothing(tmp_path, chunk):
    directory = str(tmp_path / "partition")
    rng = random.Random(f"log-append:{chunk}")
    written: list[bytes] = []
    log = PartitionLog.open(directory, CONFIG, clock=Clock(), leader_epoch=LEADER_EPOCH)
    try:
        valid_append(log, directory, rng, written, "first")
        for i in range(chunk * CASES_PER_CHUNK, (chunk + 1) * CASES_PER_CHUNK):
            kind = kind_for(i)
            case = bm.make_case(kind, 50_000 + i)
            append_checked(log, directory, case.buf, case.label, i, written)
            if i % 4 == 0:
                valid_append(log, directory, rng, written, case.label)
        assert len(log.segments) > 1, "the log never rolled: segment_bytes too large for the test"
        everything = b"".join(written)
        assert read_from(log, 0) == everything
        end = log.log_end_offset
    finally:
        log.close()

    # A clean reopen, then an unclean one (recovery checks every batch): the same bytes.
    for clean in (True, False):
        log = PartitionLog.open(directory, CONFIG, clock=Clock(), leader_epoch=LEADER_EPOCH)
        try:
            assert log.log_end_offset == end
            assert read_from(log, 0) == everything, f"reopen (clean={clean}) changed the bytes"
            if not clean:
                assert log.recovery_report is not None and not log.recovery_report.clean_shutdown
                assert not log.recovery_report.corrupt_segments
        finally:
            if clean:
                log.abandon()
            else:
                log.close()


def test_every_damage_kind_is_tried_and_mostly_rejected(tmp_path):
    """Guard against mutators that silently stopped damaging: most cases must be rejected."""
    for kind in bm.DAMAGES:
        rejected = sum(not acceptable(bm.make_case(kind, 70_000 + i).buf) for i in range(40))
        assert rejected >= 20, f"{kind}: only {rejected}/40 damaged cases are invalid appends"
