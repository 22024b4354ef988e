"""The C drain round (``_native.drain_round``) against its reference, the Python round.

Each test plays one script of ring writes and partition steps twice, on real shared memory
and real files, in two data directories: once with the Python round only, once with the C
round first. Everything the two leave behind must be byte-identical: every segment, .index
and .timeindex file (before and after a clean close), every completion each producer got,
and the published state. The scripts cover what the C round does itself (several rings,
several frames per ring, frames of several batches, index entries in the middle of a round,
a ring that wraps with padding) and what it declines to the Python round (a bad frame, a
roll due by size and by time, acks=all, the flush policy); those tests also check that it
did decline, for the reason expected, and that the C round ran in the other steps.
"""
from __future__ import annotations

import os
from typing import Callable

import pytest

from shmbroker import records
from shmbroker.config import LogConfig
from shmbroker.layout import shm as L
from shmbroker.log import files
from shmbroker.partition.owner import PartitionOwner
from shmbroker.shm import names
from shmbroker.shm.control import ControlRegion
from shmbroker.shm.ring import RingProducer

pytestmark = pytest.mark.timeout(60)

TOPIC = "t"
#: Record timestamps start here (ms); the log's clock stays at CLOCK_MS.
TIME0_MS = 1_700_000_000_000
CLOCK_MS = TIME0_MS + 10_000_000


class Rings:
    """A control region and ``n`` registered producer rings, as the supervisor and producers
    make them; frames carry Kafka-style producer fields (id, epoch, sequence), deterministically."""

    def __init__(self, data_dir: str, n: int, capacities: list[int]):
        prefix = names.broker_prefix(data_dir)
        self.control = ControlRegion.create(names.control_name(prefix, TOPIC, 0), 0)
        self.rings: list[RingProducer] = []
        self.ids: list[int] = []
        for k in range(n):
            slot, generation = self.control.claim_slot(capacities[k])
            ring = RingProducer.create(names.ring_name(prefix, TOPIC, 0, slot, generation),
                                       capacities[k], partition=0, slot=slot,
                                       generation=generation, control=self.control)
            self.control.set_slot_state(slot, L.SLOT_READY)
            self.rings.append(ring)
            self.ids.append(1000 + k)  # a Kafka-style producer id, stored as it is
        self.control.announce_registry_change()
        self.completions: list[list] = [[] for _ in range(n)]
        #: Rings whose producer does not read its completions for now (acks back-pressure).
        self.hold: set[int] = set()

    def batch(self, k: int, seq: int, records_count: int, size: int, ts: int) -> bytes:
        return records.encode_batch(
            [b"r%d-%d-%d-" % (k, seq, i) + b"x" * size for i in range(records_count)],
            timestamps=[ts + i for i in range(records_count)], producer_id=self.ids[k],
            producer_epoch=0, base_sequence=seq & 0x7FFFFFFF)

    def frame(self, k: int, batches: list[tuple[int, int, int]]) -> None:
        """One frame of ring k holding one batch per (records, value size, timestamp)."""
        seq = self.rings[k].next_sequence
        self.send(k, b"".join(self.batch(k, seq, n, size, ts) for n, size, ts in batches))

    def send(self, k: int, payload: bytes) -> None:
        self.rings[k].try_send_many([payload])  # no reap: completions are collected below
        self.reap()

    def reap(self) -> None:
        for k, ring in enumerate(self.rings):
            if k not in self.hold:
                self.completions[k] += [tuple(c) for c in ring.poll_completions()]

    def close(self) -> None:
        for ring in self.rings:
            ring.close()
        self.control.unlink()
        self.control.close()


Script = Callable[[Rings, PartitionOwner, int], None]


def play(data_dir, native: bool, config: LogConfig, capacities: list[int], steps: int,
         script: Script) -> dict:
    """Runs ``script(rings, owner, step)`` then ``owner.step()`` ``steps`` times; returns what
    the two rounds must agree on, and the drainer's counters."""
    os.makedirs(data_dir, exist_ok=True)
    rings = Rings(str(data_dir), len(capacities), capacities)
    owner = PartitionOwner(str(data_dir), TOPIC, 0, config, clock_ms=lambda: CLOCK_MS,
                           control=ControlRegion.attach(rings.control.name))
    owner.drainer.native = native
    try:
        for step in range(steps):
            script(rings, owner, step)
            owner.step()
            _check_kept_state(owner.log)
            rings.reap()
        rings.hold.clear()
        rings.reap()
        while owner.step():  # bounded: the rings hold finitely many frames
            rings.reap()
        rings.reap()
        out = _stop(rings, owner)
        drainer = owner.drainer
        return {**out, "native_rounds": drainer.native_rounds,
                "declined": drainer.native_declined, "rejected": drainer.frames_rejected}
    finally:
        rings.close()


def _stop(rings: Rings, owner: PartitionOwner) -> dict:
    """Stops the owner cleanly; the files (before and after the close), the completions and
    the published state, which the rounds compared must agree on."""
    state = rings.control.read_state()
    directory = owner.log.directory
    before = _files(directory)
    owner.shutdown()
    owner.close()
    rings.reap()
    return {"files": before, "files_closed": _files(directory),
            "completions": rings.completions,
            "state": (state.high_watermark, state.log_start_offset,
                      state.active_segment_base_offset, state.active_segment_end_position)}


def _check_kept_state(log_) -> None:
    """The state the C round appends with, as kept between rounds (PartitionLog._native_next)
    must be the one built afresh from the log's objects."""
    kept = log_._native_next
    state = log_.native_append_state()
    log_._native_next = None
    try:
        # (The clock is read afresh by each call: a wall clock may tick between the two.)
        assert state._replace(now_ms=0) == log_.native_append_state()._replace(now_ms=0)
    finally:
        log_._native_next = kept


def _files(directory: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith((files.LOG_SUFFIX, files.INDEX_SUFFIX, files.TIMEINDEX_SUFFIX)):
            with open(os.path.join(directory, name), "rb") as f:
                out[name] = f.read()
    return out


def both(tmp_path, config: LogConfig, capacities: list[int], steps: int, script: Script
         ) -> tuple[dict, dict]:
    python = play(tmp_path / "python", False, config, capacities, steps, script)
    native = play(tmp_path / "native", True, config, capacities, steps, script)
    assert python["native_rounds"] == 0
    for key in ("files", "files_closed", "completions", "state", "rejected"):
        assert native[key] == python[key], key
    assert python["files"] and any(c for c in python["completions"])
    return python, native


def mixed_frames(rings: Rings, owner: PartitionOwner, step: int) -> None:
    """Several rings, several frames each, some of several batches, timestamps that go back
    and forth (the time index keeps only new maxima)."""
    for k in range(len(rings.rings)):
        for j in range(1 + (step + k) % 3):
            ts = TIME0_MS + step * 100 + (7 * j + 3 * k) % 11 * 5
            if (j + k) % 2:
                rings.frame(k, [(3, 40, ts), (1, 120, ts - 50), (5, 10, ts + 20)])
            else:
                rings.frame(k, [(2 + j, 60 + 10 * k, ts)])


def test_c_round_and_python_round_write_identical_segments_indexes_and_completions(tmp_path):
    # Index entries every 300 bytes: most rounds cross one or more inside a ring's frames.
    config = LogConfig(index_interval_bytes=300)
    _, native = both(tmp_path, config, [1 << 16] * 4, 12, mixed_frames)
    assert native["native_rounds"] >= 10
    assert set(native["declined"]) <= {"NEW_RING"}  # each ring's first frame: Python


def test_c_round_handles_a_ring_that_wraps_with_padding_like_the_python_round(tmp_path):
    def script(rings, owner, step):
        for j in range(3):
            rings.frame(0, [(2, 150 + 37 * ((step + j) % 5), TIME0_MS + step)])
        rings.frame(1, [(1, 20, TIME0_MS + step)])

    _, native = both(tmp_path, LogConfig(index_interval_bytes=500), [1 << 12, 1 << 12], 30,
                     script)
    assert native["native_rounds"] >= 25


def interleaved_frames(rings: Rings, owner: PartitionOwner, step: int) -> None:
    """Producers whose commits alternate: each ring's frames hold every other run of offsets,
    so a round takes several runs from each ring (one completion per run)."""
    for j in range(3 + step % 3):
        for k in range(len(rings.rings)):
            ts = TIME0_MS + step * 100 + j
            rings.frame(k, [(1 + (j + k) % 3, 30 + 10 * k, ts)])


def test_interleaved_producers_give_several_runs_a_round_in_both_rounds(tmp_path):
    config = LogConfig(index_interval_bytes=250)
    python, native = both(tmp_path, config, [1 << 16] * 3, 10, interleaved_frames)
    assert native["native_rounds"] >= 9
    assert set(native["declined"]) <= {"NEW_RING"}
    # Each ring's frames came in runs of one: one completion per frame, offsets in the order
    # the frames were committed.
    for k, completions in enumerate(python["completions"]):
        assert all(c[0] == c[1] for c in completions)
        assert [c[0] for c in completions] == list(range(len(completions)))
    bases = sorted(c[2] for completions in python["completions"] for c in completions)
    assert bases[0] == 0 and len(set(bases)) == len(bases)


def test_a_producer_that_reads_no_completions_does_not_hold_the_log_back(tmp_path):
    """Ring 0's producer reads no completions. Its frames hold offsets the log needs (taken at
    its commits: decision 0005), so after COMPLETIONS_MAX of them both rounds still append
    them, in offset order with ring 1's, and owe it the completions, which it gets, in order,
    once it reads; the C round leaves a ring that is owed completions to the Python round."""
    def script(rings, owner, step):
        rings.hold = {0}
        rings.frame(0, [(1, 30, TIME0_MS + step)])
        rings.frame(1, [(2, 30, TIME0_MS + step)])
        # Ring 1's frame of this step is in the log: nothing waits for ring 0's completions.
        assert owner.log.log_end_offset >= 3 * step

    steps = L.COMPLETIONS_MAX + 6
    python, native = both(tmp_path, LogConfig(index_interval_bytes=400), [1 << 16] * 2,
                          steps, script)
    assert native["state"][0] == 3 * steps
    firsts = [c[0] for c in python["completions"][0]]
    assert firsts == list(range(steps)) and all(c[3] == 0 for c in python["completions"][0])
    assert native["native_rounds"] >= L.COMPLETIONS_MAX // 2
    assert set(native["declined"]) <= {"NEW_RING", "HOLE"}


def test_a_bad_frame_makes_the_c_round_decline_and_the_python_round_rejects_it_alone(tmp_path):
    def script(rings, owner, step):
        mixed_frames(rings, owner, step)
        if step in (3, 7):
            rings.send(1, b"\0" * 70)  # not a RecordBatch
        if step == 5:  # a valid batch followed by a cut one, in one frame
            good = rings.batch(2, rings.rings[2].next_sequence, 2, 30, TIME0_MS)
            rings.send(2, good + good[:40])

    python, native = both(tmp_path, LogConfig(index_interval_bytes=300), [1 << 16] * 3, 10,
                          script)
    assert python["rejected"] == 3
    assert native["declined"]["BAD_FRAME"] >= 3
    assert native["native_rounds"] >= 5


def test_a_roll_due_by_size_is_left_to_the_python_round(tmp_path):
    # (The frames go in offset order, ring 0's first each step: 3000 bytes make some rounds
    # fit in the segment and others roll.)
    config = LogConfig(segment_bytes=3000, index_interval_bytes=200)
    python, native = both(tmp_path, config, [1 << 16] * 2, 12, mixed_frames)
    assert sum(n.endswith(files.LOG_SUFFIX) for n in python["files"]) >= 3
    assert native["declined"]["ROLL_DUE"] >= 2
    assert native["native_rounds"] >= 2


def test_a_roll_due_by_time_is_left_to_the_python_round(tmp_path):
    def script(rings, owner, step):
        # segment.ms counts record time: 1 s per step, segments of 3 s.
        rings.frame(step % 2, [(2, 50, TIME0_MS + 1000 * step)])
        rings.frame(1 - step % 2, [(1, 80, TIME0_MS + 1000 * step + 1)])

    config = LogConfig(segment_ms=3000, index_interval_bytes=200)
    python, native = both(tmp_path, config, [1 << 16] * 2, 12, script)
    assert sum(n.endswith(files.LOG_SUFFIX) for n in python["files"]) >= 3
    assert native["declined"]["ROLL_DUE"] >= 2
    assert native["native_rounds"] >= 4


def test_acks_all_is_left_to_the_python_round_which_fsyncs(tmp_path):
    def script(rings, owner, step):
        rings.rings[1].set_fsync_required(step in (4, 5, 8))
        mixed_frames(rings, owner, step)

    _, native = both(tmp_path, LogConfig(), [1 << 16] * 3, 10, script)
    assert native["declined"]["FSYNC_REQUIRED"] >= 3
    assert native["native_rounds"] >= 4


def test_a_flush_due_by_flush_messages_is_left_to_the_python_round(tmp_path):
    _, native = both(tmp_path, LogConfig(flush_messages=40), [1 << 16] * 2, 10, mixed_frames)
    assert native["declined"]["FLUSH_DUE"] >= 1
    assert native["native_rounds"] >= 1


def test_index_entries_at_exact_interval_boundaries_match(tmp_path):
    """Batches of one size and an interval of exactly three of them: IndexRule's strict '>'
    (an entry after more than interval bytes) is where an off-by-one would show."""
    size = len(records.encode_batch([b"v" * 50], timestamp=TIME0_MS))

    def script(rings, owner, step):
        for k in range(2):
            for _ in range(step % 4 + 1):
                seq = rings.rings[k].next_sequence
                rings.send(k, records.encode_batch(
                    [b"v" * 50], timestamp=TIME0_MS + step, producer_id=rings.ids[k],
                    producer_epoch=0, base_sequence=seq & 0x7FFFFFFF))

    python, native = both(tmp_path, LogConfig(index_interval_bytes=3 * size), [1 << 16] * 2,
                          10, script)
    index = [v for n, v in python["files"].items() if n.endswith(files.INDEX_SUFFIX)]
    assert index and len(index[0]) >= 8 * 5
    assert native["native_rounds"] >= 8


def test_small_rounds_that_cross_no_index_entry_match_across_rolls(tmp_path):
    """The latency case: one small record per round, so most rounds cross no index entry and
    the C round appends with the state kept from the previous round; rolls by size (the
    Python round) in between replace the segment that state was kept for."""
    def script(rings, owner, step):
        rings.frame(step % 2, [(1, 90, TIME0_MS + step)])

    python, native = both(tmp_path, LogConfig(segment_bytes=3000), [1 << 16] * 2, 80, script)
    assert sum(n.endswith(files.LOG_SUFFIX) for n in python["files"]) >= 3
    assert native["declined"]["ROLL_DUE"] >= 2
    assert native["native_rounds"] >= 60


def _look(owner: PartitionOwner) -> int:
    """drain_sleep_prepare as wait_for_work calls it; the sleeping flag is lowered again."""
    from shmbroker.native import _native
    registry_seen = owner.ingress.registry_seen
    try:
        return _native.drain_sleep_prepare(owner.control.buf,
                                           -1 if registry_seen is None else registry_seen,
                                           owner.ingress.live_consumers())
    finally:
        owner.control.sleep_cancel()


def _python_look(owner: PartitionOwner) -> bool:
    """The reference: work if the registry moved or a ring that is read is readable."""
    return owner.control.registry_changes != owner.ingress.registry_seen or \
        any(ring.readable() for ring in owner.ingress)


def test_the_c_look_before_sleeping_finds_work_exactly_when_the_python_look_does(tmp_path):
    """wait_for_work's last look (one C call) against IngressRing.readable and the registry
    check: nothing written, a frame in one ring, a held-back ring (its producer has
    COMPLETIONS_MAX completions unread), a registry change, a broken ring."""
    rings = Rings(str(tmp_path), 3, [1 << 16] * 3)
    owner = PartitionOwner(str(tmp_path), TOPIC, 0, LogConfig(), clock_ms=lambda: CLOCK_MS,
                           control=ControlRegion.attach(rings.control.name))
    try:
        def agree(work: bool) -> None:
            seen = _look(owner)
            assert (seen < 0) == work == _python_look(owner), (seen, work)
            if not work:
                assert seen == rings.control.sleep_prepare()  # the doorbell's value
                rings.control.sleep_cancel()

        agree(False)
        rings.frame(1, [(1, 20, TIME0_MS)])
        agree(True)
        owner.step()
        rings.reap()
        agree(False)
        # Ring 0's producer stops reading completions: readable until it is held back.
        rings.hold = {0}
        for step in range(L.COMPLETIONS_MAX):
            rings.frame(0, [(1, 20, TIME0_MS + step)])
            agree(True)
            owner.step()
        rings.frame(0, [(1, 20, TIME0_MS)])
        agree(False)  # a frame waits, but the ring is held back: not work
        rings.hold.clear()
        rings.reap()
        agree(True)
        owner.step()
        agree(False)
        rings.control.announce_registry_change()
        agree(True)
        owner.step()  # rescans the registry
        agree(False)
        rings.frame(2, [(1, 20, TIME0_MS)])
        agree(True)
        ring2 = next(r for r in owner.ingress if r.name == rings.rings[2].name)
        owner.drainer._mark_broken(ring2, RuntimeError("test: broken"))
        agree(False)  # a broken ring is no longer read, so not work
    finally:
        owner.shutdown()
        owner.close()
        rings.close()


def test_wait_for_work_sleeps_until_a_frame_is_committed_and_lowers_the_sleeping_flag(tmp_path):
    """The doorbell sleep (drain_sleep_prepare, then drain_sleep): it ends when a producer
    commits a frame (not at its timeout), returns at once when a ring is already readable or
    a stop is requested, times out when nothing comes; partition_sleeping is down after each."""
    import threading
    import time

    rings = Rings(str(tmp_path), 1, [1 << 16])
    owner = PartitionOwner(str(tmp_path), TOPIC, 0, LogConfig(), clock_ms=lambda: CLOCK_MS,
                           control=ControlRegion.attach(rings.control.name))
    sleeping = L.CONTROL["partition_sleeping"]
    try:
        owner.step()

        def timed(timeout_ms: int, stop=lambda: False) -> float:
            t0 = time.monotonic()
            owner.wait_for_work(timeout_ms, stop)
            assert owner.control.registry_changes == owner.ingress.registry_seen
            from shmbroker.native import _native
            assert _native.atomic_load_u32(owner.control.buf, sleeping) == 0
            return time.monotonic() - t0

        assert 0.015 <= timed(20) < 2.0  # nothing comes: the timeout
        timer = threading.Timer(0.05, rings.frame, (0, [(1, 20, TIME0_MS)]))
        timer.start()
        try:
            assert 0.03 <= timed(10_000) < 5.0  # woken by the producer's doorbell
        finally:
            timer.join()
        assert timed(10_000) < 1.0  # the frame is still there: at once
        assert owner.step() == 1
        assert timed(10_000, stop=lambda: True) < 1.0  # a stop requested: at once
    finally:
        owner.shutdown()
        owner.close()
        rings.close()


def test_more_rings_than_the_glue_keeps_on_its_stack_match_and_are_looked_at(tmp_path):
    """drain_round keeps 4 rings and drain_sleep_prepare 8 on the C stack; more go to the
    heap. Ten rings: the two rounds agree, and a frame in the last ring is seen as work."""
    _, native = both(tmp_path / "rounds", LogConfig(index_interval_bytes=300),
                     [1 << 16] * 10, 4, mixed_frames)
    assert native["native_rounds"] >= 3
    rings = Rings(str(tmp_path / "look"), 10, [1 << 16] * 10)
    owner = PartitionOwner(str(tmp_path / "look"), TOPIC, 0, LogConfig(),
                           clock_ms=lambda: CLOCK_MS,
                           control=ControlRegion.attach(rings.control.name))
    try:
        owner.step()
        assert _look(owner) >= 0 and not _python_look(owner)
        rings.frame(9, [(1, 20, TIME0_MS)])
        assert _look(owner) == -1 and _python_look(owner)
        owner.step()
        assert _look(owner) >= 0 and not _python_look(owner)
    finally:
        owner.shutdown()
        owner.close()
        rings.close()


def _play_woken(data_dir, sleep_round: bool, config: LogConfig, monkeypatch) -> dict:
    """Frames committed by another thread while the partition sleeps on its doorbell (the
    log on the wall clock: the sleep round's condition), then a step(), as run_loop does."""
    import threading

    import shmbroker.partition.owner as owner_module

    monkeypatch.setattr(owner_module, "SLEEP_ROUND", sleep_round)
    # Each frame comes 20 ms into a sleep: a 1 ms doze would end before it (the doze has its
    # own test, test_a_dozing_partition_takes_the_commits_of_its_doze_in_one_round).
    monkeypatch.setattr(owner_module, "PARTITION_DOZE_MS", 0)
    os.makedirs(data_dir, exist_ok=True)
    rings = Rings(str(data_dir), 2, [1 << 16, 1 << 16])
    owner = PartitionOwner(str(data_dir), TOPIC, 0, config,
                           control=ControlRegion.attach(rings.control.name))
    published_at_wake = []
    try:
        mixed_frames(rings, owner, 0)
        while owner.step():  # bounded: the first (Python) rounds learn each ring's sequence
            rings.reap()
        def one_frame(step: int) -> None:
            # One frame a wake-up: which round takes it is then the only difference (several
            # commits would be split between rounds by timing, and index entries and the
            # order across rings follow the rounds).
            ts = TIME0_MS + step * 100
            if step % 3:
                rings.frame(step % 2, [(3, 40, ts), (1, 120, ts - 50), (5, 10, ts + 20)])
            else:
                rings.frame(step % 2, [(2, 70, ts)])

        for step in range(1, 12):  # bounded
            timer = threading.Timer(0.02, one_frame, (step,))
            timer.start()
            try:
                owner.wait_for_work(10_000)
            finally:
                timer.join()
            published_at_wake.append(rings.control.read_state().high_watermark)
            while owner.step():  # bounded: what the sleep round left, if anything
                rings.reap()
            _check_kept_state(owner.log)
            rings.reap()
        return {**_stop(rings, owner), "sleep_rounds": owner.drainer.sleep_rounds,
                "published_at_wake": published_at_wake}
    finally:
        rings.close()


def test_the_round_run_by_the_wake_up_itself_writes_what_the_step_after_it_would(
        tmp_path, monkeypatch):
    """drain_sleep_round: the doorbell sleep runs the C round as soon as a commit wakes it
    (no Python before the publish). Every file byte, completion and published field must be
    what the round run from step() after the wake-up leaves; and the records must be
    published when wait_for_work returns, before any step()."""
    config = LogConfig(index_interval_bytes=300)
    woken = _play_woken(tmp_path / "woken", True, config, monkeypatch)
    stepped = _play_woken(tmp_path / "stepped", False, config, monkeypatch)
    for key in ("files", "files_closed", "completions", "state"):
        assert woken[key] == stepped[key], key
    assert stepped["sleep_rounds"] == 0
    assert woken["sleep_rounds"] >= 8  # the timer's frames may land before a sleep starts
    hw = woken["published_at_wake"]
    assert sum(1 for a, b in zip([0] + hw, hw) if b > a) >= 8


def test_the_wake_up_round_reads_the_clock_after_the_sleep(tmp_path, monkeypatch):
    """The state made before the sleep has a stale clock; the C round must take the time
    afresh, or a segment.ms roll due by the time of the wake-up would be missed (the frame
    appended to the old segment). Records without timestamps (-1), so the time waited for
    the roll is the clock's (now - the segment's creation), as in Kafka."""
    import threading

    import shmbroker.partition.owner as owner_module

    monkeypatch.setattr(owner_module, "SLEEP_ROUND", True)
    rings = Rings(str(tmp_path), 1, [1 << 16])
    owner = PartitionOwner(str(tmp_path), TOPIC, 0, LogConfig(segment_ms=400),
                           control=ControlRegion.attach(rings.control.name))
    try:
        rings.frame(0, [(1, 20, -1)])
        while owner.step():  # bounded
            rings.reap()
        rings.frame(0, [(1, 20, -1)])
        while owner.step():  # bounded: a C round now (the ring's sequence is known)
            rings.reap()
        assert owner.drainer.native_rounds >= 1
        assert len(owner.log.segments) == 1
        timer = threading.Timer(0.6, rings.frame, (0, [(1, 20, -1)]))
        timer.start()
        try:
            owner.wait_for_work(10_000)
        finally:
            timer.join()
        while owner.step():  # bounded
            rings.reap()
        # The roll was due at the wake-up (600 ms > segment.ms since the segment was
        # made): the third record opened a new segment, whichever round appended it.
        assert len(owner.log.segments) == 2
        assert owner.log.segments[-1].base_offset == 2
    finally:
        owner.shutdown()
        owner.close()
        rings.close()


def _timed_wait(owner: PartitionOwner, timer) -> float:
    """Seconds one wait_for_work takes while ``timer`` (a threading.Timer) runs."""
    import time

    t0 = time.monotonic()
    timer.start()
    try:
        owner.wait_for_work(10_000)
    finally:
        timer.join()
    return time.monotonic() - t0


@pytest.mark.parametrize("sleep_round", [True, False])
def test_a_dozing_partition_takes_the_commits_of_its_doze_in_one_round(tmp_path, monkeypatch,
                                                                        sleep_round):
    """After a wake-up with work the partition dozes (PARTITION_DOZE_MS) instead of sleeping
    until woken: commits meanwhile do not wake it, and when the doze ends it takes them all
    at once (one round for three frames, published before wait_for_work returns when the
    wake-up runs the round). A doze that finds nothing is followed by a plain sleep, which a
    commit ends at once."""
    import threading

    import shmbroker.partition.owner as owner_module

    monkeypatch.setattr(owner_module, "SLEEP_ROUND", sleep_round)
    monkeypatch.setattr(owner_module, "PARTITION_DOZE_MS", 300)
    rings = Rings(str(tmp_path), 1, [1 << 16])
    owner = PartitionOwner(str(tmp_path), TOPIC, 0, LogConfig(),
                           control=ControlRegion.attach(rings.control.name))

    def commits(n: int) -> None:
        for i in range(n):
            rings.frame(0, [(1, 20, TIME0_MS + i)])

    def wait(timer: threading.Timer) -> float:
        return _timed_wait(owner, timer)

    try:
        commits(2)
        while owner.step():  # bounded: the first (Python) rounds learn the ring's sequence
            rings.reap()
        assert wait(threading.Timer(0.02, commits, (1,))) < 0.29  # a sleep: woken at once
        while owner.step():  # bounded
            rings.reap()
        rounds = owner.drainer.sleep_rounds
        # That wake-up had work: this is a doze. Three commits land in it, none wakes it.
        assert wait(threading.Timer(0.02, commits, (3,))) >= 0.29
        if sleep_round:  # the round ran at the doze's end, before any step()
            assert rings.control.read_state().high_watermark == 6
            assert owner.drainer.sleep_rounds == rounds + 1
        while owner.step():  # bounded
            rings.reap()
        assert rings.control.read_state().high_watermark == 6
        assert wait(threading.Timer(0.0, lambda: None)) >= 0.29  # a doze with nothing
        # ... so the next is a sleep again: a commit ends it at once.
        assert wait(threading.Timer(0.02, commits, (1,))) < 0.29
        while owner.step():  # bounded
            rings.reap()
        assert rings.control.read_state().high_watermark == 7
    finally:
        owner.shutdown()
        owner.close()
        rings.close()


def _play_looping(data_dir, rounds_max: int, config: LogConfig, monkeypatch) -> dict:
    """A producer thread commits one frame every ~2 ms while the partition dozes 5 ms at a
    time, as run_loop drives it (wait_for_work, then step() when it did not run a round);
    with rounds_max > 1 one wait_for_work call runs several rounds (drain_loop), dozing
    between them (a doze that ends idle ends the call: the frames must come faster than the
    doze is long)."""
    import threading
    import time

    import shmbroker.partition.drain as drain_module
    import shmbroker.partition.owner as owner_module

    monkeypatch.setattr(owner_module, "SLEEP_ROUND", True)
    monkeypatch.setattr(owner_module, "PARTITION_DOZE_MS", 5)
    monkeypatch.setattr(drain_module, "PARTITION_LOOP_ROUNDS_MAX", rounds_max)
    os.makedirs(data_dir, exist_ok=True)
    rings = Rings(str(data_dir), 1, [1 << 16])
    owner = PartitionOwner(str(data_dir), TOPIC, 0, config,
                           control=ControlRegion.attach(rings.control.name))
    frames = 120
    try:
        rings.frame(0, [(1, 30, TIME0_MS)])
        while owner.step():  # bounded: the first (Python) round learns the ring's sequence
            rings.reap()

        def produce() -> None:
            for i in range(1, frames):  # bounded
                rings.frame(0, [(1 + i % 3, 30 + i % 50, TIME0_MS + i)])
                time.sleep(0.002)

        producer = threading.Thread(target=produce)
        producer.start()
        calls = 0
        deadline = time.monotonic() + 30
        while (producer.is_alive() or rings.control.read_state().high_watermark <
               sum(1 + i % 3 for i in range(1, frames)) + 1) and time.monotonic() < deadline:
            calls += 1  # bounded by the deadline
            if not owner.wait_for_work(50):
                owner.step()
            _check_kept_state(owner.log)
        producer.join()
        rings.reap()
        return {**_stop(rings, owner), "sleep_rounds": owner.drainer.sleep_rounds,
                "rounds": owner.drainer.rounds, "calls": calls}
    finally:
        rings.close()


def _frames_completed(completions: list) -> list:
    """Every frame sequence the completions of one ring acknowledge, in order (all without
    error, base offsets growing)."""
    out, last_base = [], -1
    for first, last, base, error in completions:
        assert error == 0 and base > last_base
        out += list(range(first, last + 1))
        last_base = base
    return out


@pytest.mark.parametrize("interval,segment_bytes", [(4096, 1 << 30), (300, 1 << 30),
                                                    (4096, 3000)])
def test_rounds_that_stay_in_c_write_what_one_round_a_call_writes(tmp_path, monkeypatch,
                                                                  interval, segment_bytes):
    """drain_loop: after a woken round the C call dozes and runs the next round itself while
    each round appended, so Python settles several rounds at once. The segment, .index and
    .timeindex files and the published state must be what one round per call leaves (index
    entries every 300 bytes: gathered over the rounds of a call; 3,000-byte segments: a round
    in the loop declines for the roll, and its frames must be left to the Python round, not
    skipped), every frame completed once in order; and the loop must have run more rounds
    than calls did."""
    config = LogConfig(index_interval_bytes=interval, segment_bytes=segment_bytes)
    looping = _play_looping(tmp_path / "loop", 32, config, monkeypatch)
    single = _play_looping(tmp_path / "single", 1, config, monkeypatch)
    for key in ("files", "files_closed", "state"):
        assert looping[key] == single[key], key
    completed = _frames_completed(looping["completions"][0])
    assert completed == _frames_completed(single["completions"][0])
    assert completed == list(range(completed[0], completed[0] + 120))
    assert looping["sleep_rounds"] > 20
    if segment_bytes > 3000:  # no rolls: most calls run several rounds
        assert looping["calls"] < looping["sleep_rounds"] / 2, looping
    assert single["sleep_rounds"] <= single["calls"]


def test_a_loop_that_began_with_a_plain_sleep_dozes_between_its_rounds(tmp_path, monkeypatch):
    """A drain_loop call that began with a plain sleep (after an idle spell) was woken with
    work, so it dozes before its next rounds (never a plain sleep inside the loop, which every
    commit would end with a wake-up): commits during a doze are taken together at its end,
    and the call ends when a doze finds nothing."""
    import threading
    import time

    import shmbroker.partition.drain as drain_module
    import shmbroker.partition.owner as owner_module

    monkeypatch.setattr(owner_module, "SLEEP_ROUND", True)
    monkeypatch.setattr(owner_module, "PARTITION_DOZE_MS", 100)
    monkeypatch.setattr(drain_module, "PARTITION_LOOP_ROUNDS_MAX", 64)
    monkeypatch.setattr(drain_module, "PARTITION_LOOP_BUDGET_MS", 5_000)
    rings = Rings(str(tmp_path), 1, [1 << 16])
    owner = PartitionOwner(str(tmp_path), TOPIC, 0, LogConfig(),
                           control=ControlRegion.attach(rings.control.name))
    try:
        rings.frame(0, [(1, 20, TIME0_MS)])
        while owner.step():  # bounded: the first (Python) round learns the ring's sequence
            rings.reap()
        owner.wait_for_work(20)  # nothing: the next sleep is a plain one
        rounds, calls = owner.drainer.sleep_rounds, owner.drainer.sleep_calls

        def commits() -> None:
            rings.frame(0, [(1, 20, TIME0_MS + 1)])  # wakes the plain sleep at once
            time.sleep(0.02)
            for i in range(3):  # within the doze that follows: taken in one round
                rings.frame(0, [(1, 20, TIME0_MS + 2 + i)])

        took = _timed_wait(owner, threading.Timer(0.02, commits))
        # The woken round, a doze that took the three, a doze that found nothing.
        assert owner.drainer.sleep_calls == calls + 1
        assert owner.drainer.sleep_rounds == rounds + 2
        assert owner.drainer.ended_idle
        assert rings.control.read_state().high_watermark == 5
        # Two dozes of 100 ms after the wake-up at 20 ms; a plain sleep instead would have
        # waited out the 5 s budget.
        assert 0.2 <= took < 2.0, took
    finally:
        owner.shutdown()
        owner.close()
        rings.close()
