"""Producer: local processes write records into a partition's shared-memory ring, the way
kafka-python's KafkaProducer is used::

    from shmbroker import Producer
    with Producer(broker="/var/lib/shmbroker", acks=1) as producer:
        future = producer.send("orders", b"payload", key=b"customer-17")
        topic, partition, offset = future.result(timeout=10)
        producer.send_batch("orders", numpy_rows, partition=3).result()   # one batch, encoded in C

How a record travels (docs/design/partition.md):

1. ``send`` encodes the record at once into a per-partition accumulator
   (``_native.RecordAccumulator``: the batch under construction, in C) and returns a light
   future: no Python object per record is kept, no syscall.
2. The accumulator becomes one RecordBatch v2 (header and CRC) and one ring frame, in one C
   call that also rings the partition's doorbell, when it is full (``batch_bytes_max``), when the ring is idle (the partition process has
   appended everything written before: nothing to wait for, so latency stays low when lightly
   loaded, and batches grow by themselves under load, like Kafka's accumulator while a request
   is in flight) and ``linger_ms`` has passed, or on ``flush``/``result``/``close``. A sparse
   send (PRODUCER_SPARSE_GAP_US or more after the one before) is written at once
   beside frames still in flight, up to ``max_in_flight`` unacknowledged frames (Kafka's
   max.in.flight.requests.per.connection; 1: only on an idle ring): it would batch nothing by
   waiting, and its latency would include the partition's round. Records
   that a ``send`` leaves behind (the ring was busy) are written by a background sender
   thread as soon as the ring goes idle, so ``send`` alone always delivers, as with Kafka.
   Its producer fields are Kafka's "not idempotent" (producer id, epoch and base sequence
   -1): a restarted partition process recognises frames it appended already by the offsets
   the ring write set in them at its commit (decision 0005; docs/design/partition.md,
   "Duplicates after a restart").
3. The partition process appends the frame, writes a completion (base offset), releases the
   space. The producer reads completions whenever it writes or waits, and resolves futures.

Durability per ``acks``: ``0``: the future resolves once the batch is in the ring (offset -1,
as Kafka); ``1``: once it is appended to the log (page cache: survives a crash of any of our
processes); ``"all"`` (or -1): once the log is fsynced (survives power loss). acks="all" is a
per-ring flag (``fsync_required``) the partition process reads before completing.

A full ring is back-pressure: the write sleeps on the ring's futex up to ``send_timeout_ms``,
then ``RingFullTimeoutError`` (nothing dropped). Errors are typed (shmbroker.errors).

Fork: a child process gets fresh rings (``os.register_at_fork``); it never writes into its
parent's rings and never sends records its parent had accumulated. Spawned processes simply
build their own Producer.

Thread-safe: one lock guards the accumulators and rings (the background sender takes it
too); waits for acks and for an idle ring sleep without it.
"""
from __future__ import annotations

import atexit
import os
import random
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, NamedTuple, Sequence

from .. import errors, records
from ..broker.lock import broker_pid
from ..config import (PRODUCER_BATCH_BYTES_DEFAULT, PRODUCER_BATCH_RECORDS_MAX,
                      PRODUCER_CLOSE_DRAIN_MS_MAX, PRODUCER_DELIVERY_TIMEOUT_MS_DEFAULT, PRODUCER_LINGER_MS_MAX,
                      PRODUCER_MAX_IN_FLIGHT_DEFAULT, PRODUCER_MAX_IN_FLIGHT_MAX,
                      PRODUCER_METADATA_MAX_AGE_MS, PARTITION_SERVE_WAIT_MS,
                      PRODUCER_RING_BYTES_DEFAULT, PRODUCER_SENDER_IDLE_MS_MAX,
                      PRODUCER_SENDER_QUIET_US, PRODUCER_SENDER_TIMER_SLICE_MS,
                      PRODUCER_SENDER_WAIT_MS_MAX, PRODUCER_SPARSE_GAP_US,
                      RING_BYTES_MAX, RING_BYTES_MIN,
                      RING_SEND_TIMEOUT_MS_DEFAULT, SPIN_NS_MAX, default_data_dir)
from ..layout import record_batch as RB
from ..layout import shm as L
from ..native import _native
from ..shm import names
from ..shm.liveness import process_alive
from ..shm.ring import RING_OK, Completion, RingProducer
from . import serde
from .metadata import LocalMetadata

#: Upper bound of the bytes one record adds to a batch besides its key, value and headers
#: (varints of length, timestamp delta, offset delta, key and value lengths; attributes;
#: header count), so an accumulated batch never exceeds the size it is allowed.
RECORD_OVERHEAD_BYTES_MAX = 32
#: Read completions at the latest when half the ring's COMPLETIONS_MAX slots hold ones not
#: read yet: a partition appending frame by frame writes one per frame, and it holds a ring
#: back whose slots are all unread. A dozing partition writes one per ring and round, for
#: all the frames it took (a spinning ping-pong: ~100 frames a millisecond), so the count of
#: batches in flight alone (32 before) made every such send past the 31st take the Python
#: write and reap (perf/RESULTS.md, fourteenth session).
_REAP_COMPLETIONS = L.COMPLETIONS_MAX // 2
#: ... or when this many batches of one ring wait for theirs (bounds the deque of them).
_REAP_INFLIGHT = 2 * PRODUCER_MAX_IN_FLIGHT_MAX
#: From this many batches in flight, a write whose oldest batch is acknowledged resolves at
#: most _REAP_SOME_BATCHES of them (_reap_some): a dozing partition acknowledges a round of a
#: few hundred sparse frames at once, and resolving them all in one send stalled a ping-pong
#: round trip by ~50-100 us every ~400 sends (perf/RESULTS.md, fifteenth session).
_REAP_SOME_INFLIGHT = 64
_REAP_SOME_BATCHES = 48
#: Longest single sleep while waiting for an ack: the partition's status is checked this often.
_ACK_WAIT_SLICE_MS = 200

_tuple_new = tuple.__new__
_READ_POSITION = L.RING["read_position"]
_COMPLETIONS_WRITTEN = L.RING["completions_written"]
_COMPLETIONS_READ = L.RING["completions_read"]
_ACKED_SEQUENCE = L.RING["acked_sequence"]
_WRITE_POSITION = L.RING["write_position"]
_PARTITION_STATUS = L.CONTROL["partition_status"]
#: A batch's producer fields: Kafka's values for a producer that is not idempotent.
_NO_PRODUCER_ID = _NO_EPOCH = _NO_SEQUENCE = -1
_load_u64 = _native.atomic_load_u64
#: Producer.send takes the C fast path (_native.SendPath) where it can. Tests set it False
#: (before making a Producer) to run the Python reference alone and compare the two.
FAST_SEND = True
#: ... and writes a due batch in C as well (the common case of ``_write``: sends with an
#: int partition, acks 1/all, room in the ring, completions not due). Tests set it False.
FAST_WRITE = True
#: ... and resolves acknowledged batches in C (``_native.resolve_inflight``: _resolve's common
#: case; a dozing partition acknowledges a few hundred at once). Tests set it False.
FAST_RESOLVE = True
#: ... and, in that C write, reads the ring's completions and resolves a few acknowledged
#: batches (``_reap_some``'s common case) instead of leaving the write to ``_write``. Tests
#: set it False to run ``_reap_some`` itself.
FAST_REAP_SOME = True
_resolve_inflight = _native.resolve_inflight


class RecordMetadata(NamedTuple):
    """Where a record went (a plain ``(topic, partition, offset)`` tuple compares equal)."""

    topic: str
    partition: int
    offset: int


# --- futures -------------------------------------------------------------------------------

class _Batch:
    """The records of one accumulator generation: one RecordBatch, one ring frame."""

    __slots__ = ("producer", "topic", "partition", "count", "base_offset", "error", "done",
                 "writer", "sequence", "deadline")

    def __init__(self, producer: "Producer", topic: str, partition: int):
        self.producer = producer
        self.topic = topic
        self.partition = partition
        self.count = 0
        self.base_offset = -1
        self.error: BaseException | None = None
        self.done = False
        self.writer: _Writer | None = None  # set once written to a ring
        self.sequence = -1
        self.deadline = float("inf")  # monotonic: once written, its ack is due by then

    def resolve(self, base_offset: int) -> None:
        self.base_offset = base_offset
        self.done = True

    def fail(self, error: BaseException) -> None:
        if self.done:
            return  # the first outcome stays (a timed-out batch later dropped with its ring)
        self.error = error
        self.done = True

    def wait(self, timeout: float | None) -> None:
        if not self.done:
            self.producer._wait_batch(self, timeout)
        if self.error is not None:
            raise self.error


class RecordFuture(_native.FutureBase):
    """The future of one ``send``: ``result(timeout=None)`` -> RecordMetadata (topic,
    partition, offset); raises the record's error (typed) or RequestTimeoutError. A light
    object (its batch and index, made in C by the accumulator), resolved from ring
    completions; not a concurrent.futures.Future."""

    __slots__ = ()

    def done(self) -> bool:
        batch = self._batch
        if not batch.done and batch.writer is not None:
            batch.producer._poll_acks(batch.writer)
        return batch.done

    def result(self, timeout: float | None = None) -> RecordMetadata:
        batch = self._batch
        batch.wait(timeout)
        offset = batch.base_offset + self._index if batch.base_offset >= 0 else -1
        return RecordMetadata(batch.topic, batch.partition, offset)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self._batch.wait(timeout)
        except errors.ShmbrokerError as exc:
            return exc
        return None

    def __repr__(self) -> str:
        state = "pending" if not self._batch.done else (
            f"error={self._batch.error!r}" if self._batch.error else "done")
        return f"RecordFuture({self._batch.topic}/{self._batch.partition}, {state})"


class BatchFuture:
    """The future of one ``send_batch``. ``result()`` -> RecordMetadata of its first record;
    ``offsets()`` -> a numpy int64 array with every record's offset, in input order.

    A batch is written as RecordBatches of at most ``batch_bytes_max`` bytes each (a record
    larger than that alone, up to the topic's max.message.bytes and the ring's largest frame);
    their offsets are consecutive within each piece but another producer's records may lie
    between pieces. A keyed batch without a
    partition is split by key, one piece per partition, and ``result()`` is a list of
    RecordMetadata, one per record.
    """

    def __init__(self, pieces: list[tuple[_Batch, Any]], keyed: bool = False):
        self._pieces = pieces  # (batch, indices in the input: a range or an index array)
        self._keyed = keyed

    def done(self) -> bool:
        for batch, _ in self._pieces:
            if not batch.done and batch.writer is not None:
                batch.producer._poll_acks(batch.writer)
        return all(b.done for b, _ in self._pieces)

    def _wait(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for batch, _ in self._pieces:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            batch.wait(left)

    def offsets(self, timeout: float | None = None):
        import numpy as np

        self._wait(timeout)
        n = sum(b.count for b, _ in self._pieces)
        out = np.empty(n, dtype=np.int64)
        for batch, where in self._pieces:
            out[where] = np.arange(batch.base_offset, batch.base_offset + batch.count) \
                if batch.base_offset >= 0 else -1
        return out

    def result(self, timeout: float | None = None):
        self._wait(timeout)
        if self._keyed:
            offsets = self.offsets()
            partitions = {}
            for batch, where in self._pieces:
                for i in (where if isinstance(where, range) else where.tolist()):
                    partitions[i] = batch.partition
            topic = self._pieces[0][0].topic
            return [RecordMetadata(topic, partitions[i], int(o)) for i, o in enumerate(offsets)]
        first = self._pieces[0][0]
        return RecordMetadata(first.topic, first.partition, first.base_offset)


# --- one ring ------------------------------------------------------------------------------

class _Writer:
    """This producer's ring to one partition, its registry slot, and the frames in flight."""

    __slots__ = ("topic", "partition", "control", "ring", "buf", "slot", "generation",
                 "next_sequence", "written_position", "inflight",
                 "payload_bytes_max", "sleepers", "closing")

    def __init__(self, topic: str, partition: int, control, ring: RingProducer, slot: int,
                 generation: int):
        self.topic = topic
        self.partition = partition
        self.control = control
        self.ring = ring
        self.buf = ring.buf
        self.slot = slot
        self.generation = generation
        self.next_sequence = ring.next_sequence
        self.written_position = ring.write_position
        self.inflight: deque[_Batch] = deque()
        self.payload_bytes_max = ring.payload_bytes_max
        # Threads sleeping on this ring without the producer's lock (ack waits, the sender):
        # the ring is unmapped only once they are out (an mmap with exports cannot close).
        self.sleepers = 0
        self.closing = False

    def idle(self) -> bool:
        """The partition process has appended (and released) everything written so far."""
        return _load_u64(self.buf, _READ_POSITION) == self.written_position

    def stopped(self) -> bool:
        return _native.atomic_load_u32(self.control.buf, _PARTITION_STATUS) == \
            L.PARTITION_STATUS_STOPPED


class _Accumulator:
    """Records waiting to become the next batch of one partition: encoded already, in
    ``records`` (C), which also makes their futures (pointing to ``records.batch``) and says
    after each append whether the batch is due (``records.write_due``: its ring is idle and
    linger_ms has passed, or it holds PRODUCER_BATCH_RECORDS_MAX records). ``records`` is
    bound to the writer's ring: ``unbind`` before the ring is unmapped."""

    __slots__ = ("topic", "partition", "writer", "records", "bytes_max", "bytes_target")

    def __init__(self, producer: "Producer", topic: str, partition: int, writer: _Writer,
                 bytes_max: int, bytes_target: int):
        self.topic = topic
        self.partition = partition
        self.writer = writer
        #: Bytes of records: the most one batch can hold (a record larger is too large), and
        #: the batch.size past which it is full (a larger record goes alone into a batch).
        self.bytes_max = bytes_max
        self.bytes_target = bytes_target
        self.records = _native.RecordAccumulator(bytes_max, RecordFuture, producer.linger_ms,
                                                 PRODUCER_BATCH_RECORDS_MAX,
                                                 PRODUCER_SPARSE_GAP_US,
                                                 producer.max_in_flight
                                                 if producer.max_in_flight > 1 else 0,
                                                 bytes_target)
        self.records.batch = _Batch(producer, topic, partition)
        self.records.bind(writer.buf)

    @property
    def batch(self) -> _Batch:
        return self.records.batch

    def unbind(self) -> None:
        self.records.unbind()


# --- fork and exit ---------------------------------------------------------------------------

_LIVE: "weakref.WeakSet[Producer]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for producer in list(_LIVE):
        producer._forget_after_fork()


def _close_at_exit() -> None:
    for producer in list(_LIVE):
        if producer._pid == os.getpid() and not producer._closed:
            try:
                producer.close(timeout=PRODUCER_CLOSE_DRAIN_MS_MAX / 1000)
            except errors.ShmbrokerError:
                pass


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)


# --- the background sender -------------------------------------------------------------------

def _sender_main(ref: "weakref.ref[Producer]", wake: threading.Event) -> None:
    """Kafka's sender thread, reduced to the one duty that needs a thread here: records a
    ``send`` left in an accumulator (their ring was busy) are written once the ring is idle
    and ``linger_ms`` has passed, even if the application never calls the producer again.

    It never takes the GIL while the application keeps sending (each time it did, CPython's
    forced GIL switch made the sending thread wait until this one got a CPU: -35% msgs/s on 2
    busy cores). It waits in C instead (``rings_wait_quiet``): until a ring it watches is idle
    and was not written for PRODUCER_SENDER_QUIET_US, which means the application, which
    writes on idle rings itself, has stopped sending there. It holds the producer only through
    a weak reference between turns, and ends when the producer closes, forks, is collected,
    or has had nothing pending for PRODUCER_SENDER_IDLE_MS_MAX."""
    while True:  # bounded: each turn sleeps; the thread ends as said above
        woken = wake.wait(PRODUCER_SENDER_IDLE_MS_MAX / 1000.0)
        producer = ref()
        if producer is None:
            return
        plan = producer._sender_round(woken)
        if plan is None:
            return
        writers, timeout_ms, poke = plan
        del producer  # no strong reference while asleep
        if not writers:
            if timeout_ms > 0:
                time.sleep(timeout_ms / 1000.0)
            continue
        try:
            _native.rings_wait_quiet([w.buf for w in writers], PRODUCER_SENDER_QUIET_US,
                                     max(1, int(timeout_ms)), poke)
        except errors.ShmbrokerError:
            pass  # a corrupt ring: the application's next call on it reports it
        finally:
            producer = ref()
            if producer is not None:
                producer._sender_woke(writers)
            del producer


def check_batch_values(values: Any) -> None:
    """send_batch's values: a 2-D uint8 numpy array (one row per record) or a sequence of
    bytes-like or None; TypeError naming what is not (a 1-D array or a list of ints would
    otherwise become records of the wrong bytes, or fail deep in the encoder)."""
    if hasattr(values, "dtype"):
        if len(values.shape) != 2 or values.dtype != "uint8":
            raise TypeError(f"send_batch: a numpy array of values must be 2-D uint8, one row "
                            f"per record; got shape {values.shape} of {values.dtype}")
        return
    for i, v in enumerate(values):  # bounded by the batch
        if v is not None and not isinstance(v, (bytes, bytearray, memoryview)):
            raise TypeError(f"send_batch: values[{i}] must be bytes-like or None, got "
                            f"{type(v).__name__}")


def _as_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)  # a snapshot: the caller may reuse its buffer after send()
    raise TypeError(f"{what} must be bytes-like or None, got {type(value).__name__}")


# --- the producer ----------------------------------------------------------------------------

class Producer:
    """Writes records to the topics of the broker serving ``broker`` (a data dir).

    ``acks``: 0, 1 or "all" (-1), see the module doc. ``linger_ms``: the longest a record waits
    for more to join its batch while the ring is idle (0: write at once when idle).
    ``batch_bytes_max``: write a batch once it holds this many bytes (Kafka's batch.size; a
    larger record is written alone in a batch of its own); a record is too large
    (RecordTooLargeError) only past the topic's max.message.bytes or the ring's largest frame
    (half of ``ring_bytes``). ``send_timeout_ms``: how long a write
    blocks on a full ring before RingFullTimeoutError. ``ring_bytes``: each (producer,
    partition) ring's data bytes (power of two). ``spin_ns``: busy-wait before sleeping on a
    full ring or for an ack (lower latency, more CPU). ``delivery_timeout_ms``: how long a
    written batch may wait for its ack (riding out a restart of the partition or the broker)
    before its futures fail with RequestTimeoutError (Kafka's delivery.timeout.ms, 2 min).
    ``max_in_flight``: unacknowledged frames per partition beside which a sparse send is still
    written at once (Kafka's max.in.flight.requests.per.connection; 1: only on an idle ring).
    ``key_serializer``, ``value_serializer``: kafka-python's, callables turning a key or value
    into bytes (None is not passed to them; client/serde.py).

    A record that ``send`` cannot write at once (its ring is busy) waits in the accumulator
    and is written by the background sender thread as soon as the ring is idle and
    ``linger_ms`` has passed; ``flush()`` writes and waits for every ack, and ``close()``
    flushes (as with Kafka).
    """

    def __new__(cls, broker: str | os.PathLike | None = None, *args: Any, **kwargs: Any):
        """``broker="tcp://host:port"`` (a router) makes a RemoteProducer: same API, over TCP
        (client/remote_producer.py)."""
        if cls is Producer and isinstance(broker, str) and broker.startswith("tcp://"):
            from .remote_producer import RemoteProducer
            cls = RemoteProducer
        return super().__new__(cls)

    def __init__(self, broker: str | os.PathLike | None = None, acks: int | str = 1,
                 linger_ms: float = 0, batch_bytes_max: int = PRODUCER_BATCH_BYTES_DEFAULT,
                 send_timeout_ms: int = RING_SEND_TIMEOUT_MS_DEFAULT,
                 ring_bytes: int = PRODUCER_RING_BYTES_DEFAULT, spin_ns: int = 0,
                 delivery_timeout_ms: int = PRODUCER_DELIVERY_TIMEOUT_MS_DEFAULT,
                 max_in_flight: int = PRODUCER_MAX_IN_FLIGHT_DEFAULT,
                 key_serializer: Callable[[Any], Any] | None = None,
                 value_serializer: Callable[[Any], Any] | None = None):
        self.key_serializer = serde.checked("key_serializer", key_serializer)
        self.value_serializer = serde.checked("value_serializer", value_serializer)
        self._serializing = key_serializer is not None or value_serializer is not None
        if acks in ("all", -1, "-1"):
            acks = -1
        elif acks in (0, 1, "0", "1"):
            acks = int(acks)
        else:
            raise errors.ConfigError(f"acks must be 0, 1 or 'all', got {acks!r}")
        for name, number in (("linger_ms", linger_ms), ("spin_ns", spin_ns),
                             ("send_timeout_ms", send_timeout_ms)):
            if number is not None and (not isinstance(number, (int, float)) or
                                       isinstance(number, bool) or number != number):
                raise errors.ConfigError(f"{name}={number!r} must be a number")
        if not 0 <= linger_ms <= PRODUCER_LINGER_MS_MAX:
            raise errors.ConfigError(f"linger_ms={linger_ms} is outside [0, {PRODUCER_LINGER_MS_MAX}]")
        if not isinstance(batch_bytes_max, int) or batch_bytes_max < 1:
            raise errors.ConfigError(f"batch_bytes_max={batch_bytes_max!r} must be a positive int")
        if not isinstance(ring_bytes, int) or not RING_BYTES_MIN <= ring_bytes <= RING_BYTES_MAX \
                or ring_bytes & (ring_bytes - 1):
            raise errors.ConfigError(f"ring_bytes={ring_bytes!r} must be a power of two in "
                                     f"[{RING_BYTES_MIN}, {RING_BYTES_MAX}]")
        if not 0 <= spin_ns <= SPIN_NS_MAX:
            raise errors.ConfigError(f"spin_ns={spin_ns} is outside [0, {SPIN_NS_MAX}]")
        if send_timeout_ms is not None and send_timeout_ms < 0:
            raise errors.ConfigError(f"send_timeout_ms={send_timeout_ms} must be >= 0")
        if not isinstance(delivery_timeout_ms, int) or isinstance(delivery_timeout_ms, bool) \
                or delivery_timeout_ms < 1:
            raise errors.ConfigError(f"delivery_timeout_ms={delivery_timeout_ms!r} must be a "
                                     f"positive int")
        if not isinstance(max_in_flight, int) or isinstance(max_in_flight, bool) \
                or not 1 <= max_in_flight <= PRODUCER_MAX_IN_FLIGHT_MAX:
            raise errors.ConfigError(f"max_in_flight={max_in_flight!r} must be an int in "
                                     f"[1, {PRODUCER_MAX_IN_FLIGHT_MAX}]")
        self.data_dir = os.path.realpath(os.fspath(broker) if broker is not None
                                         else default_data_dir())
        self.acks = acks
        self.linger_ms = linger_ms
        self.batch_bytes_max = batch_bytes_max
        self.send_timeout_ms = send_timeout_ms
        self.ring_bytes = ring_bytes
        self.spin_ns = spin_ns
        self.delivery_timeout_ms = delivery_timeout_ms
        self.max_in_flight = max_in_flight
        self._check_broker()
        self._init_state()
        _LIVE.add(self)

    def _init_state(self) -> None:
        self._pid = os.getpid()
        self._closed = False
        # As a threading.Lock, but one word that the C send path takes with a CAS (~370
        # instructions per send less; native/include/shmb/mutex.h).
        self._lock = _native.Mutex()
        self._cond = threading.Condition(self._lock)  # a ring's sleepers left it
        self._sender: threading.Thread | None = None
        self._sender_wake = threading.Event()
        # Producer.send in C (see send below); it uses this lock and these dicts, so made
        # once per Producer and pointed at the new ones here (also after a fork: a `send`
        # bound before the fork must not reach the parent's accumulators).
        path = self.__dict__.get("_send_path")
        if path is None:
            path = self._send_path = _native.SendPath(_Accumulator, Producer._send_python,
                                                      Producer._after_append)
        path.enabled = FAST_SEND and not self._serializing  # serializers: the reference
        # The write of a due batch in C too (SendPath's sendpath_write): _write's common case.
        path.configure(_Batch if FAST_WRITE else None, self.acks, self.delivery_timeout_ms,
                       _REAP_INFLIGHT, _REAP_COMPLETIONS, _REAP_SOME_INFLIGHT,
                       Completion if FAST_RESOLVE and FAST_REAP_SOME else None,
                       _REAP_SOME_BATCHES)
        self._sender_armed = False  # records are pending and the sender knows
        self._sender_poke = bytearray(1)  # non-zero: the sender's wait in C ends
        self._metadata = LocalMetadata(self.data_dir)
        self._writers: dict[tuple[str, int], _Writer] = {}
        self._accs: dict[tuple[str, int], _Accumulator] = {}
        self._sticky: dict[str, _Accumulator] = {}
        self._partition_counts: dict[str, tuple[int, float]] = {}  # count, expiry
        path.reset(self._lock, self._accs, self._sticky, self._partition_counts)

    def _check_broker(self) -> None:
        if broker_pid(self.data_dir) is None:
            raise errors.BrokerNotRunningError(
                f"no broker is running on data dir {self.data_dir}: start one with "
                f"`shmbroker serve --data-dir {self.data_dir}`")

    # -- the hot path ---------------------------------------------------------------------------

    @property
    def _sender_armed(self) -> bool:
        """Records are pending and the sender knows. Kept in the SendPath, which reads it
        after each append in C."""
        return bool(self._send_path.armed)

    @_sender_armed.setter
    def _sender_armed(self, armed: bool) -> None:
        self._send_path.armed = armed

    def _send_python(self, topic: str, value: Any, key: Any = None, partition: int | None = None,
                     headers: Sequence[tuple[str, Any]] | None = None,
                     timestamp: int | None = None) -> RecordFuture:
        """The reference of ``send`` (and its fallback for what the C fast path leaves).

        Queue one record; returns its future. Raises at once for an unknown topic or
        partition, a record too large for a batch, a broker that is not running, a closed
        producer, and RingFullTimeoutError when writing a full batch blocked too long."""
        if self._serializing:
            key, value = serde.serialize(self.key_serializer, self.value_serializer, key, value)
        # acquire/release rather than `with`: ~100 ns instead of ~250 ns on this hot path.
        lock = self._lock
        lock.acquire()
        try:
            if partition is None:
                if key is None:
                    acc = self._sticky.get(topic)
                    if acc is None:
                        acc = self._sticky_switch(topic, None)
                else:
                    acc = self._keyed_accumulator(topic, key)
            else:
                acc = self._accs.get((topic, partition))
                if acc is None:
                    acc = self._accumulator(topic, partition)
            # Encoded now, in C (type checks included): the caller may reuse its buffers.
            records_ = acc.records
            if headers is None and timestamp is None:
                future = records_.append(value, key)
            else:
                future = records_.append(value, key, headers, timestamp)
            if future is None:
                acc, future = self._append_after_write(acc, value, key, headers, timestamp)
                records_ = acc.records
            # Write now when the ring is idle (and linger_ms has passed), as the accumulator
            # found; else the background sender writes the records once it is.
            if records_.write_due:
                self._write(acc)
            elif not self._sender_armed:
                self._arm_sender()
            return future
        finally:
            lock.release()

    #: ``producer.send(...)`` is one C call (_native.SendPath, native/src/module.c): the common
    #: cases (an int partition, or neither key nor partition, whose accumulator exists) are done
    #: there under ``_lock``; everything else calls ``_send_python`` above, which behaves as
    #: ``send`` always did. ``Producer.send`` (on the class) is ``_send_python`` itself.
    send = _native.SendMethod(_send_python)

    def _after_append(self, acc: _Accumulator) -> None:
        """The end of ``_send_python``, for the C fast path (lock held): the record is in
        ``acc`` and its batch is due, or the sender thread is not armed."""
        if acc.records.write_due:
            self._write(acc)
        elif not self._sender_armed:
            self._arm_sender()

    def _append_after_write(self, acc: _Accumulator, value, key, headers,
                            timestamp) -> tuple[_Accumulator, RecordFuture]:
        """The record did not fit beside the accumulated ones: write them, then append it to
        the partition's fresh batch; or it fits in no batch: RecordTooLargeError."""
        if acc.records.last_record_bytes > acc.bytes_max:
            self._too_large(acc, acc.records.last_record_bytes)
        self._write(acc)
        acc = self._accs.get((acc.topic, acc.partition)) or \
            self._accumulator(acc.topic, acc.partition)
        future = acc.records.append(value, key, headers, timestamp)
        assert future is not None  # an empty batch takes any record that is not too large
        return acc, future

    # -- the background sender (lock held in each of these) ------------------------------------

    def _arm_sender(self) -> None:
        """Records were left in an accumulator: make sure the sender thread will write them."""
        self._sender_armed = True
        self._sender_wake.set()
        if self._sender is None:
            thread = threading.Thread(target=_sender_main,
                                      args=(weakref.ref(self), self._sender_wake),
                                      name="shmbroker-producer-sender", daemon=True)
            self._sender = thread
            thread.start()

    def _sender_round(self, woken: bool):
        """One turn of the sender thread: write every accumulator whose ring is idle and whose
        linger passed; say what to wait for next: ``(writers, timeout_ms, poke)``: their rings
        (``rings_wait_quiet``), or with no writers a timer (0: back to the Event); None: the
        thread ends."""
        with self._lock:
            if self._closed or self._pid != os.getpid() \
                    or self._sender is not threading.current_thread():
                return None
            self._sender_poke[0] = 0
            busy: list[_Writer] = []
            timer_ms = None
            now_ms = time.monotonic() * 1000.0
            for acc in list(self._accs.values()):
                writer = acc.writer
                if not acc.records.count or writer.closing or writer.stopped():
                    continue  # a stopped partition: the application's next call reports it
                if _load_u64(writer.buf, _READ_POSITION) != writer.written_position:
                    busy.append(writer)
                    continue
                left_ms = (self.linger_ms - (now_ms - acc.records.first_ms)
                           if self.linger_ms else 0)
                if left_ms > 0:
                    timer_ms = left_ms if timer_ms is None else min(timer_ms, left_ms)
                    continue
                try:
                    self._write(acc)
                except (errors.ShmbrokerError, TypeError, ValueError):
                    pass  # the batch's futures carry the error
            if busy:
                busy = busy[:_native.QUIET_RINGS_MAX]  # the rest: next turn
                for writer in busy:
                    writer.sleepers += 1
                    # We wait for the partition to take the ring: a dozing one now.
                    writer.control.ring_doorbell_urgent()
                timeout_ms = PRODUCER_SENDER_WAIT_MS_MAX if timer_ms is None else timer_ms
                return busy, timeout_ms, self._sender_poke
            if timer_ms is not None:  # a linger, in slices so that close() need not wait
                return [], min(timer_ms, PRODUCER_SENDER_TIMER_SLICE_MS), self._sender_poke
            self._sender_armed = False
            self._sender_wake.clear()
            if not woken:  # idle for PRODUCER_SENDER_IDLE_MS_MAX: end (a new one on demand)
                self._sender = None
                return None
            return [], 0, self._sender_poke

    def _sender_woke(self, writers: list[_Writer]) -> None:
        with self._lock:
            for writer in writers:
                self._left_ring(writer)

    def _left_ring(self, writer: _Writer) -> None:
        writer.sleepers -= 1
        if writer.closing:
            self._cond.notify_all()

    def _retire(self, writer: _Writer) -> None:
        """No thread may sleep on ``writer``'s ring from now on; wait until those that do have
        left it (they sleep in slices of at most _ACK_WAIT_SLICE_MS), so it can be unmapped."""
        writer.closing = True
        if writer.sleepers:
            self._sender_poke[0] = 1  # the sender's wait ends within PRODUCER_SENDER_QUIET_US
            self._cond.wait_for(lambda: writer.sleepers == 0,
                                timeout=4 * _ACK_WAIT_SLICE_MS / 1000.0)

    def _too_large(self, acc: _Accumulator, record_bytes: int) -> None:
        # Name the limit that binds, and what lifts it where the producer can.
        if acc.bytes_max == acc.writer.payload_bytes_max - RB.HEADER_SIZE:
            limit = (f"this producer's rings (ring_bytes={self.ring_bytes}) take frames of at "
                     f"most {acc.writer.payload_bytes_max} bytes: a larger ring_bytes takes "
                     f"larger records, up to the topic's max.message.bytes")
        else:
            limit = "the topic's max.message.bytes, less the batch header"
        raise errors.RecordTooLargeError(
            f"a record of {record_bytes} bytes encoded (key, value and headers) does not fit "
            f"in a batch of {acc.topic}/{acc.partition}: at most {acc.bytes_max} bytes of "
            f"records ({limit})")

    # -- partitions and accumulators -----------------------------------------------------------

    def partitions_for(self, topic: str) -> set[int]:
        """The topic's partitions (kafka-python's ``partitions_for``);
        UnknownTopicOrPartitionError for a topic that does not exist."""
        with self._lock:
            return set(range(self._partitions(topic)))

    def _partitions(self, topic: str) -> int:
        """The topic's partition count for keyed and keyless sends, re-read (a stat of
        topics.json) at most every PRODUCER_METADATA_MAX_AGE_MS, so partitions added with
        `topics alter` are used (Kafka: metadata.max.age.ms)."""
        cached = self._partition_counts.get(topic)
        now = time.monotonic()
        if cached is None or now >= cached[1]:
            self._check_open()
            cached = self._partition_counts[topic] = (
                self._metadata.partitions(topic), now + PRODUCER_METADATA_MAX_AGE_MS / 1000.0)
        return cached[0]

    def _keyed_accumulator(self, topic: str, key: Any) -> _Accumulator:
        if type(key) is not bytes:
            key = _as_bytes(key, "key")
        partition = records.partition_for_key(key, self._partitions(topic))
        acc = self._accs.get((topic, partition))
        return acc if acc is not None else self._accumulator(topic, partition)

    def _sticky_switch(self, topic: str, previous: int | None) -> _Accumulator:
        """Kafka's sticky partitioner: keyless records stick to one partition until its batch
        is written, then move to another one chosen at random."""
        count = self._partitions(topic)
        partition = random.randrange(count)
        if previous is not None and count > 1 and partition == previous:
            partition = (partition + 1 + random.randrange(count - 1)) % count
        acc = self._accs.get((topic, partition))
        if acc is None:
            acc = self._accumulator(topic, partition)
        self._sticky[topic] = acc
        return acc

    def _accumulator(self, topic: str, partition: int) -> _Accumulator:
        self._check_open()
        if not isinstance(partition, int) or isinstance(partition, bool):
            raise errors.UnknownTopicOrPartitionError(f"partition must be an int, got {partition!r}")
        writer = self._writer(topic, partition)
        topic_limit = self._metadata.topic(topic, refresh=False).log_config.batch_bytes_max
        # As Kafka: batch.size (batch_bytes_max) is when a batch is full, not a limit on a
        # record; a larger one, up to max.message.bytes, is written in a batch of its own.
        bytes_max = min(topic_limit - RB.HEADER_SIZE, writer.payload_bytes_max - RB.HEADER_SIZE)
        bytes_target = min(self.batch_bytes_max + RECORD_OVERHEAD_BYTES_MAX, bytes_max)
        acc = self._accs[(topic, partition)] = _Accumulator(self, topic, partition, writer,
                                                            bytes_max, bytes_target)
        return acc

    def _writer(self, topic: str, partition: int) -> _Writer:
        """This producer's ring to the partition: a registry slot claimed, the ring created
        (0600), the slot set READY, the partition process told (registry_changes)."""
        writer = self._writers.get((topic, partition))
        if writer is not None:
            return writer
        self._metadata.check_partition(topic, partition)
        # A topic created a moment ago may not be served yet: wait for it, as Kafka's
        # producer waits for metadata (bounded by send_timeout_ms as well).
        wait_ms = PARTITION_SERVE_WAIT_MS if self.send_timeout_ms is None else \
            min(PARTITION_SERVE_WAIT_MS, self.send_timeout_ms)
        control = self._metadata.control(topic, partition, wait_ms)
        if control.partition_status == L.PARTITION_STATUS_STOPPED:
            self._metadata.forget(topic, partition)
            self._check_broker()
            control = self._metadata.control(topic, partition)
        slot, generation = control.claim_slot(self.ring_bytes)
        name = names.ring_name(self._metadata.prefix, topic, partition, slot, generation)
        try:
            ring = RingProducer.create(name, self.ring_bytes, partition=partition, slot=slot,
                                       generation=generation, control=control,
                                       acks=self.acks != 0)
        except BaseException:
            control.release_slot(slot, os.getpid())
            raise
        ring.set_fsync_required(self.acks == -1)
        control.set_slot_state(slot, L.SLOT_READY)
        control.announce_registry_change()
        writer = self._writers[(topic, partition)] = _Writer(topic, partition, control, ring,
                                                             slot, generation)
        return writer

    # -- writing batches -----------------------------------------------------------------------

    def _write(self, acc: _Accumulator) -> None:
        """The accumulator's records become one batch and one ring frame (blocks while the
        ring is full, up to send_timeout_ms)."""
        records_ = acc.records
        count = records_.count
        if not count:
            return
        batch = records_.batch
        batch.count = count
        records_.batch = _Batch(self, acc.topic, acc.partition)
        if self._sticky.get(acc.topic) is acc:
            self._sticky_switch(acc.topic, acc.partition)
        writer = acc.writer
        if writer.stopped():
            error = self._follow_restart(acc)
            if error is not None:
                records_.clear()
                batch.fail(error)
                raise error
            writer = acc.writer  # a restarted broker's ring: these records go there
        status, first, wpos = records_.write_ring(writer.buf, writer.control.buf,
                                               _NO_PRODUCER_ID, _NO_EPOCH, _NO_SEQUENCE)
        if status == RING_OK:  # _after_write, inlined for one batch (the hot path)
            writer.next_sequence = first + 1
            writer.written_position = wpos
            if self.acks == 0:
                batch.resolve(-1)
                return
            batch.writer, batch.sequence = writer, first
            batch.deadline = time.monotonic() + self.delivery_timeout_ms / 1000.0
            inflight = writer.inflight
            inflight.append(batch)
            # Completions are read when a future is asked (result, done, flush) and here
            # once in a while: often enough that the ring's completion slots never fill (the
            # partition would hold the ring back), not once per batch.
            if len(inflight) >= _REAP_INFLIGHT or \
                    _load_u64(writer.buf, _COMPLETIONS_WRITTEN) - \
                    _load_u64(writer.buf, _COMPLETIONS_READ) >= _REAP_COMPLETIONS:
                self._reap(writer)
            elif len(inflight) >= _REAP_SOME_INFLIGHT and \
                    inflight[0].sequence < _load_u64(writer.buf, _ACKED_SEQUENCE):
                self._reap_some(writer)
            return
        # No room now: the blocking write (wait for space, up to send_timeout_ms).
        self._write_frames(writer, [records_.encode(_NO_PRODUCER_ID, _NO_EPOCH, _NO_SEQUENCE)],
                           [batch])

    def _write_frames(self, writer: _Writer, payloads: list, batches: list[_Batch]) -> None:
        if writer.stopped():
            error = self._partition_stopped(writer)
            for batch in batches:
                batch.fail(error)
            raise error
        try:
            first = writer.ring.send_many(payloads, self.send_timeout_ms, self.spin_ns)
        except errors.RingFullTimeoutError as exc:
            written = getattr(exc, "written", 0)
            for batch in batches[written:]:
                batch.fail(exc)
            self._after_write(writer, batches[:written], writer.next_sequence)
            raise
        self._after_write(writer, batches, first)

    def _after_write(self, writer: _Writer, batches: list[_Batch], first: int) -> None:
        if not batches:
            return
        assert first == writer.next_sequence, (first, writer.next_sequence)
        writer.next_sequence = first + len(batches)
        writer.written_position = _load_u64(writer.buf, _WRITE_POSITION)
        if self.acks == 0:
            for batch in batches:
                batch.resolve(-1)
        else:
            deadline = time.monotonic() + self.delivery_timeout_ms / 1000.0
            for i, batch in enumerate(batches):
                batch.writer, batch.sequence, batch.deadline = writer, first + i, deadline
                writer.inflight.append(batch)
            self._reap(writer)

    def _poll_acks(self, writer: _Writer) -> None:
        """Resolve what completions say, now (a future's done())."""
        with self._lock:
            if not writer.closing and self._writers.get((writer.topic, writer.partition)) is writer:
                self._reap(writer)

    def _reap(self, writer: _Writer) -> None:
        """Resolve futures from the ring's completions (frames first..last got consecutive
        offsets from base_offset, or an error code)."""
        self._resolve(writer, writer.ring.poll_completions())

    def _reap_some(self, writer: _Writer) -> None:
        """Lock held. Resolves at most _REAP_SOME_BATCHES acknowledged batches, oldest first;
        what is left of a completion goes back to the front of the ring's unread ones (any
        later _reap takes it from there)."""
        if not FAST_RESOLVE:
            self._reap(writer)
            return
        pending = writer.ring.pending_completions()
        if not pending:
            return
        handled, next_first, next_offset = _resolve_inflight(writer.inflight, pending, _Batch,
                                                             _REAP_SOME_BATCHES)
        if next_first < 0 and handled < len(pending):
            self._reap(writer)  # an error code or an overwritten completion: the reference's
            return
        del pending[:handled]
        if next_first >= 0:
            rest = pending[0]
            # tuple.__new__: NamedTuple's own __new__ is a Python frame (~1 us cold).
            pending[0] = _tuple_new(Completion, (next_first, rest.last_sequence, next_offset,
                                                 rest.error_code))

    def _resolve(self, writer: _Writer, completions) -> None:
        inflight = writer.inflight
        if FAST_RESOLVE and completions:
            # C resolves each completion without an error code; what it leaves (an error
            # code, a batch whose completion was overwritten) is the reference's below.
            handled = _resolve_inflight(inflight, completions, _Batch)
            if handled == len(completions):
                return
            completions = completions[handled:]
        for first, last, base_offset, error_code in completions:
            offset = base_offset
            while inflight and inflight[0].sequence <= last:  # bounded by inflight
                batch = inflight.popleft()
                if batch.sequence < first:
                    # Its completion was overwritten (cannot happen while we read them).
                    batch.fail(errors.ShmbrokerError(
                        f"no completion for frame {batch.sequence} of {writer.ring.name}"))
                elif error_code:
                    cls = errors.ERRORS_BY_CODE.get(error_code, errors.ShmbrokerError)
                    batch.fail(cls(f"partition {writer.topic}/{writer.partition} rejected the "
                                   f"batch (frame {batch.sequence}): {cls.__name__}"))
                else:
                    if not batch.done:  # done: failed by its delivery timeout (_expire)
                        batch.resolve(offset)
                    offset += batch.count

    def _partition_stopped(self, writer: _Writer, keep: _Accumulator | None = None
                           ) -> errors.ShmbrokerError:
        """The partition stopped cleanly (the broker shut down, or the topic was deleted):
        frames in flight will never be appended. Drop the ring (a restarted broker gets a new
        one) and fail what was in flight."""
        try:
            self._metadata.topic(writer.topic)  # re-read: is the topic still there?
            error: errors.ShmbrokerError = errors.BrokerNotRunningError(
                f"partition {writer.topic}/{writer.partition} was stopped (broker on "
                f"{self.data_dir} shut down) before acknowledging")
        except errors.UnknownTopicOrPartitionError:
            error = errors.UnknownTopicOrPartitionError(
                f"topic {writer.topic!r} was deleted before partition "
                f"{writer.topic}/{writer.partition} acknowledged")
        except errors.ShmbrokerError as exc:  # no data dir any more, ...
            error = errors.BrokerNotRunningError(
                f"partition {writer.topic}/{writer.partition} was stopped before "
                f"acknowledging ({exc})")
        # A clean stop drains the rings first: what it appended has completions in the ring
        # (its header intact), and they say so, not this error; so do those read and not
        # yet resolved (_reap_some resolves a few batches per send). Only the rest fail.
        self._reap(writer)
        self._drop_writer(writer, error, keep)
        return error

    def _follow_restart(self, acc: _Accumulator) -> errors.ShmbrokerError | None:
        """``acc``'s partition stopped cleanly before its records were written: settle the old
        ring (as _partition_stopped), and when the broker serves the partition again (it was
        restarted) bind ``acc`` to a new ring there, so its records are written once, there
        (None). Otherwise the error for them (acc then dropped, as by _partition_stopped)."""
        old = acc.writer
        error = self._partition_stopped(old, keep=acc)
        if not isinstance(error, errors.BrokerNotRunningError) or \
                broker_pid(self.data_dir) is None:
            self._drop_accumulator(acc, error)
            return error
        try:
            writer = self._writer(acc.topic, acc.partition)
        except errors.ShmbrokerError as exc:
            self._drop_accumulator(acc, exc)
            return exc
        acc.writer = writer
        acc.records.bind(writer.buf)
        return None

    def _drop_writer(self, writer: _Writer, error: BaseException,
                     keep: _Accumulator | None = None) -> None:
        """Fail ``writer``'s frames in flight, unmap its ring, free its slot; its accumulator
        is dropped too, unless it is ``keep`` (then only unbound: _follow_restart binds it
        to the next ring)."""
        self._retire(writer)
        for batch in writer.inflight:
            batch.fail(error)
        writer.inflight.clear()
        key = (writer.topic, writer.partition)
        self._writers.pop(key, None)
        self._send_path.forget()  # it may hold this accumulator
        if keep is not None and self._accs.get(key) is keep:
            keep.unbind()
        else:
            acc = self._accs.get(key)
            if acc is not None:
                self._drop_accumulator(acc, error)
        writer.ring.close(drain_timeout_ms=0)
        writer.control.release_slot(writer.slot, os.getpid())
        self._metadata.forget(writer.topic, writer.partition)

    def _drop_accumulator(self, acc: _Accumulator, error: BaseException) -> None:
        """Forget ``acc`` (its batch's futures fail with ``error``); the next send to its
        partition makes a new one."""
        key = (acc.topic, acc.partition)
        if self._accs.get(key) is acc:
            del self._accs[key]
        self._send_path.forget()
        acc.batch.fail(error)
        acc.unbind()
        if self._sticky.get(acc.topic) is acc:
            del self._sticky[acc.topic]

    # -- waiting --------------------------------------------------------------------------------

    def _wait_batch(self, batch: _Batch, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if batch.writer is None and not batch.done:
                acc = self._accs.get((batch.topic, batch.partition))
                if acc is not None and acc.batch is batch:
                    self._write(acc)
        while not batch.done:  # bounded by the deadline (or, without one, by the ack)
            with self._lock:
                slice_ms = self._ack_wait_slice(batch, timeout, deadline)
                if slice_ms is None:
                    break
                writer = batch.writer
                writer.sleepers += 1
            try:  # without the lock: the sender and other threads go on meanwhile
                writer.ring.wait_acked(batch.sequence, slice_ms)
            finally:
                with self._lock:
                    self._left_ring(writer)

    def _ack_wait_slice(self, batch: _Batch, timeout: float | None,
                        deadline: float | None) -> float | None:
        """Lock held. Resolves what completions say; None when ``batch`` is done (or failed),
        else how long to sleep for its ack. Raises RequestTimeoutError past the deadline."""
        writer = batch.writer
        if writer is None:
            raise errors.ShmbrokerError("batch was never written")  # pragma: no cover
        self._reap(writer)
        if batch.done:
            return None
        now = time.monotonic()
        if now >= batch.deadline:
            self._expire(writer, now)
            return None
        if writer.stopped():
            self._partition_stopped(writer)
            return None
        # A ring whose header was overwritten after our frame went in is never read again
        # (the partition process drops it) and no completion comes: without this check
        # the wait ran into RequestTimeoutError after the full timeout instead of the
        # typed error (seen under load in tests/integration/test_end_to_end.py, when the
        # overwrite landed between our write and the partition's poll). One header check
        # per ack-wait slice; completions that landed before it still resolve (reap).
        try:
            _native.ring_check(writer.buf)
        except errors.RingCorruptError as exc:
            self._reap(writer)
            if batch.done:
                return None
            for pending in writer.inflight:
                pending.fail(exc)
            writer.inflight.clear()
            raise
        left_ms = None if deadline is None else (deadline - time.monotonic()) * 1000.0
        if left_ms is not None and left_ms <= 0:
            raise errors.RequestTimeoutError(
                f"no acknowledgement from partition {batch.topic}/{batch.partition} within "
                f"{timeout} s (frame {batch.sequence})")
        slice_ms = min(_ACK_WAIT_SLICE_MS, max(1.0, (batch.deadline - now) * 1000.0))
        return slice_ms if left_ms is None else min(left_ms, slice_ms)

    def _expire(self, writer: _Writer, now: float) -> None:
        """Lock held. Fail the ring's batches whose delivery timeout passed (they are in
        write order, so the oldest first). They stay in ``inflight``, failed: their frames are
        still in the ring and may yet be appended, and a completion that comes later counts
        their records to give the batches after them their own offsets."""
        why = None
        for batch in writer.inflight:  # bounded by inflight
            if batch.deadline > now:
                break
            if batch.done:
                continue
            if why is None:
                why = self._why_no_ack(writer)
            batch.fail(errors.RequestTimeoutError(
                f"partition {writer.topic}/{writer.partition} did not acknowledge frame "
                f"{batch.sequence} within delivery_timeout_ms={self.delivery_timeout_ms} "
                f"({why}); its records may or may not have been appended"))

    def _why_no_ack(self, writer: _Writer) -> str:
        """A hint for a delivery timeout's message: what the broker's state says."""
        if broker_pid(self.data_dir) is None:
            return f"the broker on {self.data_dir} is not running"
        try:
            state = writer.control.read_state()
        except errors.ShmbrokerError as exc:
            return f"its state cannot be read: {exc}"
        if not process_alive(state.partition_pid, state.partition_start_time):
            return ("its partition process is not running: restarting? the broker's log says "
                    "why, e.g. a full disk")
        return "its partition process runs but has not appended the frame: overloaded, or stopped?"

    def flush(self, timeout: float | None = None) -> None:
        """Write every accumulated record and wait until every batch is acknowledged (acks
        level). RequestTimeoutError after ``timeout`` seconds; a batch's own error is not
        raised here (it is in its futures)."""
        with self._lock:
            self._check_open()
            for acc in list(self._accs.values()):
                self._write(acc)
            lasts = [writer.inflight[-1] for writer in self._writers.values() if writer.inflight]
        deadline = None if timeout is None else time.monotonic() + timeout
        for last in lasts:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                last.wait(left)
            except errors.RequestTimeoutError as e:
                if e is not last.error:
                    raise  # flush's own timeout; a batch's delivery timeout is in its futures
            except errors.ShmbrokerError:
                pass

    # -- the batch API --------------------------------------------------------------------------

    def send_batch(self, topic: str, values: Any, keys: Sequence[Any] | None = None,
                   partition: int | None = None) -> BatchFuture:
        """Write ``values`` (a list of bytes, or a 2-D C-contiguous uint8 numpy array, one row
        per record) as one RecordBatch, encoded in C; see :class:`BatchFuture`. Records sent
        earlier with ``send`` to the same partition are written first (order is kept)."""
        with self._lock:
            return self._send_batch(topic, values, keys, partition)

    def _send_batch(self, topic: str, values: Any, keys, partition: int | None) -> BatchFuture:
        n = len(values)
        if n == 0:
            raise ValueError("send_batch: no values")
        if keys is not None and len(keys) != n:
            raise ValueError(f"send_batch: {len(keys)} keys for {n} values")
        if self._serializing:
            pairs = [serde.serialize(self.key_serializer, self.value_serializer,
                                     None if keys is None else keys[i], values[i])
                     for i in range(n)]
            values = [v for _, v in pairs]
            keys = None if keys is None else [k for k, _ in pairs]
        check_batch_values(values)
        if partition is None and keys is not None:
            return self._send_keyed_batch(topic, values, keys)
        if partition is None:
            acc = self._sticky.get(topic) or self._sticky_switch(topic, None)
        else:
            acc = self._accs.get((topic, partition)) or self._accumulator(topic, partition)
        self._write(acc)  # records sent before this batch go first
        pieces = self._write_pieces(acc, values, keys, range(n))
        if partition is None and self._sticky.get(topic) is acc:
            self._sticky_switch(topic, acc.partition)
        return BatchFuture(pieces)

    def _send_keyed_batch(self, topic: str, values: Any, keys: Sequence[Any]) -> BatchFuture:
        import numpy as np

        count = self._partitions(topic)
        keys = [None if k is None else (k if type(k) is bytes else _as_bytes(k, "key"))
                for k in keys]
        parts = np.array([records.partition_for_key(k, count) if k is not None
                          else random.randrange(count) for k in keys], dtype=np.int64)
        pieces = []
        for p in np.unique(parts).tolist():
            where = np.flatnonzero(parts == p)
            acc = self._accs.get((topic, p)) or self._accumulator(topic, p)
            self._write(acc)
            sub_values = values[where] if hasattr(values, "shape") else [values[i] for i in where]
            sub_keys = [keys[i] for i in where]
            pieces += self._write_pieces(acc, sub_values, sub_keys, where)
        return BatchFuture(pieces, keyed=True)

    def _write_pieces(self, acc: _Accumulator, values: Any, keys, where) -> list:
        """Encode ``values`` as batches of at most acc.bytes_target (a larger record alone, up
        to acc.bytes_max) and write them in one go."""
        n = len(values)
        sizes = self._record_sizes(values, keys)
        if int(sizes.max()) > acc.bytes_max:
            self._too_large(acc, int(sizes.max()))
        bounds = _split(sizes, acc.bytes_target)
        if acc.writer.stopped():  # as in _write: a restarted broker's ring takes them
            error = self._follow_restart(acc)
            if error is not None:
                raise error
        writer = acc.writer
        payloads, batches, pieces = [], [], []
        for start, end in zip(bounds, bounds[1:] + [n]):
            sub_keys = None if keys is None else list(keys[start:end])
            payloads.append(records.encode_batch(values[start:end], sub_keys))
            batch = _Batch(self, acc.topic, acc.partition)
            batch.count = end - start
            batches.append(batch)
            pieces.append((batch, where[start:end]))
        self._write_frames(writer, payloads, batches)
        return pieces

    @staticmethod
    def _record_sizes(values: Any, keys):
        import numpy as np

        if hasattr(values, "shape") and len(values.shape) == 2:
            sizes = np.full(len(values), values.shape[1], dtype=np.int64)
        else:
            sizes = np.fromiter((len(v) if v is not None else 0 for v in values),
                                dtype=np.int64, count=len(values))
        if keys is not None:
            sizes += np.fromiter((len(k) if k is not None else 0 for k in keys),
                                 dtype=np.int64, count=len(keys))
        return sizes + RECORD_OVERHEAD_BYTES_MAX

    # -- lifecycle --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise errors.IllegalStateError("this Producer is closed")
        if self._pid != os.getpid():  # fork without register_at_fork having run (vfork...)
            self._forget_after_fork()

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's rings and control regions (unmap only: they
        are the parent's) and its accumulated records; new rings are made on demand."""
        if self._pid == os.getpid():
            return
        # _init_state runs whatever happens before it: it gives the child a new lock, and the
        # parent's may have been held at the fork by a thread the child does not have (a
        # write with the GIL released); the child's first send would wait on it forever.
        try:
            for acc in self._accs.values():
                acc.unbind()
            for writer in self._writers.values():
                try:
                    writer.ring.region.close()
                except BufferError:
                    pass  # the parent's sender slept on it at the fork; the child's exit unmaps it
            try:
                self._metadata.close()  # unmaps the control regions (nothing else)
            except BufferError:
                pass  # a parent thread's write held one (its doorbell) at the fork: as above
        finally:
            self._init_state()

    def close(self, timeout: float | None = None) -> None:
        """Flush (bounded by ``timeout`` seconds), then close every ring: wait until the
        partition process took what is left, unlink the ring, free the registry slot."""
        if self._closed:
            return
        if self._pid != os.getpid():
            self._forget_after_fork()
        # One budget for the whole close: the flush, then the rings' drains (a dead broker
        # made a close(timeout=2) with 6 rings take 14 s when each ring had its own).
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.flush(timeout)
        except errors.ShmbrokerError:
            pass  # a batch's error is in its futures; a stopped broker fails them too
        finally:
            with self._lock:
                sender = self._sender
                self._close_rings(deadline)
            if sender is not None and sender is not threading.current_thread():
                sender.join(timeout=1.0)  # it sees _closed at its next turn (it sleeps at
                # most PRODUCER_SENDER_WAIT_MS_MAX on a ring, linger_ms on a timer)

    def _close_rings(self, deadline: float | None) -> None:
        """Close every ring, waiting for the partitions to take what is left until
        ``deadline`` (monotonic; at most PRODUCER_CLOSE_DRAIN_MS_MAX in all)."""
        self._closed = True
        self._sender_wake.set()  # the sender ends at its next turn
        self._sender_poke[0] = 1
        cap = time.monotonic() + PRODUCER_CLOSE_DRAIN_MS_MAX / 1000.0
        deadline = cap if deadline is None else min(deadline, cap)
        for acc in self._accs.values():
            acc.unbind()  # the rings are unmapped below
        for writer in self._writers.values():
            self._retire(writer)
            left_ms = max(0.0, (deadline - time.monotonic()) * 1000.0)
            if writer.ring.close(drain_timeout_ms=left_ms):
                writer.control.release_slot(writer.slot, os.getpid())
            # else: handed over to the partition with its slot (RingProducer.close)
            self._resolve(writer, writer.ring.take_collected())  # read while it drained
            error = errors.BrokerNotRunningError(
                f"the producer was closed before partition {writer.topic}/{writer.partition} "
                f"acknowledged this batch")
            for batch in writer.inflight:
                batch.fail(error)  # after close nothing reads completions: fail, never hang
            writer.inflight.clear()
        for acc in self._accs.values():
            if acc.records.count:  # left by a flush that failed: never written
                acc.records.clear()
                acc.batch.fail(errors.BrokerNotRunningError(
                    f"the producer was closed before these records could be written to "
                    f"{acc.topic}/{acc.partition}"))
        self._writers.clear()
        self._accs.clear()
        self._sticky.clear()
        self._send_path.forget()
        self._metadata.close()
        _LIVE.discard(self)

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Producer({self.data_dir!r}, acks={self.acks}, rings={len(self._writers)})"


def _split(sizes, bytes_max: int) -> list[int]:
    """Start indices of consecutive pieces whose sizes sum to at most ``bytes_max``."""
    import numpy as np

    bounds = [0]
    ends = np.cumsum(sizes)
    base = 0
    n = len(sizes)
    while True:  # bounded: every piece takes at least one record
        start = bounds[-1]
        end = int(np.searchsorted(ends, base + bytes_max, side="right"))
        end = max(end, start + 1)
        if end >= n:
            return bounds
        bounds.append(end)
        base = int(ends[end - 1])
