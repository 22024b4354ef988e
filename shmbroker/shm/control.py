"""The partition control region: published state, wake-up words, producer registry.

One per partition, created by the broker side (``ControlRegion.create``), attached by the
partition process, producers and consumers. It outlives restarts of the partition process.
Layout: shmbroker/layout/shm.py; protocols: docs/design/shm.md.

Writers, one per group of fields:

* published state (seqlock) and ``hw_seq``: the partition process (``publish``);
* ``doorbell``: producers, after committing frames (the C ``ring_write`` does it);
* ``partition_sleeping``: the partition process, around its doorbell sleep;
* ``next_offset``: producers take their frames' offsets from it at each commit (fetch_add
  in the C ``ring_write``); the partition process sets it once, at its start, in a new
  region (``start_offsets``; docs/decisions/0005);
* ``hw_waiters``: consumers, around their sleep on ``hw_seq`` (a count: a consumer that dies
  while counted only costs the partition extra wake syscalls);
* a registry slot: the producer that claimed it, and the partition process that frees it
  once the producer has closed or died and its ring is drained.

Nothing here is a lock: a slot is claimed by CAS 0 -> pid and freed by CAS pid -> 0; a dead
claimer is recognised by pid and start time (liveness.py) and its slot reclaimed.
"""
from __future__ import annotations

import os
import struct
import time
from typing import NamedTuple

from .. import errors
from ..config import SEQLOCK_READ_TIMEOUT_MS_MAX
from ..layout import shm as L
from ..native import _native
from . import wake
from .liveness import my_start_time, process_alive
from .region import Region

C = L.CONTROL
S = L.SLOT
_HEADER_REST = struct.Struct("<iIQi")  # owner_pid, registry_slots, owner_start_time, partition


class PartitionState(NamedTuple):
    high_watermark: int
    log_start_offset: int
    active_segment_base_offset: int
    active_segment_end_position: int
    partition_pid: int
    leader_epoch: int
    partition_start_time: int
    seq: int  # the seqlock value it was read at (even)


class SlotInfo(NamedTuple):
    slot: int
    pid: int
    state: int
    start_time: int
    generation: int
    ring_bytes: int


#: Words one futex_waitv takes (the kernel's limit).
_WAITV_WORDS_MAX = 128


class ControlRegion:
    """A mapped control region. Not thread-safe; see the module docstring for who writes what."""

    def __init__(self, region: Region):
        self.region = region
        self.buf = region.buf
        self.name = region.name
        (self.owner_pid, self.registry_slots, self.owner_start_time,
         self.partition) = _HEADER_REST.unpack_from(self.buf, C["owner_pid"])

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, partition: int, registry_slots: int = L.REGISTRY_SLOTS_MAX
               ) -> "ControlRegion":
        if not 1 <= registry_slots <= L.REGISTRY_SLOTS_MAX:
            raise errors.ConfigError(
                f"registry_slots={registry_slots} is outside [1, {L.REGISTRY_SLOTS_MAX}]")
        region = Region.create(name, L.control_region_bytes(registry_slots))
        try:
            buf = region.buf
            _HEADER_REST.pack_into(buf, C["owner_pid"], os.getpid(), registry_slots,
                                   my_start_time(), partition)
            struct.pack_into("<Q", buf, C["created_ns"], time.time_ns())
            struct.pack_into("<qqqq", buf, C["high_watermark"], 0, 0, 0, 0)
            struct.pack_into("<Q", buf, C["next_offset"], L.NEXT_OFFSET_UNSET)
            region.write_prefix(L.CONTROL_MAGIC, L.CONTROL_LAYOUT_VERSION,
                                L.CONTROL_REGISTRY_OFFSET)
        except BaseException:
            region.unlink()
            region.close()
            raise
        return cls(region)

    @classmethod
    def attach(cls, name: str, readonly: bool = False) -> "ControlRegion":
        region = Region.attach(name, magic=L.CONTROL_MAGIC,
                               layout_version=L.CONTROL_LAYOUT_VERSION, readonly=readonly,
                               what="control region")
        try:
            header_bytes = struct.unpack_from("<I", region.buf, C["header_bytes"])[0]
            slots = struct.unpack_from("<I", region.buf, C["registry_slots"])[0]
            if header_bytes != L.CONTROL_REGISTRY_OFFSET or not 1 <= slots <= L.REGISTRY_SLOTS_MAX \
                    or region.size != L.control_region_bytes(slots):
                raise errors.RegionHeaderError(
                    f"control region {name!r}: header_bytes {header_bytes}, registry_slots "
                    f"{slots} do not match its {region.size} bytes", C["registry_slots"])
            return cls(region)
        except BaseException:
            region.close()
            raise

    @classmethod
    def adopt(cls, name: str) -> "ControlRegion":
        """Attach the control region a dead predecessor (a broker killed with -9) created and
        make this process its owner: stale cleanup judges regions by owner pid, and producers
        that outlived the old broker keep their mapping and their rings. The returned object
        unlinks on ``__exit__`` like one from ``create``."""
        ctl = cls.attach(name)
        struct.pack_into("<iIQ", ctl.buf, C["owner_pid"], os.getpid(), ctl.registry_slots,
                         my_start_time())
        ctl.owner_pid, ctl.owner_start_time = os.getpid(), my_start_time()
        ctl.region.owner = True
        return ctl

    def close(self) -> None:
        self.buf = None
        self.region.close()

    def unlink(self) -> None:
        self.region.unlink()

    def __enter__(self) -> "ControlRegion":
        return self

    def __exit__(self, *exc) -> None:
        if self.region.owner:
            self.unlink()
        self.close()

    # -- published state (seqlock; the partition process is the only writer) -------------------

    def take_ownership(self, leader_epoch: int) -> None:
        """Called once by a (re)started partition process before its first publish: repairs
        a seqlock left odd by a predecessor that died while publishing."""
        seq = _native.atomic_load_u64(self.buf, C["state_seq"])
        if seq & 1:
            _native.atomic_store_u64(self.buf, C["state_seq"], seq + 1)
        struct.pack_into("<i", self.buf, C["leader_epoch"], leader_epoch)

    def publish(self, high_watermark: int, log_start_offset: int,
                active_segment_base_offset: int, active_segment_end_position: int,
                leader_epoch: int) -> None:
        """Publishes the partition's state, bumps hw_seq and wakes consumers that sleep on it."""
        buf = self.buf
        # Everything computed before the seqlock goes odd: the odd window (in which readers
        # retry) holds one pack_into and no syscall (os.getpid() used to be in it).
        fields = (high_watermark, log_start_offset, active_segment_base_offset,
                  active_segment_end_position, _pid_cached(), leader_epoch, _start_time_cached())
        seq = _native.atomic_load_u64(buf, C["state_seq"])
        assert seq & 1 == 0, "publish: seqlock is odd; call take_ownership first"
        _native.atomic_store_u64(buf, C["state_seq"], seq + 1)  # seq_cst: fields after it
        L.CONTROL_STATE_STRUCT.pack_into(buf, C["high_watermark"], *fields)
        _native.atomic_store_u64(buf, C["state_seq"], seq + 2)
        _native.atomic_add_u32(buf, C["hw_seq"], 1)
        if _native.atomic_load_u32(buf, C["hw_waiters"]):
            wake.wake(buf, C["hw_seq"])

    # -- offsets assigned at the producer's commit (decision 0005) ---------------------------

    @property
    def next_offset(self) -> int:
        """The next offset a producer's commit takes (L.NEXT_OFFSET_UNSET: not set yet)."""
        return _native.atomic_load_u64(self.buf, C["next_offset"])

    def offset_taken(self, offset: int) -> bool:
        """Whether producers have taken offsets up to ``offset`` (it may be past the high
        watermark: in a committed ring frame not appended yet, or a consumer's position just
        past one, decision 0005). A position there is a valid one to wait at."""
        taken = self.next_offset
        return not taken & L.NEXT_OFFSET_UNSET and offset <= taken

    def start_offsets(self, at_least: int) -> int:
        """Partition process, at start, before its first round: a new region's next_offset
        becomes ``at_least`` (the log end, or past every offset the attached rings' frames
        hold); producers' writes wait for this (RING_OFFSETS_UNSET). A region that has it
        already (a restarted partition process, an adopted region) keeps it: producers may
        hold offsets from it. Returns the value in force."""
        if at_least < 0 or at_least >= L.NEXT_OFFSET_UNSET:
            raise ValueError(f"start_offsets: {at_least} is not an offset")
        if _native.atomic_cas_u64(self.buf, C["next_offset"], L.NEXT_OFFSET_UNSET, at_least):
            return at_least
        return self.next_offset

    # -- consumers reading committed ring frames (decision 0005 steps 5-6) ----------------------

    def allow_ring_reads(self, batch_bytes_max: int) -> None:
        """Partition process, at start: consumers may read committed frames from the rings,
        refusing what this process refuses (the topic's max.message.bytes)."""
        if batch_bytes_max <= 0:
            raise ValueError(f"allow_ring_reads: batch_bytes_max {batch_bytes_max} <= 0")
        struct.pack_into("<q", self.buf, C["batch_bytes_max"], batch_bytes_max)
        _native.atomic_store_u32(self.buf, C["ring_reads"], 1)  # after the limit

    def forbid_ring_reads(self) -> None:
        _native.atomic_store_u32(self.buf, C["ring_reads"], 0)

    @property
    def commit_seq(self) -> int:
        return _native.atomic_load_u32(self.buf, C["commit_seq"])

    def wait_commit(self, seen_commit_seq: int, timeout_ms: float | None,
                    spin_ns: int = 0) -> bool:
        """Consumer reading rings, at an offset no producer has taken: sleeps until a commit
        (commit_seq differs from ``seen_commit_seq``); False on timeout."""
        return self._wait_counted("commit_seq", "commit_waiters", seen_commit_seq, timeout_ms,
                                  spin_ns)

    def wait_commit_or_hw(self, seen_hw_seq: int, seen_commit_seq: int,
                          timeout_ms: float | None, spin_ns: int = 0) -> bool:
        """Consumer reading rings: sleeps until a producer commits (commit_seq) or the
        partition publishes (hw_seq: a hole filled, a refused frame's empty batch appended);
        False on timeout. Counted in both waiter words for the sleep, as wait_hw_change."""
        buf = self.buf
        words = [(buf, C["hw_seq"], seen_hw_seq), (buf, C["commit_seq"], seen_commit_seq)]
        if spin_ns:
            spun = _native.futex_waitv(words, 0, spin_ns)
            if spun is not None and spun[0] != wake.TIMEOUT:
                return True
        _count(buf, "hw_waiters", 1)
        _count(buf, "commit_waiters", 1)
        try:
            r = wake.wait_any(words, timeout_ms)
            if r is None:  # no futex_waitv (Linux < 5.16): the commit word, a bounded nap;
                # the caller looks again (its deadline decides), so a publish is seen too
                wake.wait(buf, C["commit_seq"], seen_commit_seq,
                          1.0 if timeout_ms is None else min(timeout_ms, 1.0))
                return True
        finally:
            _count(buf, "commit_waiters", -1)
            _count(buf, "hw_waiters", -1)
        return r != wake.TIMEOUT

    @staticmethod
    def publisher() -> tuple[int, int]:
        """(pid, start time) that :meth:`publish` stores: the C drain round, which publishes
        by itself (native/src/drain.c), stores the same."""
        return _pid_cached(), _start_time_cached()

    def read_state(self, timeout_ms: int = SEQLOCK_READ_TIMEOUT_MS_MAX) -> PartitionState:
        """A consistent snapshot of the published state (seqlock read, bounded)."""
        buf = self.buf
        deadline = time.monotonic() + timeout_ms / 1000.0
        tries = 0
        while True:
            s1 = _native.atomic_load_u64(buf, C["state_seq"])
            if s1 & 1 == 0:
                fields = L.CONTROL_STATE_STRUCT.unpack_from(buf, C["high_watermark"])
                if _native.atomic_load_u64(buf, C["state_seq"]) == s1:
                    return PartitionState(*fields, s1)
            tries += 1
            if tries % 64 == 0:
                if time.monotonic() >= deadline:
                    raise errors.PartitionStateUnavailableError(
                        f"partition state in {self.name!r} stayed mid-update for {timeout_ms} "
                        "ms (its process died while publishing?)")
                # The writer was preempted mid-publish (2 cores, many processes): give it the
                # CPU. A 0.5 ms sleep here put millisecond tails on consumers.
                os.sched_yield()

    @property
    def hw_seq(self) -> int:
        return _native.atomic_load_u32(self.buf, C["hw_seq"])

    def wait_hw_change(self, seen_hw_seq: int, timeout_ms: float | None,
                       spin_ns: int = 0) -> bool:
        """Consumer: sleeps until hw_seq differs from ``seen_hw_seq``; False on timeout."""
        return self._wait_counted("hw_seq", "hw_waiters", seen_hw_seq, timeout_ms, spin_ns)

    def _wait_counted(self, word: str, waiters: str, seen: int, timeout_ms: float | None,
                      spin_ns: int) -> bool:
        """Sleeps until ``word`` differs from ``seen``, counted in ``waiters`` while asleep
        (its writer wakes only counted sleepers); False on timeout."""
        buf = self.buf
        if _native.atomic_load_u32(buf, C[word]) != seen:
            return True
        if spin_ns and _native.futex_wait(buf, C[word], seen, 0, spin_ns) != wake.TIMEOUT:
            # Changed while spinning, not counted meanwhile: the writer need not wake a
            # spinner (the count is only for the sleep, whose futex compare keeps the
            # protocol race-free).
            return True
        _count(buf, waiters, 1)
        try:
            r = wake.wait(buf, C[word], seen, timeout_ms)
        finally:
            _count(buf, waiters, -1)
        return r != wake.TIMEOUT

    @staticmethod
    def wait_any_hw_change(regions: list, seen_hw_seqs: list, timeout_ms: float | None,
                           spin_ns: int = 0, extra_words: list = (),
                           seen_commit_seqs: list | None = None) -> bool | None:
        """Consumer of several partitions: one sleep until any region's hw_seq differs from
        its seen value (futex_waitv); False on timeout, None when the kernel has no
        futex_waitv. Each region counts the consumer in hw_waiters meanwhile, so its
        publishes wake it. ``extra_words``: more ``(buf, offset, expected)`` words to wake on
        (a group member's wake word, whose writer wakes it unasked). ``seen_commit_seqs``:
        per region, a commit_seq to wake on as well (None: not), counted in commit_waiters
        (a consumer reading that partition's rings, wait_commit_or_hw)."""
        words = [(r.buf, C["hw_seq"], seen) for r, seen in zip(regions, seen_hw_seqs)]
        commits = [(r, seen) for r, seen in zip(regions, seen_commit_seqs or ())
                   if seen is not None]
        if len(words) + len(commits) + len(extra_words) > _WAITV_WORDS_MAX:
            commits = []  # too many words for one sleep: the publishes still wake it
        words.extend((r.buf, C["commit_seq"], seen) for r, seen in commits)
        words.extend(extra_words)
        if spin_ns:
            # Spin first, not counted in hw_waiters (as wait_hw_change): a publisher need not
            # wake a spinner; only the sleep below counts, and its futex compare keeps the
            # protocol race-free (docs/design/shm.md).
            spun = _native.futex_waitv(words, 0, spin_ns)
            if spun is None:
                return None  # no futex_waitv here
            if spun[0] != wake.TIMEOUT:
                return True
        counted = []
        try:
            for region in regions:
                _count(region.buf, "hw_waiters", 1)
                counted.append((region, "hw_waiters"))
            for region, _ in commits:
                _count(region.buf, "commit_waiters", 1)
                counted.append((region, "commit_waiters"))
            r = wake.wait_any(words, timeout_ms)
        finally:
            for region, field in counted:
                _count(region.buf, field, -1)
        return None if r is None else r != wake.TIMEOUT

    # -- partition status and the drain journal (partition process) ---------------------------

    @property
    def partition_status(self) -> int:
        return _native.atomic_load_u32(self.buf, C["partition_status"])

    def set_partition_status(self, status: int) -> None:
        assert status in (L.PARTITION_STATUS_RUNNING, L.PARTITION_STATUS_STOPPING,
                          L.PARTITION_STATUS_STOPPED), status
        _native.atomic_store_u32(self.buf, C["partition_status"], status)

    # -- registry changes (producers announce new rings) -------------------------------------

    @property
    def registry_changes(self) -> int:
        return _native.atomic_load_u32(self.buf, C["registry_changes"])

    def announce_registry_change(self) -> None:
        """Producer, after setting a slot READY: the partition process rescans the registry
        when this counter moves (one load per drain round), and is woken if it sleeps."""
        _native.atomic_add_u32(self.buf, C["registry_changes"], 1)
        _native.doorbell_ring(self.buf)

    # -- doorbell ------------------------------------------------------------------------------

    def sleep_prepare(self) -> int:
        """Partition process, step 1 of a sleep: returns the doorbell value to sleep on and
        says it may sleep. Then it must look at every ring once more, and call ``sleep`` only
        if all are empty (otherwise ``sleep_cancel``)."""
        seen = _native.atomic_load_u32(self.buf, C["doorbell"])
        _native.atomic_store_u32(self.buf, C["partition_sleeping"], L.PARTITION_MAY_SLEEP)
        return seen

    def sleep(self, seen: int, timeout_ms: float, doze_ms: float = 0) -> bool:
        """Partition process, step 2: sleeps until a producer rings (True) or timeout (False).
        ``doze_ms`` (below ``timeout_ms``): a doze instead, unless a consumer waits for the
        high watermark: producers' commits do not wake it, and it returns True at its end if
        they moved the doorbell meanwhile (the reference of shmb_drain_sleep's doze)."""
        buf = self.buf
        try:
            state = L.PARTITION_ASLEEP
            if 0 < doze_ms and (timeout_ms is None or doze_ms < timeout_ms):
                # DOZING, then the count: Dekker with hw_waiter (a consumer counts itself,
                # then wakes a dozer).
                _native.atomic_store_u32(buf, C["partition_sleeping"], L.PARTITION_DOZING)
                if not _native.atomic_load_u32(buf, C["hw_waiters"]):
                    state, timeout_ms = L.PARTITION_DOZING, doze_ms
            if state == L.PARTITION_ASLEEP:
                # ASLEEP just before the futex: producers then wake it (shmb_ctl_doorbell_ring).
                _native.atomic_store_u32(buf, C["partition_sleeping"], L.PARTITION_ASLEEP)
            if wake.wait(buf, C["doorbell"], seen, timeout_ms) != wake.TIMEOUT:
                return True
            return state == L.PARTITION_DOZING and \
                _native.atomic_load_u32(buf, C["doorbell"]) != seen
        finally:
            _native.atomic_store_u32(buf, C["partition_sleeping"], L.PARTITION_AWAKE)

    def sleep_cancel(self) -> None:
        _native.atomic_store_u32(self.buf, C["partition_sleeping"], L.PARTITION_AWAKE)

    def ring_doorbell(self) -> None:
        """Producer: wake the partition process if it sleeps (ring_write does this in C); a
        dozing one takes the frames when its doze ends."""
        _native.doorbell_ring(self.buf)

    def ring_doorbell_urgent(self) -> None:
        """A client about to wait on the partition process (an ack, ring space): wake it if
        it sleeps or dozes."""
        _native.doorbell_ring_urgent(self.buf)

    # -- registry ------------------------------------------------------------------------------

    def _slot_offset(self, slot: int) -> int:
        assert 0 <= slot < self.registry_slots, slot
        return L.CONTROL_REGISTRY_OFFSET + slot * L.SLOT_BYTES

    def slot(self, slot: int) -> SlotInfo:
        off = self._slot_offset(slot)
        pid = struct.unpack_from("<i", self.buf, off + S["pid"])[0]
        state = _native.atomic_load_u32(self.buf, off + S["state"])
        start_time, generation = struct.unpack_from("<QI", self.buf, off + S["start_time"])
        ring_bytes = struct.unpack_from("<Q", self.buf, off + S["ring_bytes"])[0]
        return SlotInfo(slot, pid, state, start_time, generation, ring_bytes)

    def slots(self) -> list[SlotInfo]:
        """Every slot whose pid is not 0."""
        out = []
        for i in range(self.registry_slots):
            off = self._slot_offset(i)
            if _native.atomic_load_u32(self.buf, off + S["pid"]):
                out.append(self.slot(i))
        return out

    def claim_slot(self, ring_bytes: int, pid: int | None = None) -> tuple[int, int]:
        """Producer: claims a free slot (CAS 0 -> pid); returns (slot, generation).

        The slot is CLAIMED; the producer creates its ring under the generation's name and
        then calls ``set_slot_state(slot, SLOT_READY)``. RegistryFullError when no slot is
        free (dead owners' slots are freed by the partition process after draining).
        """
        pid = os.getpid() if pid is None else pid
        start_time = my_start_time() if pid == os.getpid() else 0
        for i in range(self.registry_slots):
            off = self._slot_offset(i)
            if _native.atomic_load_u32(self.buf, off + S["pid"]) != 0:
                continue
            if not _native.atomic_cas_u32(self.buf, off + S["pid"], 0, pid):
                continue
            generation = (struct.unpack_from("<I", self.buf, off + S["generation"])[0] + 1) \
                & 0xFFFFFFFF
            struct.pack_into("<QI", self.buf, off + S["start_time"], start_time, generation)
            struct.pack_into("<Q", self.buf, off + S["ring_bytes"], ring_bytes)
            _native.atomic_store_u32(self.buf, off + S["state"], L.SLOT_CLAIMED)
            return i, generation
        raise errors.RegistryFullError(
            f"all {self.registry_slots} producer slots of {self.name!r} are taken")

    def set_slot_state(self, slot: int, state: int) -> None:
        assert state in (L.SLOT_CLAIMED, L.SLOT_READY, L.SLOT_CLOSING), state
        _native.atomic_store_u32(self.buf, self._slot_offset(slot) + S["state"], state)

    def release_slot(self, slot: int, pid: int) -> bool:
        """Frees ``slot`` if ``pid`` still holds it (CAS pid -> 0). The producer calls it on a
        clean close; the partition process for a dead producer, after draining its ring."""
        off = self._slot_offset(slot)
        if _native.atomic_load_u32(self.buf, off + S["pid"]) != (pid & 0xFFFFFFFF):
            return False
        # start_time first: the next claimer's pid must never be seen with our start time
        # (it would look like a reused pid, i.e. dead).
        _native.atomic_store_u64(self.buf, off + S["start_time"], 0)
        _native.atomic_store_u32(self.buf, off + S["state"], L.SLOT_EMPTY)
        return _native.atomic_cas_u32(self.buf, off + S["pid"], pid, 0)

    def reclaim_slot(self, slot: int, dead_pid: int, new_pid: int) -> bool:
        """CAS dead_pid -> new_pid: take over a dead producer's slot in one step (whoever
        wins the CAS owns it). Only call after its ring has been drained."""
        off = self._slot_offset(slot)
        if not _native.atomic_cas_u32(self.buf, off + S["pid"], dead_pid, new_pid):
            return False
        struct.pack_into("<Q", self.buf, off + S["start_time"], 0)
        _native.atomic_store_u32(self.buf, off + S["state"], L.SLOT_CLAIMED)
        return True

    def dead_slots(self) -> list[SlotInfo]:
        """Slots whose pid is no longer the process that claimed them."""
        return [s for s in self.slots() if not process_alive(s.pid, s.start_time)]


_START_TIME: tuple[int, int] | None = None


def _count(buf, waiters: str, delta: int) -> None:
    """A consumer into (+1) or out of (-1) a waiter count around its sleep. hw_waiters goes
    through _native.hw_waiter, which on the way in also wakes a dozing partition process
    (docs/design/shm.md, "Dozing"); commit_waiters is a plain count."""
    if waiters == "hw_waiters":
        _native.hw_waiter(buf, delta > 0)
    else:
        _native.atomic_add_u32(buf, C[waiters], delta)


def _pid_cached() -> int:
    """os.getpid() without the syscall, cached per process (reset after fork)."""
    global _PID
    if _PID is None:
        _PID = os.getpid()
    return _PID


_PID: int | None = None
os.register_at_fork(after_in_child=lambda: globals().__setitem__("_PID", None))


def _start_time_cached() -> int:
    """This process's start time, cached per pid (correct after fork)."""
    global _START_TIME
    pid = _pid_cached()
    if _START_TIME is None or _START_TIME[0] != pid:
        _START_TIME = (pid, my_start_time())
    return _START_TIME[1]
