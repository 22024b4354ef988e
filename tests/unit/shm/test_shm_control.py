"""The partition control region: the seqlock gives consistent snapshots and never hangs on a
dead writer; publish bumps hw_seq and wakes sleepers; the registry claims by CAS, refuses when
full, recognises dead claimers by pid and start time, and frees or reclaims their slots; a
corrupted header is a typed error."""
from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from shmbroker import _native, errors
from shmbroker.layout import shm as L
from shmbroker.shm import names
from shmbroker.shm import wake
from shmbroker.shm.control import ControlRegion

C = L.CONTROL


@pytest.fixture
def ctl(prefix):
    with ControlRegion.create(names.control_name(prefix, "orders", 0), 0, registry_slots=4) as c:
        yield c


def test_publish_then_read_state_and_hw_seq(ctl):
    reader = ControlRegion.attach(ctl.name, readonly=True)
    try:
        assert reader.read_state().high_watermark == 0
        seq0 = reader.hw_seq
        ctl.publish(10, 2, 0, 4096, 7)
        st = reader.read_state()
        assert (st.high_watermark, st.log_start_offset, st.active_segment_base_offset,
                st.active_segment_end_position, st.partition_pid, st.leader_epoch) == \
            (10, 2, 0, 4096, os.getpid(), 7)
        assert st.seq % 2 == 0 and reader.hw_seq == seq0 + 1
        assert reader.registry_slots == 4 and reader.partition == 0
    finally:
        reader.close()


def test_read_state_never_hangs_on_a_writer_that_died_mid_publish(ctl):
    _native.atomic_store_u64(ctl.buf, C["state_seq"], 5)  # odd: a publish that never ended
    with pytest.raises(errors.PartitionStateUnavailableError) as info:
        ctl.read_state(timeout_ms=50)
    assert info.value.retriable
    ctl.take_ownership(leader_epoch=1)  # the restarted partition process repairs it
    ctl.publish(3, 0, 0, 100, 1)
    assert ctl.read_state().high_watermark == 3


def test_seqlock_snapshots_are_consistent_under_concurrent_publishes(ctl):
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            ctl.publish(i, i, i, i, 0)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(3000):
            st = ctl.read_state()
            assert st.high_watermark == st.log_start_offset == st.active_segment_end_position
    finally:
        stop.set()
        t.join()


def test_consumer_sleeps_on_hw_seq_and_is_woken_by_publish(ctl):
    seen = ctl.hw_seq
    assert not ctl.wait_hw_change(seen, timeout_ms=30)
    threading.Timer(0.05, lambda: ctl.publish(1, 0, 0, 1, 0)).start()
    t0 = time.monotonic()
    assert ctl.wait_hw_change(seen, timeout_ms=5000)
    assert time.monotonic() - t0 < 2
    assert _native.atomic_load_u32(ctl.buf, C["hw_waiters"]) == 0


def test_a_spinning_consumer_is_counted_in_hw_waiters_only_once_it_sleeps(ctl):
    """The spin is not counted (a publish then needs no futex wake); the sleep after it is,
    and a publish wakes it."""
    seen = ctl.hw_seq
    counts = []

    def publish_later():
        for _ in range(10):  # bounded: 50 ms of looking while the consumer spins
            counts.append(_native.atomic_load_u32(ctl.buf, C["hw_waiters"]))
            time.sleep(0.005)
        ctl.publish(1, 0, 0, 1, 0)

    timer = threading.Thread(target=publish_later)
    timer.start()
    try:
        assert ctl.wait_hw_change(seen, timeout_ms=10_000, spin_ns=3_000_000_000)
    finally:
        timer.join()
    assert counts == [0] * 10
    seen = ctl.hw_seq
    threading.Timer(0.1, lambda: ctl.publish(2, 0, 0, 2, 0)).start()
    t0 = time.monotonic()
    assert ctl.wait_hw_change(seen, timeout_ms=10_000, spin_ns=1_000_000)  # then asleep
    assert time.monotonic() - t0 < 5
    assert _native.atomic_load_u32(ctl.buf, C["hw_waiters"]) == 0


def test_a_spinning_consumer_of_several_partitions_is_counted_only_once_it_sleeps(ctl, prefix):
    """The same rule for one futex_waitv over several partitions: no region counts the
    consumer while it spins; every region counts it while it sleeps, and a publish on any of
    them wakes it."""
    with ControlRegion.create(names.control_name(prefix, "orders", 1), 1, registry_slots=4) as other:
        regions = [ctl, other]
        waiters = lambda: [_native.atomic_load_u32(r.buf, C["hw_waiters"]) for r in regions]
        counts: list = []

        def publish_later(region, version):
            for _ in range(10):  # bounded: 50 ms of looking while the consumer waits
                counts.append(waiters())
                time.sleep(0.005)
            region.publish(version, 0, 0, version, 0)

        t = threading.Thread(target=publish_later, args=(other, 1))
        t.start()
        try:
            woke = ControlRegion.wait_any_hw_change(regions, [r.hw_seq for r in regions],
                                                    10_000, spin_ns=3_000_000_000)
        finally:
            t.join()
        if woke is None:
            pytest.skip("no futex_waitv in this kernel")
        assert woke and counts == [[0, 0]] * 10
        counts.clear()
        t = threading.Thread(target=publish_later, args=(ctl, 2))
        t.start()
        try:
            assert ControlRegion.wait_any_hw_change(regions, [r.hw_seq for r in regions],
                                                    10_000, spin_ns=1_000_000)  # then asleep
        finally:
            t.join()
        assert counts[-1] == [1, 1] and waiters() == [0, 0]


def test_doorbell_wakes_a_sleeping_partition_only_when_it_sleeps(ctl):
    before = _native.atomic_load_u32(ctl.buf, C["doorbell"])
    ctl.ring_doorbell()  # nobody sleeps: no bump, no syscall
    assert _native.atomic_load_u32(ctl.buf, C["doorbell"]) == before
    seen = ctl.sleep_prepare()
    threading.Timer(0.05, ctl.ring_doorbell).start()
    assert ctl.sleep(seen, timeout_ms=5000)
    assert _native.atomic_load_u32(ctl.buf, C["partition_sleeping"]) == 0
    seen = ctl.sleep_prepare()
    assert not ctl.sleep(seen, timeout_ms=20)


def test_a_spinning_partition_is_ended_by_the_doorbell_bump_and_a_sleeping_one_is_woken(ctl):
    """partition_sleeping: MAY_SLEEP through the partition's spin (a producer bumps the
    doorbell, which ends the spin, and makes no futex wake), ASLEEP only in the futex (the
    producer then wakes it too), AWAKE after either."""
    flag = C["partition_sleeping"]
    out = []

    def drain_sleep(spin_ns: int) -> None:
        seen = _native.drain_sleep_prepare(ctl.buf, ctl.registry_changes, [])
        out.append(_native.drain_sleep(ctl.buf, seen, 10_000, spin_ns))

    for spin_ns, state in ((3_000_000_000, L.PARTITION_MAY_SLEEP),
                           (1_000_000, L.PARTITION_ASLEEP)):
        out.clear()
        sleeper = threading.Thread(target=drain_sleep, args=(spin_ns,))
        sleeper.start()
        try:
            deadline = time.monotonic() + 5
            while _native.atomic_load_u32(ctl.buf, flag) != state \
                    and time.monotonic() < deadline:
                time.sleep(0.002)  # bounded: until it spins, or sleeps after a short spin
            time.sleep(0.05)
            assert _native.atomic_load_u32(ctl.buf, flag) == state
            t0 = time.monotonic()
            ctl.ring_doorbell()
        finally:
            sleeper.join(10)
        assert not sleeper.is_alive() and time.monotonic() - t0 < 5
        assert out == [wake.CHANGED if state == L.PARTITION_MAY_SLEEP else wake.WOKEN]
        assert _native.atomic_load_u32(ctl.buf, flag) == L.PARTITION_AWAKE


def _doze(ctl, impl: str, doze_ms: int, timeout_ms: int = 10_000) -> bool:
    """One doze as the partition process sleeps: the C call (drain_sleep) or the Python
    reference (ControlRegion.sleep); True when it ended with work (woken, or the doorbell
    moved during the doze)."""
    if impl == "c":
        seen = _native.drain_sleep_prepare(ctl.buf, ctl.registry_changes, [])
        return _native.drain_sleep(ctl.buf, seen, timeout_ms, 0, doze_ms) != wake.TIMEOUT
    seen = ctl.sleep_prepare()
    return ctl.sleep(seen, timeout_ms, doze_ms)


def _during(ctl, impl: str, doze_ms: int, action, at_s: float = 0.05):
    """Runs ``action`` ``at_s`` into a doze; (ended with work, seconds it took, the
    partition_sleeping flag the action saw)."""
    seen_flag = []

    def act():
        seen_flag.append(_native.atomic_load_u32(ctl.buf, C["partition_sleeping"]))
        action()

    timer = threading.Timer(at_s, act)
    t0 = time.monotonic()
    timer.start()
    try:
        worked = _doze(ctl, impl, doze_ms)
    finally:
        timer.join()
    assert _native.atomic_load_u32(ctl.buf, C["partition_sleeping"]) == L.PARTITION_AWAKE
    return worked, time.monotonic() - t0, seen_flag[0]


@pytest.mark.parametrize("impl", ["c", "python"])
def test_a_doze_is_not_ended_by_a_commit_but_counts_it_and_waiters_end_it_at_once(ctl, impl):
    """docs/design/shm.md, "Dozing": a producer's commit bumps a dozing partition's doorbell
    without waking it; the doze then ends at its time as a wake-up (the commits are work). A
    client about to wait on the partition (doorbell_ring_urgent) and a consumer about to
    sleep on the high watermark (hw_waiter) end it at once; with a consumer already waiting,
    the partition does not doze (a commit wakes it, as before). A doze with nothing times out."""
    worked, took, flag = _during(ctl, impl, 400, ctl.ring_doorbell)
    assert flag == L.PARTITION_DOZING
    assert worked and took >= 0.38  # not woken by the commit; its bump made the doze work
    worked, took, _ = _during(ctl, impl, 400, lambda: None)
    assert not worked and took >= 0.38
    worked, took, _ = _during(ctl, impl, 3_000, ctl.ring_doorbell_urgent)
    assert worked and took < 2.0
    worked, took, _ = _during(ctl, impl, 3_000, lambda: _native.hw_waiter(ctl.buf, True))
    _native.hw_waiter(ctl.buf, False)
    assert worked and took < 2.0
    assert _native.atomic_load_u32(ctl.buf, C["hw_waiters"]) == 0
    _native.hw_waiter(ctl.buf, True)  # a consumer waits already: a sleep, not a doze
    try:
        worked, took, flag = _during(ctl, impl, 3_000, ctl.ring_doorbell)
    finally:
        _native.hw_waiter(ctl.buf, False)
    assert flag == L.PARTITION_ASLEEP and worked and took < 2.0


@pytest.mark.parametrize("before, wakes", [(_native.ACC_DOZE_WAKE_FRAMES - 2, False),
                                          (_native.ACC_DOZE_WAKE_FRAMES - 1, True)])
def test_a_producer_with_half_its_in_flight_bound_unacknowledged_wakes_a_dozing_partition(
        ctl, before, wakes):
    """A producer sending faster than a doze is long would reach its in-flight bound within
    one doze and hold its records: its commit wakes a dozing partition once
    ACC_DOZE_WAKE_FRAMES frames (half PRODUCER_MAX_IN_FLIGHT_MAX) wait for their acks
    (RecordAccumulator.write_ring), not before."""
    from shmbroker.config import PRODUCER_MAX_IN_FLIGHT_MAX

    assert _native.ACC_DOZE_WAKE_FRAMES == PRODUCER_MAX_IN_FLIGHT_MAX // 2
    import mmap

    from shmbroker.shm.ring import init_ring_header

    ctl.start_offsets(0)
    capacity = 1 << 16
    ring = mmap.mmap(-1, L.ring_region_bytes(capacity))
    init_ring_header(ring, capacity)
    acc = _native.RecordAccumulator(1 << 12)

    def write(n: int) -> None:
        for _ in range(n):
            acc.append(b"x")
            assert acc.write_ring(ring, ctl.buf, -1, -1, -1)[0] == L.RING_STATUS["OK"]

    write(before)
    worked, took, flag = _during(ctl, "c", 1_500, lambda: write(1))
    assert flag == L.PARTITION_DOZING and worked  # the commit's bump, at least
    assert (took < 1.2) == wakes


def test_registry_claim_release_and_full(ctl):
    got = [ctl.claim_slot(ring_bytes=4096) for _ in range(4)]
    assert [s for s, _ in got] == [0, 1, 2, 3] and all(g == 1 for _, g in got)
    with pytest.raises(errors.RegistryFullError) as info:
        ctl.claim_slot(4096)
    assert info.value.retriable
    ctl.set_slot_state(2, L.SLOT_READY)
    info2 = ctl.slot(2)
    assert (info2.pid, info2.state, info2.ring_bytes) == (os.getpid(), L.SLOT_READY, 4096)
    assert ctl.dead_slots() == []
    assert not ctl.release_slot(2, os.getpid() + 1)
    assert ctl.release_slot(2, os.getpid())
    slot, gen = ctl.claim_slot(4096)
    assert (slot, gen) == (2, 2)  # a new generation: a new ring name


def test_dead_claimer_is_found_and_its_slot_reclaimed(ctl):
    pid = os.fork()
    if pid == 0:
        try:
            ctl.claim_slot(4096)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    dead = ctl.dead_slots()
    assert [(s.slot, s.pid) for s in dead] == [(0, pid)]
    assert ctl.reclaim_slot(0, pid, os.getpid())
    assert ctl.slot(0).pid == os.getpid() and ctl.dead_slots() == []


def test_reused_pid_is_not_taken_for_the_claimer(ctl):
    slot, _ = ctl.claim_slot(4096)
    off = L.CONTROL_REGISTRY_OFFSET + slot * L.SLOT_BYTES + L.SLOT["start_time"]
    struct.pack_into("<Q", ctl.buf, off, 1)  # our pid, but another process's start time
    assert [s.slot for s in ctl.dead_slots()] == [slot]


@pytest.mark.parametrize("field,value", [("magic", 1), ("layout_version", 9),
                                         ("registry_slots", 100000), ("header_bytes", 64),
                                         ("region_bytes", 1 << 40)])
def test_corrupted_control_header_is_a_typed_error(ctl, field, value):
    fmt = "<Q" if field in ("magic", "region_bytes") else "<I"
    struct.pack_into(fmt, ctl.buf, C[field], value)
    with pytest.raises(errors.RegionHeaderError):
        ControlRegion.attach(ctl.name)
