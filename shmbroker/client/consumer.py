"""The local consumer: reads committed records straight from the partitions' mmapped segments.

No socket, no request, no broker process in the path (docs/design/consumer.md)::

    Consumer.poll
      ├─ per assigned partition: hw_seq unchanged and position == high watermark? skip (idle)
      ├─ caught up in the active segment? _native.tail_read: the next three steps in one C call
      ├─ control.read_state()             seqlock read of the published state (shared memory)
      ├─ LogReader.read(position, ...)    memoryview of whole committed batches (zero copy)
      ├─ records.decode_records(view)     C: CRC + records -> list[Record]
      ├─ wrap / buffer / hand out         Python: a few list operations per poll
      └─ the log has nothing at the position? RingReads.read: the committed ring frame that
                                          holds it (client/ring_reads.py, decision 0005)
    nothing anywhere?  futex-wait on hw_seq (ControlRegion.wait_hw_change), and on commit_seq
                       when reading rings (wait_commit_or_hw), optionally after a bounded
                       spin (``spin_us``)

Owned by one thread; not thread-safe (Kafka's consumer is not either). Safe across ``fork``:
a child that uses a consumer created by its parent rebuilds its mappings and control regions
first (positions carry over). ``spawn``-ed workers build their own consumer.

With ``group=`` the consumer is a member of a consumer group (``group_membership.py``): its
partitions come from the group's assignment, positions start at the group's committed offsets,
and ``poll()`` drives heartbeats, rebalances and auto-commit (docs/design/consumer.md,
"Consumer groups"). A forked child joins as a new member; it never reuses the parent's.
"""
from __future__ import annotations

import bisect
import logging
import os
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from .. import errors, records
from ..native import _native
from ..config import (ADMIN_REQUEST_TIMEOUT_MS, GROUP_AUTO_COMMIT_INTERVAL_MS_DEFAULT, GROUP_AUTO_COMMIT_INTERVAL_MS_MIN,
                      GROUP_HEARTBEAT_INTERVAL_MS_DEFAULT, GROUP_REBALANCE_TIMEOUT_MS_DEFAULT,
                      GROUP_SESSION_TIMEOUT_MS_DEFAULT, SPIN_NS_MAX, BATCH_RECORDS_MAX,
                      default_data_dir)
from ..coordinator.topics import partition_dir
from ..layout import shm as L
from ..log.reader import LogReader, walks_on
from ..shm.control import ControlRegion
from ..shm.counters import ConsumerCounters
from .group_membership import DEFAULT_PROTOCOLS, REJOIN_ERRORS, CommitCallback, GroupMembership
from . import ring_reads, serde
from .metadata import LocalMetadata
from .ring_reads import RingReads
from .types import (OffsetAndMetadata, OffsetAndTimestamp, TopicPartition, as_topic_partition,
                    timestamps_arg, topic_names)

#: auto_offset_reset values: Kafka's names, plus "error" (Kafka's "none": raise instead).
OFFSET_RESET_POLICIES = ("earliest", "latest", "error", "none")
#: Most bytes read from one partition in one fetch (Kafka: max.partition.fetch.bytes).
FETCH_BYTES_DEFAULT = 1 << 20
FETCH_BYTES_MAX = 64 << 20
#: Most records one poll returns by default (Kafka: max.poll.records).
MAX_RECORDS_DEFAULT = 500
#: With several partitions a consumer sleeps on all their words at once (futex_waitv). Where
#: the kernel lacks it (Linux < 5.16), it sleeps on one partition's word for at most this
#: long, then looks at all of them and sleeps on the next (docs/design/consumer.md,
#: "Wake-ups"): a record on another partition is seen within this bound.
MULTI_PARTITION_SLEEP_MS = 5
#: Partitions one futex_waitv sleep covers (the kernel takes at most 128 words); a consumer of
#: more partitions rotates as above.
FUTEX_WAITV_WORDS_MAX = 128
#: False once the kernel said it has no futex_waitv (Linux < 5.16).
_FUTEX_WAITV = True
#: Iteration polls in slices this long, so signals are handled between them.
ITERATION_POLL_MS = 1_000
SPIN_US_MAX = SPIN_NS_MAX // 1000
#: Whether a caught-up consumer reads with one C call (``_native.tail_read``) where it can;
#: tests turn it off to compare with the Python read, which stays the reference.
TAIL_READ = True
#: poll's common case in one C call (_native.poll_ring); False: every poll runs _poll, the
#: Python reference (tests run both).
FAST_POLL = True
#: Reads one poll makes of a partition whose reads find only offsets without records (empty
#: batches: offsets a producer reserved and never committed, decision 0005) before it moves
#: on; each read moves past at most fetch_max_bytes of them.
_GAP_READS_MAX = 8
#: A consumer reading rings whose position no producer has taken yet sleeps on the commit
#: word alone (a publish cannot bring that offset: it would only wake it for nothing, once per
#: record it read from a ring). Only a producer that takes the offset and dies before its
#: commit makes the log move without a commit; the sleep is cut to this so that the filled
#: hole is seen within it even then. 100 ms made bench_ipc's idle row (4 consumers in
#: poll(500 ms)) 0.83% of a core against 0.32% before ring reads; 2 wake-ups a second.
COMMIT_ONLY_SLEEP_MS_MAX = 500
#: How often a consumer whose polls find nothing looks whether its partitions' control
#: regions are still the ones served (Consumer._recheck_partitions): one load and one stat
#: per partition; a consumer left on a stopped broker's region picks up its restart within
#: about this long after the restarted broker serves the partition.
PARTITION_RECHECK_MS = 500


_RING_READS = L.CONTROL["ring_reads"]

#: What the ring fast path of poll calls (module globals: one load each on that path).
_ring_take = _native.ring_take
_poll_ring = _native.poll_ring
_TAKE_DECLINED = ring_reads.DECLINED
_FOUND = ring_reads.FOUND
_monotonic_ns = time.monotonic_ns

#: The ring fast path's counters are published by the first poll at least this long after
#: the last publish: `top` samples once a second, and a publish costs ~1 us of Python, a
#: tenth of a spinning ping-pong's round trip when made on every poll (perf/RESULTS.md,
#: fourteenth session). Every other read publishes at once, as before.
COUNTERS_PUBLISH_NS = 1_000_000

#: Forks this interpreter went through (os.register_at_fork): poll compares it with the one a
#: consumer was made in, instead of calling getpid (a syscall) on every poll; _check still
#: compares pids wherever it runs.
_FORKS = [0]


def _count_fork() -> None:
    _FORKS[0] += 1


os.register_at_fork(after_in_child=_count_fork)


def _index_of(got: list, position: int, first_offset: int) -> int:
    """Index of the record at ``position`` in decoded records whose first batch starts at
    ``first_offset`` (len(got) when none is at or after it): direct unless offsets without
    records (empty batches) come first."""
    at = position - first_offset
    if at >= len(got) or got[at].offset != position:
        at = bisect.bisect_left(got, position, key=_offset_of)
    return at


def _offset_of(record) -> int:
    return record.offset

log = logging.getLogger("shmbroker.consumer")


#: One record handed out by :meth:`Consumer.poll`: topic, partition, offset, timestamp, key,
#: value, headers (and ``topic_partition``). It is the C ``records.Record`` itself, with topic
#: and partition filled in by the decoder: a poll creates no Python object per record besides
#: it (a Python wrapper used to cost ~1.3 us per record on this 2-vCPU VM, twice the decode).
ConsumerRecord = records.Record


def _fields(record) -> tuple:
    return (record.topic, record.partition, record.offset, record.timestamp, _b(record.key),
            _b(record.value), record.headers)


def _b(x):
    return bytes(x) if isinstance(x, memoryview) else x


class _Chunk:
    """The bytes of one fetch, for ViewRecord.headers (decoded on first use, then cached)."""

    __slots__ = ("data", "first_offset", "_headers")

    def __init__(self, data: memoryview, first_offset: int):
        self.data = data
        self.first_offset = first_offset
        self._headers: list | None = None

    def headers(self, offset: int) -> tuple:
        if self._headers is None:
            self._headers = [r.headers for r in records.decode_records(self.data)]
        return self._headers[offset - self.first_offset]


class ViewRecord:
    """A record whose ``key`` and ``value`` are read-only memoryviews of the segment mapping.

    Zero copy: the views keep the mapping alive (even after retention deleted the file), so
    holding records holds memory; ``bytes(record.value)`` copies out. ``headers`` are decoded
    on first access (that decodes the whole fetch once).
    """

    __slots__ = ("topic", "partition", "offset", "timestamp", "key", "value", "_chunk")

    def __init__(self, topic, partition, offset, timestamp, key, value, chunk):
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.timestamp = timestamp
        self.key = key
        self.value = value
        self._chunk = chunk

    @property
    def headers(self) -> tuple:
        return self._chunk.headers(self.offset)

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def __repr__(self) -> str:
        return (f"ViewRecord(topic={self.topic!r}, partition={self.partition}, "
                f"offset={self.offset}, timestamp={self.timestamp}, key={self.key!r}, "
                f"value={self.value!r}, headers={self.headers!r})")

    def __eq__(self, other) -> bool:
        """Equal to a ViewRecord or ConsumerRecord with the same fields (views compared by
        their bytes)."""
        if not isinstance(other, (ConsumerRecord, ViewRecord)):
            return NotImplemented
        return _fields(self) == _fields(other)

    __hash__ = None  # type: ignore[assignment]


def _decode_columnar(piece, verify_crc: bool) -> records.ColumnarBatch:
    """``records.decode_columnar`` for a reader slice, without its per-batch Python work.

    The slice's batches chain, so it holds exactly ``last - first + 1`` records and the
    columns can be sized without scanning; C fills them (checking every batch and record).
    Anything unexpected goes the long way, which raises the precise error.
    """
    n = piece.last_offset - piece.first_offset + 1
    cols = (np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64),
            np.empty(n, np.int32), np.empty(n, np.int64), np.empty(n, np.int32))
    try:
        got = _native.decode_columnar_into(piece.data, *cols, verify_crc)
    except (ValueError, errors.UnsupportedCompressionError):
        got = -1  # compressed batches: records.decode_columnar inflates them
    if got != n:
        return records.decode_columnar(piece.data, verify_crc=verify_crc)
    return records.ColumnarBatch(np.frombuffer(piece.data, dtype=np.uint8), *cols)


class _Fetch:
    """Per assigned partition: control region, reader, position, records not yet handed out."""

    __slots__ = ("tp", "topic", "partition", "directory", "control", "reader", "position",
                 "pending", "pending_at", "pending_end", "seen_hw_seq", "hw", "counter_slot",
                 "records_out", "bytes_out", "rings", "seen_commit_seq", "beyond_taken",
                 "topic_id")

    def __init__(self, tp: TopicPartition, directory: str, control, topic_id: str = "") -> None:
        self.tp = tp
        self.topic, self.partition = tp
        self.directory = directory
        self.control = control
        #: The topic's id when its control region was attached: another id after a re-attach
        #: means the topic was deleted and made again (positions start over).
        self.topic_id = topic_id
        self.reader = LogReader(directory)
        #: The next offset to hand out; None until resolved by auto_offset_reset or a seek.
        self.position: int | None = None
        #: Decoded records, not handed out yet from ``pending_at`` on (the record at
        #: ``position``); empty once all are handed out.
        self.pending: list = []
        self.pending_at = 0
        #: The offset after the last batch ``pending`` came from: past its last record when
        #: the batches end with offsets that hold no record (an empty batch over offsets a
        #: producer reserved and never committed, decision 0005; Kafka's compaction leaves
        #: such batches too). Handing out the last pending record moves the position there.
        self.pending_end = 0
        #: hw_seq loaded before the last state read: a poll sleeps until it changes.
        self.seen_hw_seq = -1
        self.hw = -1
        #: Its slot in the consumer's counters region; None until it first hands out records.
        self.counter_slot: int | None = None
        #: Handed out / read since the consumer last published its counters.
        self.records_out = self.bytes_out = 0
        #: The partition's rings, read past the log's end (client/ring_reads.py); None until
        #: first needed, or when this consumer does not read rings.
        self.rings: RingReads | None = None
        #: commit_seq loaded before the last ring read found nothing; None: the poll does
        #: not wait for commits of this partition (rings not read).
        self.seen_commit_seq: int | None = None
        #: The last ring read found the position at or past next_offset (no producer had
        #: taken it): only a commit can bring it (see COMMIT_ONLY_SLEEP_MS_MAX).
        self.beyond_taken = False

    def set_position(self, offset: int) -> None:
        self.position = offset
        self.pending, self.pending_at, self.pending_end = [], 0, 0

    def close(self) -> None:
        self.reader.close()
        self.pending, self.pending_at = [], 0
        if self.rings is not None:
            self.rings.close()
            self.rings = None


class Consumer:
    """Reads records of the partitions it is assigned (see module doc).

    ``Consumer(*topics, broker=DATA_DIR)`` assigns every partition of ``topics`` (names one
    by one, or in a list; partitions added later are not picked up).

    ``Consumer(*topics, broker=DATA_DIR, group="g")`` joins consumer group ``g`` subscribed to
    ``topics``: the group's coordinator assigns the partitions (``assign()`` then raises
    IllegalStateError); each starts at the group's committed offset, else per
    ``auto_offset_reset``. The group is joined and rebalanced from ``poll()`` (and iteration);
    a background thread heartbeats while the application processes between polls, so **poll
    at least every ``max_poll_interval_ms``** (default 5 minutes, Kafka's
    max.poll.interval.ms): a member that does not is taken to be stuck and leaves the group.
    ``enable_auto_commit`` (default True, as in Kafka): positions
    are committed from ``poll()`` every ``auto_commit_interval_ms``, before partitions are
    revoked, and on ``close()`` (which then leaves the group); with it off, commit yourself
    (``commit()`` or ``commit_async()``, e.g. in ``on_revoke``).
    ``group_instance_id``: static membership; a process restarted under the same id within
    ``session_timeout_ms`` gets its partitions back without a rebalance (its ``close()`` does
    not leave the group, and the coordinator does not remove it when its process dies: its
    session decides). ``on_assign(partitions)`` / ``on_revoke(partitions)``
    are called with sorted TopicPartition lists when partitions are added / taken away (also
    when they are lost: the member was removed, no commit is possible then).
    ``group_protocols``: assignors offered, preferred first (cooperative sticky keeps consuming
    unmoved partitions during a rebalance). ``heartbeat_interval_ms`` bounds how long a
    rebalance waits for this member to notice it.
    ``auto_offset_reset``: where a partition without a position, or with one outside the log
    (deleted by retention, or past the end), starts: "earliest", "latest", or "error" (also
    Kafka's "none") to raise :class:`~shmbroker.errors.OffsetOutOfRangeError`.
    ``value_memoryview``: records carry zero-copy memoryviews instead of bytes (ViewRecord).
    ``spin_us``: busy-wait this long before sleeping in poll (lowest latency, burns a core
    while waiting). ``fetch_max_bytes``: bytes read per partition per fetch (at least one whole
    batch). ``consumer_timeout_ms``: iteration stops after that long without a record
    (default: iterate forever). ``check_crcs=False`` skips CRC checks (not recommended).
    ``read_rings`` (default True): once the log is read to its end, the newest records come
    from the producers' committed ring frames, woken by the commit (client/ring_reads.py);
    False waits for the partition process to append them.
    """

    #: Whether records are read from mapped segments here (the one-call tail read applies);
    #: a remote consumer gets them in fetch replies.
    _maps_segments = True

    def __new__(cls, *topics: str, broker: str | os.PathLike | None = None, **kwargs):
        """``broker="tcp://host:port"`` (a router) makes a RemoteConsumer: same API, over TCP
        (client/remote_consumer.py)."""
        if cls is Consumer and isinstance(broker, str) and broker.startswith("tcp://"):
            from .remote_consumer import RemoteConsumer
            cls = RemoteConsumer
        return super().__new__(cls)

    def __init__(self, *topics: str, broker: str | os.PathLike | None = None,
                 group: str | None = None, auto_offset_reset: str = "latest",
                 value_memoryview: bool = False, spin_us: int = 0,
                 fetch_max_bytes: int = FETCH_BYTES_DEFAULT,
                 consumer_timeout_ms: int | None = None, check_crcs: bool = True,
                 client_id: str = "shmbroker-consumer", enable_auto_commit: bool = True,
                 auto_commit_interval_ms: int = GROUP_AUTO_COMMIT_INTERVAL_MS_DEFAULT,
                 session_timeout_ms: int = GROUP_SESSION_TIMEOUT_MS_DEFAULT,
                 max_poll_interval_ms: int = GROUP_REBALANCE_TIMEOUT_MS_DEFAULT,
                 heartbeat_interval_ms: int = GROUP_HEARTBEAT_INTERVAL_MS_DEFAULT,
                 group_protocols: Iterable[str] = DEFAULT_PROTOCOLS,
                 group_instance_id: str | None = None,
                 on_assign: Callable[[list], None] | None = None,
                 on_revoke: Callable[[list], None] | None = None, read_rings: bool = True,
                 key_deserializer: Callable[[Any], Any] | None = None,
                 value_deserializer: Callable[[Any], Any] | None = None):
        topics = topic_names(topics)
        self.key_deserializer = serde.checked("key_deserializer", key_deserializer)
        self.value_deserializer = serde.checked("value_deserializer", value_deserializer)
        self._deserializing = key_deserializer is not None or value_deserializer is not None
        if not isinstance(auto_commit_interval_ms, int) or \
                auto_commit_interval_ms < GROUP_AUTO_COMMIT_INTERVAL_MS_MIN:
            raise errors.ConfigError(f"auto_commit_interval_ms={auto_commit_interval_ms!r} must "
                                     f"be an int >= {GROUP_AUTO_COMMIT_INTERVAL_MS_MIN}")
        if auto_offset_reset not in OFFSET_RESET_POLICIES:
            raise errors.ConfigError(
                f"auto_offset_reset={auto_offset_reset!r}; expected one of {OFFSET_RESET_POLICIES}")
        if not isinstance(spin_us, int) or not 0 <= spin_us <= SPIN_US_MAX:
            raise errors.ConfigError(f"spin_us={spin_us!r} must be an int in [0, {SPIN_US_MAX}]")
        if not isinstance(fetch_max_bytes, int) or not 1 <= fetch_max_bytes <= FETCH_BYTES_MAX:
            raise errors.ConfigError(
                f"fetch_max_bytes={fetch_max_bytes!r} must be an int in [1, {FETCH_BYTES_MAX}]")
        self.data_dir = os.fspath(broker) if broker is not None else default_data_dir()
        self.auto_offset_reset = "error" if auto_offset_reset == "none" else auto_offset_reset
        self.value_memoryview = bool(value_memoryview)
        self.spin_ns = spin_us * 1000
        self.fetch_max_bytes = fetch_max_bytes
        self.consumer_timeout_ms = consumer_timeout_ms
        self.check_crcs = bool(check_crcs)
        #: Records past the log's end come from the producers' committed ring frames
        #: (client/ring_reads.py); not for zero-copy values (ring records are copies).
        self.read_rings = bool(read_rings) and not self.value_memoryview and \
            self._maps_segments
        self._pid = os.getpid()
        self._forks = _FORKS[0]
        self._meta = self._new_metadata()
        self._counters = self._new_counters()
        #: Polls of the ring fast path whose records the counters do not show yet (a poll
        #: publishes them first thing, once COUNTERS_PUBLISH_NS passed since the last publish).
        self._counters_due = 0
        self._counters_next_ns = 0
        self._recheck_next_ns = 0
        self._fetches: dict[TopicPartition, _Fetch] = {}
        #: The assigned partitions polls read: not paused, in assignment order.
        self._order: list[_Fetch] = []
        #: Assigned partitions paused by pause() (Kafka's pause): no records until resume().
        self._paused: set[TopicPartition] = set()
        self._next = 0  # round-robin start of the next collect
        self._sleep_next = 0  # round-robin partition to sleep on
        self._iter_buffer: list = []
        self._iter_at = 0
        self._closed = False
        self._group: GroupMembership | None = None
        self._group_args: dict | None = None
        self.enable_auto_commit = bool(enable_auto_commit)
        self.auto_commit_interval_ms = auto_commit_interval_ms
        self._next_auto_commit = 0.0
        #: A pipelined revocation commit refused for a reason other than the group moving on,
        #: raised from the next poll (see _commit_revoked).
        self._revoke_commit_error: Exception | None = None
        self._on_assign, self._on_revoke = on_assign, on_revoke
        try:
            if group is not None:
                for topic in topics:  # unknown topics fail here, not at the first poll
                    self._meta.partitions(topic)
                self._group_args = dict(
                    data_dir=self.data_dir, group_id=group, topics=topics, client_id=client_id,
                    protocols=list(group_protocols), session_timeout_ms=session_timeout_ms,
                    rebalance_timeout_ms=max_poll_interval_ms,
                    heartbeat_interval_ms=heartbeat_interval_ms,
                    group_instance_id=group_instance_id, admin_kwargs=self._admin_kwargs(),
                    wake_word=self._local_broker())
                try:
                    self._group = GroupMembership(**self._group_args)
                except errors.BrokerNotRunningError as e:
                    raise errors.BrokerNotRunningError(
                        f"group {group!r}: consumer groups need the coordinator of a running "
                        f"broker; {e}") from e
            elif topics:
                self.subscribe(topics)
        except BaseException:
            self.close()
            raise

    def _new_counters(self) -> ConsumerCounters | None:
        """This consumer's counters region (records and bytes out, for `shmbroker top` and
        the metrics endpoint: docs/design/monitor.md). Observability only: when it cannot be
        made (/dev/shm full, say), the consumer runs without one."""
        try:
            return ConsumerCounters.create(self._meta.prefix)
        except (errors.ShmbrokerError, OSError) as exc:
            log.warning("consumer counters not kept (%s): shmbroker top will not show this "
                        "consumer's records out", exc)
            return None

    def _new_metadata(self) -> LocalMetadata:
        return LocalMetadata(self.data_dir)

    def _admin_kwargs(self) -> dict:
        """More arguments of the group's Admin objects (none locally)."""
        return {}

    def _local_broker(self) -> bool:
        """Whether the broker's shared memory is ours to map (its group wake words)."""
        return True

    # -- assignment -------------------------------------------------------------------------------

    def subscribe(self, topics: Iterable[str]) -> None:
        """Assign every partition of ``topics`` (no group: a static assignment)."""
        self._check()
        self._check_no_group("subscribe()")
        topics = topic_names([topics])
        tps = []
        for topic in topics:
            tps.extend(TopicPartition(topic, p) for p in range(self._meta.partitions(topic)))
        self.assign(tps)

    def assign(self, partitions: Iterable) -> None:
        """Read exactly these partitions (TopicPartition or (topic, partition) tuples).

        Partitions kept from the previous assignment keep their positions. Unknown topics or
        partitions raise UnknownTopicOrPartitionError; a partition not being served raises
        BrokerNotRunningError naming the data dir. IllegalStateError in a group consumer
        (the group assigns its partitions).
        """
        self._check()
        self._check_no_group("assign()")
        self._assign(partitions)

    def _check_no_group(self, what: str) -> None:
        if self._group_args is not None:
            raise errors.IllegalStateError(
                f"{what}: this consumer is a member of group {self._group_args['group_id']!r}, "
                f"which assigns its partitions")

    def _assign(self, partitions: Iterable) -> None:
        wanted = [as_topic_partition(p) for p in partitions]
        fetches: dict[TopicPartition, _Fetch] = {}
        try:
            for tp in wanted:
                if tp in fetches:
                    continue
                old = self._fetches.get(tp)
                if old is not None:
                    fetches[tp] = old
                    continue
                self._meta.check_partition(tp.topic, tp.partition)
                control = self._meta.control(tp.topic, tp.partition)
                fetches[tp] = _Fetch(tp, partition_dir(self._meta.data_dir, *tp), control,
                                     self._meta.topic(tp.topic, refresh=False).topic_id)
        except BaseException:
            for tp, fetch in fetches.items():
                if tp not in self._fetches:
                    fetch.close()
            raise
        for tp, fetch in self._fetches.items():
            if tp not in fetches:
                fetch.close()
        self._drop_buffered(set(self._fetches) - set(fetches), rewind=False)
        self._fetches = fetches
        self._set_order()

    def _set_order(self) -> None:
        """The partitions polls read: the assigned ones not paused. A partition no longer
        assigned is not paused either (as Kafka forgets a revoked partition's pause)."""
        self._paused &= self._fetches.keys()
        self._order = [f for tp, f in self._fetches.items() if tp not in self._paused]
        self._next = self._sleep_next = 0

    def _drop_buffered(self, tps: set, rewind: bool) -> None:
        """Records the iterator holds from an earlier poll (not handed out yet) of partitions
        ``tps`` are dropped, the others' kept (their positions are past them already). With
        ``rewind``, each such partition's position goes back to its first dropped record, so
        it is read again later (pause); without, the caller sets the position (seek)."""
        rest = self._iter_buffer[self._iter_at:]
        kept, first = [], {}
        for record in rest:  # bounded by one poll's records
            tp = TopicPartition(record.topic, record.partition)
            if tp in tps:
                first.setdefault(tp, record.offset)
            else:
                kept.append(record)
        self._iter_buffer, self._iter_at = kept, 0
        if rewind:
            for tp, offset in first.items():
                self._fetches[tp].set_position(offset)

    def assignment(self) -> set[TopicPartition]:
        return set(self._fetches)

    def pause(self, *partitions) -> None:
        """Kafka's pause: polls hand out no records of these assigned partitions until
        ``resume``; their positions stay, and a group member stays in its group (it goes on
        polling). Records of them the iterator holds from an earlier poll are not handed out:
        the position goes back to the first of them. IllegalStateError for a partition that
        is not assigned."""
        self._check()
        tps = {self._fetch_for(tp).tp for tp in partitions}
        self._drop_buffered(tps, rewind=True)
        self._paused |= tps
        self._set_order()

    def resume(self, *partitions) -> None:
        """Polls read these assigned partitions again, from their positions."""
        self._check()
        self._paused -= {self._fetch_for(tp).tp for tp in partitions}
        self._set_order()

    def paused(self) -> set[TopicPartition]:
        """The assigned partitions paused by ``pause``."""
        return set(self._paused)

    def unsubscribe(self) -> None:
        self._check_no_group("unsubscribe() (close() leaves the group)")
        self.assign([])

    # -- consumer group ---------------------------------------------------------------------------

    def _membership(self) -> GroupMembership:
        if self._group is None:
            raise errors.IllegalStateError(
                "commit() and committed() need a consumer group: Consumer(..., group='name')")
        return self._group

    def commit(self, offsets: Mapping | None = None) -> None:
        """Commit synchronously: ``offsets`` ({TopicPartition: next offset to read, or an
        OffsetAndMetadata(offset, metadata)}), or the current positions of every assigned
        partition. RebalanceInProgressError, UnknownMemberIdError, IllegalGenerationError: the
        group moved on (the next poll rejoins); other coordinator errors are raised as their
        types too. Callbacks of earlier ``commit_async`` calls run before it returns."""
        self._check()
        group = self._membership()
        group.commit(self._commit_offsets(offsets))

    def commit_async(self, offsets: Mapping | None = None,
                     callback: CommitCallback | None = None) -> None:
        """Commit without waiting for the coordinator: ``offsets`` as for :meth:`commit`.
        ``callback(offsets, error)`` (error None on success) runs on this thread from a later
        ``poll``, ``commit``, ``commit_async`` or ``close``, in the order of the calls; an
        exception it raises is logged, not raised. Without a callback a failure is logged.
        ``close()`` waits for the replies still due (bounded by the request timeout)."""
        self._check()
        group = self._membership()
        group.commit_async(self._commit_offsets(offsets), callback)

    def _commit_offsets(self, offsets: Mapping | None) -> dict:
        if offsets is None:
            return self._positions(self._fetches)
        wanted = {}
        for tp, value in offsets.items():
            offset, metadata = (value.offset, value.metadata) \
                if isinstance(value, OffsetAndMetadata) else (value, "")
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                raise errors.ConfigError(f"commit offset of {tp} must be an int >= 0, got "
                                         f"{offset!r}")
            if not isinstance(metadata, str):
                raise errors.ConfigError(f"commit metadata of {tp} must be a str, got "
                                         f"{metadata!r:.100}")
            wanted[as_topic_partition(tp)] = OffsetAndMetadata(offset, metadata) \
                if metadata else offset
        return wanted

    def committed(self, tp, metadata: bool = False) -> int | OffsetAndMetadata | None:
        """The group's committed offset of ``tp`` (the next to read), None if none; with
        ``metadata=True`` an OffsetAndMetadata (kafka-python's signature)."""
        self._check()
        tp = as_topic_partition(tp)
        if metadata:
            return self._membership().committed_metadata([tp]).get(tp)
        return self._membership().committed([tp]).get(tp)

    def _positions(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        fetches = self._fetches
        return {tp: fetches[tp].position for tp in tps
                if tp in fetches and fetches[tp].position is not None}

    def _group_poll(self) -> None:
        """From poll: heartbeat when due, rebalance when told, auto-commit when due."""
        group = self._group
        assert group is not None
        group.dispatch_replies()
        error, self._revoke_commit_error = self._revoke_commit_error, None
        if error is not None:
            raise error
        if not group.heartbeat_if_due():
            self._revoke(set(self._fetches), commit=False)  # lost: maybe someone else's now
        if group.rejoin_needed:
            try:
                self._rejoin(group)
            except errors.CoordinatorNotAvailableError as e:
                # The coordinator restarted under the rejoin (the supervisor brings it back
                # within a second): the next poll tries again; not the application's problem.
                log.info("group %r: rejoin: %s; trying again at the next poll",
                         group.group_id, e)
                group.rejoin_needed = True
        elif self.enable_auto_commit and time.monotonic() >= self._next_auto_commit:
            self._next_auto_commit = time.monotonic() + self.auto_commit_interval_ms / 1000
            self._commit_logged(self._fetches, "auto-commit")

    def _rejoin(self, group: GroupMembership) -> None:
        if not group.cooperative:
            # Eager: give everything back before rejoining; the commit rides on the join
            # (_commit_revoked): stored just before the join is served, not waited for.
            self._revoke(set(self._fetches), pipelined=True, with_join=True)
        assigned = group.join()
        revoked = set(self._fetches) - assigned
        if revoked:
            self._revoke(revoked, pipelined=True)  # ahead of our follow-up join, likewise
        added = sorted(assigned - set(self._fetches))
        if added:
            try:
                # Sent with the assignment: no offset fetch (the coordinator read them when the
                # join phase ended, after every previous owner's last commit).
                committed = {tp: group.assigned_offsets[tp] for tp in added}
                self._assign([*self._fetches, *added])
            except BaseException:
                # Nothing remembers the assignment but the fetches: rejoin at the next poll
                # (the same assignment comes back) rather than leave partitions unread.
                group.rejoin_needed = True
                raise
            for tp in added:
                offset = committed[tp]
                if offset is not None:
                    self._fetches[tp].set_position(offset.offset)  # checked against the log on poll
        self._next_auto_commit = time.monotonic() + self.auto_commit_interval_ms / 1000
        if added and self._on_assign is not None:
            self._on_assign(added)

    def _revoke(self, tps: set, commit: bool = True, pipelined: bool = False,
                with_join: bool = False) -> None:
        """Stop reading ``tps`` (their pending records go): commit their positions first if
        auto-commit is on and ``commit`` (without waiting for the reply if ``pipelined``: a
        join follows on the same socket; inside that join if ``with_join``), then tell
        on_revoke."""
        if not tps:
            return
        if commit and self.enable_auto_commit:
            if pipelined:
                self._commit_revoked(tps, with_join)
            else:
                self._commit_logged(tps, "commit before revoking")
        if self._on_revoke is not None:
            self._on_revoke(sorted(tps))
        self._assign([tp for tp in self._fetches if tp not in tps])

    def _commit_revoked(self, tps: Iterable[TopicPartition], with_join: bool = False) -> None:
        """Send the commit of partitions being revoked and go on without its reply: inside
        the join that follows if ``with_join``, else alone just before it on the same socket
        (docs/design/groups.md, "Decision: the revocation commit rides on the join"). Safe
        because the coordinator stores it (or refuses it) before it serves that join, which
        may hand the partitions to another member, so before the join phase can end and the
        new owners' offsets are read. The outcome comes with the join's answer: a refusal
        because the group moved on is logged (as _commit_logged does); any other is raised
        from the next poll, once this member holds its new assignment."""
        group = self._group
        assert group is not None

        def done(offsets: dict, error: Exception | None) -> None:
            if error is None:
                return
            if isinstance(error, (*REJOIN_ERRORS, errors.CoordinatorNotAvailableError,
                                  errors.RequestTimeoutError)):
                log.warning("group %r: commit before revoking failed, the group moved on (%s: "
                            "%s); records after the last commit may be delivered again",
                            group.group_id, type(error).__name__, error)
            elif self._revoke_commit_error is None:
                self._revoke_commit_error = error

        try:
            if with_join:  # one request less: docs/design/groups.md, "rides on the join"
                group.commit_with_join(self._positions(tps), done)
            else:
                group.commit_async(self._positions(tps), done)
        except (errors.CoordinatorNotAvailableError, errors.RequestTimeoutError) as e:
            done({}, e)  # not even sent (no coordinator connected): as a refusal

    def _commit_logged(self, tps: Iterable[TopicPartition], why: str) -> None:
        """Commit positions where a failure because the group moved on is no caller's error
        (auto-commit, revocation, close): logged, as Kafka does; the records after the last
        commit may then be read again by the partition's next owner. Other errors raise."""
        assert self._group is not None
        try:
            self._group.commit(self._positions(tps))
        except (*REJOIN_ERRORS, errors.CoordinatorNotAvailableError,
                errors.RequestTimeoutError) as e:
            log.warning("group %r: %s failed, the group moved on (%s: %s); records after the "
                        "last commit may be delivered again", self._group.group_id, why,
                        type(e).__name__, e)

    # -- positions --------------------------------------------------------------------------------

    def _fetch_for(self, tp) -> _Fetch:
        tp = as_topic_partition(tp)
        fetch = self._fetches.get(tp)
        if fetch is None:
            raise errors.IllegalStateError(f"partition {tp} is not assigned to this consumer")
        return fetch

    def seek(self, tp, offset: int) -> None:
        """Next poll of ``tp`` starts at ``offset`` (checked against the log on that poll)."""
        self._check()
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise errors.ConfigError(f"seek offset must be an int >= 0, got {offset!r}")
        fetch = self._fetch_for(tp)
        self._drop_buffered({fetch.tp}, rewind=False)
        fetch.set_position(offset)

    def seek_to_beginning(self, *tps) -> None:
        """Start at the log start offset of ``tps`` (all assigned partitions if none given)."""
        self._seek_to(tps, beginning=True)

    def seek_to_end(self, *tps) -> None:
        """Start at the high watermark of ``tps`` (all assigned if none): only new records."""
        self._seek_to(tps, beginning=False)

    def _seek_to(self, tps, beginning: bool) -> None:
        self._check()
        fetches = [self._fetch_for(tp) for tp in tps] if tps else list(self._fetches.values())
        self._drop_buffered({f.tp for f in fetches}, rewind=False)
        for fetch in fetches:
            state = fetch.control.read_state()
            fetch.set_position(state.log_start_offset if beginning else state.high_watermark)

    def position(self, tp) -> int:
        """The offset of the next record poll returns for ``tp`` (resolved now if need be)."""
        self._check()
        fetch = self._fetch_for(tp)
        if fetch.position is None:
            self._resolve(fetch, fetch.control.read_state(), "has no position yet")
        assert fetch.position is not None
        return fetch.position

    def highwater(self, tp) -> int:
        """The partition's published high watermark (the offset the next record will get)."""
        self._check()
        return self._fetch_for(tp).control.read_state().high_watermark

    def beginning_offsets(self, tps) -> dict[TopicPartition, int]:
        self._check()
        return {f.tp: f.control.read_state().log_start_offset for f in map(self._fetch_for, tps)}

    def end_offsets(self, tps) -> dict[TopicPartition, int]:
        self._check()
        return {f.tp: f.control.read_state().high_watermark for f in map(self._fetch_for, tps)}

    def offsets_for_times(self, timestamps) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        """Kafka's offsetsForTimes: for each assigned partition in ``timestamps``
        ({TopicPartition: ms since the epoch}), the first committed record whose timestamp is
        at or after that time (offset and timestamp), or None when there is none. Found
        through the segments' time indexes (the log's, as Kafka's ListOffsets); ``seek`` to
        the offset to replay from that time."""
        self._check()
        out: dict[TopicPartition, OffsetAndTimestamp | None] = {}
        for tp, ts in timestamps_arg(timestamps).items():
            fetch = self._fetch_for(tp)
            found = fetch.reader.offset_for_timestamp(ts, fetch.control.read_state())
            out[fetch.tp] = None if found is None else OffsetAndTimestamp(*found)
        return out

    def _resolve(self, fetch: _Fetch, state, why: str) -> None:
        """Apply auto_offset_reset to ``fetch`` (or raise OffsetOutOfRangeError)."""
        policy = self.auto_offset_reset
        if policy == "error":
            raise errors.OffsetOutOfRangeError(
                f"{fetch.tp}: position {fetch.position} {why} (log start "
                f"{state.log_start_offset}, high watermark {state.high_watermark}) and "
                f"auto_offset_reset='error'")
        fetch.set_position(state.log_start_offset if policy == "earliest" else state.high_watermark)

    # -- fetching ---------------------------------------------------------------------------------

    def _read(self, fetch: _Fetch):
        """A LogSlice of new committed batches at ``fetch.position``, or None when nothing new."""
        control = fetch.control
        seq = control.hw_seq
        if seq == fetch.seen_hw_seq and fetch.position == fetch.hw:
            return None  # nothing published since we last found nothing
        try:
            state = control.read_state()
        except errors.PartitionStateUnavailableError as exc:
            # The partition process stopped mid-publish for the whole bounded wait: preempted
            # on a starved host, or killed (the supervisor restarts it within a second). Not
            # the caller's error: nothing new from this partition this time; the next poll
            # reads again. (Seen raised from poll at load average ~90 on 2 cores.)
            log.warning("partition %s: %s; trying again at the next poll", fetch.tp, exc)
            return None
        fetch.seen_hw_seq, fetch.hw = seq, state.high_watermark
        for attempt in range(2):  # bounded: a second try after re-reading the state
            position = fetch.position
            if position is None:
                self._resolve(fetch, state, "has no position yet")
            elif not state.log_start_offset <= position <= state.high_watermark:
                if position > state.high_watermark and self._ahead_ok(fetch, position):
                    return None  # read from a ring past the log's end: the log follows
                self._resolve(fetch, state, "is out of range")
            position = fetch.position
            assert position is not None
            if position == state.high_watermark:
                return None
            try:
                return fetch.reader.read(position, self.fetch_max_bytes, state, verify_crc=False)
            except errors.OffsetOutOfRangeError:
                if attempt:
                    raise
                # Retention deleted the segment after the state we read: look again.
                state = control.read_state()
                fetch.hw = state.high_watermark
                if state.log_start_offset <= position:
                    raise
        return None

    @staticmethod
    def _ahead_ok(fetch: _Fetch, position: int) -> bool:
        """A position past the high watermark is a valid one to wait at when producers have
        taken offsets up to it: this consumer read from a ring, or another one did and
        committed past it (a group member that takes the partition over then waits for the
        log, ring reads or not)."""
        return fetch.control.offset_taken(position)

    def _ring_read(self, fetch: _Fetch) -> tuple[list, int] | None:
        """Records at ``fetch.position`` from the committed frame that holds it in one of
        the partition's rings, when the log has nothing there yet (decision 0005 step 5):
        (records, index of the one at the position), or None (nothing; the poll then also
        waits for a commit, see _sleep)."""
        position = fetch.position
        if position is None or position < fetch.hw:
            return None
        rings = fetch.rings
        if rings is None or rings.control is not fetch.control:
            if rings is not None:
                rings.close()
            rings = fetch.rings = RingReads(fetch.control, self._meta.prefix, fetch.topic,
                                            fetch.partition)
        # Before the look: a commit after this load wakes the sleep (the futex compares it),
        # and an offset taken after the next load comes with such a commit.
        seen = fetch.control.commit_seq
        taken = fetch.control.next_offset
        status, payload, base, span = rings.read(position)
        if status != ring_reads.FOUND:
            fetch.seen_commit_seq = seen if rings.limit() else None
            fetch.beyond_taken = status == ring_reads.NONE and position >= taken
            return None
        got = records.decode_records(payload, False, fetch.topic, fetch.partition)
        fetch.pending_end = base + span
        at = _index_of(got, position, base)
        if self._counters is not None:
            fetch.bytes_out += len(payload)
        return got, at

    def _fill(self, fetch: _Fetch, want: int, out: list) -> int:
        """Append up to ``want`` records of ``fetch`` to ``out``; returns how many. A read
        that finds only offsets without records (empty batches) moves the position past them
        and reads again (bounded), so records after a gap come in the same poll."""
        for _ in range(_GAP_READS_MAX):  # bounded
            got = self._fill_once(fetch, want, out)
            if got >= 0:
                return got
        return 0

    def _fill_once(self, fetch: _Fetch, want: int, out: list) -> int:
        """One read for :meth:`_fill`: records handed out, or -1 when the position only moved
        past offsets that hold no record."""
        pending = fetch.pending
        # Records are handed out from pending[at:], never by copying the rest of the list: a
        # backlog read with a small max_records would copy (or move) it at every poll.
        at = fetch.pending_at
        log_said_nothing, piece, ring_tried = False, None, False
        if not pending and self.read_rings and fetch.rings is not None and \
                fetch.position is not None and fetch.position >= fetch.hw >= 0:
            # At or past the log's end when we last looked: the ring first (its frame is
            # there until the partition releases it, and a ring read costs less than a log
            # read that has to find its place again).
            ring_tried = True
            got = self._ring_read(fetch)
            if got is not None:
                pending, at = got
                if at >= len(pending):
                    fetch.pending, fetch.pending_at = [], 0
                    return self._skip_gap(fetch)
        if not pending and TAIL_READ and not self.value_memoryview:
            pending = self._tail_read(fetch)
            if pending is not None:
                if not pending:
                    skipped = self._skip_gap(fetch)
                    if skipped or not self.read_rings:
                        return skipped
                    log_said_nothing = True
                at = 0
        if not pending:
            piece = None if log_said_nothing else self._read(fetch)
            if piece is None or piece.length == 0:
                got = self._ring_read(fetch) if self.read_rings and not ring_tried else None
                if got is None:
                    return 0
                pending, at = got
                if at >= len(pending):
                    fetch.pending, fetch.pending_at = [], 0
                    return self._skip_gap(fetch)
        if piece is not None and piece.length:
            if self._counters is not None:
                fetch.bytes_out += piece.length
            position = fetch.position
            fetch.pending_end = piece.last_offset + 1
            if self.value_memoryview:
                pending, at = self._view_records(fetch, piece), 0
            else:
                pending = records.decode_records(piece.data, self.check_crcs, fetch.topic,
                                                 fetch.partition)
                at = _index_of(pending, position, piece.first_offset)
                if at >= len(pending):
                    fetch.pending, fetch.pending_at = [], 0
                    return self._skip_gap(fetch)
        taken = self._hand_out(fetch, pending, at, want)
        if not taken:
            return 0
        out.extend(taken)
        return len(taken)

    def _hand_out(self, fetch: _Fetch, pending: list, at: int, want: int) -> list:
        """Up to ``want`` records of ``pending`` from ``at`` on: the rest stays pending, the
        position moves past them (and past an empty batch that ended the read)."""
        stop = at + want
        if stop < len(pending):
            taken = pending[at:stop]
            fetch.pending, fetch.pending_at = pending, stop
        else:
            taken = pending[at:] if at else pending
            fetch.pending, fetch.pending_at = [], 0
        if not taken:
            return taken
        fetch.position = taken[-1].offset + 1
        if not fetch.pending and fetch.pending_end > fetch.position:
            fetch.position = fetch.pending_end  # past an empty batch that ended the read
        if self._counters is not None:
            fetch.records_out += len(taken)
        return taken

    def _publish_counters(self, fetches: list, polls: int = 1) -> None:
        """Publish ``polls`` more polls, and the ring fast path's that are due, with what
        ``fetches`` handed out since the last publish (counters on)."""
        polls += self._counters_due
        self._counters_due = 0
        self._counters_next_ns = _monotonic_ns() + COUNTERS_PUBLISH_NS
        self._counters.publish(fetches, polls)  # type: ignore[union-attr]

    def _tail_read(self, fetch: _Fetch, wait_ms: int = 0) -> list | None:
        """New records at ``fetch.position`` in one C call when the last read ended exactly
        there in the active segment (a caught-up consumer); [] when nothing new; None when
        that is not the case, or anything is unusual: then ``_read`` does it in Python.

        ``wait_ms`` > 0: when nothing is new, the same call sleeps on the partition's
        hw_seq (as :meth:`ControlRegion.wait_hw_change`, spinning ``spin_ns`` first) and
        reads again once woken, so a wake-up runs no Python before the records are decoded:
        on the round trip's critical path (perf/RESULTS.md, eighth session)."""
        segment = fetch.reader.last_segment
        if segment is None or segment.map is None or segment.fd is None:
            return None
        hint, position = segment.hint_offset, fetch.position
        # At the hint, or a little past it (the records in between came from a ring): the C
        # read walks on from there, as LogReader does.
        if hint != position and not walks_on(hint, position):
            return None
        args = (fetch.control.buf, segment.map, segment.base_offset, position,
                segment.hint_position, segment.checked_end, segment.fd, self.fetch_max_bytes,
                self.check_crcs, fetch.topic, fetch.partition, wait_ms, self.spin_ns)
        status, hw_seq, hw, got, next_position, next_offset, checked_end, nbytes = \
            _native.tail_read(*args) if hint == position else _native.tail_read(*args, hint)
        if status == _native.TAIL_DECLINED:
            return None
        fetch.seen_hw_seq, fetch.hw = hw_seq, hw
        if status == _native.TAIL_NOTHING:
            return []
        segment.hint_offset, segment.hint_position = next_offset, next_position
        segment.checked_end = checked_end
        fetch.pending_end = next_offset
        if self._counters is not None:
            fetch.bytes_out += nbytes
        return got

    def _skip_gap(self, fetch: _Fetch) -> int:
        """Nothing to hand out from the last read: -1 when it ended past the position (only
        offsets without records were read: move past them), else 0."""
        if fetch.pending_end > fetch.position:
            fetch.position = fetch.pending_end
            return -1
        return 0

    def _view_records(self, fetch: _Fetch, piece) -> list:
        batch = _decode_columnar(piece, self.check_crcs)
        skip = int(np.searchsorted(batch.offsets, fetch.position))
        chunk = _Chunk(piece.data, piece.first_offset)
        data = piece.data
        out = []
        topic, partition = fetch.topic, fetch.partition
        offsets, stamps = batch.offsets.tolist(), batch.timestamps.tolist()
        ks, kl = batch.key_starts.tolist(), batch.key_lengths.tolist()
        vs, vl = batch.value_starts.tolist(), batch.value_lengths.tolist()
        for i in range(skip, len(offsets)):  # bounded by the records of one fetch
            key = data[ks[i]:ks[i] + kl[i]] if kl[i] >= 0 else None
            value = data[vs[i]:vs[i] + vl[i]] if vl[i] >= 0 else None
            out.append(ViewRecord(topic, partition, offsets[i], stamps[i], key, value, chunk))
        return out

    def _collect(self, max_records: int) -> list:
        out: list = []
        order = self._order
        n = len(order)
        start = self._next
        for i in range(n):  # bounded by the assigned partitions
            fetch = order[(start + i) % n]
            self._fill(fetch, max_records - len(out), out)
            if len(out) >= max_records:
                # Start the next poll after this partition, so none is starved.
                self._next = (start + i + 1) % n
                break
        return out

    def _ring_outcome(self, fetch: _Fetch, result: tuple, max_records: int) -> list | None:
        """What :meth:`_poll` hands out after a ring read (ring_take's result): the records,
        or None when the general path goes on (nothing found; what was learnt is kept)."""
        status, got, at, end, seen, beyond = result[:6]
        if status == _FOUND and at < len(got):
            fetch.pending_end = end
            # The counters: published by a later poll (before it may sleep), not here: off
            # the way from a producer's commit to the application.
            if at or len(got) > max_records:
                got = self._hand_out(fetch, got, at, max_records)
                if self._counters is not None:
                    self._counters_due += 1
            else:  # _hand_out's common case: every record (pending stays []); poll_ring too
                position = got[-1].offset + 1
                fetch.position = end if end > position else position
                if self._counters is not None:
                    fetch.records_out += len(got)
                    self._counters_due += 1
            return got
        if status is not None and status != _FOUND:
            fetch.seen_commit_seq, fetch.beyond_taken = seen, beyond
            if status == ring_reads.NONE and not beyond and TAIL_READ:
                # Taken but in no ring: the partition released its frame before we looked,
                # so the log has it, a little past the last log read (one C call; a missed
                # frame's poll makes a ping-pong's p99).
                got = self._tail_read(fetch)
                if got:
                    out = self._hand_out(fetch, got, 0, max_records)
                    if self._counters is not None:
                        self._counters_due += 1
                    return out
            # Else the general path looks, and its sleep also wakes for this partition's
            # commits.
        return None

    def poll(self, timeout_ms: float = 0, max_records: int = MAX_RECORDS_DEFAULT) -> list:
        """Up to ``max_records`` records, waiting up to ``timeout_ms`` for the first; [] on timeout.

        Records come partition by partition, each partition's in offset order. Waiting sleeps
        on the partitions' high-watermark futex (no polling; see the module doc).
        """
        if FAST_POLL and not self._closed and self._forks == _FORKS[0] and self._group is None:
            # One partition read from the rings, in one C call (native/src/module.c,
            # poll_ring: _poll's checks, its first ring read and wait, _ring_outcome's common
            # case; perf/RESULTS.md, seventeenth session): None when it did nothing, the
            # records, or a ring read that _poll goes on from.
            counting = self._counters is not None
            got = _poll_ring(self._order, timeout_ms, max_records, self.read_rings,
                             self.spin_ns, counting, self._counters_due, self._counters_next_ns,
                             BATCH_RECORDS_MAX)
            if got.__class__ is list:
                if counting:
                    self._counters_due += 1
            else:
                got = self._poll(timeout_ms, max_records, got)
        else:
            got = self._poll(timeout_ms, max_records, None)
        if not got:
            self._recheck_partitions()
        elif self._deserializing:
            return self._deserialize(got)
        return got

    def _deserialize(self, got: list) -> list:
        """``got`` through the deserializers. A record they fail on is not handed out, nor
        what follows it: each partition's position goes back to its first such record, and
        the records before it are returned; when it is the first, SerializationError (the
        next poll meets it again: ``seek`` past it to skip it, as with Kafka's consumer)."""
        out, failed_at, exc = serde.deserialize(got, self.key_deserializer,
                                                self.value_deserializer)
        if failed_at < 0:
            return out
        first: dict[TopicPartition, int] = {}
        for r in got[failed_at:]:  # bounded by one poll's records
            first.setdefault(TopicPartition(r.topic, r.partition), r.offset)
        for tp, offset in first.items():
            fetch = self._fetches.get(tp)
            if fetch is not None:
                fetch.set_position(offset)
        if out:
            return out
        bad = got[failed_at]
        raise errors.SerializationError(
            f"the deserializer raised for {bad.topic}/{bad.partition} offset {bad.offset}: "
            f"{type(exc).__name__}: {exc} (the position stays there: seek past it to skip it)"
        ) from exc

    def _recheck_partitions(self) -> None:
        """After a poll that found nothing, at most every PARTITION_RECHECK_MS: is each
        partition's control region still the one its broker serves? A clean stop marks it
        stopped, a restart (clean or after kill -9) or a re-created topic makes a new one under
        the same name; a consumer left on the old one would wait forever. Re-attach those (the
        position kept; a re-created topic's starts over by auto_offset_reset); a deleted topic
        raises UnknownTopicOrPartitionError (outside a group, whose rebalance handles it)."""
        now = _monotonic_ns()
        if now < self._recheck_next_ns or self._closed:
            return
        self._recheck_next_ns = now + PARTITION_RECHECK_MS * 1_000_000
        for fetch in list(self._fetches.values()):  # bounded by the assignment
            control = fetch.control
            if control.partition_status != L.PARTITION_STATUS_STOPPED and \
                    control.region.is_current():
                continue
            try:
                self._reattach(fetch)
            except errors.BrokerNotRunningError:
                continue  # not served again yet: the next look tries again
            except errors.UnknownTopicOrPartitionError:
                if self._group is None:
                    raise

    def _reattach(self, fetch: _Fetch) -> None:
        """``fetch`` on its partition's current control region (see _recheck_partitions)."""
        new, old = self._meta.reattach(fetch.topic, fetch.partition)
        topic_id = self._meta.topic(fetch.topic, refresh=False).topic_id
        fetch.reader.close()
        if fetch.rings is not None:
            fetch.rings.close()
            fetch.rings, fetch.seen_commit_seq = None, None
        fetch.control = new
        fetch.reader = LogReader(fetch.directory)
        fetch.seen_hw_seq = fetch.hw = -1
        fetch.beyond_taken = False
        if topic_id != fetch.topic_id:
            log.warning("%s: the topic was deleted and created again; its position starts "
                        "over (auto_offset_reset=%r)", fetch.tp, self.auto_offset_reset)
            fetch.topic_id = topic_id
            fetch.set_position(None)
        else:
            fetch.set_position(fetch.position)  # drops records decoded from the old mapping
        if old is not None:
            old.close()

    def _poll(self, timeout_ms: float, max_records: int, taken: tuple | None) -> list:
        """:meth:`poll` in Python (the reference poll_ring is tested against); ``taken``:
        poll_ring's ring read (ring_take's result and the ns its wait began) to go on from."""
        if self._closed or self._forks != _FORKS[0]:
            self._check()
        if not isinstance(max_records, int) or isinstance(max_records, bool) or max_records < 1:
            raise errors.ConfigError(f"max_records must be an int >= 1, got {max_records!r}")
        if not isinstance(timeout_ms, (int, float)) or timeout_ms != timeout_ms:
            raise errors.ConfigError(f"timeout_ms must be a number of ms, got {timeout_ms!r}")
        if self._counters_due and _monotonic_ns() >= self._counters_next_ns:
            self._publish_counters(self._order, 0)
        first = True
        if taken is None:
            deadline = time.monotonic() + timeout_ms / 1000.0 if timeout_ms else 0.0
        else:  # the first look and wait were poll_ring's: its outcome first, then the loop
            deadline = taken[6] / 1e9 + timeout_ms / 1000.0 if timeout_ms else 0.0
            got = self._ring_outcome(self._order[0], taken, max_records)
            if got is not None:
                return got
            first = False
        while True:  # bounded by the deadline
            if self._group is not None:
                self._group_poll()
            order = self._order
            if len(order) == 1 and self._group is None and self.read_rings:
                # One partition read from the rings: the read, the sleep until a producer's
                # commit and the read after it in one C call (docs/design/consumer.md). Kept
                # lean: after a wake-up every line here runs on cold caches (a ping-pong's
                # every poll; perf/RESULTS.md, thirteenth session).
                fetch = order[0]
                rings = fetch.rings
                position = fetch.position
                if rings is not None and not fetch.pending and position is not None and \
                        position >= fetch.hw >= 0 and rings.control is fetch.control:
                    wait_ms = 0
                    if first:
                        wait_ms = int(timeout_ms + 0.999) if timeout_ms > 0 else 0
                    elif timeout_ms:
                        left_ms = (deadline - time.monotonic()) * 1000.0
                        wait_ms = int(left_ms + 0.999) if left_ms > 0 else 0
                    # RingReads.take's C call itself (its Python wrapper only for a decline:
                    # the registry changed, or ring reads are off).
                    got = _ring_take(rings.control.buf, rings._bufs, rings._hints,
                                     rings._froms, position, rings._registry_seen,
                                     BATCH_RECORDS_MAX, fetch.topic, fetch.partition, wait_ms,
                                     self.spin_ns, fetch.seen_hw_seq)
                    if got[0] == _TAKE_DECLINED:
                        got = rings.take(position, BATCH_RECORDS_MAX, fetch.topic,
                                         fetch.partition, wait_ms, self.spin_ns,
                                         fetch.seen_hw_seq)
                    got = self._ring_outcome(fetch, got, max_records)
                    if got is not None:
                        return got
            first = False
            if len(order) == 1 and self._group is None and TAIL_READ and self._maps_segments \
                    and not self.value_memoryview and not (
                        self.read_rings and _native.atomic_load_u32(order[0].control.buf,
                                                                    _RING_READS)):
                # One partition, no group (nothing else to wake for), caught up: read, and if
                # nothing is new sleep and read again, in one C call (a wake-up runs no
                # Python before the records are decoded: docs/design/consumer.md).
                fetch = order[0]
                segment = fetch.reader.last_segment
                if not fetch.pending and segment is not None \
                        and segment.hint_offset == fetch.position:
                    wait_ms = 0
                    if timeout_ms:
                        left_ms = (deadline - time.monotonic()) * 1000.0
                        wait_ms = int(left_ms + 0.999) if left_ms > 0 else 0
                    got = self._tail_read(fetch, wait_ms)
                    if got:
                        fetch.pending, fetch.pending_at = got, 0
                        out: list = []
                        self._fill(fetch, max_records, out)
                        if self._counters is not None:
                            self._publish_counters(order)
                        return out
                    if got is not None:  # nothing new by the deadline, or a signal
                        if not wait_ms:
                            return []
                        continue  # the deadline decides
                    # Declined (before or after the sleep): the reference read below.
            out = self._collect(max_records)
            if out and self._counters is not None:
                self._publish_counters(order)
            if out or not timeout_ms:
                return out
            left_ms = (deadline - time.monotonic()) * 1000.0
            if left_ms <= 0:
                return out
            self._recheck_partitions()  # rate-limited: a restarted broker's regions
            if self.read_rings:
                self._sleep(left_ms, commits=True)
            else:
                self._sleep(left_ms)

    def poll_columnar(self, timeout_ms: float = 0, max_records: int | None = None
                      ) -> dict[TopicPartition, records.ColumnarBatch]:
        """New records as numpy columns per partition (``records.ColumnarBatch``), zero copy.

        Columns refer to the segment mapping (``batch.data``): values are sliced from it, and
        holding a batch keeps the mapping alive. At most ``max_records`` rows per partition
        (default: whatever one fetch of ``fetch_max_bytes`` holds). Headers are not decoded.
        {} on timeout.
        """
        self._check()
        deadline = time.monotonic() + timeout_ms / 1000.0 if timeout_ms else 0.0
        while True:  # bounded by the deadline
            if self._group is not None:
                self._group_poll()
            out = {}
            for fetch in self._order:  # bounded by the assigned partitions
                batch = self._fill_columnar(fetch, max_records, _GAP_READS_MAX)
                if batch is not None:
                    out[fetch.tp] = batch
            if out and self._counters is not None:
                self._publish_counters(self._order)
            if out or not timeout_ms:
                return out
            left_ms = (deadline - time.monotonic()) * 1000.0
            if left_ms <= 0:
                return out
            self._sleep(left_ms)

    def _fill_columnar(self, fetch: _Fetch, max_records: int | None, gaps: int = 0):
        if fetch.pending:
            # Records decoded for poll() but not handed out: read them again as columns.
            fetch.pending, fetch.pending_at = [], 0
        piece = self._read(fetch)
        if piece is None or piece.length == 0:
            return None
        batch = _decode_columnar(piece, self.check_crcs)
        skip = int(np.searchsorted(batch.offsets, fetch.position))
        if skip >= len(batch):
            # Only offsets without records (empty batches) from the position on: past them,
            # and read again (bounded), so that records after the gap come in this poll.
            if piece.last_offset + 1 > fetch.position and gaps > 0:
                fetch.position = piece.last_offset + 1
                return self._fill_columnar(fetch, max_records, gaps - 1)
            return None
        stop = len(batch) if max_records is None else min(len(batch), skip + max_records)
        whole = stop == len(batch)
        if skip or stop < len(batch):
            batch = replace(batch, offsets=batch.offsets[skip:stop],
                            timestamps=batch.timestamps[skip:stop],
                            key_starts=batch.key_starts[skip:stop],
                            key_lengths=batch.key_lengths[skip:stop],
                            value_starts=batch.value_starts[skip:stop],
                            value_lengths=batch.value_lengths[skip:stop])
        if len(batch) == 0:
            return None
        fetch.position = int(batch.offsets[-1]) + 1
        if whole and piece.last_offset + 1 > fetch.position:
            fetch.position = piece.last_offset + 1  # past an empty batch that ended the read
        if self._counters is not None:
            fetch.records_out += len(batch)
            fetch.bytes_out += piece.length
        return batch

    # -- waiting ----------------------------------------------------------------------------------

    def _sleep(self, left_ms: float, commits: bool = False) -> None:
        """Sleep until a partition publishes, or ``left_ms`` pass (see module doc); with
        ``commits``, also until a producer commits to a partition whose rings the last look
        read (poll, reading rings: client/ring_reads.py)."""
        order = self._order
        group = self._group
        if group is not None:
            # Wake for the next heartbeat and auto-commit; a member may own nothing for a while.
            left_ms = min(left_ms, group.ms_until_heartbeat())
            if self.enable_auto_commit:
                left_ms = min(left_ms, max(0.0, (self._next_auto_commit - time.monotonic()) * 1e3))
            if self._sleep_with_group_word(group, left_ms, commits):
                return
            if not order:
                time.sleep(left_ms / 1000.0)
                return
        if not order:
            if not self._fetches:
                raise errors.IllegalStateError(
                    "this consumer has no partitions assigned: pass topics to Consumer(...) or "
                    "call assign([...]) first")
            time.sleep(left_ms / 1000.0)  # every assigned partition is paused
            return
        for fetch in order:  # bounded by the assignment
            if fetch.control.partition_status == L.PARTITION_STATUS_STOPPED:
                # A stopped broker's region: nothing will publish there; look again soon
                # for its restart (_recheck_partitions).
                left_ms = min(left_ms, PARTITION_RECHECK_MS)
                break
        if len(order) == 1:
            fetch = order[0]
            if commits and fetch.seen_commit_seq is not None and fetch.beyond_taken:
                fetch.control.wait_commit(fetch.seen_commit_seq,
                                          min(left_ms, COMMIT_ONLY_SLEEP_MS_MAX), self.spin_ns)
            elif commits and fetch.seen_commit_seq is not None:
                fetch.control.wait_commit_or_hw(fetch.seen_hw_seq, fetch.seen_commit_seq,
                                                left_ms, self.spin_ns)
            else:
                fetch.control.wait_hw_change(fetch.seen_hw_seq, left_ms, self.spin_ns)
            return
        if self._news_since_last_look(order, commits):
            return
        global _FUTEX_WAITV
        if _FUTEX_WAITV and len(order) <= FUTEX_WAITV_WORDS_MAX:
            woke = ControlRegion.wait_any_hw_change(
                [f.control for f in order], [f.seen_hw_seq for f in order], left_ms,
                self.spin_ns, seen_commit_seqs=self._commit_words(order, commits))
            if woke is not None:
                return
            _FUTEX_WAITV = False  # a kernel before 5.16: one word at a time from now on
        fetch = order[self._sleep_next % len(order)]
        self._sleep_next += 1
        fetch.control.wait_hw_change(fetch.seen_hw_seq, min(left_ms, MULTI_PARTITION_SLEEP_MS),
                                     self.spin_ns)

    @staticmethod
    def _commit_words(order: list, commits: bool) -> list | None:
        return [f.seen_commit_seq for f in order] if commits else None

    @staticmethod
    def _news_since_last_look(order: list, commits: bool) -> bool:
        """A publish (or, reading rings, a commit) since our last look: no sleep at all."""
        for fetch in order:  # bounded by the assigned partitions
            if fetch.control.hw_seq != fetch.seen_hw_seq:
                return True
            if commits and fetch.seen_commit_seq is not None and \
                    fetch.control.commit_seq != fetch.seen_commit_seq:
                return True
        return False

    def _sleep_with_group_word(self, group: GroupMembership, left_ms: float,
                               commits: bool = False) -> bool:
        """One futex_waitv sleep on the partitions' hw_seq words and the group's wake word,
        so a rebalance wakes the poll at once (shm/group_wake.py). False when there is no
        word to sleep on, or futex_waitv is missing: the caller sleeps as without a group."""
        global _FUTEX_WAITV
        word = group.wake_wait_word()
        order = self._order
        if word is None or not _FUTEX_WAITV or len(order) >= FUTEX_WAITV_WORDS_MAX:
            return False
        if self._news_since_last_look(order, commits):
            return True
        woke = ControlRegion.wait_any_hw_change([f.control for f in order],
                                                [f.seen_hw_seq for f in order], left_ms,
                                                self.spin_ns, extra_words=[word],
                                                seen_commit_seqs=self._commit_words(order,
                                                                                    commits))
        if woke is None:
            _FUTEX_WAITV = False  # a kernel before 5.16
            return False
        return True

    # -- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        buffer = self._iter_buffer
        if self._iter_at < len(buffer):
            record = buffer[self._iter_at]
            self._iter_at += 1
            return record
        limit = self.consumer_timeout_ms
        deadline = None if limit is None else time.monotonic() + limit / 1000.0
        while True:  # ends with a record, or at consumer_timeout_ms
            wait = ITERATION_POLL_MS if deadline is None else \
                min(ITERATION_POLL_MS, max(0.0, (deadline - time.monotonic()) * 1000.0))
            got = self.poll(timeout_ms=wait)
            if got:
                self._iter_buffer, self._iter_at = got, 1
                return got[0]
            if deadline is not None and time.monotonic() >= deadline:
                raise StopIteration

    # -- lifecycle --------------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise errors.IllegalStateError("this consumer is closed")
        if os.getpid() != self._pid:
            self._after_fork()

    def _after_fork(self) -> None:
        """In a forked child: drop the parent's mappings and regions (without closing what the
        parent still uses) and attach our own; positions carry over."""
        self._pid = os.getpid()
        self._forks = _FORKS[0]
        old_meta, self._meta = self._meta, LocalMetadata(self.data_dir)
        old_meta.close()  # unmaps the child's copies only; the parent's stay
        # The parent's counters region stays the parent's (not unlinked): the child counts
        # in a region of its own.
        self._counters = self._new_counters() if self._counters is not None else None
        self._counters_due = 0
        self._counters_next_ns = 0
        for fetch in self._fetches.values():
            fetch.counter_slot = None
        if self._group_args is not None:
            # The parent's partitions and member id stay the parent's: the child joins as a
            # new member and gets its own share. The parent's socket is left alone (pyzmq does
            # not close a socket in a process that did not create it).
            for fetch in self._fetches.values():
                fetch.close()
            self._fetches, self._order, self._paused = {}, [], set()
            # Kept, never used: dropping it would only make pyzmq warn of an unclosed socket.
            self._inherited_group = self._group
            self._group = GroupMembership(**self._group_args)
            self._iter_buffer, self._iter_at = [], 0
            return
        for fetch in self._fetches.values():
            fetch.reader.close()
            fetch.control = self._meta.control(fetch.topic, fetch.partition)
            fetch.reader = LogReader(fetch.directory)
            fetch.pending, fetch.pending_at = [], 0
            fetch.seen_hw_seq = fetch.hw = -1
            if fetch.rings is not None:
                fetch.rings.close()  # the child's copies of the mappings
                fetch.rings, fetch.seen_commit_seq = None, None
        self._iter_buffer, self._iter_at = [], 0

    def close(self) -> None:
        """Release mappings and control regions. Records already handed out stay valid."""
        if self._closed:
            return
        if os.getpid() != self._pid:
            self._closed = True
            return  # the parent's objects: leave them to the parent
        try:
            if self._group is not None and self._group.member_id and self._fetches:
                try:
                    self._revoke(set(self._fetches))  # commits first when auto-commit is on
                except errors.BrokerNotRunningError as e:
                    # A worker whose broker died must still be able to shut down (Kafka's
                    # close() logs a failed final commit too).
                    log.warning("group %r: the commit at close failed: %s; records after the "
                                "last commit may be delivered again", self._group.group_id, e)
                    self._revoke(set(self._fetches), commit=False)
        finally:
            try:
                if self._group is not None:
                    # Replies of commit_async calls still due: their callbacks run now.
                    self._group.dispatch_replies(wait_ms=ADMIN_REQUEST_TIMEOUT_MS)
            except errors.ShmbrokerError as e:
                log.warning("group %r: waiting for commit_async replies at close: %s",
                            self._group.group_id, e)
            self._closed = True
            try:
                if self._group is not None:
                    self._group.leave()
            except errors.ShmbrokerError as e:
                # Not the caller's problem: the coordinator removes a member whose process
                # is gone, or whose session expires.
                log.warning("group %r: leaving at close failed: %s", self._group.group_id, e)
            finally:
                self._release()

    def _release(self) -> None:
        if self._counters is not None:
            self._counters.close()
            self._counters = None
        if self._group is not None:
            self._group.close()
        for fetch in self._fetches.values():
            fetch.close()
        self._fetches.clear()
        self._order = []
        self._meta.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Consumer({self.data_dir!r}, assigned={sorted(map(str, self._fetches))}, "
                f"closed={self._closed})")


__all__ = ["Consumer", "ConsumerRecord", "ViewRecord", "TopicPartition", "OFFSET_RESET_POLICIES"]
