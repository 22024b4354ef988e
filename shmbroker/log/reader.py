"""Read-only access to a partition's segments from any process: the consumer's view of a log.

The partition process is the single writer of its log (``PartitionLog``). A consumer in another
process reads the same files through its own read-only mappings and never asks the writer for
anything: what it may read is bounded by the state the writer publishes in shared memory
(``shm.control.PartitionState``)::

    published:  log_start_offset   active_segment_base_offset   active_segment_end_position
                      |                       |                              |
    files:      [00..00.log (sealed)][00..17.log (sealed)][00..42.log (active) ..........|~~~~]
                                                                   committed bytes ^  ^ appended,
                                                                                      not published
    high_watermark: offsets below it are committed; a batch whose last offset >= it is never
    returned, whatever the file already holds.

How a read finds bytes (``read(offset, max_bytes, state)``):

1. ``offset`` outside ``[log_start_offset, high_watermark]`` is ``OffsetOutOfRangeError``;
   ``offset == high_watermark`` is an empty slice (nothing committed there yet).
2. The segment is the last base offset <= ``offset`` among the listed segment files. The
   directory is listed again when the published active segment is one we have not seen, or
   when a segment file turns out to be gone (retention).
3. Readable end: the published end position for the active segment, the file size for a
   sealed one (every segment below the active one was complete and fsynced before the next
   was created).
4. Start position: the position where the previous read of this segment stopped if it ended
   at ``offset`` (a consumer reading forward never looks anything up), else the segment's
   .index (loaded read-only, checked: whole entries, both columns strictly increasing, entries
   past the readable end ignored; a bad entry stops trust in the rest) and a walk over batch
   headers from the entry, checking that base offsets chain (they lie outside the CRC). An
   index entry that does not match the log is dropped and the walk starts at position 0.
5. Whole batches from there, up to ``max_bytes`` (at least one batch, Kafka's rule) and
   stopping before the first batch whose last offset >= the high watermark, before a batch
   whose base offset does not continue the previous one, and at the readable end. CRCs are
   checked here (``verify_crc=True``) or by the caller's decode (``records.decode_records``
   checks them; the consumer passes ``verify_crc=False`` to avoid doing it twice).

Mappings: one read-only shared mapping per segment (``_native.FileMap``), with room ahead of
the file's end: at least MAP_BYTES_MIN and twice the previous mapping, so a caught-up reader
of the active segment sees new batches in the mapping it has (the page cache is shared) and
maps again only every time the segment doubles, not on every poll (Python's mmap cannot map
past the end of a file, so it had to remap per poll: ~80 mmap + munmap pairs per second in a
1->1 consumer). A read first checks the file size (``fstat``) for bytes past what it has
checked, and never touches bytes past a size it has checked, so neither the room ahead nor a
file cut below what was mapped (only uncommitted bytes can be cut, by the recovery of a
restarted partition process) can make us fault with SIGBUS. An old mapping is closed when nothing uses it, otherwise dropped: the
memoryviews handed out keep it alive (so do views of a segment that retention unlinked).

Not thread-safe; one reader per consumer. After ``fork`` the child must build its own reader
(the consumer does, by pid).
"""
from __future__ import annotations

import bisect
import mmap
import os
import struct
from array import array
from typing import NamedTuple

from .. import errors, records
from ..layout import record_batch as layout
from ..native import _native
from . import files, index
from .segment import LogSlice

_ENTRY = struct.Struct(">ii")
_ENTRY_SIZE = _ENTRY.size
_HEAD = struct.Struct(">qi")  # base_offset, batch_length
_LAST_DELTA = struct.Struct(">i")
_LAST_DELTA_AT = layout.OFFSETS["last_offset_delta"]
_MAGIC_AT = layout.OFFSETS["magic"]
_HEADER = layout.HEADER_SIZE
_OVERHEAD = layout.LOG_OVERHEAD

#: Segments kept mapped at once; a reader going through a long backlog maps them in turn.
MAPPED_SEGMENTS_MAX = 4
#: A read this few offsets past where the last one ended walks on from there instead of
#: looking the offset up in the index (bounded: a few batch headers).
HINT_WALK_OFFSETS_MAX = 256


def _hint_holds(segment: "_SegmentFile", view: memoryview, end: int) -> bool:
    """Whether the batch at the segment's hint position (below ``end``) starts at its hint
    offset: where the last read ended is still a batch start to read or walk on from."""
    at = segment.hint_position
    return 0 <= at and at + _HEADER <= end and _HEAD.unpack_from(view, at)[0] == segment.hint_offset


def walks_on(hint: int, offset: int) -> bool:
    """Whether a read of ``offset`` walks on from a hint (the offset where the last read of
    the segment ended) rather than using the index: a little past it. Consumer._tail_read
    asks the same of the C read."""
    return 0 <= hint < offset <= hint + HINT_WALK_OFFSETS_MAX
#: Smallest mapping of a segment (address space, not memory: only touched pages cost).
MAP_BYTES_MIN = 64 * 1024 * 1024
#: Bytes of batch headers walked per native scan call (Kafka's default index interval: between
#: two index entries lie at most index_interval_bytes of batch starts).
WALK_WINDOW_BYTES = 64 * 1024
#: Segments a single read may step over (an offset past the end of a sealed segment continues
#: in the next one); more means the files contradict the published state.
SEGMENT_STEPS_MAX = 64
#: Reads one lookup by time may make after its time index entry: between two entries lie at
#: most a few index intervals of batches, so this is only a guard (4 GiB at 1 MiB a read).
TIME_LOOKUP_READS_MAX = 4096
TIME_LOOKUP_READ_BYTES = 1024 * 1024


class ReadState(NamedTuple):
    """The part of a partition's published state a read needs (PartitionState has these)."""

    high_watermark: int
    log_start_offset: int
    active_segment_base_offset: int
    active_segment_end_position: int


class _SegmentFile:
    """One segment as the reader sees it: fd, mapping, checked size, index entries, hint."""

    __slots__ = ("base_offset", "path", "index_path", "fd", "map", "checked_end",
                 "index_offsets", "index_positions", "index_bytes", "index_trusted",
                 "hint_offset", "hint_position")

    def __init__(self, directory: str, base_offset: int):
        self.base_offset = base_offset
        self.path = files.segment_path(directory, base_offset, files.LOG_SUFFIX)
        self.index_path = files.segment_path(directory, base_offset, files.INDEX_SUFFIX)
        self.fd: int | None = None
        self.map: _native.FileMap | None = None
        #: Bytes [0, checked_end) are known to exist in the file (fstat) and to be committed.
        self.checked_end = 0
        self.index_offsets = array("q")
        self.index_positions = array("q")
        self.index_bytes = 0
        self.index_trusted = True
        #: Where the previous read stopped: the batch starting at hint_position has base offset
        #: hint_offset (if the bytes are there).
        self.hint_offset = -1
        self.hint_position = -1

    def open(self) -> None:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)  # FileNotFoundError: retention

    def view(self, end: int) -> memoryview:
        """A memoryview of ``[0, end)`` of the mapping (``end`` checked against the file size)."""
        if end > self.checked_end:
            self.open()
            assert self.fd is not None
            size = os.fstat(self.fd).st_size
            if size < end:
                raise errors.CorruptSegmentError(
                    f"{self.path} is {size} bytes, shorter than the {end} bytes the partition "
                    f"published as committed (truncated by someone else?)", path=self.path,
                    position=size)
            self.checked_end = end
        if self.map is None or len(self.map) < end:
            assert self.fd is not None
            length = max(end, MAP_BYTES_MIN, 2 * len(self.map) if self.map is not None else 0)
            new = _native.FileMap(self.fd, -(-length // mmap.PAGESIZE) * mmap.PAGESIZE)
            self._retire_map()
            self.map = new
        # Cut at ``end``: the mapping reaches past the file's end, and no slice of this view
        # (a corrupt length included) may reach a page the file does not cover (SIGBUS).
        return memoryview(self.map)[:end]

    def _retire_map(self) -> None:
        old, self.map = self.map, None
        if old is not None:
            try:
                old.close()
            except BufferError:
                pass  # views handed out keep it mapped; it goes when the last one does

    def close(self) -> None:
        self._retire_map()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # -- index ------------------------------------------------------------------------------------

    def refresh_index(self) -> None:
        """Load index entries written since the last look (read-only, checked)."""
        if not self.index_trusted:
            return
        try:
            fd = os.open(self.index_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # missing index: walks start at position 0
        try:
            size = os.fstat(fd).st_size
            whole = size - size % _ENTRY_SIZE
            if whole <= self.index_bytes:
                if whole < self.index_bytes:  # the file shrank: rebuilt by a restarted owner
                    self.index_trusted = False
                return
            raw = os.pread(fd, whole - self.index_bytes, self.index_bytes)
        finally:
            os.close(fd)
        raw = raw[:len(raw) - len(raw) % _ENTRY_SIZE]
        offsets, positions = self.index_offsets, self.index_positions
        for relative, position in _ENTRY.iter_unpack(raw):
            offset = self.base_offset + relative
            if relative < 0 or position < 0 or (
                    positions and (offset <= offsets[-1] or position <= positions[-1])):
                self.index_trusted = False  # a stale or torn entry: trust nothing after it
                return
            offsets.append(offset)
            positions.append(position)
        self.index_bytes += len(raw)

    def lookup(self, offset: int, end: int) -> tuple[int, int]:
        """(entry offset, position) of the last usable entry <= offset, or (-1, 0)."""
        if not self.index_offsets or offset > self.index_offsets[-1]:
            self.refresh_index()
        slot = bisect.bisect_right(self.index_offsets, offset) - 1
        positions = self.index_positions
        while slot >= 0 and positions[slot] + _HEADER > end:
            slot -= 1  # the entry points at bytes not committed (or not mapped) yet
        if slot < 0:
            return -1, 0
        return self.index_offsets[slot], positions[slot]

    def distrust_index(self) -> None:
        self.index_trusted = False
        del self.index_offsets[:]
        del self.index_positions[:]


class LogReader:
    """Read-only reader of the partition log in ``directory`` (see module doc).

    Owned by one consumer; not thread-safe. ``read`` is bounded by the published state passed
    to it, so nothing uncommitted is ever returned.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.path.abspath(os.fspath(directory))
        self._segments: dict[int, _SegmentFile] = {}
        self._bases: list[int] = []
        self._listed_active = -1
        self._mapped: list[int] = []  # bases with a live fd/mapping, least recently used first
        self.pid = os.getpid()
        self._closed = False
        #: The segment the last successful read ended in (its hint says where the next batch
        #: starts): what a caught-up consumer's one-call read (``_native.tail_read``) continues.
        self.last_segment: _SegmentFile | None = None

    # -- segments ---------------------------------------------------------------------------------

    def _relist(self) -> None:
        try:
            found = files.list_segment_files(self.directory)
        except FileNotFoundError:
            found = {}
        bases = sorted(b for b, suffixes in found.items() if files.LOG_SUFFIX in suffixes)
        for base in list(self._segments):
            if base not in found:
                self._drop(base)
        self._bases = bases

    def _drop(self, base: int) -> None:
        segment = self._segments.pop(base, None)
        if segment is not None:
            segment.close()
        if base in self._mapped:
            self._mapped.remove(base)

    def _segment(self, base: int) -> _SegmentFile:
        segment = self._segments.get(base)
        if segment is None:
            segment = self._segments[base] = _SegmentFile(self.directory, base)
        if self._mapped and self._mapped[-1] == base:
            return segment
        if base in self._mapped:
            self._mapped.remove(base)
        self._mapped.append(base)
        while len(self._mapped) > MAPPED_SEGMENTS_MAX:  # bounded: one pass per extra entry
            old = self._segments.get(self._mapped.pop(0))
            if old is not None:
                old.close()  # views keep their mapping; the index and hint stay cached
                old.checked_end = 0
        return segment

    def _prune(self, log_start_offset: int) -> None:
        """Forget segments wholly below the log start (deleted or about to be)."""
        keep = bisect.bisect_right(self._bases, log_start_offset) - 1
        if keep > 0:
            for base in self._bases[:keep]:
                self._drop(base)
            del self._bases[:keep]

    @property
    def segment_bases(self) -> list[int]:
        """Base offsets of the segments as last listed."""
        return list(self._bases)

    # -- read -------------------------------------------------------------------------------------

    def read(self, offset: int, max_bytes: int, state, verify_crc: bool = True) -> LogSlice:
        """Whole committed batches from the one containing ``offset`` (see module doc).

        ``state``: the partition's published state (``PartitionState`` or ``ReadState``).
        The slice's ``first_offset`` may be below ``offset`` (the batch holding it starts
        earlier); its ``last_offset`` is always below the high watermark.
        """
        if self._closed:
            raise errors.LogClosedError(f"reader of {self.directory} is closed")
        hw = state.high_watermark
        start = state.log_start_offset
        if not start <= offset <= hw:
            raise errors.OffsetOutOfRangeError(
                f"offset {offset} is outside [{start}, {hw}] (log start, high watermark) of "
                f"{self.directory}")
        if offset == hw:
            return LogSlice(memoryview(b""), "", 0, 0, offset, offset - 1)
        active = state.active_segment_base_offset
        if active != self._listed_active or not self._bases or offset < self._bases[0]:
            self._relist()
            self._listed_active = active
        self._prune(start)
        slot = bisect.bisect_right(self._bases, offset) - 1
        if slot < 0:
            raise self._gone(offset, start)
        for _ in range(SEGMENT_STEPS_MAX):  # bounded: one step per segment
            if slot >= len(self._bases) or self._bases[slot] > active:
                break
            base = self._bases[slot]
            try:
                found = self._read_segment(self._segment(base), offset, max_bytes, hw,
                                           active, state.active_segment_end_position,
                                           verify_crc)
            except FileNotFoundError:
                self._relist()
                raise self._gone(offset, start) from None
            if found is not None:
                return found
            slot += 1
        raise errors.CorruptSegmentError(
            f"{self.directory}: offset {offset} is below the high watermark {hw} but no "
            f"segment up to the active one ({active}) holds it", path=self.directory)

    def tail_offset(self, state, bytes_max: int) -> int:
        """An offset from which reading to the high watermark covers about the last
        ``bytes_max`` committed bytes of the log (at least those, plus up to one index
        interval and a batch; less only where the log is shorter). Walks segments back from
        the active one; inside the segment where the budget ends, the last .index entry at
        or before the budget's first byte gives the offset (position 0 when there is none). Used by a
        restarted Kafka listener to rebuild producers' sequences from the log's tail."""
        start = state.log_start_offset
        if state.high_watermark <= start:
            return start
        active = state.active_segment_base_offset
        if active != self._listed_active or not self._bases:
            self._relist()
            self._listed_active = active
        bases = [b for b in self._bases if b <= active]
        budget = bytes_max
        earliest = active  # the oldest segment wholly within the budget so far
        for base in reversed(bases[-SEGMENT_STEPS_MAX:]):  # bounded: SEGMENT_STEPS_MAX
            if base == active:
                size = state.active_segment_end_position
            else:
                try:
                    size = os.stat(files.segment_path(self.directory, base,
                                                      files.LOG_SUFFIX)).st_size
                except FileNotFoundError:
                    break  # retention: what follows is all there is
            if size > budget:
                # The last index entry at or before the budget's first byte (entries point
                # at batch starts): at most one index interval more than asked.
                segment = self._segment(base)
                segment.refresh_index()
                at = bisect.bisect_right(segment.index_positions, size - budget) - 1
                return max(start, segment.index_offsets[at] if at >= 0 else base)
            budget -= size
            earliest = base
        return max(start, earliest)

    def offset_for_timestamp(self, timestamp: int, state) -> tuple[int, int] | None:
        """Kafka's ListOffsets by time: (offset, timestamp) of the first committed record
        whose timestamp is >= ``timestamp``, or None when there is none.

        Like Kafka's log: skip sealed segments whose largest timestamp (the last entry of
        their .timeindex, written when they are sealed) is below the target; in the first
        other segment, start at the time index's last entry below the target (every record
        up to its offset is older than the target, see ``TimeIndex.lookup``), then walk batch
        headers (their max timestamp) and decode only the batch that holds the answer. The
        active segment's .timeindex may lag behind the log (its entries are written in
        groups): that only makes the walk start earlier.
        """
        hw, start = state.high_watermark, state.log_start_offset
        if start >= hw:
            return None
        self._relist()
        self._listed_active = state.active_segment_base_offset
        self._prune(start)
        begin = start
        for slot, base in enumerate(self._bases):  # bounded by the segment files
            path = files.segment_path(self.directory, base, files.TIMEINDEX_SUFFIX)
            sealed = slot + 1 < len(self._bases) and self._bases[slot + 1] <= state.active_segment_base_offset
            if sealed:
                last = index.read_last_time_entry(path, base)
                if last is not None and last[0] < timestamp:
                    continue
            try:
                entry = index.read_time_index_file(path, base).lookup(timestamp)
            except FileNotFoundError:
                entry = None
            begin = max(start, base if entry is None else entry)
            break
        else:
            return None
        return self._first_at_or_after(begin, timestamp, state)

    def _first_at_or_after(self, offset: int, timestamp: int, state) -> tuple[int, int] | None:
        hw = state.high_watermark
        for _ in range(TIME_LOOKUP_READS_MAX):  # bounded; see TIME_LOOKUP_READS_MAX
            if offset >= hw:
                return None
            piece = self.read(offset, TIME_LOOKUP_READ_BYTES, state, verify_crc=True)
            if piece.length == 0:
                return None
            view = piece.data
            for b in records.scan_batches(view, verify_crc=False).batches:  # checked by read
                if b.max_timestamp < timestamp or b.last_offset < offset:
                    continue
                size = _HEAD.unpack_from(view, b.position)[1] + _OVERHEAD
                for record in records.decode_records(view[b.position:b.position + size], False):
                    if record.offset >= offset and record.timestamp >= timestamp:
                        return record.offset, record.timestamp
            offset = piece.last_offset + 1
        raise errors.CorruptSegmentError(
            f"{self.directory}: no answer for timestamp {timestamp} after "
            f"{TIME_LOOKUP_READS_MAX} reads from its time index entry", path=self.directory)

    def _gone(self, offset: int, start: int) -> errors.OffsetOutOfRangeError:
        first = self._bases[0] if self._bases else None
        return errors.OffsetOutOfRangeError(
            f"offset {offset} of {self.directory} is no longer in the log (published log start "
            f"{start}, first segment now {first}): deleted by retention")

    def _read_segment(self, segment: _SegmentFile, offset: int, max_bytes: int, hw: int,
                      active: int, active_end: int, verify_crc: bool) -> LogSlice | None:
        if segment.base_offset == active:
            end = active_end
        else:
            segment.open()
            assert segment.fd is not None
            end = os.fstat(segment.fd).st_size
        if end <= 0:
            return None
        view = segment.view(end)
        try:
            hint = segment.hint_offset
            if hint == offset and _hint_holds(segment, view, end):
                position, first = segment.hint_position, offset
            elif walks_on(hint, offset) and _hint_holds(segment, view, end):
                # A little past the last read (a consumer that took the records in between
                # from a ring, decision 0005): walk on from there, no index lookup (which
                # opens and reads the index file).
                found = self._walk(segment, view, segment.hint_position, end, offset, -1,
                                   expected_base=hint)
                if found is None:
                    return None
                position, first = found
            else:
                found = self._find(segment, view, offset, end)
                if found is None:
                    return None
                position, first = found
            found = self._slice(segment, view, position, first, end, max_bytes, hw, verify_crc)
            self.last_segment = segment
            return found
        finally:
            view.release()

    def _find(self, segment: _SegmentFile, view: memoryview, offset: int, end: int
              ) -> tuple[int, int] | None:
        """(position, base offset) of the batch holding ``offset``, or None past the end.

        From the index entry, or from the last read's end (the hint) where that lies between
        the entry and ``offset``: the index can lag the log by a partition's C rounds (it is
        written when Python settles them, up to PARTITION_LOOP_BUDGET_MS later), and a
        consumer that took a few hundred records from rings walked ~1 MB of headers from a
        stale entry (~100-250 us and a page fault per 4 KiB; perf/RESULTS.md, sixteenth
        session)."""
        entry_offset, position = segment.lookup(offset, end)
        hint = segment.hint_offset
        if entry_offset < hint <= offset and _hint_holds(segment, view, end):
            return self._walk(segment, view, segment.hint_position, end, offset, -1,
                              expected_base=hint)
        found = self._walk(segment, view, position, end, offset, entry_offset)
        if found == "bad-entry":
            segment.distrust_index()
            found = self._walk(segment, view, 0, end, offset, -1)
        assert found != "bad-entry"
        return found  # type: ignore[return-value]

    def _walk(self, segment: _SegmentFile, view: memoryview, position: int, end: int,
              offset: int, entry_offset: int, expected_base: int | None = None):
        """Walk batch headers from ``position`` to the batch whose last offset >= ``offset``:
        (position, base offset), None past the end, or "bad-entry".

        From position 0 the first batch must start at the segment's base offset; from an index
        entry the batch there must end at the entry's offset ("bad-entry" if not: the index is
        derived and may be stale, the log is the truth); after that base offsets must chain.
        In C (``_native.walk_batches``): a consumer that took records from a ring and then
        finds its next one in the log walks up to HINT_WALK_OFFSETS_MAX headers, ~1 us per
        header in Python. :meth:`_walk_reference` is the same in Python (tested alike).
        """
        if expected_base is None:
            expected_base = segment.base_offset if position == 0 else -1
            expected_last = entry_offset if position > 0 else -1
        else:
            expected_last = -1
        status, at, base, last, due = _native.walk_batches(view, position, end, offset,
                                                           expected_base, expected_last)
        if status == _native.WALK_FOUND:
            return at, base
        if status == _native.WALK_END:
            return None
        if status == _native.WALK_BAD_ENTRY:
            return "bad-entry"
        if status == _native.WALK_NOT_HEADER:
            raise self._corrupt(segment, at, "is not a whole RecordBatch v2 header")
        raise self._corrupt(segment, at, (
            f"holds offsets {base}..{last}, expected it to start at "
            f"{due if due >= 0 else None} (base_offset is outside the CRC)"))

    def _walk_reference(self, segment: _SegmentFile, view: memoryview, position: int, end: int,
                        offset: int, entry_offset: int, expected_base: int | None = None):
        """:meth:`_walk` in Python: the reference the C walk is tested against."""
        if expected_base is None:
            expected_base = segment.base_offset if position == 0 else None
            expected_last = entry_offset if position > 0 else None
        else:  # from a batch whose base offset is known (the last read's end)
            expected_last = None
        # Bounded: each round moves ``position`` forward by at least one batch, or returns.
        while position + _HEADER <= end:
            base, length = _HEAD.unpack_from(view, position)
            size = length + _OVERHEAD
            if view[position + _MAGIC_AT] != layout.MAGIC or length < layout.BATCH_LENGTH_MIN \
                    or position + size > end:
                if expected_last is not None:
                    return "bad-entry"
                raise self._corrupt(segment, position, "is not a whole RecordBatch v2 header")
            last = base + _LAST_DELTA.unpack_from(view, position + _LAST_DELTA_AT)[0]
            if (expected_base is not None and base != expected_base) or \
                    (expected_last is not None and last != expected_last) or last < base:
                if expected_last is not None:
                    return "bad-entry"
                raise self._corrupt(segment, position, (
                    f"holds offsets {base}..{last}, expected it to start at {expected_base} "
                    f"(base_offset is outside the CRC)"))
            if last >= offset:
                return position, base
            expected_base, expected_last = last + 1, None
            position += size
        return None

    def _slice(self, segment: _SegmentFile, view: memoryview, position: int, first: int,
               end: int, max_bytes: int, hw: int, verify_crc: bool) -> LogSlice | None:
        limit = min(end, position + max(max_bytes, _HEADER))
        _, status, _, batches = _native.scan_batches(view[position:limit], verify_crc, False, 0)
        if not batches:
            # The first batch alone is larger than max_bytes: hand it out whole anyway.
            length = _HEAD.unpack_from(view, position)[1] + _OVERHEAD
            if position + length <= end:
                _, status, _, batches = _native.scan_batches(
                    view[position:position + length], verify_crc, False, 0)
            if not batches:
                raise self._corrupt(segment, position, f"scan status {status}")
        if batches[0][1] != first:
            raise self._corrupt(segment, position, f"starts at offset {batches[0][1]}, not {first}")
        expected = first
        count = 0
        # Bounded by the batches found in at most max_bytes.
        for _, base, last, _, _ in batches:
            if base != expected or last >= hw:
                break
            expected = last + 1
            count += 1
        if count == 0:
            if batches[0][2] >= hw:
                return LogSlice(memoryview(b""), segment.path, position, 0, first, first - 1)
            raise self._corrupt(segment, position, "offsets do not chain")
        last_position = position + batches[count - 1][0]
        stop = last_position + _HEAD.unpack_from(view, last_position)[1] + _OVERHEAD
        segment.hint_offset, segment.hint_position = expected, stop
        return LogSlice(data=view[position:stop], path=segment.path, file_position=position,
                        length=stop - position, first_offset=first, last_offset=expected - 1)

    def _corrupt(self, segment: _SegmentFile, position: int, problem: str) -> errors.CorruptSegmentError:
        return errors.CorruptSegmentError(
            f"corrupt segment {segment.path} at position {position}: batch {problem}",
            path=segment.path, position=position)

    # -- sending a slice from its file ------------------------------------------------------------

    def pin(self, piece: LogSlice) -> int | None:
        """A new descriptor of the segment file ``piece`` was read from, for
        ``os.sendfile(sock, fd, piece.file_position, piece.length)``; the caller owns and
        closes it. None when that segment is no longer open here (this reader read other
        segments since and closed it): the caller sends ``piece.data`` instead.

        A duplicate of the descriptor the read used, not a new ``open`` of the path, so it is
        the very file whose committed bytes the read checked (a path may name a new file
        after retention or a restarted owner). An open descriptor keeps the file's bytes
        while retention unlinks it; only bytes past the high watermark are ever cut from a
        segment (a restarted owner's recovery), and a slice ends below it.
        """
        for segment in self._segments.values():  # bounded: the few segments known
            if segment.path == piece.path and segment.fd is not None:
                assert piece.file_position + piece.length <= segment.checked_end, piece
                return os.dup(segment.fd)  # non-inheritable, like the original
        return None

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Release fds and mappings; views handed out stay valid (they keep their mapping)."""
        for segment in self._segments.values():
            segment.close()
        self._segments.clear()
        self.last_segment = None
        self._mapped.clear()
        self._closed = True

    def __enter__(self) -> "LogReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LogReader({self.directory!r}, segments={self._bases})"
