"""One drain round: committed frames from the rings -> one log append -> completions ->
released ring space. And, once at start, the replay check that keeps a restart from
appending a frame twice. Design: docs/design/partition.md.

A round, in order (the order is what makes a crash at any point safe):

1. ``poll`` each readable ring (round-robin start, at most PARTITION_RING_ROUND_BYTES_MAX per
   ring and PARTITION_ROUND_BYTES_MAX in all), as memoryviews of the ring's frames;
2. write the round manifest to the control region: which rings' frames the append holds, in
   log order (one entry per ring: slot, generation, first sequence, frames, offsets), then
   the log end offset (``append_round_base_offset``; layout/shm.py says why this order);
3. join every payload into one buffer (the only copy; it also means a producer cannot change
   bytes between validation and write) and ``PartitionLog.append`` it: one validation pass,
   one ``writev`` per segment touched. Each ring's frames are contiguous in the buffer, so one
   completion per ring gives the producer every record's offset;
4. fsync if a ring of this round asked for acks="all" (``fsync_required``);
5. publish the new high watermark (consumers wake), so that an acknowledged record is always
   readable: a producer that gets its ack and tells a consumer must not find it missing;
6. ``complete`` each ring's frames, then ``release`` their space.

A kill between 3 and 6 leaves frames appended but not released. The restarted process counts
the whole batches the log holds from ``append_round_base_offset`` and walks the manifest's
frames in the same order: the frames those batches fill were appended (completed with their
offsets, skipped), the rest were not (:meth:`Drainer.replay_unreleased`). No field of a batch
is needed, so the partition stores producers' batches as they are (only base offset and
partition leader epoch, both outside the CRC, are set). Every append writes its own manifest:
the slow paths below append ring by ring or run by run, each after its manifest.

A batch that fails validation costs only its own frame: the round falls back to one append per
ring, and for the ring that failed to one validation per frame; the bad frame is completed with
the error's code and skipped, the others are appended.

The C round (``_native.drain_round``, native/include/shmb/drain.h) does steps 1-6 of the
common case in one call, the GIL released, in the same order: collect and copy (the join),
validate, the manifest and ``append_round_base_offset``, write, publish, complete, release. It changes nothing
before it has decided, and declines — the Python round below then runs, and stays the
reference it is tested against (tests/integration/test_native_drain.py) — for anything
unusual: a bad or empty frame, a batch split across frames, a roll or flush due, a ring that
asks for fsync (acks=all), a corrupt ring, a ring never read before, more than the scratch
buffer holds. Python then takes the index entries the C round planned, and the new log end
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

from .. import errors, records
from ..config import (PARTITION_NATIVE_ROUND, PARTITION_RING_ROUND_BYTES_MAX,
                      PARTITION_ROUND_BYTES_MAX)
from ..layout import counters as CL
from ..layout import record_batch as RB
from ..layout import shm as L
from ..log import PartitionLog
from ..log.partition_log import AppendInfo
from ..native import _native
from ..shm.control import ControlRegion, ManifestEntry
from ..shm.counters import CountersWriter
from .ingress import Ingress, IngressRing

log = logging.getLogger("shmbroker.partition")

#: Errors that belong to one frame's bytes (the frame is rejected, the partition carries on).
#: Anything else from the log (an I/O error) is not the producer's fault and stops the process;
#: the supervisor restarts it and the frames, never released, are read again.
FRAME_ERRORS = (errors.CorruptRecordError, errors.RecordTooLargeError,
                errors.UnsupportedCompressionError, errors.InvalidOffsetError)

_LAST_OFFSET_DELTA = struct.Struct(">i")
_BATCH_LENGTH = struct.Struct(">i")
_LAST_OFFSET_DELTA_AT = RB.FIELDS[[f.name for f in RB.FIELDS].index("last_offset_delta")].offset
_BATCH_LENGTH_AT = RB.FIELDS[[f.name for f in RB.FIELDS].index("batch_length")].offset
_CRC = struct.Struct(">I")
_CRC_AT = RB.OFFSETS["crc"]
#: Bytes scanned per read of the log while looking for already appended frames.
_REPLAY_READ_BYTES = 1 << 20
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


def offsets_in(payload) -> int:
    """Offsets taken by the batches of one frame's payload. Exact for validated bytes; for
    others (the manifest is written before the append validates) a bounded guess that no
    append uses, since validation then refuses the bytes before anything is written."""
    n = pos = 0
    end = len(payload)
    while pos + RB.HEADER_SIZE <= end:  # bounded: every step is at least a header long
        step = RB.LOG_OVERHEAD + _BATCH_LENGTH.unpack_from(payload, pos + _BATCH_LENGTH_AT)[0]
        if step < RB.HEADER_SIZE:
            break
        n += max(0, _LAST_OFFSET_DELTA.unpack_from(payload, pos + _LAST_OFFSET_DELTA_AT)[0]) + 1
        pos += step
    return n


def batches_in(payload) -> list[tuple[int, int]]:
    """(last_offset_delta, crc) of each batch of one frame's payload, in order (bounded as
    :func:`offsets_in`): what the replay compares with the batches in the log."""
    out = []
    pos = 0
    end = len(payload)
    while pos + RB.HEADER_SIZE <= end:  # bounded: every step is at least a header long
        step = RB.LOG_OVERHEAD + _BATCH_LENGTH.unpack_from(payload, pos + _BATCH_LENGTH_AT)[0]
        if step < RB.HEADER_SIZE:
            break
        out.append((_LAST_OFFSET_DELTA.unpack_from(payload, pos + _LAST_OFFSET_DELTA_AT)[0],
                    _CRC.unpack_from(payload, pos + _CRC_AT)[0]))
        pos += step
    return out


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
        #: Rings one round takes: the round manifest has an entry for each.
        self._rings_max = control.registry_slots
        #: Counters for logs and tests.
        self.rounds = 0
        self.native_rounds = 0
        #: C rounds run by drain_sleep_round straight from a wake-up (also in native_rounds).
        self.sleep_rounds = 0
        #: reason name -> rounds the C round declined for it.
        self.native_declined: dict[str, int] = {}
        self.frames_rejected = 0
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
        if self.native:
            done = self._round_native(order)
            if done is not None:
                return done
        taken = []
        budget = self.round_bytes_max
        for ring in order:
            if ring.broken is not None:
                continue
            if len(taken) == self._rings_max:  # one manifest entry each (layout/shm.py)
                break
            start = ring.consumer.position
            try:
                batch = ring.consumer.poll(self.ring_round_bytes_max, copy=False)
            except errors.RingCorruptError as exc:
                self._mark_broken(ring, exc)
                continue
            if batch is None:
                continue
            taken.append((ring, start, batch))
            budget -= sum(len(v) for v in batch.data)
            if budget <= 0:
                break
        if not taken:
            return 0
        frames = sum(batch.count for _, _, batch in taken)
        try:
            self._append(taken)
        finally:
            for _, _, batch in taken:
                for view in batch.data:
                    view.release()
            # Even when the append raised (the process then exits): what went in is counted.
            py = self._py_appended
            self._count_round(order, frames, py[0], py[1], py[2])
            py[0] = py[1] = py[2] = 0
        self.rounds += 1
        return frames

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
        frame sequence), at most one per manifest entry. A ring never read yet is skipped: its
        first poll learns the sequence (Python); with ``first_reads_decline``, if it has
        anything to read (or a broken header) the reason to decline is returned instead."""
        picked = []
        views = []
        for ring in order:
            if ring.broken is not None:
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
            if len(picked) == self._rings_max:  # one manifest entry each (layout/shm.py)
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

    def sleep_round(self, plan: tuple, seen: int, timeout_ms: int, spin_ns: int) -> int:
        """The doorbell sleep and, once woken, the C round, in one call (see
        sleep_round_plan); returns the frames the round handled. A declined round changes
        nothing: the loop's next step() runs it (and counts the decline) in Python."""
        picked, views, state = plan
        pid, start_time = self._publisher
        _, result = _native.drain_sleep_round(
            seen, timeout_ms, spin_ns, views, self.control.buf, self._scratch, state,
            self.round_bytes_max, self.ring_round_bytes_max, pid, start_time)
        if result is None or result[0] == _DRAIN_DECLINED:
            return 0
        self.sleep_rounds += 1
        return self._after_native(picked, state, result, 0) or 0

    def _after_native(self, picked: list, state, result: tuple, stop: int) -> int | None:
        """Everything a C round that did not decline leaves to Python: a failed write, the
        rings' positions, the log's bookkeeping, the counters."""
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
        self.rounds += 1
        self.native_rounds += 1
        self._count_native_round(picked, appended)
        return appended[0]

    def _count_native_round(self, picked: list, appended: tuple) -> None:
        """The C round's counters: the hot path (perf/bench_counters.py times it). The C
        round never rolls, so the sealed segments' bytes are the last Python round's."""
        v = self.counters.values
        v[0] += 1
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

    def _append_frames(self, parts: list) -> AppendInfo:
        """One append of the frames ``parts`` = [(ring, first sequence, payloads)], after
        the round manifest that names them (layout/shm.py): a restarted process counts the
        log's batches from the base offset against these frames (:meth:`replay_unreleased`).
        Returns the AppendInfo; a FRAME_ERROR leaves the log as it was."""
        entries = []
        for ring, first, payloads in parts:
            consumer = ring.consumer
            offsets = sum(offsets_in(v) for v in payloads)
            entries.append(ManifestEntry(first, consumer.slot, consumer.generation,
                                         len(payloads), min(offsets, 0xFFFFFFFF)))
        self.control.write_round_manifest(self.log.log_end_offset, entries)
        return self._log_append(b"".join([v for _, _, payloads in parts for v in payloads]))

    def _append(self, taken: list) -> None:
        try:
            info = self._append_frames([(ring, batch.first_sequence, batch.data)
                                        for ring, _, batch in taken])
        except FRAME_ERRORS:
            self._append_ring_by_ring(taken)
            return
        offset = info.base_offset
        done = []
        for i, (ring, _, batch) in enumerate(taken):
            done.append((ring, batch.first_sequence, batch.last_sequence, offset,
                         batch.next_position))
            if i + 1 < len(taken):
                offset += sum(offsets_in(v) for v in batch.data)
        self._finish(done)

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
            if last >= first:
                ring.consumer.complete(first, last, base_offset)
        for ring, _, _, _, next_position in done:
            self._release(ring, next_position)

    def _release(self, ring: IngressRing, position: int, expected_sequence: int | None = None
                 ) -> None:
        """``release`` (or ``skip_to``) checks the ring's header. A producer may overwrite it
        after our poll (seen in tests/integration/test_end_to_end.py): the RingCorruptError
        used to escape the round and kill the partition process (the replay check at a
        restart calls the same checks). The frames are in the log already; only this ring
        is dropped, as when its poll fails."""
        try:
            if expected_sequence is None:
                ring.consumer.release(position)
            else:
                ring.consumer.skip_to(position, expected_sequence)
        except errors.RingCorruptError as exc:
            self._mark_broken(ring, exc)

    # -- a round with a bad batch ----------------------------------------------------------------

    def _append_ring_by_ring(self, taken: list) -> None:
        done = []
        for ring, start, batch in taken:
            try:
                info = self._append_frames([(ring, batch.first_sequence, batch.data)])
            except FRAME_ERRORS:
                self._finish(done)  # what is appended so far, before the slow path
                done = []
                self._append_frame_by_frame(ring, start, batch)
                continue
            done.append((ring, batch.first_sequence, batch.last_sequence, info.base_offset,
                         batch.next_position))
        self._finish(done)

    def _append_frame_by_frame(self, ring: IngressRing, start: int, batch) -> None:
        """Appends the good frames of one ring's round, completes the bad ones with their
        error. Needs one completion per run of good frames and one per bad frame; when the
        producer's completion slots run out, the rest is left for a later round."""
        consumer = ring.consumer
        copies = [bytes(v) for v in batch.data]
        k = 0
        n = len(copies)
        while k < n:  # bounded: k grows every pass or the loop breaks
            j = k
            bad: errors.ShmbrokerError | None = None
            while j < n:
                try:
                    self.log.validate(copies[j])
                except FRAME_ERRORS as exc:
                    bad = exc
                    break
                j += 1
            if j > k:
                if consumer.completions_full():
                    break
                info = self._append_frames([(ring, batch.first_sequence + k, copies[k:j])])
                if consumer.fsync_required:
                    self.log.flush()
                self.publish()  # before the ack: see the module doc, step 5
                consumer.complete(batch.first_sequence + k, batch.first_sequence + j - 1,
                                  info.base_offset)
            if bad is None:
                k = j
                continue
            if consumer.completions_full():
                k = j
                break
            seq = batch.first_sequence + j
            log.warning("partition %s/%d: rejected frame %d of ring %s (producer pid %d): %s",
                        self.ingress.topic, self.ingress.partition, seq, ring.name,
                        consumer.owner_pid, bad)
            consumer.complete(seq, seq, -1, bad.code)
            self.frames_rejected += 1
            self.count_event("frames_rejected")
            k = j + 1
        if k == n:
            self._release(ring, batch.next_position)
            return
        position = start
        if k > 0:
            try:
                position, _ = _native.ring_scan(consumer.buf, start, batch.first_sequence,
                                                _SCAN_BYTES_ANY, k)
            except errors.RingCorruptError as exc:  # header overwritten: see _release
                self._mark_broken(ring, exc)
                return
        self._release(ring, position, batch.first_sequence + k)

    def _mark_broken(self, ring: IngressRing, exc: Exception) -> None:
        self.ingress.mark_broken(ring, str(exc))
        self.count_event("rings_broken")
        log.error("partition %s/%d: ring %s (producer pid %d) is corrupt and is no longer read: "
                  "%s", self.ingress.topic, self.ingress.partition, ring.name,
                  ring.consumer.owner_pid, exc)

    # -- after a restart ------------------------------------------------------------------------

    def replay_unreleased(self) -> int:
        """Frames at the rings' read positions that the previous process appended (its last
        append) but did not release: complete them with the offsets they got (unless it
        had: ``acked_sequence``), skip them. Returns how many were found.

        The round manifest (layout/shm.py) names the append's frames in log order; the log
        holds whole batches from ``append_round_base_offset`` (recovery cut a torn tail).
        Walking the manifest's frames, each frame's batches are matched with the next
        batches of the log (offsets contiguous, last offset delta and CRC equal: the log
        stores a producer's batch as it is, and base offset and leader epoch lie outside
        the CRC): those frames were appended, the rest were not. Worked example: base 6,
        the log holds 6..14 (three batches of 3), the manifest says ring A frames 2..3,
        ring B frame 0..1: A's frames 2 and 3 and B's frame 0 were appended (offsets 6, 9,
        12), B's frame 1 was not and is drained as usual."""
        base = self.control.append_round_base_offset
        end = self.log.log_end_offset
        if base < 0 or base >= end or base < self.log.log_start_offset:
            return 0
        logged = self._batches_since(base)
        rings = {(r.consumer.slot, r.consumer.generation): r for r in self.ingress}
        at = 0  # index of the next logged batch to match
        found = 0
        for entry in self.control.round_manifest():  # bounded: registry_slots
            if at == len(logged):
                break
            ring = rings.get((entry.slot, entry.generation))
            frames = 0
            try:
                if ring is not None and ring.broken is None:
                    frames, at, whole = self._skip_appended(ring, entry, logged, at)
                else:
                    whole = False
            except errors.RingCorruptError as exc:  # see _release: only this ring is dropped
                self._mark_broken(ring, exc)
                whole = False
            found += frames
            if whole:
                continue
            if frames == 0 and self._released(ring, entry):
                # Released already (its ring gone, or read past): its offsets still count.
                stop = logged[at][0] + entry.offset_count
                while at < len(logged) and logged[at][0] < stop:  # bounded by logged
                    at += 1
                continue
            break  # the log ends inside this ring's frames: later entries were not written
        if found:
            log.info("partition %s/%d: %d frame(s) appended before the restart but not released "
                     "were recognised in the log and not appended again", self.ingress.topic,
                     self.ingress.partition, found)
        return found

    @staticmethod
    def _released(ring: IngressRing | None, entry: ManifestEntry) -> bool:
        """The entry's frames are no longer in its ring (released, or the ring is gone)."""
        if ring is None or ring.broken is not None:
            return True
        seq = ring.consumer.first_unread_sequence()
        return seq is None or seq >= entry.first_sequence + entry.frame_count

    def _batches_since(self, offset: int) -> list[tuple[int, int, int]]:
        """(base offset, last offset, crc) of every whole batch from ``offset`` to the log end
        (at most one append: a round, PARTITION_ROUND_BYTES_MAX and one ring's share)."""
        out: list[tuple[int, int, int]] = []
        end = self.log.log_end_offset
        while offset < end:  # bounded: offset grows with every slice
            piece = self.log.read(offset, _REPLAY_READ_BYTES)
            if piece.length == 0:
                break
            scan = records.scan_batches(piece.data, verify_crc=False)
            for b in scan.batches:
                if b.base_offset >= offset:
                    out.append((b.base_offset, b.last_offset,
                                _CRC.unpack_from(piece.data, b.position + _CRC_AT)[0]))
            offset = piece.last_offset + 1
            del piece, scan
        return out

    def _skip_appended(self, ring: IngressRing, entry: ManifestEntry, logged: list, at: int
                       ) -> tuple[int, int, bool]:
        """Matches ``entry``'s frames, read from ``ring``, with ``logged[at:]``. Returns
        (frames skipped, index of the next logged batch, whether every frame of the entry
        was in the log)."""
        consumer = ring.consumer
        seq = consumer.first_unread_sequence()
        if seq is None or seq > entry.first_sequence or \
                seq >= entry.first_sequence + entry.frame_count:
            return 0, at, False
        acked = _native.atomic_load_u64(consumer.buf, L.RING["acked_sequence"])
        if acked < entry.first_sequence:
            # Unreleased frames before the entry's were completed (an earlier append of a
            # round that went frame by frame); any that was not means a manifest we do
            # not understand: leave the ring alone.
            return 0, at, False
        position, start_seq = consumer.position, seq
        last = entry.first_sequence + entry.frame_count  # one past the entry's frames
        first_offset = -1  # offset of the first frame at or after acked
        torn = -1  # a frame whose first batches only are in the log
        while seq < last:  # bounded by the entry's frames
            nxt, spans = _native.ring_scan(consumer.buf, position, seq, _SCAN_BYTES_ANY,
                                           _ONE_FRAME)
            if not spans:
                break
            if seq >= entry.first_sequence:
                off, length = spans[0]
                with memoryview(consumer.buf) as whole, whole[off:off + length] as payload:
                    batches = batches_in(payload)
                k = 0
                for delta, crc in batches:  # bounded by the frame's batches
                    if at + k == len(logged):
                        break
                    base, last_offset, logged_crc = logged[at + k]
                    if last_offset - base != delta or logged_crc != crc:
                        break
                    k += 1
                if k == 0 and at < len(logged):
                    log.warning("partition %s/%d: the batch at offset %d is not frame %d of "
                                "ring %s, which the round manifest names; the replay stops "
                                "there", self.ingress.topic, self.ingress.partition,
                                logged[at][0], seq, ring.name)
                if k < len(batches) or not batches:
                    if k > 0:
                        torn, at = seq, at + k
                        position, seq = nxt, seq + 1
                    break
                if seq >= acked and first_offset < 0:
                    first_offset = logged[at][0]
                at += k
            position, seq = nxt, seq + 1
        if seq == start_seq:
            return 0, at, False
        appended_last = torn - 1 if torn >= 0 else seq - 1
        first = max(entry.first_sequence, acked)
        if first_offset >= 0 and appended_last >= first and not consumer.completions_full():
            consumer.complete(first, appended_last, first_offset)
        if torn >= acked and not consumer.completions_full():
            self._refuse_torn(ring, torn, logged[at - 1][1])
        consumer.skip_to(position, seq)
        return seq - start_seq, at, seq == last and torn < 0

    def _refuse_torn(self, ring: IngressRing, seq: int, last_logged: int) -> None:
        """A frame of several batches whose first batches are in the log and the rest not (a
        kill inside the write, between two of its batches): it is neither appended again
        (that would duplicate what is there) nor acknowledged (records are missing); its
        producer gets RequestTimeoutError ("may or may not be appended"), as when an ack
        is lost. Our producers, the router and the Kafka listener write one batch per
        frame, so only another writer's ring can see this."""
        log.error("partition %s/%d: frame %d of ring %s was cut inside the write before the "
                  "restart (the log holds its batches up to offset %d only); answered with "
                  "REQUEST_TIMED_OUT", self.ingress.topic, self.ingress.partition, seq,
                  ring.name, last_logged)
        ring.consumer.complete(seq, seq, -1, errors.RequestTimeoutError.code)
