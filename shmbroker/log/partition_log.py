"""A partition's log: its segments, offsets, roll, retention, flush policy and recovery on open.

Kafka's layering, one module per layer::

    PartitionLog (this module)   offsets, roll, retention, flush policy, checkpoint, loader
      └─ LogSegment (segment.py) one .log + indexes: append (writev), read (mmap), truncate
           ├─ OffsetIndex / TimeIndex (index.py)   sparse, append-only, rebuilt when in doubt
           └─ recovery.py                            validate, cut a torn tail, rebuild indexes
    files.py                     names, modes, fsync of files and directories

Files of a partition directory besides the segments (both small text files, replaced
atomically, each starting with a magic word and a version)::

    recovery-point-offset-checkpoint   "shmbroker-recovery-point 1" / "recovery_point N" /
                                       "leader_epoch E": every byte below offset N was fsynced
    .clean-shutdown                    "shmbroker-clean-shutdown 1" / "log_end_offset N" /
                                       "active_segment B" / "active_size S": written by close(),
                                       deleted by open(); its presence means nothing is unflushed

On open, after an unclean stop (no valid marker), every segment that may hold offsets at or
above the recovery point is validated batch by batch (recovery.py); after a clean one only the
tail of the active segment after its last index entry is (to learn the next offset).

Owned by one writer process; not thread-safe. Readers in the same process use :meth:`read`;
other processes map the segment files read-only. The one other thread is the log's
SegmentFlusher (flusher.py), which fsyncs rolled segments through its own descriptors and
touches nothing of this object: the owner picks its results up (:meth:`collect_flushes`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, NamedTuple

from .. import errors, records
from ..config import BATCH_RECORDS_MAX, ROLL_FLUSH_CLOSE_WAIT_MS_MAX, LogConfig
from ..layout import record_batch as layout
from ..native import _native
from . import files, recovery
from .flusher import FlushJob, SegmentFlusher
from ..records import validation
from .recovery import RecoveryReport, SegmentRecovery
from .segment import LogSegment, LogSlice, PlannedBatch, plan_batches, segment_for

CHECKPOINT_FILE = "recovery-point-offset-checkpoint"
CLEAN_SHUTDOWN_FILE = ".clean-shutdown"
_CHECKPOINT_MAGIC = "shmbroker-recovery-point 1"
_CLEAN_MAGIC = "shmbroker-clean-shutdown 1"
#: Small text files are read whole; anything bigger is not ours.
_META_FILE_BYTES_MAX = 4096

ClockMs = Callable[[], int]


#: Default clock: wall time in ms (``time.time_ns() // 1_000_000``), because segment.ms and
#: retention.ms compare it with record timestamps, which producers take from their wall clocks
#: (Kafka does the same). In C: the partition loop reads it every round, and a Python
#: function costs a frame (~1,400 instructions) each time.
wall_clock_ms: ClockMs = _native.wall_clock_ms


class NativeAppendState(NamedTuple):
    """What the C drain round (``_native.drain_round``, native/include/shmb/drain.h) needs to
    append at the log end by itself, in the order its glue parses. Built by
    :meth:`PartitionLog.native_append_state` and handed back to
    :meth:`PartitionLog.record_native_append`, which checks nothing moved meanwhile."""

    fd: int
    log_end_offset: int
    log_start_offset: int
    segment_base_offset: int
    segment_size: int
    leader_epoch: int
    batch_bytes_max: int
    batch_records_max: int
    segment_bytes: int
    segment_ms: int
    offset_entries_left: int
    time_entries_left: int
    first_batch_max_timestamp: int  # -1: none (time_waited_for_roll uses the wall clock)
    created_ms: int
    last_offset_max: int
    index_interval_bytes: int
    bytes_since_entry: int
    max_timestamp: int
    offset_of_max_timestamp: int
    # The fields read afresh every round come last: the others are kept between rounds
    # (PartitionLog._native_next) and these three appended to them.
    now_ms: int
    flush_due: bool                 # flush.ms would fsync after this append
    flush_records_left: int         # flush.messages fsyncs at this many more records; -1: never


#: The fields of a NativeAppendState that do not depend on the clock or the flush policy.
_NATIVE_KEPT_FIELDS = len(NativeAppendState._fields) - 3
_new_native_state = tuple.__new__  # (NativeAppendState, fields): no Python __new__ frame


@dataclass(frozen=True)
class AppendInfo:
    """What :meth:`PartitionLog.append` did.

    ``position`` is the file position of the first batch in the segment whose base offset is
    ``segment_base_offset``; an append that rolled wrote its later batches to newer segments.
    """

    base_offset: int
    last_offset: int
    max_timestamp: int
    offset_of_max_timestamp: int
    records_count: int
    batches_count: int
    size_bytes: int
    position: int
    segment_base_offset: int
    rolled: int
    flushed: bool


class PartitionLog:
    """The log of one partition (see module doc). Build with :meth:`open`.

    Owned by one writer process; not thread-safe.
    """

    def __init__(self, directory: str, config: LogConfig, clock: ClockMs, leader_epoch: int,
                 flusher: SegmentFlusher | None = None):
        self.directory = directory
        self.config = config
        self.clock = clock
        self.leader_epoch = leader_epoch
        self._segments: list[LogSegment] = []
        self._bases: list[int] = []
        self._recovery_point = 0
        #: The recovery point last written to the checkpoint file.
        self._checkpointed = -1
        #: Fsyncs of rolled segments, in the background (flusher.py).
        self._flusher = flusher if flusher is not None else SegmentFlusher()
        #: A rolled segment's fsync was handed to the flusher and its result not yet picked
        #: up by collect_flushes (a plain attribute: the owner's loop reads it every pass).
        self.roll_flushes_pending = False
        self._unflushed_records = 0
        self._last_flush_ms = clock()
        #: fsyncs by flush() (the flush policy, acks=all, close); for the counters region.
        self.flushes = 0
        self._sealed_key: tuple[int, int] | None = None
        self._sealed_bytes = 0
        self._closed = False
        self.recovery_report: RecoveryReport | None = None
        #: Whether the flush policy can ever fsync (flush.messages or flush.ms set).
        self._flush_policy = config.flush_messages is not None or config.flush_ms is not None
        #: The C round's next state but its last three fields, as record_native_append left
        #: the log; with the segment, segment size, log end and log start it was computed for
        #: (checked on use). None: build it afresh (see native_append_state).
        self._native_next: tuple | None = None

    # -- open / load ------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str, config: LogConfig = LogConfig(), clock: ClockMs | None = None,
             leader_epoch: int = 0, flusher: SegmentFlusher | None = None) -> "PartitionLog":
        """Open (creating if needed) the log in ``directory`` and recover it if it was not
        closed cleanly. ``leader_epoch`` is stamped on every appended batch; it must not be
        below an epoch already in the log (LogError), since recovery treats a batch from a
        later epoch than the current one as corrupt. ``flusher``: the background fsync of
        rolled segments (default: a SegmentFlusher of its own; the partition owner passes one
        that wakes its loop)."""
        if not isinstance(leader_epoch, int) or not 0 <= leader_epoch <= 0x7FFFFFFF:
            raise errors.ConfigError(f"leader_epoch={leader_epoch!r} must be an int in [0, 2**31)")
        log = cls(os.path.abspath(directory), config, clock or wall_clock_ms, leader_epoch,
                  flusher)
        try:
            log._load()
        except BaseException:
            log._close_segments()
            raise
        return log

    def _load(self) -> None:
        directory = self.directory
        files.make_dir(directory)
        removed = recovery.remove_leftovers(directory)
        checkpoint = _read_checkpoint(os.path.join(directory, CHECKPOINT_FILE))
        clean = _read_clean_marker(os.path.join(directory, CLEAN_SHUTDOWN_FILE))
        notes: list[str] = []
        if checkpoint is not None and checkpoint[1] > self.leader_epoch:
            raise errors.LogError(
                f"{directory}: leader_epoch {self.leader_epoch} is below epoch {checkpoint[1]} "
                f"already recorded in {CHECKPOINT_FILE}")
        bases = sorted(b for b, s in files.list_segment_files(directory).items() if files.LOG_SUFFIX in s)
        if not bases:
            start = checkpoint[0] if checkpoint is not None else 0
            segment = LogSegment.create(directory, start, self.config, self.clock())
            self._segments, self._bases = [segment], [start]
            self._recovery_point = start
            self._write_checkpoint()
            self.recovery_report = RecoveryReport(directory, True, start, files_removed=tuple(removed))
            return
        if clean is not None and (clean[1] != bases[-1] or clean[2] != files.file_size(
                files.segment_path(directory, bases[-1], files.LOG_SUFFIX))):
            notes.append(f"clean-shutdown marker does not match the active segment {clean}; "
                         f"treating the stop as unclean")
            clean = None
        recovery_point = checkpoint[0] if checkpoint is not None else bases[0]
        if clean is None and checkpoint is None:
            notes.append(f"no valid {CHECKPOINT_FILE}; validating every segment")
        checked, rebuilt = self._load_segments(bases, clean is not None, recovery_point, notes)
        # From here on, a crash must be seen as unclean: remove the marker before any append.
        files.remove_files([os.path.join(directory, CLEAN_SHUTDOWN_FILE)])
        if checked:
            # Recovered segments were fsynced by recover_segment: everything is durable now.
            self._recovery_point = self.log_end_offset
            self._write_checkpoint()
        else:
            self._recovery_point = min(max(recovery_point, self.log_start_offset), self.log_end_offset)
        self.recovery_report = RecoveryReport(
            directory=directory, clean_shutdown=clean is not None, recovery_point=recovery_point,
            segments_checked=tuple(checked), indexes_rebuilt=tuple(rebuilt),
            corrupt_segments=tuple(s.corruption for s in self._segments if s.corruption is not None),
            files_removed=tuple(removed), notes=tuple(notes))

    def _load_segments(self, bases: list[int], clean: bool, recovery_point: int,
                       notes: list[str]) -> tuple[list[SegmentRecovery], list[tuple[str, str]]]:
        checked: list[SegmentRecovery] = []
        rebuilt: list[tuple[str, str]] = []
        now = self.clock()
        for i, base in enumerate(bases):
            next_base = bases[i + 1] if i + 1 < len(bases) else None
            log_path = files.segment_path(self.directory, base, files.LOG_SUFFIX)
            # A segment may hold unflushed bytes if any of its offsets is >= the recovery point.
            unflushed = next_base is None or next_base > recovery_point
            segment: LogSegment | str | None = None
            if clean or not unflushed:
                if next_base is not None:
                    segment = LogSegment.open_sealed(self.directory, base, self.config, now, next_base)
                else:
                    segment = LogSegment.open_active(self.directory, base, self.config, now,
                                                     self.leader_epoch)
                if isinstance(segment, str):
                    rebuilt.append((files.segment_path(self.directory, base, files.INDEX_SUFFIX), segment))
                    notes.append(f"active segment failed its check ({segment}); validating it")
                    segment = None
            if segment is None:
                result = recovery.recover_segment(
                    log_path, base, self.config, sealed=next_base is not None,
                    epoch_max=self.leader_epoch, offset_limit=next_base)
                checked.append(result)
                segment = LogSegment.open_recovered(result, self.directory, self.config, now, next_base)
            if segment.index_rebuild_reason:
                rebuilt.append((segment.index_path, segment.index_rebuild_reason))
            self._segments.append(segment)
            self._bases.append(base)
        return checked, rebuilt

    # -- properties -------------------------------------------------------------------------------

    @property
    def segments(self) -> tuple[LogSegment, ...]:
        return tuple(self._segments)

    @property
    def active_segment(self) -> LogSegment:
        return self._segments[-1]

    @property
    def log_start_offset(self) -> int:
        return self._bases[0]

    @property
    def log_end_offset(self) -> int:
        """The offset the next appended record gets."""
        return self._segments[-1].next_offset

    @property
    def high_watermark(self) -> int:
        """Equal to the log end offset: one replica, so every appended record is committed."""
        return self.log_end_offset

    @property
    def last_flush_ms(self) -> int | None:
        """The log's clock at the last flush() of this object; None: none yet."""
        return self._last_flush_ms if self.flushes else None

    @property
    def recovery_point(self) -> int:
        """Offsets below this are known fsynced."""
        return self._recovery_point

    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def disk_usage(self) -> tuple[int, int]:
        """(segments, bytes of their .log files), cheap enough for every drain round: the
        sealed segments' bytes are summed again only when the list of segments changed."""
        segments = self._segments
        key = (len(segments), self._bases[0])
        if key != self._sealed_key:
            self._sealed_key = key
            self._sealed_bytes = sum(s.size for s in segments[:-1])
        return len(segments), self._sealed_bytes + segments[-1].size

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise errors.LogClosedError(f"log {self.directory} is closed")

    # -- append -----------------------------------------------------------------------------------

    def append(self, data, gap: bool = False) -> AppendInfo:
        """Validate the batches in ``data``, give them offsets, write them; all or nothing.

        ``data`` is one or more RecordBatch v2 batches back to back (any buffer; its base
        offsets are ignored). Every batch is checked before anything is written: CRC, magic,
        lengths, record structure, size against ``batch_bytes_max`` (RecordTooLargeError),
        compression (UnsupportedCompressionError), record count, no control batches. Bad bytes
        raise the typed error from shmbroker.errors naming the problem and its position, and
        leave the log unchanged.

        ``gap``: ``data`` is the partition process's own empty batch (records.empty_batch)
        over offsets that no producer will commit (decision 0005); a batch of no records is
        refused otherwise.
        """
        self._check_open()
        self._native_next = None
        view = _byte_view(data)
        planned = self._validate(view, gap)
        now = self.clock()
        position, segment, rolled = self._write(view, planned, now)
        records_count = sum(b.records_count for b in planned)
        self._unflushed_records += records_count
        flushed = self._maybe_flush(now)
        if self.roll_flushes_pending and self._flusher.done_offset > self._checkpointed:
            # A rolled segment became durable: the checkpoint follows here too, for owners
            # without a loop that calls collect_flushes (the coordinator's offset store).
            self.collect_flushes()
        max_batch = max(planned, key=lambda b: b.max_timestamp)  # the first one reaching it
        assert self.log_end_offset == planned[-1].last_offset + 1
        return AppendInfo(
            base_offset=planned[0].base_offset, last_offset=planned[-1].last_offset,
            max_timestamp=max_batch.max_timestamp, offset_of_max_timestamp=max_batch.last_offset,
            records_count=records_count, batches_count=len(planned), size_bytes=len(view),
            position=position, segment_base_offset=segment.base_offset, rolled=rolled,
            flushed=flushed)

    # -- append by the C drain round ---------------------------------------------------------

    @property
    def sleep_round_ok(self) -> bool:
        """Whether a NativeAppendState made before a sleep holds after it once the C round
        reads the clock itself (``_native.drain_sleep_round``): the clock is the wall clock
        (not a test's) and no flush policy (whose flush_due depends on the time) is set."""
        return self.clock is wall_clock_ms and not self._flush_policy and not self._closed

    def native_append_state(self) -> NativeAppendState | None:
        """The state and limits the C drain round appends with (see NativeAppendState); None
        when the log cannot take such an append now (closed; active segment unusable).

        The C round appends only what :meth:`append` would write in one go to the active
        segment: it declines (and the caller runs :meth:`append`) when a roll, a flush or a
        bad batch would be involved. It reads the clock once, as append does.

        Between C rounds nothing but the clock and the flush fields changes unless something
        else appended, rolled, deleted or closed: record_native_append keeps the rest
        (``_native_next``), and it is used only while the active segment, its size, the log
        end and the log start are still the ones it was computed for (append, delete and
        close also drop it)."""
        if self._closed:
            return None
        now = self.clock()
        config = self.config
        if self._flush_policy:
            flush_due = config.flush_ms is not None and \
                now - self._last_flush_ms >= config.flush_ms
            flush_left = -1 if config.flush_messages is None else \
                max(0, config.flush_messages - self._unflushed_records)
        else:
            flush_due, flush_left = False, -1
        kept = self._native_next
        if kept is not None:
            segment, size, log_end, log_start, fields = kept
            active = self._segments[-1]
            # (The active segment is closed only by a failed write, which drops the kept
            # state: append and native_append_failed, or by close().)
            if segment is active and active.size == size and active.next_offset == log_end \
                    and self._bases[0] == log_start:
                return _new_native_state(NativeAppendState, fields + (now, flush_due, flush_left))
            self._native_next = None
        active = self._segments[-1]
        seg = active.native_state()
        if seg is None:
            return None
        (fd, size, offset_left, time_left, first_ts, created_ms, interval, since, max_ts,
         max_off) = seg
        return NativeAppendState(
            fd, self.log_end_offset, self.log_start_offset, active.base_offset, size,
            self.leader_epoch, config.batch_bytes_max, BATCH_RECORDS_MAX, config.segment_bytes,
            config.segment_ms, offset_left, time_left, first_ts, created_ms,
            files.OFFSET_MAX - 1, interval, since, max_ts, max_off, now, flush_due, flush_left)

    def record_native_append(self, state: NativeAppendState, appended: tuple) -> None:
        """The C drain round appended at ``state``'s position; ``appended`` is its result
        (frames, records, batches, bytes, log_end_offset, segment_size,
        first_batch_max_timestamp, bytes_since_entry, max_timestamp, offset_of_max_timestamp,
        offset_entries, time_entries). Leaves this object as :meth:`append` would have."""
        (_, records_count, _, _, log_end, size, first_ts, since, max_ts, max_off,
         offset_entries, time_entries) = appended
        active = self._segments[-1]
        assert active.base_offset == state.segment_base_offset and \
            active.next_offset == state.log_end_offset, (self, state)
        active.record_native_append(state.segment_size, size, log_end, first_ts,
                                    (since, max_ts, max_off), offset_entries, time_entries)
        self._unflushed_records += records_count
        if self._flush_policy:
            # The round declined if the flush policy was due (flush_due, flush_records_left),
            # so this never flushes; it is here so that the policy holds even if that were
            # wrong.
            flushed = self._maybe_flush(state.now_ms)
            assert not flushed, "the C round appended although the flush policy was due"
        if offset_entries or time_entries:
            # Entries left and (for a time entry) what the index kept: built afresh.
            self._native_next = None
            return
        # The next round's state, as native_append_state would build it: only the log end,
        # the segment's size, its first batch's timestamp and the IndexRule moved.
        self._native_next = (active, size, log_end, state.log_start_offset, (
            state.fd, log_end, state.log_start_offset, state.segment_base_offset, size,
            state.leader_epoch, state.batch_bytes_max, state.batch_records_max,
            state.segment_bytes, state.segment_ms, state.offset_entries_left,
            state.time_entries_left, state.first_batch_max_timestamp if first_ts is None
            else first_ts, state.created_ms, state.last_offset_max, state.index_interval_bytes,
            since, max_ts, max_off))

    def native_append_failed(self, state: NativeAppendState, errno_: int, truncated: bool
                             ) -> None:
        """The C drain round's write failed: raise what :meth:`append` raises (LogError)."""
        self._native_next = None
        self.active_segment.native_write_failed(state.segment_size, truncated)
        raise errors.LogError(f"write to {self.active_segment.path} failed: "
                              f"{os.strerror(errno_)}")

    def validate(self, data) -> int:
        """Check ``data`` exactly as :meth:`append` would, without writing anything; returns
        its record count. Raises the typed error append would raise. (The partition process
        uses it to find the one bad frame of a drain round whose combined append failed.)"""
        self._check_open()
        return sum(b.records_count for b in self._validate(_byte_view(data)))

    def _write(self, view: memoryview, planned: list[PlannedBatch], now: int
               ) -> tuple[int, LogSegment, int]:
        """Write ``planned`` into the active segment, rolling first (and in between) as needed.

        Returns (position of the first batch, its segment, number of rolls). Batches going to
        the same segment are written with one writev call.
        """
        active = self.active_segment
        rolled = 0
        incoming_max_timestamp = max(b.max_timestamp for b in planned)
        if active.size > 0 and \
                active.time_waited_for_roll(now, incoming_max_timestamp) > self.config.segment_ms:
            active = self._roll(now)
            rolled += 1
        first: tuple[int, LogSegment] | None = None
        group: list[PlannedBatch] = []
        group_bytes = 0
        for batch in planned:
            if group and not self._fits(active, group, group_bytes, batch):
                position = active.append(view, group, self.leader_epoch)
                first = first or (position, active)
                group, group_bytes = [], 0
            if not group and not active.room_for(batch):
                active = self._roll(now)
                rolled += 1
            group.append(batch)
            group_bytes += batch.size
        position = active.append(view, group, self.leader_epoch)
        first = first or (position, active)
        assert active is self.active_segment and not active.sealed
        return first[0], first[1], rolled

    def _fits(self, active: LogSegment, group: list[PlannedBatch], group_bytes: int,
              batch: PlannedBatch) -> bool:
        """Whether ``batch`` can join the batches already grouped for ``active``."""
        if active.size + group_bytes + batch.size > self.config.segment_bytes:
            return False
        if batch.last_offset - active.base_offset > 0x7FFFFFFF:
            return False
        # Conservative: one index entry per batch at most, one time slot kept for the roll.
        return (active.offset_index.entries_left >= len(group) + 1
                and active.time_index.entries_left >= len(group) + 2)

    def _validate(self, view: memoryview, gap: bool = False) -> list[PlannedBatch]:
        if len(view) == 0:
            raise errors.CorruptRecordError("append: no batch (empty buffer)", 0)
        limit = self.config.batch_bytes_max
        scan = records.scan_batches(view, verify_crc=True, verify_records=True, batch_bytes_max=limit)
        if scan.status != validation.STATUS["OK"]:
            raise validation.error_for(view, scan.error_position, scan.status, limit, "append")
        assert scan.valid_bytes == len(view) and scan.batches
        for batch in scan.batches:
            position, _, _, _, count = batch
            header = records.read_header(view, position)
            if not (gap and count == 0) and not 1 <= count <= BATCH_RECORDS_MAX:
                raise errors.InvalidRecordError(
                    f"append: batch at position {position} has records_count {count}, outside "
                    f"[1, {BATCH_RECORDS_MAX}]", position)
            if header.attributes & layout.CONTROL_MASK:
                raise errors.InvalidRecordError(
                    f"append: batch at position {position} is a control batch; producers may "
                    f"not write those", position)
        next_offset = self.log_end_offset
        planned = plan_batches(scan.batches, len(view), next_offset)
        if planned[-1].last_offset > files.OFFSET_MAX - 1:
            raise errors.InvalidOffsetError(
                f"append: offsets would pass {files.OFFSET_MAX} (log end {next_offset})")
        return planned

    def _roll(self, now: int) -> LogSegment:
        """Seal the active segment and start a new one at the log end offset.

        The old segment (data, final time entry, indexes) is fsynced in the background, as
        Kafka schedules ``flushUptoOffsetExclusive(newSegment.baseOffset)``: its files go to
        the SegmentFlusher as duplicated descriptors and the append goes on at once (an fsync
        of a full 1 GiB segment stalled every ring for ~390 ms). *Ordering guarantee:* the
        recovery point, and the checkpoint that records it, move past the old segment only
        after that fsync completed (:meth:`collect_flushes`, or :meth:`flush` and
        :meth:`close`, which wait for it), so the checkpoint never calls a segment durable
        before it is, and a crash before then makes the next open validate it. The new files
        are made durable by a directory fsync here, synchronously (it is cheap).
        """
        old = self.active_segment
        assert old.size > 0, "never roll an empty segment"
        self._flusher.raise_if_failed()  # before sealing: a failed disk leaves the log as it is
        handed = old.seal(sync=False)
        base = old.next_offset
        # From here the descriptors belong to the flusher (submit closes them if it raises).
        self._flusher.submit(FlushJob(base, tuple(fd for fd, _ in handed),
                                      tuple(path for _, path in handed)))
        self.roll_flushes_pending = True
        new = LogSegment.create(self.directory, base, self.config, now, sync_dir=False)
        self._segments.append(new)
        self._bases.append(base)
        files.fsync_dir(self.directory)
        return new

    # -- flush ------------------------------------------------------------------------------------

    def _maybe_flush(self, now: int) -> bool:
        config = self.config
        due = (config.flush_messages is not None and self._unflushed_records >= config.flush_messages) \
            or (config.flush_ms is not None and self._unflushed_records > 0
                and now - self._last_flush_ms >= config.flush_ms)
        if due:
            self.flush()
        return due

    def maybe_flush(self) -> bool:
        """Apply the time part of the flush policy (call it from the owner's loop); True if flushed."""
        if self._closed:
            self._check_open()
        if not self._flush_policy:
            return False  # neither flush.messages nor flush.ms: nothing is ever due
        return self._maybe_flush(self.clock())

    def flush(self) -> None:
        """fsync the active segment's .log: every appended record is durable after this.

        Rolled segments whose background fsync is still pending are waited for first (and a
        failure of one raises LogError), so "durable" means everything up to the log end, for
        acks=all and the flush policy alike. The checkpoint is not rewritten here (that would
        add a rename and two fsyncs to every flush) unless a roll's fsync completed since it
        was last written (once per roll, as before); so after a crash recovery validates the
        active segment even if it was flushed.
        """
        self._check_open()
        if self.roll_flushes_pending:
            self._wait_for_roll_flushes(None)
        self.active_segment.flush()
        self._recovery_point = self.log_end_offset
        self._unflushed_records = 0
        self._last_flush_ms = self.clock()
        self.flushes += 1
        if self.roll_flushes_pending:
            self.collect_flushes()

    def collect_flushes(self) -> bool:
        """Pick up what the background fsyncs of rolled segments did (the owner's loop calls it
        when :attr:`roll_flushes_pending`, after the flusher's ``on_done`` woke it): move the
        recovery point to the end of the last segment fsynced and write the checkpoint.
        Returns True if the checkpoint was written. A failed fsync raises LogError here, as a
        synchronous one raised from the append that rolled."""
        self._check_open()
        flusher = self._flusher
        flusher.raise_if_failed()
        idle = flusher.pending == 0  # read before done_offset: no completion is missed
        done = flusher.done_offset
        wrote = False
        if done > self._recovery_point:
            self._recovery_point = done
        if self._recovery_point > self._checkpointed and done > self._checkpointed:
            self._write_checkpoint()
            wrote = True
        if idle:
            self.roll_flushes_pending = False
        return wrote

    def _wait_for_roll_flushes(self, timeout_ms: int | None) -> None:
        """Block until every rolled segment handed to the flusher is fsynced; LogError if one
        failed or ``timeout_ms`` passed first."""
        if not self._flusher.wait(None if timeout_ms is None else timeout_ms / 1000):
            raise errors.LogError(
                f"{self.directory}: background fsync of rolled segments not done after "
                f"{timeout_ms} ms")
        self._flusher.raise_if_failed()

    def _write_checkpoint(self, sync_dir: bool = True) -> None:
        text = f"{_CHECKPOINT_MAGIC}\nrecovery_point {self._recovery_point}\nleader_epoch {self.leader_epoch}\n"
        files.write_atomic(os.path.join(self.directory, CHECKPOINT_FILE), text.encode(), sync_dir=sync_dir)
        self._checkpointed = self._recovery_point

    # -- read -------------------------------------------------------------------------------------

    def read(self, offset: int, max_bytes: int = 1 << 20) -> LogSlice:
        """Whole batches from the one containing ``offset`` (see LogSlice and LogSegment.read).

        Empty slice at the log end; OffsetOutOfRangeError below the log start or past the end;
        CorruptSegmentError (naming file and position) when the batch at ``offset`` is corrupt.
        """
        self._check_open()
        if offset < self.log_start_offset or offset > self.log_end_offset:
            raise errors.OffsetOutOfRangeError(
                f"offset {offset} is outside [{self.log_start_offset}, {self.log_end_offset}] "
                f"of {self.directory}")
        if offset < self.log_end_offset:
            # Bounded by the number of segments; normally the first one tried has the offset.
            for segment in self._segments[segment_for(self._bases, offset):]:
                found = segment.read(offset, max_bytes, self.leader_epoch)
                if found is not None:
                    return found
        active = self.active_segment
        return LogSlice(data=memoryview(b""), path=active.path, file_position=active.size,
                        length=0, first_offset=self.log_end_offset, last_offset=self.log_end_offset - 1)

    def offset_for_timestamp(self, timestamp: int) -> int | None:
        """Kafka's ListOffsets by time: the first offset whose timestamp is >= ``timestamp``."""
        self._check_open()
        for segment in self._segments:
            if segment.max_timestamp >= timestamp:
                found = segment.find_offset_by_timestamp(timestamp)
                if found is not None:
                    return found
        return None

    # -- retention --------------------------------------------------------------------------------

    def delete_old_segments(self) -> list[int]:
        """Delete whole segments past ``retention_ms`` or beyond ``retention_bytes``; never the
        active one. Returns the base offsets deleted, oldest first.

        Time: a segment goes when ``clock() - largest timestamp > retention_ms`` (Kafka's rule),
        checked from the oldest and stopping at the first that stays, so the log start only
        moves forward over a contiguous prefix. Size: oldest segments go while the log stays at
        least ``retention_bytes`` without them. A reader holding a view of a deleted segment
        keeps reading it: the mapping outlives the unlink.
        """
        self._check_open()
        now = self.clock()
        doomed = 0
        sealed = self._segments[:-1]
        if self.config.retention_ms >= 0:
            while doomed < len(sealed) and now - sealed[doomed].largest_timestamp() > self.config.retention_ms:
                doomed += 1
        if self.config.retention_bytes >= 0:
            excess = self.size_bytes - self.config.retention_bytes - sum(s.size for s in sealed[:doomed])
            while doomed < len(sealed) and excess - sealed[doomed].size >= 0:
                excess -= sealed[doomed].size
                doomed += 1
        if doomed == 0:
            return []
        victims = self._segments[:doomed]
        # Forget them first: from here on no read can pick a segment being deleted.
        del self._segments[:doomed]
        del self._bases[:doomed]
        for segment in victims:
            segment.delete(sync_dir=False)
        files.fsync_dir(self.directory)
        self._recovery_point = max(self._recovery_point, self.log_start_offset)
        return [s.base_offset for s in victims]

    # -- close ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush everything, write the checkpoint and the clean-shutdown marker, release files.

        Waits (at most ROLL_FLUSH_CLOSE_WAIT_MS_MAX) for the background fsyncs of rolled
        segments first. If one failed or did not finish in time, the log is abandoned (files
        released, no checkpoint, no marker: the next open validates what may be unflushed)
        and LogError raised. Readers' views stay valid after close (their mappings live on).
        """
        if self._closed:
            return
        if self.roll_flushes_pending:
            try:
                self._wait_for_roll_flushes(ROLL_FLUSH_CLOSE_WAIT_MS_MAX)
            except errors.LogError:
                self.abandon()
                raise
            self.roll_flushes_pending = False
        active = self.active_segment
        if active.max_timestamp >= 0:
            # Kafka's final time entry, so a later open knows the max timestamp from the index.
            active.time_index.maybe_append(active.max_timestamp, active.offset_of_max_timestamp)
        active.flush(indexes=True)
        self._recovery_point = self.log_end_offset
        self._write_checkpoint(sync_dir=False)
        marker = (f"{_CLEAN_MAGIC}\nlog_end_offset {self.log_end_offset}\n"
                  f"active_segment {active.base_offset}\nactive_size {active.size}\n")
        files.write_atomic(os.path.join(self.directory, CLEAN_SHUTDOWN_FILE), marker.encode())
        self._close_segments()
        self._closed = True

    def abandon(self) -> None:
        """Release the files without flushing, checkpointing or marking a clean shutdown.

        The state a kill -9 leaves on disk (minus what the page cache would still have written);
        used by crash tests and by an owner that found the log unusable.
        """
        if not self._closed:
            self._close_segments()
            self._closed = True

    def _close_segments(self) -> None:
        for segment in self._segments:
            segment.close()

    def __enter__(self) -> "PartitionLog":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"PartitionLog({self.directory!r}, start={self.log_start_offset}, "
                f"end={self.log_end_offset}, segments={len(self._segments)})")


def _byte_view(data) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B") if view.c_contiguous else memoryview(bytes(view))
    elif view.format != "B":
        view = view.cast("B")
    return view


def _read_small(path: str) -> list[str] | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(_META_FILE_BYTES_MAX + 1)
    except FileNotFoundError:
        return None
    if len(raw) > _META_FILE_BYTES_MAX:
        return None
    try:
        return raw.decode("ascii").splitlines()
    except UnicodeDecodeError:
        return None


def _parse_fields(lines: list[str], magic: str, names: tuple[str, ...]) -> tuple[int, ...] | None:
    if not lines or lines[0] != magic or len(lines) != len(names) + 1:
        return None
    values = []
    for line, name in zip(lines[1:], names):
        parts = line.split()
        if len(parts) != 2 or parts[0] != name or not parts[1].lstrip("-").isdigit():
            return None
        values.append(int(parts[1]))
    return tuple(values)


def _read_checkpoint(path: str) -> tuple[int, int] | None:
    """(recovery point, leader epoch), or None when missing or unreadable (=> full recovery)."""
    lines = _read_small(path)
    parsed = _parse_fields(lines or [], _CHECKPOINT_MAGIC, ("recovery_point", "leader_epoch"))
    if parsed is None or parsed[0] < 0:
        return None
    return parsed[0], parsed[1]


def _read_clean_marker(path: str) -> tuple[int, int, int] | None:
    """(log end offset, active segment base, active segment size) or None."""
    lines = _read_small(path)
    return _parse_fields(lines or [], _CLEAN_MAGIC, ("log_end_offset", "active_segment", "active_size"))  # type: ignore[return-value]
