"""Committed consumer-group offsets, stored in an internal compacted log (Kafka's
``__consumer_offsets``) and restored when the broker restarts. Design: docs/design/groups.md,
section "Committed offsets".

On disk: ``<data_dir>/__consumer_offsets-0/``, an ordinary partition directory written through
:class:`~shmbroker.log.PartitionLog`, so the files are Kafka's segment format, recovery after a
crash is the log's, and ``shmbroker dump-log`` prints them. One partition: Kafka spreads groups
over 50 so that many brokers can share the coordinator role; one host has one coordinator.

One record per (group, topic, partition) commit; the record key says which, the value what::

    key (big-endian; the bytes of Kafka's OffsetCommitKey, record type 1)
      0       2       4              4+G     6+G            6+G+T          10+G+T
      +-------+-------+----- ... ----+-------+----- ... ----+--------------+
      | int16 | int16 | group        | int16 | topic        | int32        |
      | ver 1 | G     | UTF-8, G B   | T     | ASCII, T B   | partition    |
      +-------+-------+----- ... ----+-------+----- ... ----+--------------+

    value (big-endian; the bytes of Kafka's OffsetCommitValue v3), or null: a tombstone
      0       2               10              14      16             16+M           24+M
      +-------+---------------+---------------+-------+----- ... ----+--------------+
      | int16 | int64         | int32         | int16 | metadata     | int64        |
      | ver 3 | offset (>=-1) | leader epoch  | M     | UTF-8, M B   | commit ms    |
      |       |               | (-1: unknown) |       |              | (wall clock) |
      +-------+---------------+---------------+-------+----- ... ----+--------------+

The version comes first in both, so a reader meets an unknown version before anything else.
A record that does not decode (unknown version, bad lengths, a null key) does not stop the
load: it is counted in :class:`OffsetLoadReport`, logged with its offset, and skipped.

Owned by the coordinator process; not thread-safe.
"""
from __future__ import annotations

import logging
import os
import shutil
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .. import errors, records
from ..config import (BATCH_BYTES_MAX_LIMIT, GROUP_NAME_LENGTH_MAX,
                      GROUP_OFFSET_COMMIT_PARTITIONS_MAX, GROUP_OFFSET_METADATA_BYTES_MAX,
                      GROUP_OFFSETS_COMPACTION_BATCH_RECORDS_DEFAULT,
                      GROUP_OFFSETS_COMPACTION_RATIO_DEFAULT, GROUP_OFFSETS_COMPACTION_RATIO_MAX,
                      GROUP_OFFSETS_COMPACTION_RATIO_MIN,
                      GROUP_OFFSETS_COMPACTION_RECORDS_MIN_DEFAULT,
                      GROUP_OFFSETS_LOAD_WARNINGS_MAX, GROUP_OFFSETS_SEGMENT_BYTES_DEFAULT,
                      SEGMENT_BYTES_MAX_LIMIT, SEGMENT_BYTES_MIN_LIMIT, TOPIC_NAME_LENGTH_MAX,
                      TOPIC_PARTITIONS_MAX, LogConfig)
from ..layout import record_batch as layout
from ..log import PartitionLog, RecoveryReport, files
from ..log.partition_log import ClockMs, wall_clock_ms
from .topics import OFFSETS_TOPIC, validate_topic_name

log = logging.getLogger("shmbroker.coordinator")

#: The one partition directory, and the two names compaction uses next to it.
OFFSETS_DIR_NAME = f"{OFFSETS_TOPIC}-0"
CLEANED_SUFFIX = ".cleaned"
OLD_SUFFIX = ".old"

#: Kafka's OffsetCommitKey record type; 0 is the same layout, written by old Kafka versions.
KEY_VERSION = 1
KEY_VERSIONS_READ = (0, 1)
#: Kafka's OffsetCommitValue v3 (v4 adds tagged fields; we neither write nor read it).
VALUE_VERSION = 3

_INT16 = struct.Struct(">h")
_KEY_TAIL = struct.Struct(">i")                 # partition
_VALUE_HEAD = struct.Struct(">hqih")            # version, offset, leader epoch, metadata length
_VALUE_TAIL = struct.Struct(">q")               # commit timestamp
_INT32_MAX = (1 << 31) - 1

#: Worst-case record: a key with the longest names (a group id character takes at most 4 UTF-8
#: bytes), a value with the longest metadata, and the record's own varints and header count.
_RECORD_OVERHEAD_BYTES_MAX = 5 + 1 + 10 + 5 + 3 + 3 + 1
_KEY_BYTES_MAX = _INT16.size * 3 + 4 * GROUP_NAME_LENGTH_MAX + TOPIC_NAME_LENGTH_MAX + _KEY_TAIL.size
_VALUE_BYTES_MAX = _VALUE_HEAD.size + GROUP_OFFSET_METADATA_BYTES_MAX + _VALUE_TAIL.size
_RECORD_BYTES_MAX = _RECORD_OVERHEAD_BYTES_MAX + _KEY_BYTES_MAX + _VALUE_BYTES_MAX
# One commit is one batch: the largest allowed one must fit the log's batch limit.
assert layout.HEADER_SIZE + GROUP_OFFSET_COMMIT_PARTITIONS_MAX * _RECORD_BYTES_MAX <= BATCH_BYTES_MAX_LIMIT

#: Bytes asked of the log per read while loading (whole batches, at least one).
_LOAD_READ_BYTES = 1 << 20

#: Compaction steps, in order; ``compact(on_step=...)`` is called with each name once the step
#: is done (and durable). Why a crash after each one is safe: docs/design/groups.md.
COMPACTION_STEPS = ("cleaned_partial", "cleaned_written", "old_closed", "old_renamed",
                    "new_renamed", "old_deleted")


@dataclass(frozen=True)
class CommittedOffset:
    """One committed offset, as Kafka's OffsetAndMetadata plus the commit time."""

    offset: int
    leader_epoch: int
    metadata: str
    commit_timestamp_ms: int


@dataclass(frozen=True)
class OffsetKey:
    group: str
    topic: str
    partition: int


@dataclass(frozen=True)
class OffsetStoreConfig:
    """Settings of the offsets log; defaults and bounds in shmbroker/config.py."""

    #: Compact when records >= ``compaction_ratio`` x live keys ...
    compaction_ratio: int = GROUP_OFFSETS_COMPACTION_RATIO_DEFAULT
    #: ... and records >= this.
    compaction_records_min: int = GROUP_OFFSETS_COMPACTION_RECORDS_MIN_DEFAULT
    #: Records per batch of the rewritten log.
    compaction_batch_records: int = GROUP_OFFSETS_COMPACTION_BATCH_RECORDS_DEFAULT
    segment_bytes: int = GROUP_OFFSETS_SEGMENT_BYTES_DEFAULT

    def __post_init__(self) -> None:
        _check_config("compaction_ratio", self.compaction_ratio,
                      GROUP_OFFSETS_COMPACTION_RATIO_MIN, GROUP_OFFSETS_COMPACTION_RATIO_MAX)
        _check_config("compaction_records_min", self.compaction_records_min, 0, 1 << 62)
        # Bounded by the commit limit, so a rewritten batch is never bigger than a commit's.
        _check_config("compaction_batch_records", self.compaction_batch_records, 1,
                      GROUP_OFFSET_COMMIT_PARTITIONS_MAX)
        _check_config("segment_bytes", self.segment_bytes, SEGMENT_BYTES_MIN_LIMIT,
                      SEGMENT_BYTES_MAX_LIMIT)

    def log_config(self) -> LogConfig:
        # Never deleted by time or size: it is compacted instead. No roll by time either: it
        # only serves retention, and compaction rewrites the whole log, not sealed segments.
        return LogConfig(segment_bytes=self.segment_bytes, segment_ms=1 << 62, retention_ms=-1,
                         retention_bytes=-1, batch_bytes_max=BATCH_BYTES_MAX_LIMIT)


@dataclass
class OffsetLoadReport:
    """What :meth:`OffsetStore.open` found. ``log_recovery`` is the log's own report (torn
    tail cut, indexes rebuilt); ``skipped`` lists offset ranges [first, end) lost to a corrupt
    segment; ``notes`` what was done about an interrupted compaction."""

    directory: str
    log_recovery: RecoveryReport | None = None
    records: int = 0
    tombstones: int = 0
    undecodable: int = 0
    undecodable_offsets: list[int] = field(default_factory=list)
    skipped: list[tuple[int, int, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CompactionResult:
    records_before: int
    records_after: int
    bytes_before: int
    bytes_after: int


# -- the byte layout ---------------------------------------------------------------------------

def encode_key(group: str, topic: str, partition: int) -> bytes:
    """The key of an offset record (layout in the module doc); inputs must be valid."""
    return (_INT16.pack(KEY_VERSION) + _encode_string(group) + _encode_string(topic)
            + _KEY_TAIL.pack(partition))


def encode_value(committed: CommittedOffset) -> bytes:
    metadata = committed.metadata.encode("utf-8")
    return (_VALUE_HEAD.pack(VALUE_VERSION, committed.offset, committed.leader_epoch, len(metadata))
            + metadata + _VALUE_TAIL.pack(committed.commit_timestamp_ms))


def decode_key(data: Any) -> OffsetKey:
    """Inverse of :func:`encode_key`. UnsupportedVersionError for a version we do not read;
    CorruptRecordError for anything else that is not a valid key (with the byte position)."""
    if data is None:
        raise errors.CorruptRecordError("offset record without a key")
    data = bytes(data)
    version = _version(data, KEY_VERSIONS_READ, "key")
    group, position = _decode_string(data, _INT16.size, "group")
    topic, position = _decode_string(data, position, "topic")
    if len(data) != position + _KEY_TAIL.size:
        raise errors.CorruptRecordError(
            f"key v{version}: {len(data)} bytes, expected {position + _KEY_TAIL.size}", position)
    (partition,) = _KEY_TAIL.unpack_from(data, position)
    try:
        _check_group(group)
        _check_topic_partition(topic, partition)
    except errors.ShmbrokerError as exc:
        raise errors.CorruptRecordError(f"key v{version}: {exc}", 0) from None
    return OffsetKey(group, topic, partition)


def decode_value(data: Any) -> CommittedOffset:
    """Inverse of :func:`encode_value` (errors as :func:`decode_key`)."""
    data = bytes(data)
    _version(data, (VALUE_VERSION,), "value")
    if len(data) < _VALUE_HEAD.size:
        raise errors.CorruptRecordError(f"value: {len(data)} bytes, shorter than its header", 0)
    _, offset, leader_epoch, length = _VALUE_HEAD.unpack_from(data, 0)
    end = _VALUE_HEAD.size + length
    if length < 0 or len(data) != end + _VALUE_TAIL.size:
        raise errors.CorruptRecordError(
            f"value: metadata length {length} does not fit its {len(data)} bytes", _VALUE_HEAD.size - 2)
    try:
        metadata = data[_VALUE_HEAD.size:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.CorruptRecordError(f"value: metadata is not UTF-8 ({exc})", _VALUE_HEAD.size) from None
    (timestamp,) = _VALUE_TAIL.unpack_from(data, end)
    if offset < -1 or leader_epoch < -1:
        raise errors.CorruptRecordError(f"value: offset {offset} or leader epoch {leader_epoch} below -1", 2)
    return CommittedOffset(offset, leader_epoch, metadata, timestamp)


def _encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _INT16.pack(len(raw)) + raw


def _decode_string(data: bytes, position: int, what: str) -> tuple[str, int]:
    if len(data) < position + _INT16.size:
        raise errors.CorruptRecordError(f"key: {what} length cut off", position)
    (length,) = _INT16.unpack_from(data, position)
    start = position + _INT16.size
    if length < 0 or len(data) < start + length:
        raise errors.CorruptRecordError(f"key: {what} length {length} does not fit", position)
    try:
        return data[start:start + length].decode("utf-8"), start + length
    except UnicodeDecodeError as exc:
        raise errors.CorruptRecordError(f"key: {what} is not UTF-8 ({exc})", start) from None


def _version(data: bytes, known: tuple[int, ...], what: str) -> int:
    if len(data) < _INT16.size:
        raise errors.CorruptRecordError(f"{what}: {len(data)} bytes, too short for a version", 0)
    (version,) = _INT16.unpack_from(data, 0)
    if version not in known:
        raise errors.UnsupportedVersionError(f"{what} version {version} (this build reads {known})", 0)
    return version


# -- input checks ------------------------------------------------------------------------------

def _check_group(group: Any) -> str:
    if not isinstance(group, str) or not group or len(group) > GROUP_NAME_LENGTH_MAX:
        raise errors.InvalidGroupIdError(
            f"group id must be a non-empty string of at most {GROUP_NAME_LENGTH_MAX} "
            f"characters, got {group!r:.300}")
    try:
        group.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.InvalidGroupIdError(f"group id {group!r:.300} is not valid Unicode") from None
    return group


def _check_topic_partition(topic: Any, partition: Any) -> tuple[str, int]:
    validate_topic_name(topic)  # InvalidTopicError
    if not isinstance(partition, int) or isinstance(partition, bool) \
            or not 0 <= partition < TOPIC_PARTITIONS_MAX:
        raise errors.UnknownTopicOrPartitionError(
            f"partition of {topic!r} must be an integer in [0, {TOPIC_PARTITIONS_MAX}), got {partition!r}")
    return topic, partition


def _check_int(what: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise errors.InvalidRequestError(f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _check_entry(key: Any, value: Any) -> tuple[tuple[str, int], int, str, int]:
    """One ``(topic, partition): (offset, metadata[, leader_epoch])`` item of a commit."""
    if not isinstance(key, tuple) or len(key) != 2:
        raise errors.InvalidRequestError(f"offsets keys must be (topic, partition), got {key!r:.300}")
    topic_partition = _check_topic_partition(*key)
    if not isinstance(value, tuple) or len(value) not in (2, 3):
        raise errors.InvalidRequestError(
            f"offsets[{key!r}] must be (offset, metadata) or (offset, metadata, leader_epoch), "
            f"got {value!r:.300}")
    offset = _check_int(f"offset of {key!r}", value[0], -1, files.OFFSET_MAX)
    metadata = "" if value[1] is None else value[1]
    if not isinstance(metadata, str):
        raise errors.InvalidRequestError(
            f"metadata of {key!r} must be a string or None, got {metadata!r:.300}")
    try:
        size = len(metadata.encode("utf-8"))
    except UnicodeEncodeError:
        raise errors.InvalidRequestError(f"metadata of {key!r} is not valid Unicode") from None
    if size > GROUP_OFFSET_METADATA_BYTES_MAX:
        # Kafka answers OFFSET_METADATA_TOO_LARGE (12) here; we have no class for it yet.
        raise errors.InvalidRequestError(
            f"metadata of {key!r} is {size} UTF-8 bytes; the limit is {GROUP_OFFSET_METADATA_BYTES_MAX}")
    epoch = _check_int(f"leader epoch of {key!r}", value[2], -1, _INT32_MAX) if len(value) == 3 else -1
    return topic_partition, offset, metadata, epoch


def _check_offsets(offsets: Any) -> list[tuple[tuple[str, int], int, str, int]]:
    if not isinstance(offsets, Mapping):
        raise errors.InvalidRequestError(
            f"offsets must map (topic, partition) to (offset, metadata), got {type(offsets).__name__}")
    if len(offsets) > GROUP_OFFSET_COMMIT_PARTITIONS_MAX:
        raise errors.InvalidRequestError(
            f"a commit names {len(offsets)} partitions; the limit is {GROUP_OFFSET_COMMIT_PARTITIONS_MAX}")
    return [_check_entry(key, value) for key, value in offsets.items()]


def _check_config(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise errors.ConfigError(f"{name}={value!r} must be an integer in [{low}, {high}]")


# -- the store ---------------------------------------------------------------------------------

def offsets_dir(data_dir: str) -> str:
    return os.path.join(os.path.abspath(data_dir), OFFSETS_DIR_NAME)


class OffsetStore:
    """Every group's committed offsets: a dict in memory, a compacted log on disk (the truth).

    Build with :meth:`open`. Owned by the coordinator process; not thread-safe. The broker's
    data-dir lock keeps a second coordinator (so a second writer) away.

    Durability: a commit returns once its batch is written to the log file (the page cache),
    which survives the crash of any of our processes (kill -9 included) but not of the kernel
    or the power. ``fsync=True`` fsyncs the log after every commit and group deletion, for
    power-loss safety at the price of one fsync per commit (Kafka's default is the former:
    it relies on replication, and fsyncs only on roll).
    """

    def __init__(self, data_dir: str, clock_ms: ClockMs, fsync: bool, config: OffsetStoreConfig):
        self.data_dir = os.path.abspath(data_dir)
        self.directory = offsets_dir(data_dir)
        self.clock_ms = clock_ms
        self.fsync = fsync
        self.config = config
        self._log: PartitionLog | None = None
        self._offsets: dict[str, dict[tuple[str, int], CommittedOffset]] = {}
        self._live_keys = 0
        self._records = 0
        # Undecodable records still in the log: compaction would drop them (see compact()).
        self._undecodable_records = 0
        self.load_report = OffsetLoadReport(self.directory)

    @classmethod
    def open(cls, data_dir: str, *, clock_ms: ClockMs | None = None, fsync: bool = False,
             config: OffsetStoreConfig = OffsetStoreConfig()) -> "OffsetStore":
        """Open (creating if needed) the offsets log under ``data_dir`` and load every offset:
        the whole log is read, the last value of each key wins, tombstones remove. An
        interrupted compaction is finished or undone first (see :meth:`compact`).
        ``clock_ms``: wall-clock milliseconds for commit timestamps (default: the real one)."""
        if not isinstance(fsync, bool):
            raise errors.ConfigError(f"fsync must be True or False, got {fsync!r}")
        if not isinstance(config, OffsetStoreConfig):
            raise errors.ConfigError(f"config must be an OffsetStoreConfig, got {config!r:.200}")
        store = cls(data_dir, clock_ms or wall_clock_ms, fsync, config)
        files.make_dir(store.data_dir)
        store.load_report.notes.extend(_finish_interrupted_compaction(store.directory))
        store._log = PartitionLog.open(store.directory, config.log_config(), clock=store.clock_ms)
        try:
            store.load_report.log_recovery = store._log.recovery_report
            store._load()
        except BaseException:
            store._log.abandon()
            raise
        return store

    # -- load -----------------------------------------------------------------------------------

    def _load(self) -> None:
        """Read the whole log once. Bounded: every round moves ``offset`` forward."""
        assert self._log is not None
        offset, end = self._log.log_start_offset, self._log.log_end_offset
        while offset < end:
            try:
                piece = self._log.read(offset, _LOAD_READ_BYTES)
            except errors.CorruptSegmentError as exc:
                offset = self._skip_corrupt(offset, end, exc)
                continue
            assert piece.length > 0 and piece.last_offset >= offset
            try:
                self._apply_batches(piece.data)
            finally:
                piece.data.release()
            offset = piece.last_offset + 1
        report = self.load_report
        report.records = self._records
        if report.undecodable > len(report.undecodable_offsets):
            log.warning("%s: %d undecodable records skipped in all (first offsets: %s)",
                        self.directory, report.undecodable, report.undecodable_offsets)

    def _apply_batches(self, data: memoryview) -> None:
        # read() checked every batch's CRC; decode batch by batch, so that one batch whose
        # records do not decode costs only its own records.
        scan = records.scan_batches(data, verify_crc=False)
        assert scan.ok, scan.status_name
        bounds = [b.position for b in scan.batches] + [scan.valid_bytes]
        for batch, start, stop in zip(scan.batches, bounds, bounds[1:]):
            try:
                decoded = records.decode_records(data[start:stop])
            except errors.CorruptRecordError as exc:
                self._records += batch.records_count
                self._undecodable(batch.base_offset, f"its batch does not decode: {exc}", batch.records_count)
                continue
            for record in decoded:
                self._apply_record(record)

    def _apply_record(self, record: Any) -> None:
        self._records += 1
        try:
            key = decode_key(record.key)
            value = None if record.value is None else decode_value(record.value)
        except (errors.CorruptRecordError, errors.UnsupportedVersionError) as exc:
            self._undecodable(record.offset, str(exc))
            return
        if value is None:
            self.load_report.tombstones += 1
            self._remove(key.group, (key.topic, key.partition))
        else:
            self._set(key.group, (key.topic, key.partition), value)

    def _undecodable(self, offset: int, reason: str, count: int = 1) -> None:
        report = self.load_report
        report.undecodable += count
        self._undecodable_records += count
        if len(report.undecodable_offsets) < GROUP_OFFSETS_LOAD_WARNINGS_MAX:
            report.undecodable_offsets.append(offset)
            log.warning("%s: record at offset %d skipped: %s", self.directory, offset, reason)

    def _skip_corrupt(self, offset: int, end: int, exc: errors.CorruptSegmentError) -> int:
        """Go on at the next segment after a corrupt one (the log never serves past the bad
        bytes of a segment). What was there is lost: a key may come back to an older value,
        so its group re-reads some messages (at least once still holds)."""
        assert self._log is not None
        later = [s.base_offset for s in self._log.segments if s.base_offset > offset]
        resume = later[0] if later else end
        self.load_report.skipped.append((offset, resume, str(exc)))
        log.error("%s: offsets [%d, %d) skipped, unreadable: %s", self.directory, offset, resume, exc)
        return resume

    # -- the in-memory view -----------------------------------------------------------------------

    def _set(self, group: str, topic_partition: tuple[str, int], value: CommittedOffset) -> None:
        owned = self._offsets.setdefault(group, {})
        self._live_keys += topic_partition not in owned
        owned[topic_partition] = value

    def _remove(self, group: str, topic_partition: tuple[str, int]) -> None:
        owned = self._offsets.get(group)
        if owned is not None and owned.pop(topic_partition, None) is not None:
            self._live_keys -= 1
            if not owned:
                del self._offsets[group]

    def committed(self, group: str, topic: str, partition: int) -> CommittedOffset | None:
        self._check_open()
        owned = self._offsets.get(_check_group(group))
        return None if owned is None else owned.get(_check_topic_partition(topic, partition))

    def group_offsets(self, group: str) -> dict[tuple[str, int], CommittedOffset]:
        """``{(topic, partition): CommittedOffset}`` of one group (a copy; empty if none)."""
        self._check_open()
        return dict(self._offsets.get(_check_group(group), {}))

    def groups(self) -> list[str]:
        """Groups with at least one committed offset, sorted."""
        self._check_open()
        return sorted(self._offsets)

    @property
    def live_keys(self) -> int:
        return self._live_keys

    @property
    def records(self) -> int:
        """Records in the log (values, tombstones, undecodable ones): what compaction weighs."""
        return self._records

    # -- writes ---------------------------------------------------------------------------------

    def commit(self, group: str, offsets: Mapping) -> dict[tuple[str, int], CommittedOffset]:
        """Store ``{(topic, partition): (offset, metadata[, leader_epoch])}`` for ``group``.

        All or nothing: every entry is checked first (typed errors: InvalidGroupIdError,
        InvalidTopicError, UnknownTopicOrPartitionError, InvalidRequestError), then the whole
        commit is one batch, which a crash leaves either whole or absent (its CRC covers it
        all; recovery cuts a torn one). Offsets are >= 0, or -1 (Kafka's "no offset"); metadata
        None is stored as "". Returns what was stored, with the commit time.
        """
        self._check_open()
        group = _check_group(group)
        entries = _check_offsets(offsets)
        if not entries:
            return {}
        now = self._now()
        stored = {tp: CommittedOffset(offset, epoch, metadata, now)
                  for tp, offset, metadata, epoch in entries}
        self._append([encode_key(group, *tp) for tp in stored],
                     [encode_value(c) for c in stored.values()], [now] * len(stored))
        for topic_partition, value in stored.items():
            self._set(group, topic_partition, value)
        return stored

    def delete_group(self, group: str) -> int:
        """Forget every offset of ``group``: one batch of tombstones (all or nothing, as a
        commit). Returns how many offsets were deleted (0: the group had none)."""
        self._check_open()
        owned = self._offsets.get(_check_group(group))
        if not owned:
            return 0
        doomed = list(owned)
        now = self._now()
        self._append([encode_key(group, *tp) for tp in doomed], [None] * len(doomed), [now] * len(doomed))
        for topic_partition in doomed:
            self._remove(group, topic_partition)
        return len(doomed)

    def _now(self) -> int:
        now = self.clock_ms()
        assert isinstance(now, int) and not isinstance(now, bool) and now >= 0, now
        return now

    def _append(self, keys: list[bytes], values: list[bytes | None], timestamps: list[int]) -> None:
        assert self._log is not None and len(keys) == len(values) == len(timestamps) > 0
        batch = records.encode_batch(values, keys=keys, timestamps=timestamps, timestamp=timestamps[0])
        self._log.append(batch)
        self._records += len(keys)
        if self.fsync:
            # The batch is in the log either way; if this fsync fails the caller hears of it,
            # and the commit, retried, writes the same values again.
            self._log.flush()

    def flush(self) -> None:
        """fsync everything written so far (what ``fsync=True`` does after every write)."""
        self._check_open()
        assert self._log is not None
        self._log.flush()

    # -- compaction -----------------------------------------------------------------------------

    def compaction_due(self) -> bool:
        """Whether :meth:`compact` would rewrite the log now. Never while the log holds
        records this build cannot decode (a newer build's, say): the rewrite would lose them."""
        config = self.config
        return (self._undecodable_records == 0
                and self._records >= config.compaction_records_min
                and self._records >= config.compaction_ratio * max(1, self._live_keys))

    def compact(self, force: bool = False, on_step: Callable[[str], None] | None = None
                ) -> CompactionResult | None:
        """Kafka's log cleaner, simplified: when :meth:`compaction_due` (or ``force``), rewrite
        the log as one value per live key (no tombstones: nobody else reads this log, so
        nobody needs to see a deletion) and swap it in. None when not due. ``force`` also
        drops the records that did not decode at load.

        Steps (COMPACTION_STEPS; ``on_step(name)`` runs after each, for crash tests):
        write ``<dir>.cleaned`` (cleaned_partial, then closed and fsynced: cleaned_written);
        close the live log (old_closed); rename ``<dir>`` to ``<dir>.old`` (old_renamed);
        rename ``<dir>.cleaned`` to ``<dir>`` (new_renamed); delete ``<dir>.old``
        (old_deleted). Every rename is followed by a fsync of the data dir. :meth:`open` undoes
        a compaction stopped before new_renamed and finishes one stopped after it.

        A failure while writing ``.cleaned`` removes it and leaves the store as it was; a
        failure after that closes the store (LogError): reopening it recovers as after a crash.
        """
        self._check_open()
        assert self._log is not None
        if not force and not self.compaction_due():
            return None
        step = on_step or (lambda name: None)
        before = (self._records, self._log.size_bytes)
        cleaned = self.directory + CLEANED_SUFFIX
        self._write_cleaned(cleaned, step)
        try:
            self._swap_in(cleaned, step)
            self._log = PartitionLog.open(self.directory, self.config.log_config(), clock=self.clock_ms)
        except Exception as exc:
            self._log = None
            raise errors.LogError(f"{self.directory}: compaction failed after the rewrite ({exc}); "
                                  f"the store is closed, open it again to recover") from exc
        self._records = self._live_keys
        self._undecodable_records = 0
        return CompactionResult(before[0], self._records, before[1], self._log.size_bytes)

    def _write_cleaned(self, cleaned: str, step: Callable[[str], None]) -> None:
        """Write every live value, sorted by key, into a fresh log at ``cleaned``."""
        if os.path.exists(cleaned):  # only a crash leaves one, and open() removes it
            shutil.rmtree(cleaned)
        target = PartitionLog.open(cleaned, self.config.log_config(), clock=self.clock_ms)
        try:
            chunk_max = self.config.compaction_batch_records
            live = self._sorted_live()
            for start in range(0, len(live), chunk_max):  # bounded by the live keys
                chunk = live[start:start + chunk_max]
                batch = records.encode_batch(
                    [encode_value(v) for _, v in chunk], keys=[encode_key(*k) for k, _ in chunk],
                    timestamps=[v.commit_timestamp_ms for _, v in chunk],
                    timestamp=chunk[0][1].commit_timestamp_ms)
                target.append(batch)
                if start == 0:
                    step("cleaned_partial")
            if not live:
                step("cleaned_partial")
            target.close()  # fsyncs the segment, its indexes, the checkpoint and the marker
            files.fsync_dir(self.data_dir)
            step("cleaned_written")
        except BaseException:
            target.abandon()
            shutil.rmtree(cleaned, ignore_errors=True)
            raise

    def _sorted_live(self) -> list[tuple[tuple[str, str, int], CommittedOffset]]:
        return sorted(((group, topic, partition), value)
                      for group, owned in self._offsets.items()
                      for (topic, partition), value in owned.items())

    def _swap_in(self, cleaned: str, step: Callable[[str], None]) -> None:
        assert self._log is not None
        old = self.directory + OLD_SUFFIX
        self._log.close()
        self._log = None
        step("old_closed")
        os.rename(self.directory, old)
        files.fsync_dir(self.data_dir)
        step("old_renamed")
        os.rename(cleaned, self.directory)
        files.fsync_dir(self.data_dir)
        step("new_renamed")
        shutil.rmtree(old)
        files.fsync_dir(self.data_dir)
        step("old_deleted")

    # -- close ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._log is None:
            raise errors.LogClosedError(f"offset store {self.directory} is closed")

    @property
    def closed(self) -> bool:
        return self._log is None

    def close(self) -> None:
        """Close the log cleanly (fsync, checkpoint, clean-shutdown marker). Idempotent."""
        if self._log is not None:
            self._log.close()
            self._log = None

    def abandon(self) -> None:
        """Release the files as a crash would (no flush, no marker); for crash tests."""
        if self._log is not None:
            self._log.abandon()
            self._log = None

    def __enter__(self) -> "OffsetStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"OffsetStore({self.directory!r}, groups={len(self._offsets)}, "
                f"live_keys={self._live_keys}, records={self._records})")


def _finish_interrupted_compaction(directory: str) -> list[str]:
    """Bring the directory back to one log after a compaction that stopped anywhere.

    * ``<dir>`` exists: it is complete (the old log, or the new one once renamed), so any
      ``.cleaned`` (unfinished or never swapped in) and ``.old`` (already replaced) go.
    * ``<dir>`` missing but ``.old`` there: the stop came between the two renames; the old
      log is complete and was never changed, so it gets its name back (undo).
    * only ``.cleaned``: no step of ours leaves that; refuse rather than guess.
    """
    cleaned, old = directory + CLEANED_SUFFIX, directory + OLD_SUFFIX
    parent = os.path.dirname(directory)
    notes = []
    if not os.path.isdir(directory) and os.path.isdir(old):
        os.rename(old, directory)
        files.fsync_dir(parent)
        notes.append(f"compaction stopped between its renames: {old} restored")
    elif not os.path.isdir(directory) and os.path.exists(cleaned):
        raise errors.LogError(f"{cleaned} exists without {directory} or {old}: not a state "
                              f"compaction leaves; move it away or rename it by hand")
    for leftover in (cleaned, old):
        if os.path.exists(leftover):
            shutil.rmtree(leftover)
            notes.append(f"removed {leftover} left by an interrupted compaction")
    if notes:
        files.fsync_dir(parent)
        for note in notes:
            log.warning("%s", note)
    return notes


__all__ = ["OffsetStore", "OffsetStoreConfig", "CommittedOffset", "OffsetKey", "OffsetLoadReport",
           "CompactionResult", "encode_key", "decode_key", "encode_value", "decode_value",
           "offsets_dir", "OFFSETS_TOPIC", "OFFSETS_DIR_NAME", "COMPACTION_STEPS"]
