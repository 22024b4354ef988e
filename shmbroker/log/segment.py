"""One segment: a .log of RecordBatch v2 bytes plus its .index and .timeindex.

::

    00000000000000004711.log   [batch 4711..4720][batch 4721..4721][batch 4722..4790] ...
                                ^ position 0      ^ position 1503   ^ position 1590
    00000000000000004711.index      sparse (last offset of a batch -> its position)
    00000000000000004711.timeindex  sparse (running max timestamp -> offset)

A segment is *active* (the last one of its log, the only one appended to) or *sealed*. The
.log holds exactly the producer's batch bytes except ``base_offset`` and
``partition_leader_epoch``, which the log assigns; both lie before the CRC'd range, so no CRC
is recomputed and the file is what a Kafka broker would have written.

Writes: ``os.writev`` with two iovecs per batch, a 21-byte patched prefix (base_offset,
batch_length, leader epoch, magic, crc) and a view of the rest of the caller's buffer, so the
batch body is never copied in Python. At most IOV_MAX iovecs per call.

Reads: zero-copy ``memoryview`` slices of a read-only ``mmap`` of the .log, together with the
file position range, so a network path can ``os.sendfile`` the same bytes instead. When the
file has grown past the current mapping we map it again; an old mapping is closed only if no
view of it is alive (``mmap.close`` refuses while buffers are exported), otherwise it is
dropped and lives on until its last view goes. That is also why a reader keeps working on a
segment that retention deleted: unlinking a mapped file is fine on Linux.

Sealed segments that need no recovery load their indexes lazily, on the first lookup: opening
a log with a thousand segments must not read a thousand index files.

Owned by the partition log of one writer process; not thread-safe.
"""
from __future__ import annotations

import bisect
import mmap
import os
import struct
import weakref
from dataclasses import dataclass

from .. import errors, records
from ..config import LogConfig
from ..layout import record_batch as layout
from . import files, recovery
from ..records import validation
from .index import NO_TIMESTAMP, IndexRule, OffsetIndex, TimeIndex, read_last_time_entry

try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):  # pragma: no cover - every Linux has it
    IOV_MAX = 1024
if IOV_MAX <= 0:  # pragma: no cover
    IOV_MAX = 1024
#: Two iovecs per batch, so flush a writev before a batch would be split across calls.
IOV_BATCHES_MAX = max(1, IOV_MAX // 2)

_PREFIX_SIZE = layout.CRC_START  # 21: base_offset .. crc, the bytes we re-send patched
_BASE_OFFSET = struct.Struct(">q")
_EPOCH = struct.Struct(">i")
_EPOCH_AT = layout.OFFSETS["partition_leader_epoch"]
assert _PREFIX_SIZE == 21 and _EPOCH_AT == 12

#: Smallest window for walking batch headers: between two index entries lie at most
#: index_interval_bytes of batch starts (see index.py), plus one header to read the last one.
_WALK_WINDOW_MIN = 4096 + layout.HEADER_SIZE


@dataclass(frozen=True)
class LogSlice:
    """Whole batches read from one segment: zero-copy bytes plus where they lie in the file.

    ``data`` is a read-only memoryview of the segment's mapping (``length`` bytes from
    ``file_position`` of ``path``): hand it to ``records.decode_records``, or send the same range
    with ``os.sendfile``. ``first_offset`` is the base offset of the first batch, which may be
    below the offset asked for (a read starts at the batch *containing* it, as Kafka's fetch
    does); ``last_offset`` is the last offset in the slice. An empty slice (at the log end) has
    ``length == 0`` and ``last_offset == first_offset - 1``.
    """

    data: memoryview
    path: str
    file_position: int
    length: int
    first_offset: int
    last_offset: int

    def __len__(self) -> int:
        return self.length

    @property
    def next_offset(self) -> int:
        """Where the next read should start."""
        return self.last_offset + 1


@dataclass(frozen=True)
class PlannedBatch:
    """A validated batch of the caller's buffer and the offsets the log gives it."""

    source_position: int
    size: int
    base_offset: int
    last_offset: int
    max_timestamp: int
    records_count: int


class LogSegment:
    """One .log + .index + .timeindex (see module doc). Build with create/open_* classmethods."""

    def __init__(self, directory: str, base_offset: int, config: LogConfig, fd: int, *,
                 size: int, next_offset: int, sealed: bool, created_ms: int):
        self.directory = directory
        self.base_offset = base_offset
        self.config = config
        self.path = files.segment_path(directory, base_offset, files.LOG_SUFFIX)
        self.index_path = files.segment_path(directory, base_offset, files.INDEX_SUFFIX)
        self.timeindex_path = files.segment_path(directory, base_offset, files.TIMEINDEX_SUFFIX)
        self._fd: int | None = fd
        #: Bytes of whole, acknowledged batches. Reads never go past it.
        self.size = size
        #: The offset the next batch appended here would get. For a sealed segment, the next
        #: segment's base offset (known without reading this segment).
        self.next_offset = next_offset
        self.sealed = sealed
        #: When the segment was created or opened (clock ms); Kafka's roll-by-time fallback
        #: for segments whose batches carry no timestamp.
        self.created_ms = created_ms
        self.max_timestamp = NO_TIMESTAMP
        self.offset_of_max_timestamp = -1
        #: max_timestamp of the first batch: segment.ms counts from it (time_waited_for_roll).
        self.first_batch_max_timestamp: int | None = None
        self._rule = IndexRule(config.index_interval_bytes)
        self._offset_index: OffsetIndex | None = None
        self._time_index: TimeIndex | None = None
        #: Known corruption of a sealed segment (found by recovery, a lazy index rebuild or a
        #: read): the fence; nothing at or after its position is read (see _corrupt).
        self.corruption: errors.CorruptSegmentError | None = None
        #: Why a lazily loaded index had to be rebuilt (for the operator), if it did.
        self.index_rebuild_reason: str | None = None
        self._map: mmap.mmap | None = None
        self._retired_maps: list[weakref.ref] = []
        self._log_dirty = False
        self.deleted = False

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str, base_offset: int, config: LogConfig, now_ms: int,
               *, sync_dir: bool = True) -> "LogSegment":
        """New empty segment files (0600). ``sync_dir=False`` when the caller fsyncs the dir."""
        paths = [files.segment_path(directory, base_offset, s) for s in files.SEGMENT_SUFFIXES]
        for path in paths:
            files.create_file(path)
        if sync_dir:
            files.fsync_dir(directory)
        segment = cls(directory, base_offset, config, files.open_append(paths[0]), size=0,
                      next_offset=base_offset, sealed=False, created_ms=now_ms)
        segment._open_indexes()
        return segment

    @classmethod
    def open_recovered(cls, result: recovery.SegmentRecovery, directory: str, config: LogConfig,
                       now_ms: int, next_segment_base: int | None) -> "LogSegment":
        """Segment whose .log recover_segment just validated (and whose indexes it rebuilt)."""
        scan = result.scan
        sealed = next_segment_base is not None
        fd = files.open_append(result.path)
        # The active segment was cut to its valid bytes; a sealed one is never cut (reads stop
        # at its corruption position instead).
        size = os.fstat(fd).st_size
        assert sealed or size == scan.valid_bytes, (result.path, size, scan.valid_bytes)
        segment = cls(directory, result.base_offset, config, fd, size=size,
                      next_offset=next_segment_base if sealed else scan.next_offset,
                      sealed=sealed, created_ms=now_ms)
        segment.corruption = result.error
        segment._adopt_scan(scan)
        segment._open_indexes()
        assert not segment._index_problem(), segment._index_problem()
        return segment

    @classmethod
    def open_sealed(cls, directory: str, base_offset: int, config: LogConfig, now_ms: int,
                    next_segment_base: int) -> "LogSegment":
        """A sealed segment below the recovery point: trusted, indexes loaded on first use.

        Its largest timestamp (needed for retention and time lookups before any read) comes from
        the last .timeindex entry, which the roll wrote; if that entry is missing or
        implausible, the indexes are loaded (and checked, and rebuilt if need be) right away.
        """
        path = files.segment_path(directory, base_offset, files.LOG_SUFFIX)
        fd = files.open_append(path)
        segment = cls(directory, base_offset, config, fd, size=os.fstat(fd).st_size,
                      next_offset=next_segment_base, sealed=True, created_ms=now_ms)
        last = read_last_time_entry(segment.timeindex_path, base_offset)
        if last is not None and base_offset <= last[1] < next_segment_base:
            segment.max_timestamp, segment.offset_of_max_timestamp = last
        elif segment.size > 0:
            segment._ensure_indexes()
        return segment

    @classmethod
    def open_active(cls, directory: str, base_offset: int, config: LogConfig, now_ms: int,
                    epoch_max: int | None) -> "LogSegment | str":
        """The last segment after a clean shutdown; returns a reason string if it needs recovery.

        Trusts the bytes up to the last offset-index entry (they were fsynced by the clean
        close), checks the indexes, and validates the tail after that entry fully: that tail
        also tells the next offset and the largest timestamp without reading the whole file.
        """
        path = files.segment_path(directory, base_offset, files.LOG_SUFFIX)
        fd = files.open_append(path)
        segment = cls(directory, base_offset, config, fd, size=os.fstat(fd).st_size,
                      next_offset=base_offset, sealed=False, created_ms=now_ms)
        try:
            problem = segment._missing_index()
            segment._open_indexes()
            if problem is None:
                problem = segment._offset_index.sanity_problem(segment.size)  # type: ignore[union-attr]
            if problem is None:
                problem = segment._load_tail(epoch_max)
            if problem is None:
                problem = segment._index_problem()
        except BaseException:
            segment.close()
            raise
        if problem is not None:
            segment.close()
            return problem
        return segment

    def _adopt_scan(self, scan: recovery.SegmentScan) -> None:
        self.max_timestamp = scan.max_timestamp
        self.offset_of_max_timestamp = scan.offset_of_max_timestamp
        self.first_batch_max_timestamp = scan.first_batch_max_timestamp
        assert scan.rule is not None
        self._rule = scan.rule

    def _open_indexes(self) -> None:
        max_bytes = self.config.index_bytes_max
        self._offset_index = OffsetIndex.open(self.index_path, self.base_offset, max_bytes)
        try:
            self._time_index = TimeIndex.open(self.timeindex_path, self.base_offset, max_bytes)
        except BaseException:
            self._offset_index.close()
            self._offset_index = None
            raise

    def _close_indexes(self) -> None:
        for index in (self._offset_index, self._time_index):
            if index is not None:
                index.close()
        self._offset_index = self._time_index = None

    def _missing_index(self) -> str | None:
        for path in (self.index_path, self.timeindex_path):
            if not os.path.exists(path):
                return f"{path} is missing"
        return None

    def _index_problem(self) -> str | None:
        assert self._offset_index is not None and self._time_index is not None
        return (self._offset_index.sanity_problem(self.size, self.next_offset)
                or self._time_index.sanity_problem(self.next_offset))

    def _load_tail(self, epoch_max: int | None) -> str | None:
        """Validate the bytes after the last offset-index entry; set next offset, max timestamp."""
        assert self._offset_index is not None and self._time_index is not None
        last_entry = self._offset_index.last_entry()
        start, first_last = (0, None) if last_entry is None else (last_entry[1], last_entry[0])
        time_last = self._time_index.last_entry()
        rule = IndexRule(self.config.index_interval_bytes,
                         max_timestamp=time_last[0] if time_last else NO_TIMESTAMP,
                         offset_of_max_timestamp=time_last[1] if time_last else -1)
        if self.size == 0:
            self._rule = rule
            return None
        view = self._view(self.size)
        try:
            scan = recovery.scan_log(view, path=self.path, base_offset=self.base_offset,
                                     interval_bytes=self.config.index_interval_bytes,
                                     start_position=start, end=self.size,
                                     first_last_offset=first_last, rule=rule,
                                     time_index_last=self._time_index.last_timestamp,
                                     epoch_max=epoch_max)
            if scan.problem is not None:
                return scan.problem
            first = records.read_header(view, 0)
            self.first_batch_max_timestamp = first.max_timestamp
        finally:
            view.release()
        self.next_offset = scan.next_offset
        self.max_timestamp = rule.max_timestamp
        self.offset_of_max_timestamp = rule.offset_of_max_timestamp
        self._rule = rule
        # Entries the tail should have had (an index write lost in the crash of a clean close?)
        # are simply added: they are what IndexRule would have written.
        for offset, position in scan.offset_entries:
            self._offset_index.append(offset, position)
        for timestamp, offset in scan.time_entries:
            self._time_index.maybe_append(timestamp, offset)
        self._offset_index.write_pending()
        self._time_index.write_pending()
        return None

    def _ensure_indexes(self) -> None:
        """Load a sealed segment's indexes on first use; rebuild them if they fail the check."""
        if self._offset_index is not None:
            return
        assert self._fd is not None, f"{self.path} is closed"
        problem = self._missing_index()
        self._open_indexes()
        problem = problem or self._index_problem()
        if problem is None and self.size > 0 and len(self._time_index) == 0:  # type: ignore[arg-type]
            # A sealed segment gets a final time entry when sealed, unless none of its records
            # has a timestamp; an empty file is more likely damage, and a rebuild settles it.
            problem = f"{self.timeindex_path} is empty but {self.path} is not"
        if problem is None:
            last = self._time_index.last_entry()  # type: ignore[union-attr]
            if last is not None and last[0] > self.max_timestamp:
                self.max_timestamp, self.offset_of_max_timestamp = last
            return
        self._close_indexes()
        result = recovery.recover_segment(self.path, self.base_offset, self.config, sealed=True,
                                          offset_limit=self.next_offset, sync=False)
        self.index_rebuild_reason = problem
        self.corruption = result.error
        self._adopt_scan(result.scan)
        self._open_indexes()

    # -- properties -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._fd is None

    @property
    def offset_index(self) -> OffsetIndex:
        self._ensure_indexes()
        assert self._offset_index is not None
        return self._offset_index

    @property
    def time_index(self) -> TimeIndex:
        self._ensure_indexes()
        assert self._time_index is not None
        return self._time_index

    def largest_timestamp(self) -> int:
        """Kafka's segment.largestTimestamp: the max record timestamp, else the file's mtime."""
        if self.max_timestamp >= 0:
            return self.max_timestamp
        return int(os.stat(self.path).st_mtime * 1000)

    def time_waited_for_roll(self, now_ms: int, incoming_max_timestamp: int) -> int:
        """Kafka's measure for segment.ms (LogSegment.timeWaitedForRoll).

        Record time, not wall time: the incoming batches' max timestamp minus the max timestamp
        of this segment's first batch. Only when the first batch has no timestamp (-1) does the
        wall clock count, from the segment's creation. Comparing record time with record time
        is what keeps a producer that sends old timestamps (a replay, a mirror) from rolling a
        new segment on every append.
        """
        first = self.first_batch_max_timestamp
        if first is not None and first >= 0:
            return incoming_max_timestamp - first
        return now_ms - self.created_ms

    def _readable_end(self) -> int:
        return self.corruption.position if self.corruption is not None else self.size  # type: ignore[return-value]

    def __repr__(self) -> str:
        state = "sealed" if self.sealed else "active"
        return f"LogSegment({self.path!r}, {state}, size={self.size}, next_offset={self.next_offset})"

    # -- append ---------------------------------------------------------------------------------

    def room_for(self, batch: PlannedBatch) -> bool:
        """Whether ``batch`` may go into this (active) segment without rolling first.

        An empty segment takes any batch, however large: rolling would not help.
        """
        if self.size == 0:
            return True
        if self.size + batch.size > self.config.segment_bytes:
            return False
        if batch.last_offset - self.base_offset > 0x7FFFFFFF:
            return False  # relative offsets in the indexes are int32
        # Each batch adds at most one entry to each index; keep one time slot for the roll.
        return self.offset_index.entries_left >= 1 and self.time_index.entries_left >= 2

    def append(self, data: memoryview, batches: list[PlannedBatch], leader_epoch: int) -> int:
        """Write ``batches`` (slices of ``data``) at the end; returns the position of the first.

        ``data`` must stay unchanged during the call. On a write error the file is cut back to
        its previous size, so a failed append leaves no torn batch behind.
        """
        assert not self.sealed, f"append to sealed {self!r}"
        if self._fd is None:
            raise errors.LogClosedError(f"{self.path} is closed (after a failed write?)")
        assert batches and batches[0].base_offset == self.next_offset, (batches[0], self.next_offset)
        start = self.size
        buffers: list = []
        written = 0
        try:
            for i, batch in enumerate(batches):
                prefix = bytearray(data[batch.source_position:batch.source_position + _PREFIX_SIZE])
                _BASE_OFFSET.pack_into(prefix, 0, batch.base_offset)
                _EPOCH.pack_into(prefix, _EPOCH_AT, leader_epoch)
                buffers.append(prefix)
                buffers.append(data[batch.source_position + _PREFIX_SIZE:
                                    batch.source_position + batch.size])
                if len(buffers) >= 2 * IOV_BATCHES_MAX or i == len(batches) - 1:
                    written += _writev_all(self._fd, buffers)
                    buffers = []
        except OSError as exc:
            self._undo_partial_write(start)
            raise errors.LogError(f"write to {self.path} failed: {exc}") from exc
        assert written == sum(b.size for b in batches), (written, batches)
        self._log_dirty = True
        self._index_batches(batches, start)
        return start

    def native_state(self) -> tuple | None:
        """What the C drain round needs to append here: (fd, size, offset_entries_left,
        time_entries_left, first_batch_max_timestamp or -1, created_ms, and the IndexRule's
        interval_bytes, bytes_since_entry, max_timestamp, offset_of_max_timestamp). None when
        the segment cannot be appended to (sealed, or closed after a failed write)."""
        if self.sealed or self._fd is None:
            return None
        rule = self._rule
        first = self.first_batch_max_timestamp
        return (self._fd, self.size, self.offset_index.entries_left,
                self.time_index.entries_left, -1 if first is None else first, self.created_ms,
                rule.interval_bytes, rule.bytes_since_entry, rule.max_timestamp,
                rule.offset_of_max_timestamp)

    def record_native_append(self, position: int, size: int, next_offset: int,
                             first_batch_max_timestamp: int | None, rule_state: tuple,
                             offset_entries: list, time_entries: list) -> None:
        """The C drain round wrote batches at ``position`` (the old size) up to ``size``:
        take its index entries (planned with the same IndexRule as :meth:`_index_batches`)
        and its new ends, exactly as :meth:`append` would have left this object."""
        assert not self.sealed and self._fd is not None and self.size == position, \
            (self, position)
        rule = self._rule
        if offset_entries or time_entries:
            # (Most small rounds cross no entry: index_interval_bytes is 4 KiB. The active
            # segment's indexes are open and have nothing pending outside an append, so a
            # round without entries has nothing to write.)
            offset_index, time_index = self.offset_index, self.time_index
            for offset, entry_position in offset_entries:
                offset_index.append(offset, entry_position)
            for timestamp, offset in time_entries:
                time_index.maybe_append(timestamp, offset)
            offset_index.write_pending()
            time_index.write_pending()
        if first_batch_max_timestamp is not None:
            assert position == 0
            self.first_batch_max_timestamp = first_batch_max_timestamp
        rule.bytes_since_entry, rule.max_timestamp, rule.offset_of_max_timestamp = rule_state
        self.max_timestamp = rule.max_timestamp
        self.offset_of_max_timestamp = rule.offset_of_max_timestamp
        self._log_dirty = True
        self.size = size
        self.next_offset = next_offset

    def native_write_failed(self, position: int, truncated: bool) -> None:
        """The C drain round's write failed; it cut the file back to ``position`` if it could
        (``truncated``). As :meth:`_undo_partial_write`: a file that could not be cut back is
        no longer used (recovery cuts the torn tail)."""
        assert self.size == position
        if not truncated:
            self.close()

    def _undo_partial_write(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)  # type: ignore[arg-type]
        except OSError:
            # Cannot even cut it back: stop using this segment; recovery will cut the torn tail.
            self.close()

    def _index_batches(self, batches: list[PlannedBatch], start: int) -> None:
        offset_index, time_index, rule = self.offset_index, self.time_index, self._rule
        position = start
        for batch in batches:
            if rule.observe(batch.size, batch.last_offset, batch.max_timestamp):
                offset_index.append(batch.last_offset, position)
                time_index.maybe_append(rule.max_timestamp, rule.offset_of_max_timestamp)
            if position == 0:
                self.first_batch_max_timestamp = batch.max_timestamp
            position += batch.size
        self.max_timestamp = rule.max_timestamp
        self.offset_of_max_timestamp = rule.offset_of_max_timestamp
        # Index entries are written after the batches they point at, so an index on disk
        # never points past the log's bytes (in page-cache order at least; after a crash the
        # sanity check covers the rest).
        offset_index.write_pending()
        time_index.write_pending()
        self.size = position
        self.next_offset = batches[-1].last_offset + 1

    # -- read -----------------------------------------------------------------------------------

    def _view(self, end: int) -> memoryview:
        """A memoryview of the mapping covering at least ``[0, end)``; remaps if needed."""
        if end == 0:
            return memoryview(b"")
        if self._map is None or len(self._map) < end:
            self._remap(end)
        assert self._map is not None
        return memoryview(self._map)

    def _remap(self, end: int) -> None:
        assert self._fd is not None, f"{self.path} is closed"
        new = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        if len(new) < end:
            new.close()
            raise errors.CorruptSegmentError(
                f"{self.path} is {os.fstat(self._fd).st_size} bytes, shorter than the {end} "
                f"the log wrote (truncated by someone else?)", path=self.path, position=end)
        self._retire_map()
        self._map = new

    def _retire_map(self) -> None:
        old, self._map = self._map, None
        if old is not None:
            try:
                old.close()
            except BufferError:
                # A reader still holds a view: keep only a weak reference; the map is unmapped
                # when its last view goes. truncate_to() checks these before cutting the file.
                self._retired_maps.append(weakref.ref(old))
        self._retired_maps = [r for r in self._retired_maps if r() is not None]

    def find_batch(self, offset: int) -> tuple[int, int, int] | None:
        """(position, base offset, last offset) of the first batch with last offset >= ``offset``.

        None when the segment has no such batch. Raises CorruptSegmentError when the walk meets
        bytes that are not a batch header, or offsets that do not chain, before finding it.
        """
        entry_offset, position = self.offset_index.lookup(offset)
        end = self._readable_end()
        view = self._view(end)
        try:
            for batch_position, base, last, _ in self._walk(view, position, end, entry_offset):
                if last >= offset:
                    return batch_position, base, last
            return None
        finally:
            view.release()

    def _walk(self, view: memoryview, position: int, end: int, entry_offset: int):
        """Yield (position, base, last, max_timestamp) of each batch header from ``position``.

        ``position`` is 0 or an offset-index entry's position, and ``entry_offset`` that entry's
        offset. The offsets must chain, because base_offset is outside the CRC: the batch at 0
        starts at the segment's base offset, the batch at an entry ends at the entry's offset,
        and each next batch starts right after the previous one. Headers only: CRCs are
        checked by whoever hands bytes out. Raises the segment's known corruption when the
        walk reaches it (the fence, see _corrupt).
        """
        window = max(_WALK_WINDOW_MIN, self.config.index_interval_bytes + layout.HEADER_SIZE)
        expected_base = self.base_offset if position == 0 else None
        expected_last = None if position == 0 else entry_offset
        # Bounded: each round moves ``position`` forward by at least one batch, or raises.
        while position < end:
            result = records.scan_batches(view[position:min(end, position + window)],
                                          verify_crc=False)
            found = [(position + p, b, l, t) for p, b, l, t, _ in result.batches]
            position += result.valid_bytes
            status = result.status
            if position < end and status == validation.STATUS["TRUNCATED"] \
                    and end - position >= layout.HEADER_SIZE:
                # The window cut a batch: read its header from the whole view.
                header = records.read_header(view, position)
                if header.magic != layout.MAGIC:
                    status = validation.STATUS["BAD_MAGIC"]
                elif header.batch_length < layout.BATCH_LENGTH_MIN:
                    status = validation.STATUS["BAD_LENGTH"]
                elif position + header.size <= end:
                    found.append((position, header.base_offset, header.last_offset,
                                  header.max_timestamp))
                    position += header.size
            for batch in found:
                if (expected_base is not None and batch[1] != expected_base) or \
                        (expected_last is not None and batch[2] != expected_last):
                    raise self._corrupt(view, batch[0], problem=(
                        f"batch holds offsets {batch[1]}..{batch[2]}, expected it to "
                        f"{'start at %d' % expected_base if expected_base is not None else 'end at %d' % expected_last} "
                        f"(base_offset is outside the CRC)"))
                expected_base, expected_last = batch[2] + 1, None
                yield batch
            if position < end and not found:
                # Not even one header could be walked over here: the bytes are not a batch.
                if status == validation.STATUS["OK"]:
                    status = validation.STATUS["TRUNCATED"]
                raise self._corrupt(view[:end], position, status)
        if self.corruption is not None:
            raise self.corruption

    def _corrupt(self, view, position: int, status: int | None = None,
                 problem: str | None = None) -> errors.CorruptSegmentError:
        """The error for bad bytes at ``position``; in a sealed segment it also fences them.

        Fencing: once a sealed segment is known to be corrupt at some position, nothing at or
        after it is read any more (the header walk past it is no longer trustworthy), whether
        the corruption was found by recovery or by a read. The active segment is not fenced,
        so appends after a bad batch stay readable.
        """
        if problem is None:
            assert status is not None
            problem = validation.describe(view, position, status)
        error = errors.CorruptSegmentError(
            f"corrupt segment {self.path} at position {position}: {problem}",
            path=self.path, position=position)
        if self.sealed and (self.corruption is None or position < self.corruption.position):  # type: ignore[operator]
            self.corruption = error
        return error

    def read(self, offset: int, max_bytes: int, epoch_max: int | None = None) -> LogSlice | None:
        """Whole batches from the one containing ``offset``, about ``max_bytes`` of them.

        At least one whole batch, even when it is larger than ``max_bytes`` (Kafka's rule, so a
        consumer can always progress). Before anything is handed out, every batch's CRC is
        checked and, because base_offset lies outside the CRC, the offsets must continue from
        batch to batch and the first batch must hold ``offset``. If a bad batch follows good
        ones, the good ones are returned and the next read, starting at the bad one, raises
        CorruptSegmentError. ``epoch_max`` (the log's current leader epoch) also bounds each
        batch's partition_leader_epoch, the other field outside the CRC. None when ``offset``
        is beyond this segment.
        """
        found = self.find_batch(offset)
        if found is None:
            return None
        start = found[0]
        end = self._readable_end()
        view = self._view(end)
        try:
            batches = self._checked_batches(view, start, end, max_bytes, offset, epoch_max)
            length = batches[-1][0] + validation.batch_length_at(view, start + batches[-1][0]) \
                + layout.LOG_OVERHEAD
            data = view[start:start + length]
        finally:
            view.release()
        return LogSlice(data=data, path=self.path, file_position=start, length=length,
                        first_offset=batches[0][1], last_offset=batches[-1][2])

    def _checked_batches(self, view: memoryview, start: int, end: int, max_bytes: int,
                         offset: int, epoch_max: int | None) -> list:
        """Valid batches from ``start`` within ``max_bytes`` (at least one), or raise."""
        limit = min(end, start + max(max_bytes, layout.HEADER_SIZE))
        result = records.scan_batches(view[start:limit], verify_crc=True)
        if not result.batches:
            size = records.read_header(view, start).size
            if result.status == validation.STATUS["TRUNCATED"] and start + size <= end:
                result = records.scan_batches(view[start:start + size], verify_crc=True)
            if not result.batches:
                raise self._corrupt(view[:end], start, result.status)
        batches = result.batches
        first_base, first_last = batches[0][1], batches[0][2]
        if offset >= self.base_offset and not first_base <= offset <= first_last:
            raise self._corrupt(view, start, problem=(
                f"batch holds offsets {first_base}..{first_last}, not {offset} (base_offset "
                f"damaged?)"))
        epoch_min = -1
        for i, batch in enumerate(batches):
            epoch = _EPOCH.unpack_from(view, start + batch[0] + _EPOCH_AT)[0]
            bad_epoch = epoch < epoch_min or (epoch_max is not None and epoch > epoch_max)
            if i == 0 and bad_epoch:
                raise self._corrupt(view, start, problem=(
                    f"partition_leader_epoch {epoch} is outside [-1, {epoch_max}]"))
            if i > 0 and (bad_epoch or batch[1] != batches[i - 1][2] + 1):
                return batches[:i]  # the next read starts at the bad one and raises there
            epoch_min = epoch
        return batches

    def find_offset_by_timestamp(self, timestamp: int) -> int | None:
        """First offset in this segment whose record timestamp is >= ``timestamp``, or None."""
        if self.max_timestamp < timestamp:
            return None
        start_offset = self.time_index.lookup(timestamp)
        entry_offset, position = self.offset_index.lookup(
            self.base_offset if start_offset is None else start_offset)
        end = self._readable_end()
        view = self._view(end)
        try:
            for batch_position, _, last, max_timestamp in self._walk(view, position, end, entry_offset):
                if max_timestamp < timestamp:
                    continue
                size = validation.batch_length_at(view, batch_position) + layout.LOG_OVERHEAD
                try:
                    batch_records = records.decode_records(view[batch_position:batch_position + size])
                except errors.CorruptRecordError as exc:
                    raise self._corrupt(view, batch_position, problem=str(exc)) from exc
                for record in batch_records:
                    if record.timestamp >= timestamp:
                        return record.offset
            return None
        finally:
            view.release()

    # -- flush, seal, truncate, close, delete ----------------------------------------------------

    def flush(self, indexes: bool = False) -> bool:
        """fsync the .log (and the indexes if asked); True if anything was fsynced.

        The indexes are not fsynced by the flush policy: after an unclean stop the active
        segment's indexes are rebuilt from the log anyway, so their durability buys nothing
        until the segment is sealed or the log closed, which do fsync them.
        """
        assert self._fd is not None, f"{self.path} is closed"
        did = False
        if self._log_dirty:
            files.fsync_fd(self._fd)
            self._log_dirty = False
            did = True
        if indexes and self._offset_index is not None:
            self._offset_index.flush()
            self._time_index.flush()  # type: ignore[union-attr]
            did = True
        return did

    def seal(self, sync: bool = True) -> list[tuple[int, str]]:
        """Stop appending here: write Kafka's final time entry (the segment's max), then fsync
        all (``sync``) or return ``[(fd, path)]``: duplicated descriptors of the .log and both
        indexes, owned by the caller, whose fsync makes the segment durable (the roll hands
        them to the SegmentFlusher). Either way the segment counts as clean afterwards."""
        assert not self.sealed
        assert self._fd is not None, f"{self.path} is closed"
        if self.max_timestamp > NO_TIMESTAMP:
            self.time_index.maybe_append(self.max_timestamp, self.offset_of_max_timestamp)
        handed: list[tuple[int, str]] = []
        if sync:
            self.flush(indexes=True)
        else:
            try:
                handed.append((os.dup(self._fd), self.path))
                handed.append((self.offset_index.dup_for_flush(), self.index_path))
                handed.append((self.time_index.dup_for_flush(), self.timeindex_path))
            except BaseException:
                for fd, _ in handed:
                    os.close(fd)
                raise
            self._log_dirty = False
        self.sealed = True
        return handed

    def truncate_to(self, offset: int) -> int:
        """Remove the batch containing ``offset`` and everything after it; returns bytes cut.

        Refused (LogError) while a reader holds a view of this segment's mapping: cutting a
        mapped file under a reader makes its next access die with SIGBUS.
        """
        assert self._fd is not None
        found = self.find_batch(offset)
        if found is None:
            return 0
        position, base, _ = found
        self._retire_map()
        if self._retired_maps:
            raise errors.LogError(f"cannot truncate {self.path} while readers hold views of it")
        os.ftruncate(self._fd, position)
        files.fsync_fd(self._fd)
        cut = self.size - position
        self.size = position
        self.next_offset = base
        self.offset_index.truncate_to_position(position)
        self.time_index.truncate_to_offset(base)
        self.offset_index.flush()
        self.time_index.flush()
        self.first_batch_max_timestamp = None
        problem = self._load_tail(epoch_max=None)
        assert problem is None, problem
        return cut

    def close(self) -> None:
        """Release the file descriptors; live reader views keep their mapping."""
        if self._fd is None:
            return
        try:
            self._retire_map()
            self._close_indexes()
        finally:
            os.close(self._fd)
            self._fd = None

    def delete(self, *, sync_dir: bool = True) -> list[str]:
        """Close and unlink the three files; readers' views stay valid (module doc)."""
        self.close()
        self.deleted = True
        return files.remove_files([self.path, self.index_path, self.timeindex_path],
                                  sync_dir=sync_dir)


def _writev_all(fd: int, buffers: list) -> int:
    """os.writev until every byte is written; returns the byte count.

    A short write to a regular file happens only on a full disk (then the next call raises
    ENOSPC) or a signal; we resume from the first unwritten byte.
    """
    total = 0
    index = 0
    # Bounded: each round writes at least one byte or raises.
    while index < len(buffers):
        written = os.writev(fd, buffers[index:index + IOV_MAX])
        if written <= 0:
            raise OSError(f"writev wrote {written} bytes")
        total += written
        while written > 0:
            length = len(buffers[index])
            if written >= length:
                written -= length
                index += 1
            else:
                buffers[index] = memoryview(buffers[index])[written:]
                written = 0
    return total


def plan_batches(scanned: list, data_len: int, next_offset: int) -> list[PlannedBatch]:
    """Offsets for validated batches (``scan_batches(...).batches`` of a buffer of
    ``data_len`` bytes): each batch continues where the previous one ended."""
    planned = []
    positions = [b[0] for b in scanned] + [data_len]
    for i, (position, base, last, max_timestamp, count) in enumerate(scanned):
        size = positions[i + 1] - position
        planned.append(PlannedBatch(position, size, next_offset, next_offset + (last - base),
                                    max_timestamp, count))
        next_offset += last - base + 1
    return planned


def segment_for(bases: list[int], offset: int) -> int:
    """Index of the segment whose range holds ``offset`` (the last base <= offset)."""
    return max(0, bisect.bisect_right(bases, offset) - 1)

