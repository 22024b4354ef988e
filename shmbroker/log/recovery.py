"""Validate segment files, cut torn or corrupt tails, rebuild indexes, report what was dropped.

Plain functions over files: nothing here needs an open :class:`PartitionLog`, so every case
can be tested on bytes written by hand. The loader in partition_log.py decides *which*
segments to run them on (every segment from the recovery point on, after an unclean stop).

What "valid" means for a segment, batch after batch from position 0:

1. ``records.scan_batches(verify_crc=True, verify_records=True)`` accepts it: whole, magic 2,
   CRC-32C right, every record's varints and lengths consistent, uncompressed;
2. the fields *outside* the CRC are plausible, because a flipped bit there is invisible to the
   CRC: ``base_offset`` continues the previous batch exactly (the first one equals the
   segment's base offset, from its file name), and ``partition_leader_epoch`` never decreases
   and lies in ``[-1, epoch_max]`` (the current leader epoch: no batch can come from a later
   leadership);
3. offsets stay inside the segment: ``last_offset - base_offset`` fits an int32 index entry,
   and below ``offset_limit`` (the next segment's base offset) when there is a next segment.

The first batch failing any of these ends the valid prefix. For the active (last) segment,
everything from there on is a torn write or garbage from a crash: it is truncated and counted
(:class:`SegmentRecovery`). A *sealed* segment was fsynced before the next one was created, so
bad bytes there are real corruption: nothing is truncated and later segments are kept; the
problem is reported as :class:`~shmbroker.errors.CorruptSegmentError` naming the file and the
position, and reads stop before it.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Iterator

from .. import errors, records
from ..config import BATCH_RECORDS_MAX, LogConfig
from ..layout import record_batch as layout
from . import files
from ..records import validation
from .index import INT32_MAX, NO_TIMESTAMP, IndexRule, OffsetIndex, TimeIndex

#: A whole-segment scan is done in windows so the list of batch tuples that scan_batches
#: returns stays bounded (8 MiB of batches of 61 bytes is 137k tuples) however big the file.
SCAN_WINDOW_BYTES = 8 << 20

_EPOCH = struct.Struct(">i")
_EPOCH_AT = layout.OFFSETS["partition_leader_epoch"]
_COUNT = struct.Struct(">i")
_COUNT_AT = layout.OFFSETS["records_count"]
_DELTA = struct.Struct(">i")
_DELTA_AT = layout.OFFSETS["last_offset_delta"]


@dataclass
class SegmentScan:
    """What a validation pass learned about one .log, from ``start_position`` on."""

    path: str
    base_offset: int
    start_position: int
    file_size: int
    #: Bytes from 0 that are whole, valid batches (where the log may be cut).
    valid_bytes: int
    #: Offset after the last valid batch (the base offset when there is none).
    next_offset: int
    batches: int = 0
    records: int = 0
    #: Largest timestamp seen and the last offset of the batch that first reached it.
    max_timestamp: int = NO_TIMESTAMP
    offset_of_max_timestamp: int = -1
    #: max_timestamp of the batch at position 0 (Kafka rolls by time on it); None if not seen.
    first_batch_max_timestamp: int | None = None
    last_epoch: int = -1
    #: Index entries the scanned batches get under IndexRule, in order.
    offset_entries: list[tuple[int, int]] = field(default_factory=list)
    time_entries: list[tuple[int, int]] = field(default_factory=list)
    rule: IndexRule | None = None
    #: Why the valid prefix ends before the file does, and where; None when all is valid.
    problem: str | None = None
    problem_position: int | None = None


@dataclass(frozen=True)
class SegmentRecovery:
    """Outcome of :func:`recover_segment` for one segment."""

    path: str
    base_offset: int
    sealed: bool
    file_size: int
    valid_bytes: int
    next_offset: int
    #: Bytes cut from the end (0 for a sealed segment: it is never cut).
    bytes_dropped: int
    #: Batches (whole or torn) from the first bad byte on; a torn header counts as one.
    batches_dropped: int
    #: Records counted from the dropped batches' headers. Best effort: the bytes are bad by
    #: definition, so a header is only believed when records_count and last_offset_delta agree.
    records_dropped: int
    reason: str | None
    position: int | None
    #: Set for a sealed segment with bad bytes: what reads of it will raise.
    error: errors.CorruptSegmentError | None
    scan: SegmentScan

    @property
    def truncated(self) -> bool:
        return self.bytes_dropped > 0


@contextlib.contextmanager
def mapped(path: str) -> Iterator[memoryview]:
    """A read-only view of the whole file, unmapped on exit (empty files give b"")."""
    fd = files.open_read(path)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            yield memoryview(b"")
            return
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    view = memoryview(mm)
    try:
        yield view
    finally:
        view.release()
        try:
            mm.close()
        except BufferError:
            # A caller kept a slice; the map is freed when that slice goes. Not our bug to hide
            # by force-closing (that would turn their slice into a crash).
            pass


def scan_log(buf, *, path: str, base_offset: int, interval_bytes: int, start_position: int = 0,
             end: int | None = None, first_last_offset: int | None = None,
             rule: IndexRule | None = None, time_index_last: int = NO_TIMESTAMP,
             epoch_max: int | None = None, offset_limit: int | None = None,
             window_bytes: int = SCAN_WINDOW_BYTES) -> SegmentScan:
    """Validate the batches of ``buf[start_position:end]`` (see the module doc for "valid").

    From position 0 the first batch must start at ``base_offset``. From a later position (the
    last index entry, when a cleanly closed segment is reopened) ``first_last_offset`` is the
    offset the index says the batch there ends at, and ``rule``/``time_index_last`` carry the
    index state so that any entries the tail is missing are produced (``offset_entries``...).
    """
    end = len(buf) if end is None else end
    assert 0 <= start_position <= end <= len(buf), (start_position, end, len(buf))
    scan = SegmentScan(path=path, base_offset=base_offset, start_position=start_position,
                       file_size=len(buf), valid_bytes=start_position, next_offset=base_offset,
                       rule=rule or IndexRule(interval_bytes))
    state = _WalkState(scan, first_last_offset, time_index_last, epoch_max, offset_limit)
    position = start_position
    # Bounded: each round advances by at least one batch or ends the scan.
    while position < end:
        window_end = min(end, position + window_bytes)
        result = records.scan_batches(buf[position:window_end], verify_crc=True, verify_records=True)
        for batch in result.batches:
            if not state.accept(buf, position, batch):
                return scan
        advanced = position + result.valid_bytes
        assert advanced == scan.valid_bytes
        if result.status == validation.STATUS["OK"]:
            position = advanced
            continue
        if result.status == validation.STATUS["TRUNCATED"] and window_end < end:
            length = validation.batch_length_at(buf, advanced)
            if length is not None and advanced + length + layout.LOG_OVERHEAD <= end \
                    and length >= layout.BATCH_LENGTH_MIN:
                # The window cut a batch in two; make the next window hold it whole.
                window_bytes = max(window_bytes, length + layout.LOG_OVERHEAD)
                if advanced > position:
                    position = advanced
                continue
        status = result.status
        scan.problem = validation.describe(buf[:end], advanced, status)
        scan.problem_position = advanced
        return scan
    return scan


class _WalkState:
    """Per-batch checks of scan_log for the fields the CRC does not cover."""

    def __init__(self, scan: SegmentScan, first_last_offset: int | None, time_index_last: int,
                 epoch_max: int | None, offset_limit: int | None):
        self.scan = scan
        self.expected_base: int | None = scan.base_offset if first_last_offset is None else None
        self.first_last_offset = first_last_offset
        self.time_last = time_index_last
        self.epoch_max = epoch_max
        self.epoch_min = -1
        self.offset_limit = offset_limit

    def accept(self, buf, window_start: int, batch: tuple) -> bool:
        relative_position, base, last, max_timestamp, count = batch
        scan = self.scan
        position = window_start + relative_position
        assert position == scan.valid_bytes
        problem = self._problem(buf, position, base, last, count)
        if problem is not None:
            scan.problem = problem
            scan.problem_position = position
            return False
        size = validation.batch_length_at(buf, position) + layout.LOG_OVERHEAD
        if position == 0:
            scan.first_batch_max_timestamp = max_timestamp
        rule = scan.rule
        assert rule is not None
        if rule.observe(size, last, max_timestamp):
            scan.offset_entries.append((last, position))
            if rule.max_timestamp > self.time_last:
                self.time_last = rule.max_timestamp
                scan.time_entries.append((rule.max_timestamp, rule.offset_of_max_timestamp))
        if max_timestamp > scan.max_timestamp:
            scan.max_timestamp = max_timestamp
            scan.offset_of_max_timestamp = last
        scan.batches += 1
        scan.records += count
        scan.valid_bytes = position + size
        scan.next_offset = last + 1
        self.expected_base = last + 1
        return True

    def _problem(self, buf, position: int, base: int, last: int, count: int) -> str | None:
        scan = self.scan
        if self.expected_base is not None and base != self.expected_base:
            return (f"batch at position {position} has base_offset {base}, expected "
                    f"{self.expected_base} (offsets must continue without a gap)")
        if self.first_last_offset is not None:
            expected, self.first_last_offset = self.first_last_offset, None
            if last != expected:
                return (f"batch at position {position} ends at offset {last} but the offset "
                        f"index says {expected}")
        # 0: an empty batch over offsets no record holds (Kafka's compaction leaves them; the
        # partition writes one over offsets a producer reserved and never committed).
        if not 0 <= count <= BATCH_RECORDS_MAX:
            return f"batch at position {position} has records_count {count}"
        if last - scan.base_offset > INT32_MAX:
            return (f"batch at position {position} ends at offset {last}, beyond the int32 "
                    f"range of segment {scan.base_offset}")
        if self.offset_limit is not None and last >= self.offset_limit:
            return (f"batch at position {position} ends at offset {last}, at or beyond the next "
                    f"segment's base offset {self.offset_limit}")
        epoch = _EPOCH.unpack_from(buf, position + _EPOCH_AT)[0]
        if epoch < self.epoch_min or (self.epoch_max is not None and epoch > self.epoch_max):
            return (f"batch at position {position} has partition_leader_epoch {epoch}, outside "
                    f"[{self.epoch_min}, {self.epoch_max}] (epochs never decrease and never "
                    f"exceed the current leader's)")
        self.epoch_min = epoch
        scan.last_epoch = epoch
        return None


def count_dropped(buf, position: int) -> tuple[int, int]:
    """(batches, records) that start at or after ``position`` going by their headers.

    A header is only believed when records_count and last_offset_delta agree; the walk stops at
    the first length that cannot be right (the rest is one torn batch).
    """
    batches = records_total = 0
    end = len(buf)
    # Bounded: every step advances by at least BATCH_LENGTH_MIN + LOG_OVERHEAD bytes.
    while position < end:
        batches += 1
        length = validation.batch_length_at(buf, position)
        if length is None or length < layout.BATCH_LENGTH_MIN:
            break
        if end - position >= layout.HEADER_SIZE:
            count = _COUNT.unpack_from(buf, position + _COUNT_AT)[0]
            delta = _DELTA.unpack_from(buf, position + _DELTA_AT)[0]
            if (1 <= count <= BATCH_RECORDS_MAX and delta == count - 1) or \
                    (count == 0 and delta >= 0):
                records_total += count
        position += length + layout.LOG_OVERHEAD
    return batches, records_total


def scan_segment_file(log_path: str, base_offset: int, config: LogConfig, *,
                      epoch_max: int | None = None, offset_limit: int | None = None
                      ) -> tuple[SegmentScan, int, int]:
    """Scan a whole .log; returns (scan, batches dropped, records dropped after the valid part)."""
    with mapped(log_path) as view:
        scan = scan_log(view, path=log_path, base_offset=base_offset,
                        interval_bytes=config.index_interval_bytes, epoch_max=epoch_max,
                        offset_limit=offset_limit)
        dropped = count_dropped(view, scan.valid_bytes) if scan.problem else (0, 0)
    return scan, dropped[0], dropped[1]


def write_indexes(log_path: str, base_offset: int, scan: SegmentScan, *, sealed: bool,
                  sync_dir: bool = True) -> None:
    """Replace the segment's .index and .timeindex with the entries ``scan`` computed.

    Written to temporary files, fsynced, renamed over the old ones, then the directory fsynced:
    a crash in between leaves either the old index (checked again on the next open) or the new.
    A sealed segment also gets the final time entry Kafka writes on roll, so that the last
    time entry is the segment's largest timestamp.
    """
    assert log_path.endswith(files.LOG_SUFFIX)
    stem = log_path[: -len(files.LOG_SUFFIX)]
    time_entries = list(scan.time_entries)
    if sealed and scan.max_timestamp > (time_entries[-1][0] if time_entries else NO_TIMESTAMP):
        time_entries.append((scan.max_timestamp, scan.offset_of_max_timestamp))
    for suffix, data in ((files.INDEX_SUFFIX, OffsetIndex.encode(base_offset, scan.offset_entries)),
                         (files.TIMEINDEX_SUFFIX, TimeIndex.encode(base_offset, time_entries))):
        files.write_atomic(stem + suffix, data, sync_dir=False)
    if sync_dir:
        files.fsync_dir(os.path.dirname(os.path.abspath(log_path)))


def recover_segment(log_path: str, base_offset: int, config: LogConfig, *, sealed: bool,
                    epoch_max: int | None = None, offset_limit: int | None = None,
                    sync: bool = True) -> SegmentRecovery:
    """Validate one segment; cut a bad tail if it is the active one; rebuild its indexes.

    ``sync``: fsync the .log afterwards, so that the validated bytes (which after a process
    crash may exist only in the page cache) are durable before the recovery point moves past
    them.
    """
    scan, batches_dropped, records_dropped = scan_segment_file(
        log_path, base_offset, config, epoch_max=epoch_max, offset_limit=offset_limit)
    error = None
    bytes_dropped = 0
    if scan.problem is not None:
        if sealed:
            error = errors.CorruptSegmentError(
                f"corrupt sealed segment {log_path} at position {scan.problem_position}: "
                f"{scan.problem}", path=log_path, position=scan.problem_position)
        else:
            bytes_dropped = scan.file_size - scan.valid_bytes
            os.truncate(log_path, scan.valid_bytes)
    elif sealed and offset_limit is not None and scan.next_offset < offset_limit:
        # A roll starts the next segment at this one's log end, so a sealed segment that ends
        # early lost its tail: a power loss before the roll's background fsync ran (flusher.py)
        # can cut it exactly at a batch boundary. The missing offsets are fenced, not skipped.
        error = errors.CorruptSegmentError(
            f"sealed segment {log_path} ends at offset {scan.next_offset} (position "
            f"{scan.valid_bytes}) but the next segment starts at {offset_limit}: its tail is "
            f"missing", path=log_path, position=scan.valid_bytes)
    if sync:
        files.fsync_file(log_path)
    write_indexes(log_path, base_offset, scan, sealed=sealed)
    return SegmentRecovery(
        path=log_path, base_offset=base_offset, sealed=sealed, file_size=scan.file_size,
        valid_bytes=scan.valid_bytes, next_offset=scan.next_offset, bytes_dropped=bytes_dropped,
        batches_dropped=batches_dropped, records_dropped=records_dropped, reason=scan.problem,
        position=scan.problem_position, error=error, scan=scan)


def remove_leftovers(directory: str) -> list[str]:
    """Delete temporary files and index files whose .log is gone; returns what was removed.

    Both are what a crash in the middle of an atomic write or of a segment deletion leaves
    behind. Index files are derived data, so removing them can lose nothing.
    """
    present = files.list_segment_files(directory)
    doomed = [os.path.join(directory, name) for name in os.listdir(directory)
              if name.endswith(files.TMP_SUFFIX)]
    for base_offset, suffixes in present.items():
        if files.LOG_SUFFIX not in suffixes:
            doomed.extend(files.segment_path(directory, base_offset, s) for s in sorted(suffixes))
    return files.remove_files(doomed)


@dataclass(frozen=True)
class RecoveryReport:
    """What opening a log found and did. ``log.recovery_report``.

    The top-level counts and ``reason``/``position``/``path`` describe bytes cut from the active
    segment's tail (the only place recovery ever cuts); ``corrupt_segments`` lists sealed
    segments with bad bytes (kept, never served past the bad position).
    """

    directory: str
    clean_shutdown: bool
    recovery_point: int
    segments_checked: tuple[SegmentRecovery, ...] = ()
    indexes_rebuilt: tuple[tuple[str, str], ...] = ()
    corrupt_segments: tuple[errors.CorruptSegmentError, ...] = ()
    files_removed: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def bytes_dropped(self) -> int:
        return sum(s.bytes_dropped for s in self.segments_checked)

    @property
    def records_dropped(self) -> int:
        return sum(s.records_dropped for s in self.segments_checked if s.truncated)

    @property
    def batches_dropped(self) -> int:
        return sum(s.batches_dropped for s in self.segments_checked if s.truncated)

    @property
    def truncated(self) -> SegmentRecovery | None:
        return next((s for s in self.segments_checked if s.truncated), None)

    @property
    def reason(self) -> str | None:
        cut = self.truncated
        return cut.reason if cut else None

    @property
    def position(self) -> int | None:
        cut = self.truncated
        return cut.position if cut else None

    @property
    def path(self) -> str | None:
        cut = self.truncated
        return cut.path if cut else None

    def summary(self) -> str:
        """One line for the broker's log."""
        head = "clean shutdown" if self.clean_shutdown else f"unclean shutdown, recovered from offset {self.recovery_point}"
        parts = [head, f"{len(self.segments_checked)} segment(s) validated"]
        if self.truncated:
            parts.append(f"dropped {self.bytes_dropped} bytes / {self.batches_dropped} batch(es) / "
                         f"{self.records_dropped} record(s) at {self.path}:{self.position} ({self.reason})")
        if self.indexes_rebuilt:
            parts.append(f"{len(self.indexes_rebuilt)} index rebuild(s)")
        for error in self.corrupt_segments:
            parts.append(str(error))
        return "; ".join(parts)
