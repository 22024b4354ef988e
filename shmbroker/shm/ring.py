"""The ingress ring: one per (producer process, partition), single producer, single consumer.

``RingProducer`` (the producer process; it creates and, on close, unlinks the ring) writes
frames; ``RingConsumer`` (the partition process) reads committed frames, hands them to the
log, writes a completion (the base offset each frame got) and releases the space. Byte layout:
shmbroker/layout/shm.py; the hot paths are C (``_native.ring_*``) with a pure-Python twin in
ring_reference.py; protocol, wake-ups and failure handling: docs/design/shm.md.

A full ring is back-pressure: ``send`` sleeps on the ring's space futex (woken by the
consumer's release, not polled) up to its timeout, then raises RingFullTimeoutError. Nothing
is ever dropped. A payload the ring can never hold is RecordTooLargeError at once.
"""
from __future__ import annotations

import os
import struct
import time
from typing import NamedTuple, Sequence

from .. import errors
from ..layout import shm as L
from ..native import _native
from . import wake
from .control import ControlRegion
from .liveness import my_start_time, process_alive
from .region import Region

R = L.RING
C = L.CONTROL
RING_OK = L.RING_STATUS["OK"]
RING_FULL = L.RING_STATUS["FULL"]
RING_OFFSETS_UNSET = L.RING_STATUS["OFFSETS_UNSET"]
#: Nap while the partition process has not set next_offset yet (it is starting: recovering
#: its log); a start takes milliseconds to seconds, so a nap is cheaper than a futex word.
_OFFSETS_UNSET_NAP_S = 0.002
_HEADER_REST = struct.Struct("<QQiiQIIQ")  # region_bytes .. created_ns (offset 16)


class Completion(NamedTuple):
    """Frames first_sequence..last_sequence were appended with consecutive offsets starting at
    base_offset (error_code 0), or were rejected with the shmbroker.errors code error_code."""

    first_sequence: int
    last_sequence: int
    base_offset: int
    error_code: int


_tuple_new = tuple.__new__


class ReadBatch(NamedTuple):
    """Committed frames taken by RingConsumer.poll: ``data`` is their payloads back to back
    (bytes) or one memoryview per payload (copy=False; valid until released)."""

    data: bytes | list[memoryview]
    first_sequence: int
    count: int
    next_position: int

    @property
    def last_sequence(self) -> int:
        return self.first_sequence + self.count - 1


def _check_capacity(capacity: int) -> None:
    if not (L.RING_CAPACITY_MIN <= capacity <= L.RING_CAPACITY_MAX) or capacity & (capacity - 1):
        raise errors.ConfigError(f"ring capacity {capacity} must be a power of two in "
                                 f"[{L.RING_CAPACITY_MIN}, {L.RING_CAPACITY_MAX}]")


def init_ring_header(buf, capacity: int, *, partition: int = -1, slot: int = 0,
                     generation: int = 0) -> None:
    """Writes a ring header into zeroed ``buf`` (ring_region_bytes(capacity) bytes), the magic
    last. Used by RingProducer.create and by tests on anonymous mappings."""
    _check_capacity(capacity)
    assert len(buf) == L.ring_region_bytes(capacity), (len(buf), capacity)
    _HEADER_REST.pack_into(buf, R["region_bytes"], len(buf), capacity, os.getpid(), partition,
                           my_start_time(), slot, generation, time.time_ns())
    struct.pack_into("<II", buf, R["layout_version"], L.RING_LAYOUT_VERSION, L.RING_DATA_OFFSET)
    _native.atomic_store_u64(buf, R["magic"], L.RING_MAGIC)


class RingProducer:
    """Producer side. Owned by the process that created it; not thread-safe (a client that
    shares one between threads serialises the calls)."""

    def __init__(self, region: Region, control: ControlRegion | None = None,
                 acks: bool = True):
        self.region = region
        self.buf = region.buf
        self.name = region.name
        self.control = control
        self.capacity = _native.ring_check(self.buf)
        self.payload_bytes_max = L.payload_bytes_max(self.capacity)
        self._completions_read = _native.atomic_load_u64(self.buf, R["completions_read"])
        #: Completions read from the ring (which must not fill up: the consumer stops taking
        #: frames then) and not yet handed out by poll_completions.
        self._completions: list[Completion] = []
        self._pid = os.getpid()
        #: False: this producer does not want completions (acks=0); the consumer may
        #: overwrite unread ones instead of holding the ring back.
        self.acks = acks
        _native.atomic_store_u32(self.buf, R["completions_off"], 0 if acks else 1)

    @classmethod
    def create(cls, name: str, capacity: int, *, partition: int = -1, slot: int = 0,
               generation: int = 0, control: ControlRegion | None = None,
               acks: bool = True) -> "RingProducer":
        """Creates the ring region ``name`` (0600, O_EXCL) and initialises its header.
        ``acks``: whether this producer reads completions (False for acks=0)."""
        _check_capacity(capacity)
        region = Region.create(name, L.ring_region_bytes(capacity))
        try:
            init_ring_header(region.buf, capacity, partition=partition, slot=slot,
                             generation=generation)
            return cls(region, control, acks)
        except BaseException:
            region.unlink()
            region.close()
            raise

    # -- writing --------------------------------------------------------------------------------

    def try_send_many(self, payloads: Sequence) -> tuple[int, int, int]:
        """One non-blocking attempt: (status RING_OK/RING_FULL, first_sequence, written)."""
        doorbell = self.control.buf if self.control is not None else None
        return _native.ring_write(self.buf, payloads, doorbell)

    def send(self, payload, timeout_ms: float | None = None, spin_ns: int = 0) -> int:
        """Writes one frame; returns its sequence. Blocks while the ring is full."""
        status, seq, _ = self.try_send_many((payload,))
        if status == RING_OK:
            if self.acks:
                self.reap_completions()  # keeps the consumer from holding the ring back
            return seq
        return self.send_many((payload,), timeout_ms, spin_ns)

    def send_many(self, payloads: Sequence, timeout_ms: float | None = None,
                  spin_ns: int = 0) -> int:
        """Writes every payload, in order, as few publishes as the space allows; returns the
        first sequence. Blocks on a full ring up to ``timeout_ms`` (None: forever) in total,
        then raises RingFullTimeoutError (``.written`` says how many went in before)."""
        payloads = list(payloads)
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0
        first = None
        done = 0
        while True:
            if self.acks:
                self.reap_completions()
            status, seq, written = self.try_send_many(payloads[done:] if done else payloads)
            if first is None and written:
                first = seq
            done += written
            if status == RING_OK:
                return first if first is not None else seq
            if status == RING_OFFSETS_UNSET:
                self._wait_offsets(deadline, timeout_ms, done)
                continue
            self._wait_space(len(payloads[done]), deadline, timeout_ms, done, spin_ns)

    def _wait_offsets(self, deadline: float | None, timeout_ms, done: int) -> None:
        """The partition process has not set next_offset yet (decision 0005: offsets are
        taken at the commit): nap until it has, up to the deadline."""
        if deadline is not None and time.monotonic() >= deadline:
            err = errors.RingFullTimeoutError(
                f"ring {self.name!r}: the partition process did not start within {timeout_ms} "
                f"ms ({done} payloads written, the rest not sent): no offsets to give them")
            err.written = done
            raise err
        time.sleep(_OFFSETS_UNSET_NAP_S)

    def _wait_space(self, payload_bytes: int, deadline: float | None, timeout_ms, done: int,
                    spin_ns: int) -> None:
        while True:
            left_ms = -1
            if deadline is not None:
                left_ms = (deadline - time.monotonic()) * 1000.0
                if left_ms <= 0:
                    err = errors.RingFullTimeoutError(
                        f"ring {self.name!r} stayed full for {timeout_ms} ms ({done} payloads "
                        "written, the rest not sent): the partition process is not draining")
                    err.written = done
                    raise err
            self._before_wait()
            if _native.ring_wait_space(self.buf, payload_bytes,
                                       -1 if left_ms < 0 else max(1, int(left_ms)), spin_ns):
                return
            # Timed out or nudged: the consumer holds back a ring whose completions are all
            # unread, and nudges the producer. Read them and ring the doorbell.
            if self.acks and self.reap_completions() and self.control is not None:
                self.control.ring_doorbell()

    def _before_wait(self) -> None:
        """About to wait on the partition (space, an ack): a dozing one is woken now rather
        than at the end of its doze (ControlRegion.ring_doorbell_urgent)."""
        if self.control is not None:
            self.control.ring_doorbell_urgent()

    # -- completions (acks) ------------------------------------------------------------------

    def reap_completions(self) -> int:
        """Moves completions out of the ring (freeing their slots for the consumer) into this
        object; returns how many. One atomic load when there are none."""
        written = _native.atomic_load_u64(self.buf, R["completions_written"])
        if written == self._completions_read:
            return 0
        n = written - self._completions_read
        if self.acks:
            assert 0 < n <= L.COMPLETIONS_MAX, n
            unpack, out = L.COMPLETION_STRUCT.unpack_from, self._completions
            for k in range(self._completions_read, written):
                off = L.RING_COMPLETIONS_OFFSET + (k % L.COMPLETIONS_MAX) * L.COMPLETION_BYTES
                # tuple.__new__: a Completion without the Python __new__ NamedTuple gives it
                # (about a third of a one-record send's CPU went to reading its completion).
                out.append(_tuple_new(Completion, unpack(self.buf, off)))
        self._completions_read = written
        _native.atomic_store_u64(self.buf, R["completions_read"], written)
        return n

    def poll_completions(self) -> list[Completion]:
        """Completions since the last call, oldest first."""
        self.reap_completions()
        out, self._completions = self._completions, []
        return out

    def pending_completions(self) -> list[Completion]:
        """Completions read (the ring's new ones now) and not yet handed out, oldest first: the
        live list, which the caller consumes from its front and may put the rest of a
        completion back into (Producer._reap_some resolves a few batches at a time)."""
        self.reap_completions()
        return self._completions

    def take_collected(self) -> list[Completion]:
        """Completions already moved out of the ring and not yet polled; unlike
        poll_completions, this reads nothing from the ring (it may be closed)."""
        out, self._completions = self._completions, []
        return out

    @property
    def acked_sequence(self) -> int:
        """Every frame with a sequence below this has a completion."""
        return _native.atomic_load_u64(self.buf, R["acked_sequence"])

    def wait_acked(self, sequence: int, timeout_ms: float | None) -> bool:
        """Sleeps until frame ``sequence`` has its completion; False on timeout. Completions
        are not consumed here: call poll_completions to read them."""
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0
        buf, word, flag = self.buf, R["ack_seq"], R["ack_waiting"]
        while True:
            if self.acked_sequence > sequence:
                return True
            seen = _native.atomic_load_u32(buf, word)
            _native.atomic_store_u32(buf, flag, 1)
            try:
                if self.acked_sequence > sequence:
                    return True
                left = None if deadline is None else (deadline - time.monotonic()) * 1000.0
                if left is not None and left <= 0:
                    return False
                self._before_wait()
                wake.wait(buf, word, seen, left)
            finally:
                _native.atomic_store_u32(buf, flag, 0)

    # -- state and lifecycle ------------------------------------------------------------------

    def set_fsync_required(self, required: bool) -> None:
        """acks="all": the partition process fsyncs the log before completing this ring's
        frames (a per-ring setting, since one producer has one acks level)."""
        _native.atomic_store_u32(self.buf, R["fsync_required"], 1 if required else 0)

    @property
    def next_sequence(self) -> int:
        return _native.atomic_load_u64(self.buf, R["next_sequence"])

    @property
    def write_position(self) -> int:
        return _native.atomic_load_u64(self.buf, R["write_position"])

    @property
    def read_position(self) -> int:
        return _native.atomic_load_u64(self.buf, R["read_position"])

    def drained(self) -> bool:
        """Whether the consumer has released every frame written so far."""
        return self.read_position == self.write_position

    def close(self, drain_timeout_ms: float = 0) -> bool:
        """Marks the ring closed, waits up to ``drain_timeout_ms`` for the consumer to take
        every committed frame, unlinks the name and unmaps. Returns whether it was drained.
        A ring of a partition (``control``) that is not drained by then is left to the
        partition instead (L.RING_HANDED_OVER): its committed frames hold offsets that
        consumers may have read from it already, so they must reach the log (the partition
        unlinks it and frees the slot once drained; a restarted one finds it in the
        registry). Without a partition, undrained frames stay readable by a consumer that
        has the ring mapped already."""
        if self.region.closed:
            return True
        _native.atomic_store_u32(self.buf, R["closed"], L.RING_CLOSED)
        if self.control is not None:
            self.control.ring_doorbell_urgent()
        deadline = time.monotonic() + drain_timeout_ms / 1000.0
        try:
            while not self.drained() and time.monotonic() < deadline:
                if self.acks and self.reap_completions() and self.control is not None:
                    self.control.ring_doorbell()
                _native.ring_wait_space(self.buf, self.capacity // 2 - L.FRAME_HEADER_BYTES,
                                        max(1, int((deadline - time.monotonic()) * 1000)))
        except errors.RingCorruptError:
            # A ring whose header was overwritten never drains (the partition process stops
            # reading it). Raising here left it in /dev/shm and its registry slot claimed,
            # and Producer.close() never closed its other rings: unlink and unmap it anyway.
            pass
        drained = self.drained()
        if not drained and self._readable_by_consumers():
            # Nobody reads its completions any more: the partition must not hold it back.
            _native.atomic_store_u32(self.buf, R["completions_off"], 1)
            _native.atomic_store_u32(self.buf, R["closed"], L.RING_HANDED_OVER)
            self.control.ring_doorbell()
        elif os.getpid() == self._pid:  # a forked child never unlinks its parent's ring
            self.region.unlink()
        self.region.close()
        self.buf = None
        return drained

    def _readable_by_consumers(self) -> bool:
        """Whether consumers may have read committed frames of this ring (decision 0005): the
        partition allows ring reads, has not stopped for good, and the ring is sound (one
        whose header broke is given up by the partition anyway)."""
        control = self.control
        if control is None or not _native.atomic_load_u32(control.buf, C["ring_reads"]) or \
                control.partition_status == L.PARTITION_STATUS_STOPPED:
            return False
        try:
            _native.ring_check(self.buf)
        except errors.RingCorruptError:
            return False
        return True

    def __enter__(self) -> "RingProducer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RingConsumer:
    """Partition-process side of one ring. Not thread-safe. It never unlinks the ring except
    on behalf of a dead producer (``unlink_for_dead_owner``)."""

    def __init__(self, region: Region):
        self.region = region
        self.buf = region.buf
        self.name = region.name
        self.capacity = _native.ring_check(self.buf)
        (_, _, self.owner_pid, self.partition, self.owner_start_time, self.slot,
         self.generation, _) = _HEADER_REST.unpack_from(self.buf, R["region_bytes"])
        #: Where the next poll starts (frames before it were taken but maybe not released).
        self.position = _native.atomic_load_u64(self.buf, R["read_position"])
        #: Sequence of the frame at ``position``; None until the first committed frame is
        #: seen (after an attach, e.g. by a restarted partition process, it is read from that
        #: frame's header: next_sequence could already count frames still being written).
        self.expected_sequence: int | None = None

    @classmethod
    def attach(cls, name: str) -> "RingConsumer":
        region = Region.attach(name, magic=L.RING_MAGIC, layout_version=L.RING_LAYOUT_VERSION,
                               what="ring")
        try:
            return cls(region)
        except BaseException:
            region.close()
            raise

    def _peek_sequence(self) -> int | None:
        """The sequence of the committed frame at ``position`` (past a padding frame), or
        None when nothing is committed there."""
        mask = self.capacity - 1
        off = L.RING_DATA_OFFSET + (self.position & mask)
        if _native.atomic_load_u32(self.buf, off) == 0:
            return None
        length, ftype, seq = L.FRAME_HEADER_STRUCT.unpack_from(self.buf, off)
        if ftype == L.FRAME_TYPE_PADDING:
            off = L.RING_DATA_OFFSET
            if _native.atomic_load_u32(self.buf, off) == 0:
                return None
            length, ftype, seq = L.FRAME_HEADER_STRUCT.unpack_from(self.buf, off)
        return seq if ftype == L.FRAME_TYPE_DATA else None

    def first_unread_sequence(self) -> int | None:
        """The sequence of the committed frame at ``position``, None when none is there."""
        return self._peek_sequence()

    # -- reading --------------------------------------------------------------------------------

    def completions_free(self) -> int:
        """Completions the producer has room for (unbounded, 1 << 62, when it wants none:
        completions_off). The C round's completions_free is the same rule."""
        if _native.atomic_load_u32(self.buf, R["completions_off"]):
            return 1 << 62
        written = _native.atomic_load_u64(self.buf, R["completions_written"])
        unread = written - _native.atomic_load_u64(self.buf, R["completions_read"])
        return max(0, L.COMPLETIONS_MAX - unread)

    def completions_full(self) -> bool:
        return self.completions_free() == 0

    def has_unread(self) -> bool:
        """Whether a committed frame waits at ``position`` (one acquire load)."""
        off = L.RING_DATA_OFFSET + (self.position & (self.capacity - 1))
        return _native.atomic_load_u32(self.buf, off) != 0

    def poll(self, max_bytes: int = 1 << 20, copy: bool = True) -> ReadBatch | None:
        """Takes committed frames from ``position`` (payloads up to ``max_bytes``, at least one
        frame). None when there is nothing, or when the producer has COMPLETIONS_MAX
        completions unread (acks back-pressure; the producer is nudged)."""
        if self.completions_full():
            self.nudge_producer()
            return None
        if self.expected_sequence is None:
            _native.ring_check(self.buf)  # the C read does this on every call after
            self.expected_sequence = self._peek_sequence()
            if self.expected_sequence is None:
                return None
        if copy:
            nxt, count, data = _native.ring_read(self.buf, self.position, self.expected_sequence,
                                                 max_bytes)
        else:
            nxt, spans = _native.ring_scan(self.buf, self.position, self.expected_sequence,
                                           max_bytes)
            count = len(spans)
            view = memoryview(self.buf)
            data = [view[o:o + n] for o, n in spans]
        if count == 0:
            if nxt != self.position:  # only a padding frame: skip it
                self.position = nxt
            return None
        batch = ReadBatch(data, self.expected_sequence, count, nxt)
        self.position = nxt
        self.expected_sequence += count
        return batch

    def release(self, position: int) -> None:
        """Frees the ring up to ``position`` (a ReadBatch's next_position) and wakes the
        producer if it waits for space. Call after the frames are appended to the log."""
        _native.ring_release(self.buf, position)

    def complete(self, first_sequence: int, last_sequence: int, base_offset: int,
                 error_code: int = 0) -> None:
        """Tells the producer what happened to frames first..last (they got consecutive
        offsets from base_offset, or error_code). At most COMPLETIONS_MAX may be unread: poll
        checks that before taking frames, so one completion per poll always fits."""
        buf = self.buf
        written = _native.atomic_load_u64(buf, R["completions_written"])
        assert not self.completions_full(), "complete() without a poll that allowed it"
        off = L.RING_COMPLETIONS_OFFSET + (written % L.COMPLETIONS_MAX) * L.COMPLETION_BYTES
        L.COMPLETION_STRUCT.pack_into(buf, off, first_sequence, last_sequence, base_offset,
                                      error_code)
        _native.atomic_store_u64(buf, R["completions_written"], written + 1)
        _native.atomic_store_u64(buf, R["acked_sequence"], last_sequence + 1)
        _native.atomic_add_u32(buf, R["ack_seq"], 1)
        if _native.atomic_load_u32(buf, R["ack_waiting"]):
            wake.wake(buf, R["ack_seq"])

    def nudge_producer(self) -> None:
        """Wake the producer if it sleeps on a full ring (it reads its completions then)."""
        if _native.atomic_load_u32(self.buf, R["space_waiting"]):
            _native.atomic_add_u32(self.buf, R["space_seq"], 1)
            wake.wake(self.buf, R["space_seq"])

    # -- the producer's state ------------------------------------------------------------------

    @property
    def fsync_required(self) -> bool:
        return _native.atomic_load_u32(self.buf, R["fsync_required"]) != 0

    def stop_holding_back(self) -> None:
        """For a dead producer: nobody will read completions any more, so stop holding the
        ring back for them (completions_off) and drain it."""
        _native.atomic_store_u32(self.buf, R["completions_off"], 1)

    @property
    def producer_closed(self) -> bool:
        return _native.atomic_load_u32(self.buf, R["closed"]) != 0

    @property
    def handed_over(self) -> bool:
        """The producer closed it undrained and left it to us (L.RING_HANDED_OVER)."""
        return _native.atomic_load_u32(self.buf, R["closed"]) == L.RING_HANDED_OVER

    def owner_alive(self) -> bool:
        return process_alive(self.owner_pid, self.owner_start_time)

    def finished(self) -> bool:
        """The producer is gone (closed or dead) and every committed frame was taken."""
        return (self.producer_closed or not self.owner_alive()) and not self.has_unread()

    def unlink_for_dead_owner(self) -> None:
        """Removes the ring's name once its producer is dead and it is drained."""
        from .region import unlink

        assert not self.owner_alive(), f"{self.name}: owner {self.owner_pid} is alive"
        unlink(self.name)

    def close(self) -> None:
        self.region.close()
        self.buf = None

    def __enter__(self) -> "RingConsumer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
