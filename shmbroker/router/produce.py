"""Remote produce: the router writes each client's RecordBatch into the partition's ingress
ring, as a local Producer would, and answers from the ring's completions.

The router is one producer per partition (two when acks="all" is used too: ``fsync_required``
is a per-ring flag). For each produce request, in this order:

1. the batch is checked before anything else sees it: exactly one RecordBatch v2, whole,
   uncompressed, every record well formed, the CRC right, at most the topic's
   max.message.bytes and the ring's largest frame (``records.scan_batches``, the partition's
   own check, in C);
2. it is written to the ring as the client sent it, not a byte changed (the partition sets
   base offset and partition leader epoch, which lie outside the CRC, as Kafka's leader
   does): a Kafka client's producer id, epoch and base sequence stay in the log, where a
   restarted Kafka listener finds them (kafka/idempotence.py), and a restarted partition
   process recognises frames it had appended by the offsets the ring write set in them at
   its commit, not by producer fields (docs/design/partition.md, "Duplicates after a
   restart");
3. it is written to the ring without blocking: a full ring keeps the request waiting in the
   partition's FIFO (order kept, in the router's own copy), tried again at every tick of the
   router loop; when nothing waits and the ring has room, a buffer the caller lends
   (``borrowed``: the Kafka listener's receive buffer) is written straight from there;
4. completions are read at every tick while any request waits for one; each frame's base
   offset is the completion's base offset plus the records of the frames before it.

Replies of one partition's requests go out in request order (one FIFO per ring); a client
writing to several partitions matches replies by ``id``.

Owned by the router process's main thread; not thread-safe.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

from .. import errors, records
from ..config import PRODUCER_RING_BYTES_DEFAULT, RING_SEND_TIMEOUT_MS_DEFAULT
from ..layout import record_batch as RB
from ..layout import shm as L
from ..shm import names
from ..shm.ring import RING_OK, RingProducer
from ..client.metadata import LocalMetadata

log = logging.getLogger("shmbroker.router")

#: Each of the router's rings (one per partition and fsync level): the same size as a local
#: producer's by default.
ROUTER_RING_BYTES = PRODUCER_RING_BYTES_DEFAULT
#: A produce request not answered within this long (its ring stayed full, or the partition
#: did not acknowledge) gets RequestTimeoutError; its records may or may not be appended.
ROUTER_PRODUCE_TIMEOUT_MS = RING_SEND_TIMEOUT_MS_DEFAULT
#: Produce requests waiting for room in one ring (beyond: a retriable error at once). The
#: router's in-flight limit per client bounds them too; this bounds them across clients.
ROUTER_RING_WAITING_MAX = 4_096

#: A request's batch once the ring has its copy.
_WRITTEN = b""


@dataclass(eq=False)
class ProduceRequest:
    """One produce request between arrival and reply."""

    route: list            # the client's envelope frames
    request_id: int
    acks: int
    batch: bytearray | bytes  # the router's copy of the client's RecordBatch, until written
    count: int             # records in it
    deadline: float        # monotonic
    sequence: int = -1     # its frame's sequence once written
    answered: bool = False  # a timeout was answered already; a later completion is dropped


@dataclass(eq=False)
class Outcome:
    """What to tell a client about a request: a base offset or an error."""

    request: ProduceRequest
    base_offset: int = -1
    error: errors.ShmbrokerError | None = None


def check_batch(data, bytes_max: int) -> int:
    """Raises the typed error of a batch the partition would refuse; returns its record count."""
    if len(data) < RB.HEADER_SIZE:
        raise errors.TruncatedBatchError(
            f"produce: the record frame has {len(data)} bytes, fewer than a "
            f"{RB.HEADER_SIZE}-byte RecordBatch header", 0)
    scan = records.scan_batches(data, verify_crc=True, verify_records=True,
                                batch_bytes_max=bytes_max)
    if not scan.ok:
        raise scan.error(data, "produce", bytes_max)
    if len(scan.batches) != 1:
        raise errors.InvalidRequestError(
            f"produce: the record frame holds {len(scan.batches)} batches; send exactly one "
            f"RecordBatch per request")
    return scan.batches[0].records_count


@dataclass(eq=False)
class PartitionWriter:
    """The router's ring into one partition at one fsync level, and its requests."""

    topic: str
    partition: int
    control: object
    ring: RingProducer
    slot: int
    generation: int
    waiting: deque = field(default_factory=deque)   # not written yet (ring full)
    inflight: deque = field(default_factory=deque)  # written, waiting for a completion

    def busy(self) -> bool:
        return bool(self.waiting or self.inflight)

    def pump(self) -> None:
        """Write waiting requests, oldest first, until the ring is full."""
        while self.waiting:  # bounded by the waiting requests
            request = self.waiting[0]
            if not self.write(request, request.batch):
                return
            self.waiting.popleft()
            request.batch = _WRITTEN  # the ring has its copy

    def write(self, request: ProduceRequest, batch) -> bool:
        """Write ``batch`` to the ring unchanged: True and ``request`` in flight; False when
        the ring is full."""
        sequence = self.ring.next_sequence  # the router is this ring's only writer
        status, first, _ = self.ring.try_send_many((batch,))
        if status != RING_OK:
            return False
        assert first == sequence, (first, sequence)
        request.sequence = sequence
        self.inflight.append(request)
        return True

    def reap(self, out: list) -> None:
        """Outcomes of the requests whose completions arrived."""
        inflight = self.inflight
        for first, last, base_offset, error_code in self.ring.poll_completions():
            offset = base_offset
            while inflight and inflight[0].sequence <= last:  # bounded by inflight
                request = inflight.popleft()
                if request.answered:
                    offset += request.count
                    continue
                if request.sequence < first or error_code:
                    cls = errors.ERRORS_BY_CODE.get(error_code, errors.ShmbrokerError)
                    out.append(Outcome(request, error=cls(
                        f"partition {self.topic}/{self.partition} rejected the batch: "
                        f"{cls.__name__}")))
                else:
                    out.append(Outcome(request, base_offset=offset))
                    offset += request.count

    def expire(self, now: float, out: list) -> None:
        """Requests past their deadline get RequestTimeoutError (once)."""
        while self.waiting and self.waiting[0].deadline <= now:  # bounded by waiting
            request = self.waiting.popleft()
            out.append(Outcome(request, error=errors.RequestTimeoutError(
                f"partition {self.topic}/{self.partition}: the router's ring stayed full for "
                f"{ROUTER_PRODUCE_TIMEOUT_MS} ms; the batch was not written")))
        for request in self.inflight:  # bounded by inflight (oldest first)
            if request.deadline > now:
                break
            if not request.answered:
                request.answered = True
                out.append(Outcome(request, error=errors.RequestTimeoutError(
                    f"partition {self.topic}/{self.partition} did not acknowledge within "
                    f"{ROUTER_PRODUCE_TIMEOUT_MS} ms; the batch may or may not be appended")))

    def fail_all(self, error: errors.ShmbrokerError, out: list) -> None:
        for request in (*self.waiting, *self.inflight):
            if not request.answered:
                out.append(Outcome(request, error=error))
        self.waiting.clear()
        self.inflight.clear()

    def stopped(self) -> bool:
        return self.control.partition_status == L.PARTITION_STATUS_STOPPED

    def close(self, drain_timeout_ms: float) -> None:
        self.ring.close(drain_timeout_ms=drain_timeout_ms)
        self.control.release_slot(self.slot, os.getpid())


class Produce:
    """Every PartitionWriter of the router (see the module doc)."""

    def __init__(self, data_dir: str, ring_bytes: int = ROUTER_RING_BYTES):
        self.meta = LocalMetadata(data_dir)
        self.ring_bytes = ring_bytes
        self.writers: dict[tuple[str, int, bool], PartitionWriter] = {}
        #: Writers with requests waiting or in flight (the loop ticks while there are any).
        self.busy: set[PartitionWriter] = set()
        #: Counters for logs and tests (``in_place``: borrowed batches written without a copy).
        self.batches = self.rejected = self.in_place = 0

    def submit(self, route: list, request_id: int, topic: str, partition: int, acks: int,
               data, borrowed: bool = False) -> None:
        """Check and queue one request; raises its typed error when it is refused at once.

        ``borrowed``: ``data`` is a buffer valid only until this returns (the Kafka
        listener's receive buffer): when nothing waits ahead of it and the ring has room, it
        is written from there (the ring write is the one copy); otherwise it is copied, as
        every other request is."""
        fsync = acks == -1
        writer = self.writers.get((topic, partition, fsync))
        if writer is None:
            self.meta.check_partition(topic, partition)
        limit = self.meta.topic(topic, refresh=writer is None).log_config.batch_bytes_max
        if writer is None:
            writer = self._writer(topic, partition, fsync)
        bytes_max = min(limit, writer.ring.payload_bytes_max)
        count = check_batch(data, bytes_max)
        if writer.stopped():
            self._drop(writer, [])
            raise errors.BrokerNotRunningError(
                f"partition {topic}/{partition} is stopped (the broker is shutting down)")
        if len(writer.waiting) >= ROUTER_RING_WAITING_MAX:
            raise errors.RequestTimeoutError(
                f"partition {topic}/{partition}: {len(writer.waiting)} batches already wait for "
                f"room in the router's ring; try again")
        deadline = time.monotonic() + ROUTER_PRODUCE_TIMEOUT_MS / 1000.0
        request = ProduceRequest(route, request_id, acks, _WRITTEN, count, deadline)
        self.batches += 1
        if borrowed and not writer.waiting and writer.write(request, data):
            self.in_place += 1
        else:
            request.batch = bytearray(data)
            writer.waiting.append(request)
        writer.pump()
        if writer.busy():
            self.busy.add(writer)

    def _writer(self, topic: str, partition: int, fsync: bool) -> PartitionWriter:
        """A ring into the partition: slot claimed, ring created (0600), READY, announced
        (as Producer._writer does for a local producer)."""
        control = self.meta.control(topic, partition)
        if control.partition_status == L.PARTITION_STATUS_STOPPED:
            raise errors.BrokerNotRunningError(
                f"partition {topic}/{partition} is stopped (the broker is shutting down)")
        slot, generation = control.claim_slot(self.ring_bytes)
        name = names.ring_name(self.meta.prefix, topic, partition, slot, generation)
        try:
            ring = RingProducer.create(name, self.ring_bytes, partition=partition, slot=slot,
                                       generation=generation, control=control, acks=True)
        except BaseException:
            control.release_slot(slot, os.getpid())
            raise
        ring.set_fsync_required(fsync)
        control.set_slot_state(slot, L.SLOT_READY)
        control.announce_registry_change()
        writer = self.writers[(topic, partition, fsync)] = PartitionWriter(
            topic, partition, control, ring, slot, generation)
        return writer

    def tick(self) -> list[Outcome]:
        """Write what waits, read completions, expire the overdue; the outcomes to answer."""
        out: list[Outcome] = []
        if not self.busy:
            return out
        now = time.monotonic()
        for writer in list(self.busy):  # bounded by the writers
            try:
                writer.reap(out)
                writer.pump()
                writer.expire(now, out)
            except errors.RingCorruptError as exc:
                log.error("router ring %s is corrupt: %s; dropping it", writer.ring.name, exc)
                self._drop(writer, out, exc)
                continue
            if writer.stopped():
                writer.reap(out)
                self._drop(writer, out)
                continue
            if not writer.busy():
                self.busy.discard(writer)
        self.rejected += sum(1 for o in out if o.error is not None)
        return out

    def _drop(self, writer: PartitionWriter, out: list,
              error: errors.ShmbrokerError | None = None) -> None:
        """Fail the writer's requests and let its ring go (a restarted broker needs a new one)."""
        writer.fail_all(error or errors.BrokerNotRunningError(
            f"partition {writer.topic}/{writer.partition} was stopped before acknowledging"),
            out)
        self.busy.discard(writer)
        for key, w in list(self.writers.items()):
            if w is writer:
                del self.writers[key]
        try:
            writer.close(0)
        except errors.ShmbrokerError:
            pass
        self.meta.forget(writer.topic, writer.partition)

    def close(self, drain_timeout_ms: float) -> None:
        """Close every ring, waiting (in all) up to ``drain_timeout_ms`` for the partitions to
        take what was written."""
        deadline = time.monotonic() + drain_timeout_ms / 1000.0
        for writer in self.writers.values():
            try:
                writer.close(max(0.0, (deadline - time.monotonic()) * 1000.0))
            except errors.ShmbrokerError as exc:
                log.warning("closing router ring %s: %s", writer.ring.name, exc)
        self.writers.clear()
        self.busy.clear()
        self.meta.close()
