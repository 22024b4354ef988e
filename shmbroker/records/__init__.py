"""RecordBatch v2 for the rest of shmbroker: always the C core, never the slow reference.

The routines and their contract are described in ``docs/design/records.md``. This module adds
only what is pleasant in Python: defaults (``timestamp`` = now), a named ``ScanResult``, the
batch header as a named tuple, and the numpy columnar decode.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

from .. import errors
from ..layout import record_batch as layout
from ..native import _native
from . import compression
from .validation import STATUS_ERRORS, error_for

Record = _native.Record
crc32c = _native.crc32c
murmur2 = _native.murmur2
partition_for_key = _native.partition_for_key
_native_decode_records = _native.decode_records

SCAN_STATUS = layout.SCAN_STATUS
SCAN_OK = SCAN_STATUS["OK"]
_STATUS_NAMES = {v: k for k, v in SCAN_STATUS.items()}


#: Smallest possible record: length, attributes, timestamp delta, offset delta, key length,
#: value length and header count, one byte each.
RECORD_BYTES_MIN = 7

#: The attributes field is big-endian: its low byte, with the codec bits, is the second.
_ATTRIBUTES_LOW = layout.OFFSETS["attributes"] + 1


class BatchInfo(NamedTuple):
    """One valid batch found by :func:`scan_batches`."""

    position: int
    base_offset: int
    last_offset: int
    max_timestamp: int
    records_count: int


class ScanResult(NamedTuple):
    """Where the valid batches of a buffer end, and why the scan stopped there."""

    valid_bytes: int
    status: int
    error_position: int
    batches: list

    @property
    def ok(self) -> bool:
        return self.status == SCAN_OK

    @property
    def status_name(self) -> str:
        return _STATUS_NAMES.get(self.status, f"UNKNOWN({self.status})")

    @property
    def records(self) -> int:
        return sum(b[4] for b in self.batches)

    def error(self, buf: Any, context: str = "", batch_bytes_max: int = 0) -> errors.ShmbrokerError:
        """The exception for a failed scan of ``buf`` (callers decide whether to raise it)."""
        assert not self.ok
        return error_for(buf, self.error_position, self.status, batch_bytes_max, context)


def scan_batches(buf: Any, verify_crc: bool = True, verify_records: bool = False,
                 batch_bytes_max: int = 0) -> ScanResult:
    valid, status, err_pos, batches = _native.scan_batches(buf, verify_crc, verify_records, batch_bytes_max)
    return ScanResult(valid, status, err_pos, [BatchInfo(*b) for b in batches])


def _inflated(buf: Any, verify_crc: bool) -> bytes:
    """``buf`` with its compressed batches decompressed (records/compression.py), after the
    original bytes passed the scan (so a bad CRC is reported at its real position)."""
    scan = scan_batches(buf, verify_crc=verify_crc)
    if not scan.ok:
        raise scan.error(buf, "decode")
    return compression.inflate_batches(buf, crc32c)


def decode_records(buf: Any, verify_crc: bool = True, topic: str | None = None,
                   partition: int = -1) -> list:
    """Every record of the whole batches in ``buf`` (C), compressed batches included.

    The C decoder refuses a compressed batch; only then are the batches inflated in Python
    and decoded again, so plain batches pay nothing for compression support.
    """
    try:
        return _native_decode_records(buf, verify_crc, topic, partition)
    except errors.UnsupportedCompressionError:
        pass  # a compressed batch (or a codec that is not Kafka's: inflating names it)
    return _native_decode_records(_inflated(buf, verify_crc), False, topic, partition)


class BatchHeader(NamedTuple):
    base_offset: int
    batch_length: int
    partition_leader_epoch: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    base_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    records_count: int

    @property
    def size(self) -> int:
        """Bytes of the whole batch, header included."""
        return self.batch_length + layout.LOG_OVERHEAD

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    @property
    def compression(self) -> int:
        return self.attributes & layout.COMPRESSION_MASK


assert BatchHeader._fields == tuple(f.name for f in layout.FIELDS)


def read_header(buf: Any, pos: int = 0) -> BatchHeader:
    """The 61-byte header at ``pos``; raises TruncatedBatchError if fewer bytes are there.

    Reads fields only: it checks neither the magic nor the CRC (use :func:`scan_batches`).
    """
    if pos < 0 or len(buf) - pos < layout.HEADER_SIZE:
        raise errors.TruncatedBatchError(
            f"need {layout.HEADER_SIZE} bytes for a batch header at byte {pos}, "
            f"have {max(0, len(buf) - pos)}", pos)
    return BatchHeader(*layout.HEADER_STRUCT.unpack_from(buf, pos))


#: Largest span one empty batch covers (lastOffsetDelta is an INT32).
EMPTY_BATCH_SPAN_MAX = 0x7FFFFFFF + 1


def empty_batch(base_offset: int, span: int) -> bytes:
    """A batch of no records that takes offsets ``base_offset .. base_offset + span - 1``
    (lastOffsetDelta = span - 1): what Kafka's compaction leaves where records were, and what
    a partition process appends over offsets a producer reserved and never committed
    (decision 0005). Readers skip it and continue after its last offset. No timestamps."""
    if not 1 <= span <= EMPTY_BATCH_SPAN_MAX:
        raise ValueError(f"empty_batch: span {span} outside [1, {EMPTY_BATCH_SPAN_MAX}]")
    buf = bytearray(layout.HEADER_SIZE)
    layout.HEADER_STRUCT.pack_into(
        buf, 0, base_offset, layout.BATCH_LENGTH_MIN, -1, layout.MAGIC, 0, 0, span - 1, -1, -1,
        layout.NO_PRODUCER_ID, layout.NO_PRODUCER_EPOCH, layout.NO_SEQUENCE, 0)
    crc = crc32c(memoryview(buf)[layout.CRC_START:])
    buf[layout.OFFSETS["crc"]:layout.OFFSETS["crc"] + 4] = crc.to_bytes(4, "big")
    return bytes(buf)


def encode_batch(values: Any, keys: Sequence[Any] | None = None,
                 headers: Sequence[Any] | None = None, timestamps: Any = None,
                 timestamp: int | None = None, base_offset: int = 0,
                 partition_leader_epoch: int = -1, producer_id: int = -1,
                 producer_epoch: int = -1, base_sequence: int = -1, attributes: int = 0) -> bytes:
    """One uncompressed batch; ``timestamp`` (ms) defaults to now for records without one."""
    if timestamp is None:
        timestamp = time.time_ns() // 1_000_000
    return _native.encode_batch(values, keys, headers, timestamps, timestamp, base_offset,
                                partition_leader_epoch, producer_id, producer_epoch,
                                base_sequence, attributes)


@dataclass(frozen=True)
class ColumnarBatch:
    """Records as columns over the original bytes: no Python object per record.

    ``value_starts[i]``/``value_lengths[i]`` locate record i's value inside ``data`` (a uint8
    view of the buffer that was decoded, not a copy); a length of -1 means null.
    """

    data: np.ndarray
    offsets: np.ndarray
    timestamps: np.ndarray
    key_starts: np.ndarray
    key_lengths: np.ndarray
    value_starts: np.ndarray
    value_lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets)

    def value(self, i: int) -> memoryview | None:
        n = int(self.value_lengths[i])
        if n < 0:
            return None
        start = int(self.value_starts[i])
        return memoryview(self.data[start:start + n])

    def key(self, i: int) -> memoryview | None:
        n = int(self.key_lengths[i])
        if n < 0:
            return None
        start = int(self.key_starts[i])
        return memoryview(self.data[start:start + n])

    def values_2d(self) -> np.ndarray:
        """All values as one (n, width) uint8 array; they must all have the same length."""
        if len(self) == 0:
            return np.empty((0, 0), dtype=np.uint8)
        width = int(self.value_lengths[0])
        if width < 0 or not np.all(self.value_lengths == width):
            raise ValueError("values_2d needs every value non-null and of the same length")
        return self.data[self.value_starts[:, None] + np.arange(width)]


def decode_columnar(buf: Any, verify_crc: bool = True) -> ColumnarBatch:
    """Decode whole batches into numpy columns (see :class:`ColumnarBatch`)."""
    scan = scan_batches(buf, verify_crc=verify_crc)
    if not scan.ok:
        raise scan.error(buf, "decode_columnar")
    view = memoryview(buf).cast("B")
    if any(view[b.position + _ATTRIBUTES_LOW] & layout.COMPRESSION_MASK for b in scan.batches):
        # Columns point into the bytes they were decoded from: here, the inflated copy.
        buf = compression.inflate_batches(buf, crc32c)
        scan = scan_batches(buf, verify_crc=False)
    # records_count is only a header field here: a corrupt one may be negative or absurd. Size
    # the arrays by it, but never beyond what the batch's bytes can hold (a record takes at
    # least RECORD_BYTES_MIN), so garbage cannot make us allocate gigabytes; the walk below
    # proves the real count and raises before writing past the arrays.
    ends = [b.position for b in scan.batches[1:]] + [scan.valid_bytes]
    n = sum(min(max(0, b.records_count), (end - b.position - layout.HEADER_SIZE) // RECORD_BYTES_MIN)
            for b, end in zip(scan.batches, ends))
    cols = (np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64),
            np.empty(n, np.int32), np.empty(n, np.int64), np.empty(n, np.int32))
    # The scan above already checked the CRCs; the walk below still checks every record.
    got = _native.decode_columnar_into(buf, *cols, False)
    assert got == n, (got, n)
    return ColumnarBatch(np.frombuffer(buf, dtype=np.uint8), *cols)


__all__ = [
    "Record", "BatchHeader", "BatchInfo", "ScanResult", "ColumnarBatch", "SCAN_STATUS",
    "crc32c", "murmur2", "partition_for_key", "encode_batch", "empty_batch", "decode_records",
    "decode_columnar", "scan_batches", "read_header", "STATUS_ERRORS",
]
