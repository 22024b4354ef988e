"""One drain round: committed frames from the rings -> one log append -> completions ->
released ring space, in offset order across the rings. Design: docs/design/partition.md.

Producers take their frames' offsets at their commit (docs/decisions/0005: a fetch_add on the
control region's next_offset, written into the batches), so the log's order is fixed before
the partition process sees a frame: it appends frames in offset order, merging the rings.

A round, in order (the order is what makes a crash at any point safe):

1. from the log end, take the ring whose first unread frame starts at the next offset, and its
   run (its frames while each continues the previous one); then the next ring that continues
   the log; each ring once a round, at most PARTITION_RING_ROUND_BYTES_MAX per ring and
   PARTITION_ROUND_BYTES_MAX in all (:meth:`Drainer._collect`), as memoryviews of the frames;
2. join every payload into one buffer (the only copy; it also means a producer cannot change
   bytes between validation and write) and ``PartitionLog.append`` it: one validation pass,
   one ``writev`` per segment touched. Each ring's run is contiguous in offsets, so one
   completion per ring gives the producer every record's offset;
3. fsync if a ring of this round asked for acks="all" (``fsync_required``);
4. publish the new high watermark (consumers wake), so that an acknowledged record is always
   readable: a producer that gets its ack and tells a consumer must not find it missing;
5. ``complete`` each ring's run, then ``release`` its space; when the producer has
   COMPLETIONS_MAX completions unread, both wait in the ring's ``owed`` list (its frames are
   in the log: completions never hold the log back).

A kill between 2 and 5 leaves frames appended but not released; the offsets in them are the
journal: a restarted process finds them below the log end, checks that the log's batch there
is theirs, completes them with their offsets and skips them (:meth:`Drainer._settle_behind`).
No producer field of a batch is needed, so the partition stores producers' batches as they are
(only the partition leader epoch, outside the CRC, is set).

When no ring continues the log, a live producer between its reservation and its commit is
waited for (``blocked_by``: the loop sleeps on the doorbell), and offsets nobody alive will
commit (a producer killed in that window) are filled with an empty batch
(:meth:`Drainer._no_progress`).

A batch that fails validation costs only its own frame: the round falls back to one append per
ring, and for the ring that failed to one validation per frame; the bad frame is completed with
the error's code, its offsets get an empty batch, the others are appended.

The C round (``_native.drain_round``, native/include/shmb/drain.h) does steps 1-6 of the
common case in one call, the GIL released, in the same order: collect and copy (the join),
the same merge by offset, validate, write, publish, complete, release. It changes nothing
before it has decided, and declines — the Python round below then runs, and stays the
reference it is tested against (tests/integration/test_native_drain.py) — for anything
unusual: a bad or empty frame, a batch split across frames, a roll or flush due, a ring that
asks for fsync (acks=all), a corrupt ring, a ring never read before or owed completions, more
than the scratch buffer holds, a frame below the log end, rings whose frames do not continue
the log. Python then takes the index entries the C round planned, and the new log end
and segment size (``PartitionLog.record_native_append``): index files are derived data,
written just after the publish instead of just before it (a reader that looks meanwhile
walks from the previous entry).

Counters (shmbroker/layout/counters.py, docs/design/monitor.md): each round that appended
adds its frames, batches, records and bytes to plain ints and stores the per-round counters
(with the high watermark, the log's size, the fullest ring and the producers) with one C call
(:meth:`Drainer._count_round`); rejected frames, broken rings and declined C rounds are
stored when they happen.

Owned by the partition process's main thread; not thread-safe.
"""
from __future__ import annotations

import logging
import struct
import time

from .. import errors, records
from ..config import (PARTITION_LOOP_BUDGET_MS, PARTITION_LOOP_ROUNDS_MAX,
                      PARTITION_NATIVE_ROUND, PARTITION_RING_ROUND_BYTES_MAX,
                      PARTITION_ROUND_BYTES_MAX)
from ..layout import counters as CL
from ..layout import record_batch as RB
from ..layout import shm as L
from ..log import PartitionLog
from ..log.partition_log import AppendInfo
from ..native import _native
from ..shm.control import ControlRegion
from ..shm.ring import ReadBatch
from ..shm.counters import CountersWriter
from ..shm.wake import TIMEOUT as _WAIT_TIMEOUT
from .ingress import Ingress, IngressRing

log = logging.getLogger("shmbroker.partition")

#: Errors that belong to one frame's bytes (the frame is rejected, the partition carries on).
#: Anything else from the log (an I/O error) is not the producer's fault and stops the process;
#: the supervisor restarts it and the frames, never released, are read again.
FRAME_ERRORS = (errors.CorruptRecordError, errors.RecordTooLargeError,
                errors.UnsupportedCompressionError, errors.InvalidOffsetError)

_BASE_OFFSET = struct.Struct(">q")
#: One frame per ring_scan call (to know each frame's end position).
_ONE_FRAME = 1
_SCAN_BYTES_ANY = 1 << 62
_WRITE_POSITION = L.RING["write_position"]
_FSYNCS = CL.PARTITION["fsyncs"]
_FILL = CL.PARTITION["ring_fill_percent"]
_PRODUCERS = CL.PARTITION["producers"]
_SEGMENTS = CL.PARTITION["segments"]
_COUNTERS_OFFSET = CL.COUNTERS_OFFSET
# The rounds count the first seven by index, in this order.
assert [c.name for c in CL.PARTITION_COUNTERS[:7]] == [
    "drain_rounds", "frames_in", "batches_in", "records_in", "bytes_in", "high_watermark",
    "log_bytes"]
#: The C round samples the rings' fill every this many rounds (a power of two).
FILL_SAMPLE_ROUNDS = 8
_FILL_SAMPLE_MASK = FILL_SAMPLE_ROUNDS - 1
assert CL.PARTITION["last_fsync_time_ms"] == _FSYNCS + 1
#: The C round's names for why it declined (index = its code).
DECLINE_REASONS = _native.DRAIN_DECLINE_REASONS
_DRAIN_DECLINED = _native.DRAIN_DECLINED
_DRAIN_WRITE_FAILED = _native.DRAIN_WRITE_FAILED
#: Tests only: make the C round stop right after a step, as a kill -9 there would.
NATIVE_STOP_AFTER = {"write": _native.DRAIN_STOP_AFTER_WRITE,
                     "publish": _native.DRAIN_STOP_AFTER_PUBLISH,
                     "complete": _native.DRAIN_STOP_AFTER_COMPLETE}


class NativeRoundStopped(Exception):
    """Tests only: the C round stopped where ``Drainer.native_stop_after`` said (it stands
    for a kill -9 there; the caller then abandons the log and the shared memory)."""


#: The offsets a frame's payload takes (shmb_frame_offsets; reference:
#: shm/ring_reference.frame_offsets): the producer reserved exactly these at its commit.
frame_offsets = _native.frame_offsets


def frame_base(payload) -> int:
    """The base offset the producer's commit wrote into a frame's first batch (-1 for a
    payload too short to hold one: no commit of ours writes such a frame)."""
    return _BASE_OFFSET.unpack_from(payload, 0)[0] if len(payload) >= RB.HEADER_SIZE else -1


#: Frames below the log end one look at a ring settles (after a restart: at most one round's
#: worth per ring, released as they are settled; more wait for the next round).
_BEHIND_PER_LOOK = 4096
#: How long a producer may hold the log's next offset uncommitted before the partition looks
#: whether it is still alive (a commit takes a few stores; a descheduled producer, a few ms).
RESERVER_ALIVE_CHECK_MS = 20
#: Frames one ring gives one round (the C round's limit).
_RING_FRAMES_MAX = _native.DRAIN_RING_FRAMES_MAX
_RESERVED_BASE = L.RING["reserved_base"]
_RESERVED_END = L.RING["reserved_end"]


class Drainer:
    """Moves committed frames from an Ingress into a PartitionLog (see the module doc)."""

    def __init__(self, log_: PartitionLog, control: ControlRegion, ingress: Ingress,
                 round_bytes_max: int = PARTITION_ROUND_BYTES_MAX,
                 ring_round_bytes_max: int = PARTITION_RING_ROUND_BYTES_MAX,
                 native: bool = PARTITION_NATIVE_ROUND, counters: CountersWriter | None = None):
        self.log = log_
        self.control = control
        self.ingress = ingress
        self.round_bytes_max = round_bytes_max
        self.ring_round_bytes_max = ring_round_bytes_max
        #: Try the C round first (see the module doc).
        self.native = native
        #: Tests only: a NATIVE_STOP_AFTER key.
        self.native_stop_after: str | None = None
        #: The C round's private copy of a round's payloads (allocated on first use): a
        #: round takes at most round_bytes_max plus one ring's share; a larger one (a single
        #: frame above the ring's share) is declined to the Python round.
        self._scratch: bytearray | None = None
        self._publisher: tuple[int, int] = (0, 0)  # ControlRegion.publisher(), with _scratch
        self._start = 0  # round-robin: which ring goes first
        #: Rings one round takes at most (one completion and one release each).
        self._rings_max = control.registry_slots
        #: Rings whose completions (and releases) wait for their producer to read older ones.
        self._owing: set = set()
        #: The reservation waited for since when (time.monotonic()): see _wait_for.
        self._blocked_key: tuple | None = None
        self._blocked_since = 0.0
        #: (ring, reserved_base seen): the last round found the next offset reserved by this
        #: live producer, which has not committed it yet (the loop sleeps on the doorbell).
        self.blocked_by: tuple | None = None
        #: Counters for logs and tests.
        self.rounds = 0
        self.native_rounds = 0
        #: C rounds run by drain_sleep_round straight from a wake-up (also in native_rounds).
        self.sleep_rounds = 0
        #: drain_sleep_round calls that ran at least one round (sleep_rounds / this: the
        #: rounds one call ran without Python in between).
        self.sleep_calls = 0
        #: sleep_round's loop ended with a doze that found nothing.
        self.ended_idle = False
        #: reason name -> rounds the C round declined for it.
        self.native_declined: dict[str, int] = {}
        self.frames_rejected = 0
        #: Frames found in the log below its end (appended before a restart, not released).
        self.frames_settled = 0
        #: The partition's counters region (a private one when nobody reads it).
        self.counters = counters if counters is not None else \
            CountersWriter.private(CL.KIND_PARTITION)
        #: Bytes of the sealed segments (refresh_disk), for the C round's log_bytes.
        self._sealed_bytes = 0
        #: log.flushes already added to the fsyncs counter.
        self._flushes_counted = 0
        #: What the Python round appended since it was last counted (_log_append).
        self._py_appended = [0, 0, 0]  # records, batches, bytes

    # -- one round ------------------------------------------------------------------------------

    def _rotated(self) -> list:
        """The rings, starting one further each round, so that none is always first."""
        rings = self.ingress.ring_list()
        n = len(rings)
        if n <= 1:
            return rings
        start = self._start = (self._start + 1) % n
        return rings[start:] + rings[:start]

    def round(self) -> int:
        """Drains what is committed now (bounded); returns the frames handled (0: none)."""
        order = self._rotated()
        if not order:
            return 0
        self.blocked_by = None
        if self._owing:
            self.flush_owed()
        if self.native:
            done = self._round_native(order)
            if done is not None:
                return done
        taken = self._collect(order)
        if not taken:
            return self._no_progress()
        frames = sum(batch.count for _, _, _, batch in taken)
        try:
            self._append(taken)
        finally:
            for _, _, _, batch in taken:
                for view in batch.data:
                    view.release()
            # Even when the append raised (the process then exits): what went in is counted.
            py = self._py_appended
            self._count_round(order, frames, py[0], py[1], py[2])
            py[0] = py[1] = py[2] = 0
        self.rounds += 1
        return frames

    # -- merging the rings by offset (decision 0005) --------------------------------------------

    def _collect(self, order: list) -> list:
        """The rounds' rule (the C round follows it exactly): from the log end, take the ring
        whose first unread frame starts at the next offset and its *run*, its following
        frames while each starts where the previous one ended; then the ring that continues
        the log, and so on: a ring whose producers' commits interleave with others' gives
        several runs a round. Each run is one completion, so a ring gives no more runs than
        its producer has completion slots free (the round ends there), except a first one
        when it has none (its completions are owed, :meth:`_settle`; the C round holds such a
        ring back and declines). At most ``ring_round_bytes_max`` bytes and
        SHMB_DRAIN_RING_FRAMES_MAX frames of a ring (each run takes at least one frame) and
        about ``round_bytes_max`` in all. Returns [(ring, start position, base offset,
        ReadBatch)] in log order."""
        next_offset = self.log.log_end_offset
        budget = self.round_bytes_max
        heads: dict = {}
        runs: dict = {}  # ring -> [runs, bytes, frames] this round
        taken: list = []
        rings = [r for r in order if r.broken is None]
        while True:  # bounded: each pass takes at least one frame or stops
            ring = None
            for r in rings:
                if r not in heads:
                    heads[r] = self._head(r)
                head = heads[r]
                if head is not None and head[0] == next_offset:
                    ring = r
                    break
            if ring is None:
                break
            done = runs.setdefault(ring, [0, 0, 0])
            if done[2] >= _RING_FRAMES_MAX:
                break
            if done[0] and done[0] >= ring.consumer.completions_free():
                break
            start, base = ring.consumer.position, next_offset
            batch, next_offset, heads[ring] = self._take_run(
                ring, next_offset, max(0, self.ring_round_bytes_max - done[1]),
                _RING_FRAMES_MAX - done[2])
            taken.append((ring, start, base, batch))
            size = sum(len(v) for v in batch.data)
            done[0] += 1
            done[1] += size
            done[2] += batch.count
            budget -= size
            if budget <= 0:
                break
        return taken

    def _head(self, ring: IngressRing) -> tuple[int, int] | None:
        """(base offset, offsets) of the ring's first unread committed frame; None when it
        has none or broke. Frames below the log end are settled on the way
        (:meth:`_settle_behind`). A producer with COMPLETIONS_MAX completions unread is nudged,
        but its frames are not held back: they hold offsets the log needs (their completions
        wait instead: :meth:`_settle`)."""
        consumer = ring.consumer
        if consumer.completions_full():
            consumer.nudge_producer()  # it has completions to read (its frames still go in)
        run = None  # [first, last, base, next base, position]: settled frames, one completion
        settled = self.frames_settled
        head = None
        for _ in range(_BEHIND_PER_LOOK):  # bounded: settled frames are skipped one by one
            try:
                found = self._first_frame(ring)
            except errors.RingCorruptError as exc:
                self._mark_broken(ring, exc)
                break
            if found is None:
                break
            nxt, payload = found
            base, offsets = frame_base(payload), frame_offsets(payload)
            if base >= self.log.log_end_offset:
                payload.release()
                head = base, offsets
                break
            seq = consumer.expected_sequence
            outcome = self._settle_behind(ring, nxt, base, offsets, payload)
            payload.release()
            appended = outcome is True
            if run is not None and not (appended and run[3] == base and run[1] + 1 == seq):
                self._settle(ring, run[0], run[1], run[2], 0, run[4])
                run = None
            if not appended:
                self._settle(ring, seq, seq, -1, outcome, nxt)
            else:
                if run is None:
                    run = [seq, seq, base, base + offsets, nxt]
                else:
                    run[1], run[3], run[4] = seq, base + offsets, nxt
            if ring.broken is not None:
                break
        if run is not None:
            self._settle(ring, run[0], run[1], run[2], 0, run[4])
        if self.frames_settled != settled:
            log.info("partition %s/%d: %d frame(s) appended before the restart but not released "
                     "were recognised in the log (ring %s) and not appended again",
                     self.ingress.topic, self.ingress.partition, self.frames_settled - settled,
                     ring.name)
        return head if ring.broken is None else None

    @staticmethod
    def _first_frame(ring: IngressRing) -> tuple[int, memoryview] | None:
        """(position after it, payload view) of the first unread committed frame, or None.
        A first look at a ring learns its frame sequence (RingConsumer.poll's rule)."""
        consumer = ring.consumer
        if consumer.expected_sequence is None:
            _native.ring_check(consumer.buf)
            consumer.expected_sequence = consumer.first_unread_sequence()
            if consumer.expected_sequence is None:
                return None
        nxt, spans = _native.ring_scan(consumer.buf, consumer.position,
                                       consumer.expected_sequence, _SCAN_BYTES_ANY, _ONE_FRAME)
        if not spans:
            if nxt != consumer.position:  # only a padding frame: skip it
                consumer.position = nxt
            return None
        off, length = spans[0]
        return nxt, memoryview(consumer.buf)[off:off + length]

    def _take_run(self, ring: IngressRing, next_offset: int, max_bytes: int, frames_max: int):
        """The ring's frames from its position while each starts at the next offset (at most
        ``max_bytes`` and ``frames_max``, the first always). Returns (ReadBatch of payload
        views, the offset after them, the ring's next head: (base, offsets) of the frame that
        ended the run when it starts further on, else None); the consumer moves past them."""
        consumer = ring.consumer
        start, seq = consumer.position, consumer.expected_sequence
        nxt, spans = _native.ring_scan(consumer.buf, start, seq, max_bytes, frames_max)
        whole = memoryview(consumer.buf)
        views = []
        head = None
        for off, length in spans:  # bounded by the scan
            view = whole[off:off + length]
            base = frame_base(view)
            if base != next_offset:
                if base > next_offset:
                    head = base, frame_offsets(view)
                view.release()
                break
            views.append(view)
            next_offset += frame_offsets(view)
        if len(views) < len(spans):
            nxt, _ = _native.ring_scan(consumer.buf, start, seq, _SCAN_BYTES_ANY, len(views))
        consumer.position = nxt
        consumer.expected_sequence = seq + len(views)
        return ReadBatch(views, seq, len(views), nxt), next_offset, head

    @staticmethod
    def _untake(ring: IngressRing, start: int, batch) -> None:
        """Puts frames taken by _take_run back (a later round reads them again)."""
        ring.consumer.position = start
        ring.consumer.expected_sequence = batch.first_sequence

    def _settle_behind(self, ring: IngressRing, nxt: int, base: int, offsets: int,
                       payload) -> bool | int:
        """A frame whose offsets start below the log end; the consumer moves past it. After a
        restart that is a frame the previous process appended but did not release (the
        offsets are the drain journal): the log's batch at ``base`` is the frame's own (same
        CRC and last offset delta). True when it is and its producer has no completion for it
        yet (``acked_sequence``): the caller completes it (runs of such frames share one
        completion); else the error code to complete it with (-1: none, it has one). Any other such frame was never appended and can no longer be at its
        offsets: its producer gets REQUEST_TIMED_OUT ("may or may not be appended", as when an
        ack is lost) when part of it is in the log, CORRUPT_MESSAGE otherwise (a frame whose
        base offset no reservation gave it)."""
        consumer = ring.consumer
        seq = consumer.expected_sequence
        consumer.position, consumer.expected_sequence = nxt, seq + 1
        end = self.log.log_end_offset
        acked = _native.atomic_load_u64(consumer.buf, L.RING["acked_sequence"])
        if base + offsets <= end and self._in_log(base, payload):
            self.frames_settled += 1
            if seq >= acked:
                return True
        elif seq >= acked:
            torn = base + offsets > end
            code = errors.RequestTimeoutError.code if torn else errors.CorruptRecordError.code
            log.error("partition %s/%d: frame %d of ring %s (producer pid %d) holds offsets "
                      "%d..%d but the log ends at %d%s; answered with %s", self.ingress.topic,
                      self.ingress.partition, seq, ring.name, consumer.owner_pid, base,
                      base + offsets - 1, end, "" if torn else " and holds other batches there",
                      "REQUEST_TIMED_OUT" if torn else "CORRUPT_MESSAGE")
            self.frames_rejected += 1
            self.count_event("frames_rejected")
            return code
        return -1

    def _in_log(self, base: int, payload) -> bool:
        """Whether the log's batch at ``base`` is the payload's first batch (last offset delta
        and CRC equal: the log stores a producer's batch as it is, and base offset and leader
        epoch lie outside the CRC)."""
        if len(payload) < RB.HEADER_SIZE or base < self.log.log_start_offset:
            return False
        piece = self.log.read(base, RB.HEADER_SIZE)
        if piece.length < RB.HEADER_SIZE:
            return False
        mine = records.read_header(payload, 0)
        logged = records.read_header(piece.data, 0)
        return (logged.base_offset == base and logged.crc == mine.crc
                and logged.last_offset_delta == mine.last_offset_delta)

    def _no_progress(self) -> int:
        """No ring continues the log. Either nothing is reserved beyond it, or a producer is
        between its reservation and its commit (wait: it commits within a few stores and
        rings the doorbell; ``blocked_by`` tells the loop to sleep on it), or the offsets
        at the log end belong to nobody alive: a producer that died in that window, or a
        refused or settled frame. Those are filled with an empty batch (decision 0005, step
        3), as far as the first offset someone alive may still commit. Returns 1 when it
        appended one, else 0. Loads in the order that makes it safe: next_offset first, then
        the registry and the rings' reservations, then their first frames (a reservation
        counted in next_offset is seen as PENDING, as its range, or as its committed frame)."""
        end = self.log.log_end_offset
        next_offset = self.control.next_offset
        if next_offset & L.NEXT_OFFSET_UNSET:
            return 0
        ingress = self.ingress
        if self.control.registry_changes != ingress.registry_seen:
            ingress.refresh()
        limit = next_offset
        refused = 0
        for ring in ingress.ring_list():  # bounded by the attached rings
            if ring.broken is not None:
                continue  # its offsets are given up: it is no longer read
            buf = ring.consumer.buf
            reserved = _native.atomic_load_u64(buf, _RESERVED_BASE)
            if reserved == L.RESERVED_PENDING:
                if self._wait_for(ring, reserved):
                    return 0
            elif reserved != L.RESERVED_NONE and not ring.dead:
                if reserved <= end < _native.atomic_load_u64(buf, _RESERVED_END) and \
                        self._wait_for(ring, reserved):
                    return 0
                if end < reserved < limit:
                    limit = reserved
            head = self._head(ring)
            if head is None:
                continue
            if head[0] == end:
                return 0  # committed meanwhile: the next round takes it
            if head[0] >= next_offset:
                # Reserved after our load of next_offset? Then it is below it now.
                if head[0] >= self.control.next_offset:
                    self._refuse_unreserved(ring, head[0])
                    refused += 1
                continue
            if head[0] < limit:
                limit = head[0]
        if refused or limit <= end:
            return refused  # (after a refused frame its ring's next one may hold the offsets)
        self._fill(end, limit)
        return 1

    def _wait_for(self, ring: IngressRing, reserved: int) -> bool:
        """The producer of ``ring`` holds the next offset uncommitted: True (wait for it,
        ``blocked_by``) unless it is dead. Ingress.reap finds dead producers once every
        DOORBELL_SLEEP_MS_MAX; a producer seen in the same reservation for longer than
        RESERVER_ALIVE_CHECK_MS is looked at now (one /proc read), so that the log waits that
        long, not a whole reap interval, for a producer killed in its window."""
        if ring.dead:
            return False
        now = time.monotonic()
        if self._blocked_key != (ring, reserved):
            self._blocked_key, self._blocked_since = (ring, reserved), now
        elif (now - self._blocked_since) * 1000 >= RESERVER_ALIVE_CHECK_MS and \
                not ring.consumer.owner_alive():
            ring.dead = True
            ring.consumer.stop_holding_back()
            log.info("partition %s/%d: producer pid %d of ring %s died holding offsets it had "
                     "not committed", self.ingress.topic, self.ingress.partition,
                     ring.consumer.owner_pid, ring.name)
            return False
        self.blocked_by = (ring, reserved)
        return True

    def _refuse_unreserved(self, ring: IngressRing, base: int) -> None:
        """A frame whose base offset lies beyond every offset given out: no commit of ours
        wrote it. Refused (CORRUPT_MESSAGE) and skipped, so it blocks nothing."""
        consumer = ring.consumer
        found = self._first_frame(ring)
        if found is None:
            return
        nxt, payload = found
        payload.release()
        seq = consumer.expected_sequence
        log.error("partition %s/%d: frame %d of ring %s (producer pid %d) says offset %d, which "
                  "no producer reserved; rejected", self.ingress.topic, self.ingress.partition,
                  seq, ring.name, consumer.owner_pid, base)
        self.frames_rejected += 1
        self.count_event("frames_rejected")
        self._settle(ring, seq, seq, -1, errors.CorruptRecordError.code, nxt, seq + 1)

    def _fill(self, start: int, stop: int) -> None:
        """Empty batches over offsets start..stop-1 that nobody will commit, then publish."""
        log.warning("partition %s/%d: offsets %d..%d were reserved by a producer that died "
                    "before committing them (or belong to a refused frame); filled with an "
                    "empty batch", self.ingress.topic, self.ingress.partition, start, stop - 1)
        at = start
        while at < stop:  # bounded: each pass covers up to EMPTY_BATCH_SPAN_MAX offsets
            span = min(stop - at, records.EMPTY_BATCH_SPAN_MAX)
            self.log.append(records.empty_batch(at, span), gap=True)
            at += span
        self.count_event("offsets_filled", stop - start)
        self.publish()

    def reserver_moved(self) -> bool:
        """Whether the producer that ``blocked_by`` names has committed or given up its
        reservation since (the loop's re-check before it sleeps on the doorbell)."""
        if self.blocked_by is None:
            return True
        ring, seen = self.blocked_by
        return ring.consumer.buf is None or \
            _native.atomic_load_u64(ring.consumer.buf, _RESERVED_BASE) != seen

    def start_offsets(self) -> int:
        """At start: a new control region's next_offset becomes the log end, or the end of
        the furthest frame or reservation the attached rings hold (rings a killed broker left:
        their offsets came from the old region's counter). A region that has one keeps it."""
        end = self.log.log_end_offset
        if not self.control.next_offset & L.NEXT_OFFSET_UNSET:
            have = self.control.next_offset
            if have < end:
                log.error("partition %s/%d: next_offset %d is below the log end %d; frames "
                          "reserved below it will be refused", self.ingress.topic,
                          self.ingress.partition, have, end)
                _native.atomic_cas_u64(self.control.buf, L.CONTROL["next_offset"], have, end)
            return self.control.next_offset
        furthest = end
        for ring in self.ingress.ring_list():
            if ring.broken is not None:
                continue
            consumer = ring.consumer
            reserved = _native.atomic_load_u64(consumer.buf, _RESERVED_BASE)
            if reserved not in (L.RESERVED_NONE, L.RESERVED_PENDING):
                furthest = max(furthest, _native.atomic_load_u64(consumer.buf, _RESERVED_END))
            seq = consumer.first_unread_sequence()
            if seq is None:
                continue
            try:
                _, spans = _native.ring_scan(consumer.buf, consumer.position, seq,
                                             _SCAN_BYTES_ANY)
            except errors.RingCorruptError as exc:
                self._mark_broken(ring, exc)
                continue
            with memoryview(consumer.buf) as whole:
                for off, length in spans:  # bounded by the ring's frames
                    with whole[off:off + length] as payload:
                        furthest = max(furthest, frame_base(payload) + frame_offsets(payload))
        return self.control.start_offsets(furthest)

    # -- the C round ----------------------------------------------------------------------------

    def _round_native(self, order: list) -> int | None:
        """The round in one C call; None when it declined (nothing changed: run the Python
        round). Frames handled otherwise."""
        picked = self._pick(order, True)
        if isinstance(picked, str):
            return self._declined(picked)
        picked, views = picked
        if not picked:
            return 0
        state = self.log.native_append_state()
        if state is None:
            return self._declined("LOG")
        if self._scratch is None:
            self._scratch = bytearray(self.round_bytes_max + self.ring_round_bytes_max)
            # (pid, start time): fixed for the life of this process, which made this object.
            self._publisher = self.control.publisher()
        stop = NATIVE_STOP_AFTER[self.native_stop_after] if self.native_stop_after else 0
        pid, start_time = self._publisher
        result = _native.drain_round(
            views, self.control.buf, self._scratch, state, self.round_bytes_max,
            self.ring_round_bytes_max, pid, start_time, stop)
        if result[0] == _DRAIN_DECLINED:
            return self._declined(DECLINE_REASONS[result[1]])
        return self._after_native(picked, state, result, stop)

    def _pick(self, order: list, first_reads_decline: bool) -> tuple[list, list] | str:
        """The rings a C round reads and what it reads of each (buffer, position, expected
        frame sequence), at most _rings_max. A ring never read yet is skipped: its
        first poll learns the sequence (Python); with ``first_reads_decline``, if it has
        anything to read (or a broken header) the reason to decline is returned instead."""
        picked = []
        views = []
        for ring in order:
            if ring.broken is not None:
                continue
            if ring.owed:
                # Its completions must follow the owed ones (flush_owed): if its frames are
                # next in the log, the C round finds a hole and the Python round takes them.
                continue
            consumer = ring.consumer
            expected = consumer.expected_sequence
            if expected is None:
                if first_reads_decline:
                    try:
                        _native.ring_check(consumer.buf)
                    except errors.RingCorruptError:
                        return "RING_CORRUPT"
                    if consumer.has_unread() or consumer.completions_full():
                        return "NEW_RING"
                continue
            picked.append(ring)
            views.append((consumer.buf, consumer.position, expected))
            if len(picked) == self._rings_max:
                break
        return picked, views

    def sleep_round_plan(self) -> tuple | None:
        """What ``_native.drain_sleep_round`` needs to run the C round the moment the doorbell
        sleep ends: ``(picked, views, state)``, or None when the next round must start in
        Python (the Python round, a test stop point, no ring read yet, or a log whose clock
        or flush policy the C round cannot read by itself: see
        PartitionLog.sleep_round_ok). Called right before the sleep, after its last look
        found nothing, so nothing in it can change until the wake-up but the clock."""
        if not self.native or self.native_stop_after or not self.log.sleep_round_ok:
            return None
        # (A ring never read yet is left out: the loop's step() after the wake-up runs its
        # first round in Python.)
        picked, views = self._pick(self._rotated(), False)
        if not picked or self._scratch is None:
            return None
        state = self.log.native_append_state()
        if state is None:
            return None
        return picked, views, state

    def sleep_round(self, plan: tuple, seen: int, timeout_ms: int, spin_ns: int,
                    doze_ms: int = 0, registry_seen: int | None = None,
                    loop_doze_ms: int = 0) -> int:
        """The doorbell sleep (or doze) and, once woken, the C round, in one call (see
        sleep_round_plan); returns the frames the rounds handled, -1 when the sleep ended
        without a wake-up (a timeout: no round ran). A declined round changes nothing: the
        loop's next step() runs it (and counts the decline) in Python.

        With ``registry_seen`` (the ingress registry the plan's rings come from), the C call
        goes on dozing and running rounds while each appended and left nothing for Python
        (``drain_loop``: at most PARTITION_LOOP_ROUNDS_MAX rounds, PARTITION_LOOP_BUDGET_MS,
        dozing ``loop_doze_ms`` between rounds; 0: one round, as without registry_seen);
        what it returns is their sum, settled here in one pass. ``ended_idle`` says whether
        its last doze found nothing (the loop's next sleep is then a plain one)."""
        picked, views, state = plan
        pid, start_time = self._publisher
        # (registry_seen -1: the loop ends after its first round, as with rounds_max 1.)
        status, result, rounds = _native.drain_sleep_round(
            seen, timeout_ms, spin_ns, views, self.control.buf, self._scratch, state,
            self.round_bytes_max, self.ring_round_bytes_max, pid, start_time, doze_ms,
            (PARTITION_LOOP_ROUNDS_MAX, PARTITION_LOOP_BUDGET_MS,
             -1 if registry_seen is None else registry_seen, loop_doze_ms))
        self.ended_idle = rounds > 0 and status == _WAIT_TIMEOUT
        if result is None:
            return -1
        if result[0] == _DRAIN_DECLINED:
            return 0
        self.sleep_rounds += rounds
        self.sleep_calls += 1
        return self._after_native(picked, state, result, 0, rounds) or 0

    def _after_native(self, picked: list, state, result: tuple, stop: int,
                      rounds: int = 1) -> int | None:
        """Everything C rounds that did not decline leave to Python: a failed write, the
        rings' positions, the log's bookkeeping, the counters (``rounds`` of them, summed)."""
        status = result[0]
        if status == _DRAIN_WRITE_FAILED:
            self.log.native_append_failed(state, result[1], result[2])  # raises LogError
        if stop and result[2] is not None:
            raise NativeRoundStopped(self.native_stop_after)
        _, rings_done, appended = result
        for ring, (next_position, count, _, release_error) in zip(picked, rings_done):
            consumer = ring.consumer
            consumer.position = next_position
            consumer.expected_sequence += count
            if release_error is not None:  # as _release: the frames are in the log already
                self._mark_broken(ring, errors.RingCorruptError(*release_error))
        if appended is None:
            return 0
        self.log.record_native_append(state, appended)
        self.rounds += rounds
        self.native_rounds += rounds
        self._count_native_round(picked, appended, rounds)
        return appended[0]

    def _count_native_round(self, picked: list, appended: tuple, rounds: int = 1) -> None:
        """The C round's counters: the hot path (perf/bench_counters.py times it). The C
        round never rolls, so the sealed segments' bytes are the last Python round's."""
        v = self.counters.values
        v[0] += rounds
        v[1] += appended[0]
        v[2] += appended[2]
        v[3] += appended[1]
        v[4] += appended[3]
        v[5] = appended[4]
        v[6] = self._sealed_bytes + appended[5]
        if v[0] & _FILL_SAMPLE_MASK == 0:
            self._sample_rings(picked)
        _native.atomic_store_u64_many(self.counters.buf, _COUNTERS_OFFSET, v)

    def _count_round(self, rings: list, frames: int, records_count: int, batches: int,
                     nbytes: int) -> None:
        """The Python round's counters (the C round counts inline): the mirror, then one
        C call for the whole region."""
        v = self.counters.values
        v[0] += 1
        v[1] += frames
        v[2] += batches
        v[3] += records_count
        v[4] += nbytes
        v[5] = self.log.high_watermark
        segments, log_bytes = self.log.disk_usage()
        self._sealed_bytes = log_bytes - self.log.active_segment.size
        v[6] = log_bytes
        v[_SEGMENTS] = segments
        self._sample_rings(rings)
        self.count_fsyncs()
        self.counters.store()

    def _sample_rings(self, rings: list) -> None:
        """ring_fill_percent and producers into the mirror: every Python round, every
        FILL_SAMPLE_ROUNDS-th C round (one atomic load per ring costs about as much as the
        rest of the round's counters together), every reap interval (PartitionOwner)."""
        v = self.counters.values
        v[_FILL] = self.ring_fill_percent(rings)
        v[_PRODUCERS] = len(self.ingress.rings)
        self.count_fsyncs()  # acks=all rings: the C round declines them, but the policy may not

    def refresh_disk(self) -> tuple[int, int]:
        """(segments, log bytes), and the sealed bytes the C round adds its segment to."""
        segments, log_bytes = self.log.disk_usage()
        self._sealed_bytes = log_bytes - self.log.active_segment.size
        return segments, log_bytes

    def count_fsyncs(self) -> None:
        """fsyncs and last_fsync_time_ms from the log, into the mirror (not stored)."""
        flushes = self.log.flushes
        if flushes != self._flushes_counted:
            v = self.counters.values
            v[_FSYNCS] += flushes - self._flushes_counted
            v[_FSYNCS + 1] = self.log.last_flush_ms or 0
            self._flushes_counted = flushes

    @staticmethod
    def ring_fill_percent(rings) -> int:
        """The fullest ring's unread bytes (write position - our read position), percent of
        its capacity: one atomic load per ring."""
        fill = 0
        for ring in rings:
            consumer = ring.consumer
            used = (_native.atomic_load_u64(consumer.buf, _WRITE_POSITION) - consumer.position) \
                * 100 // consumer.capacity
            if used > fill:
                fill = used
        return min(fill, 100)

    def count_event(self, name: str, delta: int = 1) -> None:
        """A counter of layout/counters.py's PARTITION table that moves on an event."""
        self.counters.add(CL.PARTITION[name], delta)

    def _declined(self, reason: str) -> None:
        self.native_declined[reason] = self.native_declined.get(reason, 0) + 1
        self.count_event("native_rounds_declined")
        return None

    def _log_append(self, data) -> AppendInfo:
        """PartitionLog.append, counted for the Python round (see _count_round)."""
        info = self.log.append(data)
        py = self._py_appended
        py[0] += info.records_count
        py[1] += info.batches_count
        py[2] += info.size_bytes
        return info

    def _append(self, taken: list) -> None:
        """One append of every taken run (their offsets are contiguous from the log end: the
        merge made sure), then _finish; a bad batch sends the round down the slow path."""
        try:
            info = self._log_append(b"".join([v for *_, batch in taken for v in batch.data]))
        except FRAME_ERRORS:
            self._append_ring_by_ring(taken)
            return
        assert info.base_offset == taken[0][2], (info.base_offset, taken[0][2])
        self._finish([(ring, batch.first_sequence, batch.last_sequence, base,
                       batch.next_position) for ring, _, base, batch in taken])

    def publish(self) -> None:
        """High watermark, log start and the active segment's end, for consumers (seqlock);
        wakes consumers sleeping on hw_seq."""
        active = self.log.active_segment
        self.control.publish(self.log.high_watermark, self.log.log_start_offset,
                             active.base_offset, active.size, self.log.leader_epoch)

    def _finish(self, done: list) -> None:
        """fsync if asked, publish, then complete, then release (this order: see the module doc)."""
        if any(ring.consumer.fsync_required for ring, *_ in done):
            self.log.flush()
        self.publish()
        for ring, first, last, base_offset, next_position in done:
            self._settle(ring, first, last, base_offset, 0, next_position)

    # -- completions and releases, in each ring's order ----------------------------------------

    def _settle(self, ring: IngressRing, first: int, last: int, base_offset: int,
                error_code: int, position: int, expected_sequence: int | None = None) -> None:
        """Complete frames first..last (base_offset, or error_code; error_code -1: no
        completion, the producer had one already) and release the ring up to ``position``.
        When the producer has COMPLETIONS_MAX completions unread (or older ones are owed),
        both wait in the ring's ``owed`` list, in order, until it has read some
        (:meth:`flush_owed`): the frames are in the log already, and the ring's space stays
        taken until their completion is written, so a restart finds them below the log end
        and completes them itself. ``expected_sequence``: the frames were read without
        ``_take_run``; the consumer moves past them now."""
        consumer = ring.consumer
        if expected_sequence is not None:
            consumer.position, consumer.expected_sequence = position, expected_sequence
        if ring.owed or (error_code >= 0 and consumer.completions_full()):
            ring.owed.append((first, last, base_offset, error_code, position))
            self._owing.add(ring)
            consumer.nudge_producer()
            return
        if error_code >= 0:
            consumer.complete(first, last, base_offset, error_code)
        self._release(ring, position)

    def flush_owed(self) -> int:
        """Completions and releases that waited for the producers to read theirs (see
        :meth:`_settle`), as far as they have room now; returns how many were written."""
        done = 0
        for ring in list(self._owing):  # bounded by the rings that owe
            consumer = ring.consumer
            owed = ring.owed
            while owed and ring.broken is None:  # bounded by the owed entries
                first, last, base_offset, error_code, position = owed[0]
                if error_code >= 0:
                    if consumer.completions_full():
                        break
                    consumer.complete(first, last, base_offset, error_code)
                owed.popleft()
                self._release(ring, position)
                done += 1
            if not owed or ring.broken is not None:
                owed.clear()
                self._owing.discard(ring)
        return done

    def owed_flushable(self) -> bool:
        """Whether :meth:`flush_owed` would write something now (the loop does not sleep)."""
        for ring in self._owing:  # bounded by the rings that owe
            if ring.owed and (ring.owed[0][3] < 0 or not ring.consumer.completions_full()):
                return True
        return False

    def _release(self, ring: IngressRing, position: int) -> None:
        """``release`` checks the ring's header. A producer may overwrite it after our read
        (seen in tests/integration/test_end_to_end.py): the RingCorruptError used to escape
        the round and kill the partition process. The frames are in the log already; only
        this ring is dropped, as when its read fails."""
        try:
            ring.consumer.release(position)
        except errors.RingCorruptError as exc:
            self._mark_broken(ring, exc)

    # -- a round with a bad batch ----------------------------------------------------------------

    def _append_ring_by_ring(self, taken: list) -> None:
        """The round's runs one append each, in log order; the run with a bad batch frame by
        frame. A run that could not be handled whole ends the round there: the runs after it
        are put back (their offsets would not continue the log)."""
        done = []
        for i, (ring, start, base, batch) in enumerate(taken):
            try:
                self._log_append(b"".join(batch.data))
            except FRAME_ERRORS:
                self._finish(done)  # what is appended so far, before the slow path
                done = []
                if not self._append_frame_by_frame(ring, start, base, batch):
                    # Latest first: a ring's earliest run put back sets its position last.
                    for later_ring, later_start, _, later in reversed(taken[i + 1:]):
                        self._untake(later_ring, later_start, later)
                    return
                continue
            done.append((ring, batch.first_sequence, batch.last_sequence, base,
                         batch.next_position))
        self._finish(done)

    def _append_frame_by_frame(self, ring: IngressRing, start: int, base: int, batch) -> bool:
        """Appends the good frames of one ring's run and completes the bad ones with their
        error; a bad frame's offsets get an empty batch, so the log stays contiguous (and
        the runs after it still continue it: True)."""
        consumer = ring.consumer
        copies = [bytes(v) for v in batch.data]
        k = 0
        n = len(copies)
        offset = base
        positions = None  # where each frame ends, when a run of good frames needs it
        while k < n:  # bounded: k grows every pass
            j = k
            bad: errors.ShmbrokerError | None = None
            while j < n:
                try:
                    self.log.validate(copies[j])
                except FRAME_ERRORS as exc:
                    bad = exc
                    break
                j += 1
            if positions is None:
                positions = self._frame_ends(ring, start, batch)
            if j > k:
                info = self._log_append(b"".join(copies[k:j]))
                assert info.base_offset == offset, (info.base_offset, offset)
                if consumer.fsync_required:
                    self.log.flush()
                self.publish()  # before the ack: see the module doc, step 5
                self._settle(ring, batch.first_sequence + k, batch.first_sequence + j - 1,
                             offset, 0, positions[j - 1])
                offset = info.last_offset + 1
            if bad is None:
                break
            seq = batch.first_sequence + j
            log.warning("partition %s/%d: rejected frame %d of ring %s (producer pid %d): %s",
                        self.ingress.topic, self.ingress.partition, seq, ring.name,
                        consumer.owner_pid, bad)
            span = frame_offsets(copies[j])
            self.log.append(records.empty_batch(offset, span), gap=True)
            offset += span
            self.count_event("offsets_filled", span)
            self.publish()
            self.frames_rejected += 1
            self.count_event("frames_rejected")
            self._settle(ring, seq, seq, -1, bad.code, positions[j])
            k = j + 1
        return True

    @staticmethod
    def _frame_ends(ring: IngressRing, start: int, batch) -> list[int]:
        """The ring position after each frame of ``batch`` (read from ``start``)."""
        ends = []
        position, seq = start, batch.first_sequence
        for _ in range(batch.count):  # bounded by the batch's frames
            position, _ = _native.ring_scan(ring.consumer.buf, position, seq, _SCAN_BYTES_ANY,
                                            _ONE_FRAME)
            ends.append(position)
            seq += 1
        return ends

    def _mark_broken(self, ring: IngressRing, exc: Exception) -> None:
        self.ingress.mark_broken(ring, str(exc))
        self.count_event("rings_broken")
        log.error("partition %s/%d: ring %s (producer pid %d) is corrupt and is no longer read: "
                  "%s", self.ingress.topic, self.ingress.partition, ring.name,
                  ring.consumer.owner_pid, exc)
