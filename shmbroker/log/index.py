"""Sparse indexes of one segment: offset -> file position, and timestamp -> offset.

Both use Kafka's on-disk format byte for byte, so Kafka's ``kafka-dump-log`` reads them::

    .index      (OffsetIndex), 8 bytes per entry, big-endian
        offset  size  field
             0     4  relative_offset   int32; batch's last offset - segment base offset
             4     4  position          int32; byte position of that batch in the .log

    .timeindex  (TimeIndex), 12 bytes per entry, big-endian
        offset  size  field
             0     8  timestamp         int64 ms; the largest timestamp so far in the segment
             8     4  relative_offset   int32; offset (- base) of the batch that first reached it

Worked example (index_interval_bytes = 4096, batches of 1500 bytes, base offset 100, 10
records per batch): batches start at 0, 1500, 3000, 4500, 6000 ... An entry is added for a
batch when more than 4096 bytes were appended since the previous entry, so the entries are
``(rel 39, pos 4500)``, ``(rel 69, pos 9000)``, ``(rel 99, pos 13500)`` ... To find offset 152
we take the largest entry with offset <= 152, i.e. (139 -> pos 4500), and walk batch headers
from position 4500: batch starts between two entries span at most ``index_interval_bytes``.

Why the files are written with plain appends and nothing is preallocated: Kafka preallocates
and mmaps its index files, then trims them on close, so a crashed Kafka leaves index files
full of zeros. Appending keeps each file exactly its entries, readable by Kafka's tools at any
moment; lookups use an in-memory copy (``array`` + ``bisect``), which is as fast as a mapping.

Why indexes are never trusted after a crash: they carry no checksum, and their pages can
reach disk in any order relative to the .log's. So on open each index gets a sanity check
(:meth:`OffsetIndex.sanity_problem`) and is rebuilt from the log when it fails (see
recovery.py). The log is the truth; an index is a cache of it.

Owned by the segment that owns the files; not thread-safe.
"""
from __future__ import annotations

import bisect
import os
import struct
import sys
from array import array

import numpy as np

from . import files

OFFSET_ENTRY = struct.Struct(">ii")
TIME_ENTRY = struct.Struct(">qi")
OFFSET_ENTRY_SIZE = OFFSET_ENTRY.size  # 8
TIME_ENTRY_SIZE = TIME_ENTRY.size  # 12
#: Relative offsets and positions are int32 on disk.
INT32_MAX = (1 << 31) - 1
#: Kafka's "no timestamp".
NO_TIMESTAMP = -1

assert OFFSET_ENTRY_SIZE == 8 and TIME_ENTRY_SIZE == 12
assert array("i").itemsize == 4 and array("q").itemsize == 8

_TIME_DTYPE = np.dtype([("timestamp", ">i8"), ("relative_offset", ">i4")])
assert _TIME_DTYPE.itemsize == TIME_ENTRY_SIZE


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    position = 0
    # Bounded by the file size: each pread makes progress or we stop at a short read (the
    # file shrank under us, which only a foreign writer could do).
    while position < size:
        chunk = os.pread(fd, size - position, position)
        if not chunk:
            break
        chunks.append(chunk)
        position += len(chunk)
    return b"".join(chunks)


class _IndexFile:
    """The parts both indexes share: the file, staged entries, flush, close."""

    entry_size = 0

    @classmethod
    def open(cls, path: str, base_offset: int, max_bytes: int):
        """Open (creating when missing) and load the whole file into memory; no checks yet."""
        fd = files.open_append(path, create=True)
        try:
            return cls(path, base_offset, max_bytes, fd, _read_all(fd))
        except BaseException:
            os.close(fd)
            raise

    def __init__(self, path: str, base_offset: int, max_bytes: int, fd: int | None, raw: bytes):
        assert max_bytes >= self.entry_size
        self.path = path
        self.base_offset = base_offset
        self.max_entries = max_bytes // self.entry_size
        self._fd: int | None = fd
        #: Bytes found on disk; a torn last entry makes it a non-multiple of entry_size.
        self.file_bytes_at_open = len(raw)
        #: Entries appended in memory but not yet written to the file (see write_pending).
        self._pending = bytearray()
        self._dirty = False

    # -- file ---------------------------------------------------------------------------------

    def write_pending(self) -> None:
        """Append staged entries to the file (one write per segment append, not per entry)."""
        if not self._pending:
            return
        assert self._fd is not None, f"{self.path} is closed"
        view = memoryview(self._pending)
        written = 0
        while written < len(view):  # bounded: progress or OSError
            written += os.write(self._fd, view[written:])
        self._pending = bytearray()
        self._dirty = True

    def flush(self) -> None:
        self.write_pending()
        if self._dirty:
            assert self._fd is not None
            files.fsync_fd(self._fd)
            self._dirty = False

    def dup_for_flush(self) -> int:
        """Write staged entries and hand the caller a duplicate of the file's descriptor to
        fsync (SegmentFlusher); the file counts as clean from here on: the caller owns its
        durability."""
        self.write_pending()
        assert self._fd is not None, f"{self.path} is closed"
        fd = os.dup(self._fd)
        self._dirty = False
        return fd

    def close(self) -> None:
        if self._fd is not None:
            self.write_pending()
            os.close(self._fd)
            self._fd = None

    @property
    def closed(self) -> bool:
        return self._fd is None

    def _truncate_file(self, entries: int) -> None:
        assert self._fd is not None
        self._pending = bytearray()
        os.ftruncate(self._fd, entries * self.entry_size)
        self._dirty = True

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def is_full(self) -> bool:
        return len(self) >= self.max_entries

    @property
    def entries_left(self) -> int:
        return max(0, self.max_entries - len(self))

    @property
    def size_bytes(self) -> int:
        return len(self) * self.entry_size


class OffsetIndex(_IndexFile):
    """Sparse map from offset to the file position of the batch holding it (see module doc)."""

    entry_size = OFFSET_ENTRY_SIZE

    def __init__(self, path: str, base_offset: int, max_bytes: int, fd: int | None, raw: bytes):
        super().__init__(path, base_offset, max_bytes, fd, raw)
        whole = len(raw) - len(raw) % OFFSET_ENTRY_SIZE
        flat = array("i")
        flat.frombytes(raw[:whole])
        if sys.byteorder == "little":
            flat.byteswap()
        self._relative_offsets = flat[0::2]
        self._positions = flat[1::2]

    def __len__(self) -> int:
        return len(self._positions)

    def append(self, offset: int, position: int) -> None:
        """Stage entry (offset -> position); both must grow strictly (asserted)."""
        relative = offset - self.base_offset
        assert 0 <= relative <= INT32_MAX, (self.path, offset)
        assert 0 <= position <= INT32_MAX, (self.path, position)
        if self._positions:
            assert relative > self._relative_offsets[-1], (self.path, offset)
            assert position > self._positions[-1], (self.path, position)
        self._relative_offsets.append(relative)
        self._positions.append(position)
        self._pending += OFFSET_ENTRY.pack(relative, position)

    def lookup(self, offset: int) -> tuple[int, int]:
        """Largest entry with offset <= ``offset`` as (absolute offset, position).

        ``(base_offset, 0)`` when no entry qualifies: the walk then starts at the first batch.
        """
        slot = bisect.bisect_right(self._relative_offsets, offset - self.base_offset) - 1
        if slot < 0:
            return self.base_offset, 0
        return self.base_offset + self._relative_offsets[slot], self._positions[slot]

    def last_entry(self) -> tuple[int, int] | None:
        if not self._positions:
            return None
        return self.base_offset + self._relative_offsets[-1], self._positions[-1]

    def entries(self) -> list[tuple[int, int]]:
        """Every entry as (absolute offset, position)."""
        return [(self.base_offset + r, p) for r, p in zip(self._relative_offsets, self._positions)]

    def truncate_to_position(self, position: int) -> None:
        """Drop entries pointing at ``position`` or beyond (the log is being cut there)."""
        self.write_pending()
        keep = bisect.bisect_left(self._positions, position)
        del self._relative_offsets[keep:]
        del self._positions[keep:]
        self._truncate_file(keep)

    def sanity_problem(self, log_size: int, next_offset: int | None = None) -> str | None:
        """Why this index cannot be trusted for a .log of ``log_size`` bytes, or None.

        Checks what a torn or stale write can break: whole entries only; relative offsets and
        positions strictly increasing; every position inside the log; every offset inside the
        segment (below ``next_offset`` when that is known).
        """
        if self.file_bytes_at_open % OFFSET_ENTRY_SIZE:
            return (f"{self.path}: size {self.file_bytes_at_open} is not a multiple of "
                    f"{OFFSET_ENTRY_SIZE} (torn entry)")
        return _check_increasing(self.path, "relative offset", self._relative_offsets) or \
            _check_increasing(self.path, "position", self._positions) or \
            _check_last(self.path, self._positions, log_size, "position", "log size") or \
            _check_last_offset(self, self._relative_offsets, next_offset)

    @staticmethod
    def encode(base_offset: int, entries: list[tuple[int, int]]) -> bytes:
        """File bytes for ``entries`` of (absolute offset, position)."""
        return b"".join(OFFSET_ENTRY.pack(o - base_offset, p) for o, p in entries)


class TimeIndex(_IndexFile):
    """Sparse map from timestamp to offset; entries only when the timestamp grows."""

    entry_size = TIME_ENTRY_SIZE

    def __init__(self, path: str, base_offset: int, max_bytes: int, fd: int | None, raw: bytes):
        super().__init__(path, base_offset, max_bytes, fd, raw)
        whole = len(raw) - len(raw) % TIME_ENTRY_SIZE
        table = np.frombuffer(raw[:whole], dtype=_TIME_DTYPE)
        self._timestamps = array("q", table["timestamp"].astype(np.int64).tobytes())
        self._relative_offsets = array("i", table["relative_offset"].astype(np.int32).tobytes())

    def __len__(self) -> int:
        return len(self._timestamps)

    @property
    def last_timestamp(self) -> int:
        return self._timestamps[-1] if self._timestamps else NO_TIMESTAMP

    def maybe_append(self, timestamp: int, offset: int) -> bool:
        """Stage (timestamp -> offset) if ``timestamp`` is larger than the last entry's.

        Kafka's rule: the time index only records new maxima, so it stays sorted on both
        columns and a binary search on the timestamp is valid.
        """
        if timestamp <= self.last_timestamp:
            return False
        relative = offset - self.base_offset
        assert 0 <= relative <= INT32_MAX, (self.path, offset)
        if self._relative_offsets:
            assert relative > self._relative_offsets[-1], (self.path, offset)
        self._timestamps.append(timestamp)
        self._relative_offsets.append(relative)
        self._pending += TIME_ENTRY.pack(timestamp, relative)
        return True

    def lookup(self, timestamp: int) -> int | None:
        """Offset of the last entry whose timestamp is strictly below ``timestamp``, or None.

        Every record at or before that offset has a timestamp <= the entry's, hence below
        ``timestamp``, so a search for the first record >= ``timestamp`` may start there. (We use
        "<" where Kafka uses "<=": equally correct, and it does not depend on the entry's offset
        being where the maximum was *first* reached.)
        """
        slot = bisect.bisect_left(self._timestamps, timestamp) - 1
        if slot < 0:
            return None
        return self.base_offset + self._relative_offsets[slot]

    def last_entry(self) -> tuple[int, int] | None:
        if not self._timestamps:
            return None
        return self._timestamps[-1], self.base_offset + self._relative_offsets[-1]

    def entries(self) -> list[tuple[int, int]]:
        """Every entry as (timestamp, absolute offset)."""
        return [(t, self.base_offset + r) for t, r in zip(self._timestamps, self._relative_offsets)]

    def truncate_to_offset(self, offset: int) -> None:
        """Drop entries for offsets >= ``offset``."""
        self.write_pending()
        keep = bisect.bisect_left(self._relative_offsets, offset - self.base_offset)
        del self._timestamps[keep:]
        del self._relative_offsets[keep:]
        self._truncate_file(keep)

    def sanity_problem(self, next_offset: int | None = None) -> str | None:
        if self.file_bytes_at_open % TIME_ENTRY_SIZE:
            return (f"{self.path}: size {self.file_bytes_at_open} is not a multiple of "
                    f"{TIME_ENTRY_SIZE} (torn entry)")
        return _check_increasing(self.path, "timestamp", self._timestamps) or \
            _check_increasing(self.path, "relative offset", self._relative_offsets) or \
            _check_last_offset(self, self._relative_offsets, next_offset)

    @staticmethod
    def encode(base_offset: int, entries: list[tuple[int, int]]) -> bytes:
        """File bytes for ``entries`` of (timestamp, absolute offset)."""
        return b"".join(TIME_ENTRY.pack(t, o - base_offset) for t, o in entries)


def _check_increasing(path: str, what: str, values: array) -> str | None:
    if not values:
        return None
    column = np.frombuffer(values, dtype=np.int64 if values.itemsize == 8 else np.int32)
    if column[0] < 0:
        return f"{path}: entry 0 has a negative {what} ({int(column[0])})"
    bad = np.nonzero(column[1:] <= column[:-1])[0]
    if len(bad):
        slot = int(bad[0]) + 1
        return (f"{path}: entry {slot} {what} {int(column[slot])} does not grow "
                f"(previous {int(column[slot - 1])})")
    return None


def _check_last(path: str, values: array, bound: int, what: str, bound_name: str) -> str | None:
    if values and values[-1] >= bound:
        return f"{path}: last {what} {values[-1]} is not below the {bound_name} {bound}"
    return None


def _check_last_offset(index: _IndexFile, relative: array, next_offset: int | None) -> str | None:
    if next_offset is None or not relative:
        return None
    last = index.base_offset + relative[-1]
    if last >= next_offset:
        return f"{index.path}: last offset {last} is not below the segment's next offset {next_offset}"
    return None


def read_offset_index_file(path: str, base_offset: int) -> OffsetIndex:
    """Read-only load for tools (dump-log): the file is not opened for writing."""
    fd = files.open_read(path)
    try:
        raw = _read_all(fd)
    finally:
        os.close(fd)
    return OffsetIndex(path, base_offset, max(len(raw), OFFSET_ENTRY_SIZE), None, raw)


def read_time_index_file(path: str, base_offset: int) -> TimeIndex:
    fd = files.open_read(path)
    try:
        raw = _read_all(fd)
    finally:
        os.close(fd)
    return TimeIndex(path, base_offset, max(len(raw), TIME_ENTRY_SIZE), None, raw)


def read_last_time_entry(path: str, base_offset: int) -> tuple[int, int] | None:
    """The last whole entry of a .timeindex as (timestamp, absolute offset), read with one pread.

    Lets a sealed segment learn its largest timestamp without loading its indexes (see
    segment.py: sealed segments load their indexes lazily).
    """
    try:
        fd = files.open_read(path)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < TIME_ENTRY_SIZE or size % TIME_ENTRY_SIZE:
            return None
        raw = os.pread(fd, TIME_ENTRY_SIZE, size - TIME_ENTRY_SIZE)
    finally:
        os.close(fd)
    if len(raw) != TIME_ENTRY_SIZE:
        return None
    timestamp, relative = TIME_ENTRY.unpack(raw)
    return timestamp, base_offset + relative


class IndexRule:
    """Kafka's rule for which batches get index entries, shared by append and by rebuild.

    For each batch, in log order: first fold its max timestamp into the running maximum, then,
    if more than ``interval_bytes`` were appended since the last entry, add an offset entry
    (batch's last offset -> batch position) and a time entry (running max timestamp -> offset
    of the batch that first reached it). The first batch of a segment never gets an entry: a
    lookup that finds no entry starts at position 0 anyway.

    Keeping one implementation means an index written during appends and one rebuilt after a
    crash are identical, which the tests check.
    """

    __slots__ = ("interval_bytes", "bytes_since_entry", "max_timestamp", "offset_of_max_timestamp")

    def __init__(self, interval_bytes: int, bytes_since_entry: int = 0,
                 max_timestamp: int = NO_TIMESTAMP, offset_of_max_timestamp: int = -1):
        assert interval_bytes >= 0
        self.interval_bytes = interval_bytes
        self.bytes_since_entry = bytes_since_entry
        self.max_timestamp = max_timestamp
        self.offset_of_max_timestamp = offset_of_max_timestamp

    def observe(self, size: int, last_offset: int, max_timestamp: int) -> bool:
        """Account for one batch; True when it must get index entries (see class doc)."""
        if max_timestamp > self.max_timestamp:
            self.max_timestamp = max_timestamp
            self.offset_of_max_timestamp = last_offset
        index_it = self.bytes_since_entry > self.interval_bytes
        if index_it:
            self.bytes_since_entry = 0
        self.bytes_since_entry += size
        return index_it
