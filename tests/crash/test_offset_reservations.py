"""Offsets are taken at the producer's commit (docs/decisions/0005): kill -9 of a producer
between its reservation and its commit leaves offsets that nobody will commit. The partition
fills them with an empty batch once it knows the producer is dead, the producers after it
carry on, and every reader skips the gap: Consumer.poll (the C tail read and the Python read),
poll_columnar, memoryview records. In-process cases pin the partition's rule: a live producer
in its window is waited for (the log does not move past its offsets), one that gave its
reservation up or died is filled for."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from broker_harness import wait_for
from produce_helpers import RAW_PRODUCER, read_partition

from shmbroker import Admin, Consumer, Producer, records
from shmbroker.config import LogConfig
from shmbroker.layout import counters as CL
from shmbroker.layout import shm as L
from shmbroker.native import _native
from shmbroker.partition.owner import PartitionOwner
from shmbroker.shm import names
from shmbroker.shm.control import ControlRegion
from shmbroker.shm.ring import RingProducer

pytestmark = pytest.mark.timeout(120)

#: It commits one frame, then dies (SIGKILL from inside ring_write) after taking the offsets
#: of its next frame (5 records) and before committing it.
DIES_IN_ITS_RESERVATION = RAW_PRODUCER + r"""
ring.send(records.encode_batch([b"dead-committed"]))
_native.ring_write(ring.buf, [records.encode_batch([b"never-%d" % i for i in range(5)])],
                   ctl.buf, die_before_commit=True)
print("still alive", flush=True)
"""


def test_kill_9_between_reservation_and_commit_is_filled_and_every_reader_skips_it(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("h", 1)
    pids = broker.partition_pids(broker.wait_running())
    with Producer(broker=broker.data_dir) as producer:
        first = [producer.send("h", b"before-%d" % i) for i in range(10)]
        producer.flush()
        assert [f.result(timeout=10).offset for f in first] == list(range(10))
        # A consumer caught up at the log end before the gap: its next reads (the C tail
        # read) start at the empty batch.
        tail = Consumer("h", broker=broker.data_dir, auto_offset_reset="earliest")
        seen = []
        for _ in range(50):  # bounded
            seen += [(r.offset, r.value) for r in tail.poll(200)]
            if len(seen) >= 10:
                break
        child = subprocess.run([sys.executable, "-c", DIES_IN_ITS_RESERVATION, broker.data_dir,
                                "h"], capture_output=True, timeout=60,
                               env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()
        assert b"still alive" not in child.stdout
        ctl = ControlRegion.attach(names.control_name(names.broker_prefix(broker.data_dir),
                                                      "h", 0), readonly=True)
        try:
            assert ctl.next_offset == 16  # 10, the dead one's committed frame, its 5
        finally:
            ctl.close()
        after = [producer.send("h", b"after-%d" % i) for i in range(10)]
        producer.flush()  # acked once the partition filled 11..15 (its reap finds the dead)
        assert [f.result(timeout=10).offset for f in after] == list(range(16, 26))
        for _ in range(50):  # bounded
            seen += [(r.offset, r.value) for r in tail.poll(200)]
            if len(seen) >= 21:
                break
        tail.close()

    want = [(i, b"before-%d" % i) for i in range(10)] + [(10, b"dead-committed")] + \
        [(16 + i, b"after-%d" % i) for i in range(10)]
    assert seen == want
    for options in ({}, {"value_memoryview": True}):
        with Consumer("h", broker=broker.data_dir, auto_offset_reset="earliest",
                      **options) as consumer:
            got = []
            for _ in range(50):  # bounded
                got += [(r.offset, bytes(r.value)) for r in consumer.poll(200)]
                if len(got) >= len(want):
                    break
            assert got == want, options
    with Consumer("h", broker=broker.data_dir, auto_offset_reset="earliest") as consumer:
        rows = []
        for _ in range(50):  # bounded
            for batch in consumer.poll_columnar(200).values():
                rows += batch.offsets.tolist()
            if len(rows) >= len(want):
                break
        assert rows == [o for o, _ in want]
    assert broker.partition_pids(broker.wait_running()) == pids  # nothing crashed
    assert broker.stop() == 0
    assert [(r.offset, r.value) for r in read_partition(broker.data_dir, "h", 0)] == want
    with open(os.path.join(broker.data_dir, "h-0", "00000000000000000000.log"), "rb") as f:
        scan = records.scan_batches(f.read(), verify_crc=True, verify_records=True)
    gaps = [(b.base_offset, b.last_offset) for b in scan.batches if b.records_count == 0]
    assert gaps == [(11, 15)]


# -- in process: the partition's rule ---------------------------------------------------------

TOPIC = "t"


@pytest.fixture
def two_rings(data_dir):
    prefix = names.broker_prefix(str(data_dir))
    control = ControlRegion.create(names.control_name(prefix, TOPIC, 0), 0)
    rings = []
    for _ in range(2):
        slot, generation = control.claim_slot(1 << 16)
        rings.append(RingProducer.create(names.ring_name(prefix, TOPIC, 0, slot, generation),
                                         1 << 16, partition=0, slot=slot, generation=generation,
                                         control=control))
        control.set_slot_state(slot, L.SLOT_READY)
    control.announce_registry_change()
    owner = PartitionOwner(str(data_dir), TOPIC, 0, LogConfig(),
                           control=ControlRegion.attach(control.name))
    yield control, rings, owner
    owner.shutdown()
    owner.close()
    for ring in rings:
        ring.close()
    control.unlink()
    control.close()


def reserve_by_hand(control, ring, count: int) -> int:
    """What ring_write does up to its commit: the state of a producer in its window."""
    ring_buf = ring.buf
    _native.atomic_store_u64(ring_buf, L.RING["reserved_base"], L.RESERVED_PENDING)
    base = _native.atomic_add_u64(control.buf, L.CONTROL["next_offset"], count)
    _native.atomic_store_u64(ring_buf, L.RING["reserved_end"], base + count)
    _native.atomic_store_u64(ring_buf, L.RING["reserved_base"], base)
    return base


def test_a_live_producer_in_its_reservation_is_waited_for_and_the_log_never_skips_it(two_rings):
    control, (a, b), owner = two_rings
    a.send(records.encode_batch([b"a0"]))
    assert owner.step() and owner.log.log_end_offset == 1
    base = reserve_by_hand(control, a, 3)  # a is alive (this process) and in its window
    assert base == 1
    b.send(records.encode_batch([b"b0", b"b1"]))  # offsets 4..5: after a's
    for _ in range(3):
        owner.step()
    assert owner.log.log_end_offset == 1  # b's frame waits: offsets 1..3 are a's
    assert owner.drainer.blocked_by is not None and owner.drainer.blocked_by[0].consumer.name \
        == a.name
    assert not owner.drainer.reserver_moved()
    # a gives its reservation up without a commit (as if its write failed): now nobody
    # alive holds 1..3, which the partition fills; b's frame follows.
    _native.atomic_store_u64(a.buf, L.RING["reserved_base"], L.RESERVED_NONE)
    assert owner.drainer.reserver_moved()
    for _ in range(3):
        owner.step()
    assert owner.log.log_end_offset == 6
    piece = owner.log.read(0, 1 << 20)
    assert [(r.offset, r.value) for r in records.decode_records(piece.data)] == \
        [(0, b"a0"), (4, b"b0"), (5, b"b1")]


def test_a_dead_producers_reservation_is_filled_when_the_reap_marks_it(two_rings):
    control, (a, b), owner = two_rings
    reserve_by_hand(control, a, 2)
    b.send(records.encode_batch([b"b0"]))
    owner.step()
    assert owner.log.log_end_offset == 0
    (ring_a,) = [r for r in owner.ingress if r.consumer.name == a.name]
    ring_a.dead = True  # what Ingress.reap concludes once a's pid is gone
    owner.step()  # fills 0..1
    owner.step()  # then b's frame continues the log
    assert owner.log.log_end_offset == 3
    assert owner.counters.values[CL.PARTITION["offsets_filled"]] == 2
    piece = owner.log.read(0, 1 << 20)
    assert [(r.offset, r.value) for r in records.decode_records(piece.data)] == [(2, b"b0")]


def test_a_new_control_region_starts_offsets_past_what_the_old_rings_hold(data_dir):
    """A broker killed with -9 whose control region is gone (not adopted): the rings it left
    hold frames with offsets from the old region's counter. The new region's next_offset starts
    past them, so new producers never take offsets those frames hold."""
    prefix = names.broker_prefix(str(data_dir))
    old = ControlRegion.create(names.control_name(prefix, TOPIC, 0), 0)
    old.start_offsets(40)  # the old run's log had 40 records... that this log does not have
    slot, generation = old.claim_slot(1 << 16)
    ring = RingProducer.create(names.ring_name(prefix, TOPIC, 0, slot, generation), 1 << 16,
                               partition=0, slot=slot, generation=generation, control=old)
    old.set_slot_state(slot, L.SLOT_READY)
    ring.send(records.encode_batch([b"x", b"y"]))  # offsets 40..41
    raw = bytes(old.buf)
    ring.control = None  # its producer died with the old broker
    old.unlink()
    old.close()
    new = ControlRegion.create(names.control_name(prefix, TOPIC, 0), 0)
    new.buf[L.CONTROL_REGISTRY_OFFSET:] = raw[L.CONTROL_REGISTRY_OFFSET:]  # the registry
    new.announce_registry_change()
    owner = PartitionOwner(str(data_dir), TOPIC, 0, LogConfig(),
                           control=ControlRegion.attach(new.name))
    try:
        assert new.next_offset == 42
    finally:
        owner.shutdown()
        owner.close()
        ring.close()
        new.unlink()
        new.close()


def test_a_frame_whose_offsets_nobody_reserved_is_refused_and_blocks_nothing(two_rings):
    """A frame written without a reservation (not by a commit of ours: its base offset lies
    beyond next_offset) is completed with CORRUPT_MESSAGE and skipped; the ring goes on."""
    from shmbroker import errors

    control, (a, _), owner = two_rings
    rogue = bytearray(records.encode_batch([b"rogue"]))
    rogue[0:8] = (1000).to_bytes(8, "big")
    _native.ring_write(a.buf, [bytes(rogue)])  # no control region: no offsets taken
    a.send(records.encode_batch([b"good"]))  # offset 0, in the frame after the rogue one
    for _ in range(4):
        owner.step()
    completions = a.poll_completions()
    assert [(c.first_sequence, c.error_code) for c in completions] == \
        [(0, errors.CorruptRecordError.code), (1, 0)]
    piece = owner.log.read(0, 1 << 20)
    assert [(r.offset, r.value) for r in records.decode_records(piece.data)] == [(0, b"good")]


#: It commits three frames of ten records each, then dies (kill -9).
COMMITS_THEN_DIES = RAW_PRODUCER + r"""
for f in range(3):
    ring.send(records.encode_batch([b"b-%d" % (10 * f + i) for i in range(10)]))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_9_of_the_whole_broker_with_a_hole_and_frames_after_it_restarts_in_offset_order(
        make_broker):
    """The partition process is stopped (SIGSTOP) so that nothing is drained; producer A
    commits a frame and dies inside its next reservation (offsets 1..5), producer B commits
    30 records after it (6..35) and dies; then the whole broker is killed with -9. The next
    broker adopts the control region, appends A's frame, fills A's offsets, appends B's
    records at the offsets their commits took, and unlinks both rings."""
    broker = make_broker()
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("w", 1)
    (pid,) = broker.partition_pids(broker.wait_running({("w", 0)})).values()
    os.kill(pid, signal.SIGSTOP)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for script in (DIES_IN_ITS_RESERVATION, COMMITS_THEN_DIES):
        child = subprocess.run([sys.executable, "-c", script, broker.data_dir, "w"],
                               capture_output=True, timeout=60, env=env)
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    broker.kill9()
    restarted = make_broker()
    prefix = names.broker_prefix(broker.data_dir)
    wait_for(lambda: not [n for n in os.listdir("/dev/shm") if n.startswith(prefix) and
                          ".r." in n], 20, "both dead producers' rings to be drained")
    assert restarted.stop() == 0
    # One more start and stop: recovery keeps the empty batch and what follows it.
    assert make_broker().stop() == 0
    want = [(0, b"dead-committed")] + [(6 + i, b"b-%d" % i) for i in range(30)]
    assert [(r.offset, r.value) for r in read_partition(broker.data_dir, "w", 0)] == want
    with open(os.path.join(broker.data_dir, "w-0", "00000000000000000000.log"), "rb") as f:
        scan = records.scan_batches(f.read(), verify_crc=True, verify_records=True)
    assert [(b.base_offset, b.last_offset) for b in scan.batches if b.records_count == 0] == \
        [(1, 5)]
    assert "adopted 1 control region(s)" in restarted.log()


def test_kill_9_of_the_partition_process_with_a_hole_pending_loses_nothing(broker):
    """As above, but only the partition process dies, and the producer after the hole is a
    live Producer whose futures wait: the restarted partition fills the hole and appends
    its records at the offsets their commits took; its futures resolve with them."""
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("p", 1)
    (pid,) = broker.partition_pids(broker.wait_running({("p", 0)})).values()
    with Producer(broker=broker.data_dir) as producer:
        producer.send("p", b"first").result(timeout=10)  # ring made, offset 0
        os.kill(pid, signal.SIGSTOP)
        child = subprocess.run([sys.executable, "-c", DIES_IN_ITS_RESERVATION,
                                broker.data_dir, "p"], capture_output=True, timeout=60,
                               env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()
        futures = [producer.send("p", b"after-%d" % i) for i in range(20)]
        os.kill(pid, signal.SIGKILL)
        offsets = [f.result(timeout=20).offset for f in futures]
    assert offsets == list(range(7, 27))  # 0 first, 1 A's frame, 2..6 A's reservation
    assert broker.partition_pids(broker.wait_running())[("p", 0)] != pid
    assert broker.stop() == 0
    want = [(0, b"first"), (1, b"dead-committed")] + [(7 + i, b"after-%d" % i)
                                                     for i in range(20)]
    assert [(r.offset, r.value) for r in read_partition(broker.data_dir, "p", 0)] == want


def test_a_remote_consumer_reads_across_the_empty_batch(make_broker):
    """Through the router (fetch replies, and cold reads by sendfile), a consumer caught up
    at the offsets a producer killed in its reservation took: its next fetch starts with the
    empty batch over them, and it goes on with the records after it, each once, in order."""
    broker = make_broker(serve_args=("--listen", "tcp://127.0.0.1:*"))
    address = broker.wait_running()["router_endpoint"]
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("r", 1)
    broker.wait_running({("r", 0)})
    want = [(0, b"first"), (1, b"dead-committed"), (7, b"after-0"), (8, b"after-1"),
            (9, b"after-2")]
    with Producer(broker=broker.data_dir) as producer, \
            Consumer("r", broker=address, auto_offset_reset="earliest") as live, \
            Consumer("r", broker=address, auto_offset_reset="earliest",
                     cold_read_bytes_max=0) as no_cold:
        producer.send("r", b"first").result(timeout=10)
        child = subprocess.run([sys.executable, "-c", DIES_IN_ITS_RESERVATION,
                                broker.data_dir, "r"], capture_output=True, timeout=60,
                               env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()
        got = {id(live): [], id(no_cold): []}
        for consumer in (live, no_cold):
            for _ in range(50):  # bounded: both caught up at offset 2, the reserved ones
                got[id(consumer)] += [(r.offset, r.value) for r in consumer.poll(200)]
                if len(got[id(consumer)]) >= 2:
                    break
        after = [producer.send("r", b"after-%d" % i) for i in range(3)]
        assert [f.result(timeout=20).offset for f in after] == [7, 8, 9]
        for consumer in (live, no_cold):
            for _ in range(50):  # bounded
                got[id(consumer)] += [(r.offset, r.value) for r in consumer.poll(200)]
                if len(got[id(consumer)]) >= len(want):
                    break
            assert consumer.poll(200) == []
            assert got[id(consumer)] == want
