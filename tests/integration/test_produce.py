"""Producers in real processes writing through shared-memory rings into a real broker: every
record lands in the log exactly once, at the offset its future returned, in the order each
producer sent it; bad input gives typed errors and the broker keeps serving."""
from __future__ import annotations

import glob
import multiprocessing
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from broker_harness import WAIT_S_MAX, run_cli, wait_for
from produce_helpers import (check_exactly_once, make_value, read_partition, read_topic,
                             spawn_producer)

from shmbroker import Admin, Consumer, Producer, _native, errors
from shmbroker.layout import shm as L
from shmbroker.shm import names
from shmbroker.shm.control import ControlRegion

pytestmark = pytest.mark.usefixtures("stop_resource_tracker")



def create_topic(data_dir, name, partitions, config=None):
    with Admin(broker=data_dir) as admin:
        admin.create_topic(name, partitions, config)


def test_records_from_a_producer_process_are_in_the_log_once_at_their_future_offsets(
        broker, tmp_path):
    create_topic(broker.data_dir, "orders", 3)
    out = str(tmp_path / "p0.json")
    proc = spawn_producer(multiprocessing.get_context("spawn"), broker.data_dir, "orders", 0,
                          20_000, 3, out)
    proc.join(WAIT_S_MAX)
    assert proc.exitcode == 0
    check_exactly_once(broker.data_dir, "orders", 3, {0: out}, 20_000)


@pytest.mark.slow
def test_8_producer_processes_x_4_partitions_x_100k_every_record_once_in_order(broker,
                                                                                tmp_path):
    count = 100_000
    create_topic(broker.data_dir, "many", 4)
    ctx = multiprocessing.get_context("spawn")
    outs = {i: str(tmp_path / f"p{i}.json") for i in range(8)}
    procs = [spawn_producer(ctx, broker.data_dir, "many", i, count, 4, outs[i], chunk=count // 4)
             for i in range(8)]
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    check_exactly_once(broker.data_dir, "many", 4, outs, count)
    # Every producer closed: its rings are gone and its registry slots free.
    prefix = names.broker_prefix(broker.data_dir)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix + "r.")]


def test_keyed_keyless_and_explicit_partitions_and_batches(broker):
    create_topic(broker.data_dir, "mix", 4)
    with Producer(broker=broker.data_dir) as producer:
        keyed = [producer.send("mix", b"v%d" % i, key=b"user-%d" % (i % 7)) for i in range(200)]
        keyless = [producer.send("mix", b"free %d" % i) for i in range(200)]
        explicit = producer.send("mix", b"to-two", partition=2)
        rows = np.arange(3000 * 16, dtype=np.uint8).reshape(3000, 16)
        batch = producer.send_batch("mix", rows, partition=1)
        listed = producer.send_batch("mix", [b"a", b"bb", b"ccc"])
        by_key = producer.send_batch("mix", [b"k1", b"k2"], keys=[b"alpha", b"beta"])
        producer.flush()
        from shmbroker import records
        for i, f in enumerate(keyed):
            assert f.result().partition == records.partition_for_key(b"user-%d" % (i % 7), 4)
        assert explicit.result().partition == 2
        topic, partition, base = batch.result()
        assert (topic, partition) == ("mix", 1)
        assert list(batch.offsets()) == list(range(base, base + 3000))
        assert len(listed.offsets()) == 3
        results = by_key.result()
        assert [r.partition for r in results] == [records.partition_for_key(k, 4)
                                                 for k in (b"alpha", b"beta")]
        where = {(r.partition, r.offset) for r in (f.result() for f in keyed + keyless)}
        assert len(where) == 400  # distinct offsets
    logs = read_topic(broker.data_dir, "mix", 4)
    assert sum(len(v) for v in logs.values()) == 400 + 1 + 3000 + 3 + 2
    p1 = {r.offset: r.value for r in logs[1]}
    assert all(p1[base + i] == rows[i].tobytes() for i in range(3000))
    # Sticky partitioner: keyless records stick to one partition per batch and move to
    # another one when the batch is written.
    with Producer(broker=broker.data_dir) as producer:
        runs = []
        for _ in range(5):
            futures = [producer.send("mix", b"sticky") for _ in range(10)]
            producer.flush()
            runs.append({f.result().partition for f in futures})
    assert len(set().union(*runs)) > 1  # each written batch moves the sticky partition


def _sender_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "shmbroker-producer-sender"]


@pytest.mark.parametrize("acks", [1, 0])
def test_records_sent_without_flush_reach_the_log_through_the_background_sender(broker, acks):
    """send() alone delivers: records left in the accumulator while the ring was busy are
    written by the sender thread once the ring goes idle, with no further producer call."""
    create_topic(broker.data_dir, "bg", 1)
    producer = Producer(broker=broker.data_dir, acks=acks)
    try:
        futures = [producer.send("bg", make_value(0, i), partition=0) for i in range(3000)]
        # Nothing but waiting: no send, flush, result or close until the log has them all.
        wait_for(lambda: len(read_partition(broker.data_dir, "bg", 0)) == 3000,
                 what="3000 records in the log without a flush")
        got = read_partition(broker.data_dir, "bg", 0)
        assert [r.value for r in got] == [make_value(0, i) for i in range(3000)]
        if acks:
            assert [f.result(timeout=10).offset for f in futures] == list(range(3000))
    finally:
        producer.close()
    assert not _sender_threads()


def test_linger_ms_holds_a_record_back_then_the_sender_writes_it(broker):
    create_topic(broker.data_dir, "lingering", 1)
    with Producer(broker=broker.data_dir, linger_ms=300) as producer:
        producer.send("lingering", b"first", partition=0).result(timeout=10)
        start = time.monotonic()
        producer.send("lingering", b"late", partition=0)
        wait_for(lambda: len(read_partition(broker.data_dir, "lingering", 0)) == 2,
                 what="the lingering record in the log")
        assert time.monotonic() - start >= 0.29  # held for linger_ms, then written unprompted


def test_an_idle_producer_has_no_sender_thread(broker):
    create_topic(broker.data_dir, "quiet", 1)
    with Producer(broker=broker.data_dir) as producer:
        for i in range(2000):
            producer.send("quiet", b"x%d" % i, partition=0)
        wait_for(lambda: len(read_partition(broker.data_dir, "quiet", 0)) == 2000,
                 what="2000 records in the log")
        # PRODUCER_SENDER_IDLE_MS_MAX (1 s) with nothing pending: the thread ends.
        wait_for(lambda: not _sender_threads(), timeout_s=5, what="the sender thread to end")
        producer.send("quiet", b"again", partition=0).result(timeout=10)


def test_partitions_added_while_a_producer_runs_get_its_keyed_and_keyless_records(broker):
    from shmbroker import records

    create_topic(broker.data_dir, "growing", 1)
    with Producer(broker=broker.data_dir) as producer:
        assert producer.send("growing", b"k", key=b"user-1").result(10).partition == 0
        with Admin(broker=broker.data_dir) as admin:
            admin.alter_partitions("growing", 4)
        broker.wait_running({("growing", p) for p in range(4)})
        key = next(b"user-%d" % i for i in range(100)
                   if records.partition_for_key(b"user-%d" % i, 4) != 0)
        # The count is re-read within PRODUCER_METADATA_MAX_AGE_MS (1 s): keyed records
        # follow murmur2 over 4 partitions, keyless ones spread over them.
        wait_for(lambda: producer.send("growing", b"v", key=key).result(10).partition != 0,
                 interval_s=0.2, what="a keyed record on a new partition")
        seen = {producer.send("growing", b"free").result(10).partition for _ in range(200)}
        assert len(seen) > 1, seen


def test_acks_0_and_all(broker):
    create_topic(broker.data_dir, "acks", 1)
    with Producer(broker=broker.data_dir, acks=0) as p0:
        futures = [p0.send("acks", b"zero %d" % i) for i in range(100)]
        p0.flush()
        assert {f.result().offset for f in futures} == {-1}
    with Producer(broker=broker.data_dir, acks="all") as pall:
        f = pall.send("acks", b"durable")
        assert f.result(timeout=10).offset == 100
    values = [r.value for r in read_partition(broker.data_dir, "acks", 0)]
    assert values == [b"zero %d" % i for i in range(100)] + [b"durable"]


def _fork_worker(producer, data_dir, out):
    """In a forked child: the inherited producer works (on new rings of its own)."""
    future = producer.send("forked", b"from child %d" % os.getpid(), partition=0)
    out.put(tuple(future.result(timeout=10)))
    producer.close()


def _spawn_worker(data_dir, out):
    with Producer(broker=data_dir) as producer:
        out.put(tuple(producer.send("forked", b"from spawned", partition=0).result(timeout=10)))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_fork_and_spawn_workers_produce_correctly(broker, method):
    create_topic(broker.data_dir, "forked", 1)
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    with Producer(broker=broker.data_dir) as parent:
        parent.send("forked", b"parent before", partition=0).result(timeout=10)
        pending = parent.send("forked", b"parent pending", partition=0)  # maybe accumulated
        if method == "fork":
            procs = [ctx.Process(target=_fork_worker, args=(parent, broker.data_dir, queue))
                     for _ in range(3)]
        else:
            procs = [ctx.Process(target=_spawn_worker, args=(broker.data_dir, queue))
                     for _ in range(3)]
        for proc in procs:
            proc.start()
        results = [queue.get(timeout=WAIT_S_MAX) for _ in procs]
        for proc in procs:
            proc.join(WAIT_S_MAX)
            assert proc.exitcode == 0
        after = parent.send("forked", b"parent after", partition=0).result(timeout=10)
        pending.result(timeout=10)
    values = [r.value for r in read_partition(broker.data_dir, "forked", 0)]
    assert values.count(b"parent pending") == 1  # a child never re-sends what the parent held
    assert len(values) == 6 and values[0] == b"parent before"
    assert sorted(o for _, _, o in results + [tuple(after)]) == \
        sorted({o for _, _, o in results + [tuple(after)]})


def _forked_while_sending(producer, queue) -> None:
    for i in range(100):
        producer.send("busy-fork", b"child %d" % i, partition=0)
    producer.close()  # flushes: the child's own ring, its own sender thread
    queue.put("done")


def _send_ten_in_child(producer, queue) -> None:
    offsets = [producer.send("held-fork", b"child %d" % i, partition=0).result(timeout=10)[2]
               for i in range(10)]
    producer.close()
    queue.put(offsets)


def test_a_fork_while_a_parent_thread_holds_the_lock_and_a_region_gives_the_child_its_own(
        broker):
    """A parent thread writing a large batch holds the producer's lock and an export of the
    control region (its doorbell) with the GIL released; a fork then copies both. The child
    must still get a new lock and new regions: it sends and gets its acks instead of waiting
    forever on a lock that no thread of its own will release."""
    create_topic(broker.data_dir, "held-fork", 1)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with Producer(broker=broker.data_dir) as parent:
        parent.send("held-fork", b"parent", partition=0).result(timeout=10)
        held = memoryview(parent._writers[("held-fork", 0)].control.buf)  # the write's export
        parent._lock.acquire()  # as the writing thread holds it
        proc = ctx.Process(target=_send_ten_in_child, args=(parent, queue))
        try:
            proc.start()
            offsets = queue.get(timeout=WAIT_S_MAX)
        finally:
            parent._lock.release()
            held.release()
            if proc.is_alive() and proc.exitcode is None:
                proc.join(WAIT_S_MAX)
            if proc.is_alive():
                proc.kill()
                proc.join(WAIT_S_MAX)
    assert offsets == list(range(1, 11))
    assert proc.exitcode == 0


def test_a_fork_while_the_background_sender_runs_gives_the_child_a_working_producer(broker):
    create_topic(broker.data_dir, "busy-fork", 1)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with Producer(broker=broker.data_dir) as parent:
        for i in range(3000):  # a burst: records pile up while the ring is busy
            parent.send("busy-fork", b"parent %d" % i, partition=0)
        proc = ctx.Process(target=_forked_while_sending, args=(parent, queue))
        proc.start()  # the parent's sender thread may be waiting on the ring right now
        assert queue.get(timeout=WAIT_S_MAX) == "done"
        proc.join(WAIT_S_MAX)
        assert proc.exitcode == 0
        wait_for(lambda: len(read_partition(broker.data_dir, "busy-fork", 0)) == 3100,
                 what="every parent and child record in the log, no flush by the parent")
    values = [r.value for r in read_partition(broker.data_dir, "busy-fork", 0)]
    assert sorted(values) == sorted([b"parent %d" % i for i in range(3000)] +
                                    [b"child %d" % i for i in range(100)])
    parents = [v for v in values if v.startswith(b"parent")]
    assert parents == [b"parent %d" % i for i in range(3000)]  # order kept, nothing twice


@pytest.mark.parametrize("max_in_flight", [1, 5])
def test_sparse_sends_are_written_beside_frames_in_flight_up_to_max_in_flight(broker,
                                                                              max_in_flight):
    """A send that starts a batch, more than PRODUCER_SPARSE_GAP_US after the last frame
    went out, is written at once though the partition has not taken that frame (its latency
    would otherwise include the partition's round), up to max_in_flight unacknowledged frames;
    then records batch behind them. The partition process is stopped meanwhile (SIGSTOP), so
    nothing is taken; afterwards every record is in the log once, in order."""
    import signal

    create_topic(broker.data_dir, "sparse", 1)
    pids = broker.partition_pids(broker.wait_running())
    producer = Producer(broker=broker.data_dir, max_in_flight=max_in_flight)
    try:
        assert producer.send("sparse", b"first", partition=0).result(timeout=10).offset == 0
        writer = producer._writers[("sparse", 0)]
        wait_for(lambda: _native.atomic_load_u64(writer.buf, L.RING["read_position"]) ==
                 writer.written_position, what="the ring to be idle")
        os.kill(pids[("sparse", 0)], signal.SIGSTOP)
        try:
            futures = []
            for i in range(7):
                time.sleep(0.002)  # sparse: 2 ms since the last frame went out
                futures.append(producer.send("sparse", b"v%d" % i, partition=0))
            frames = writer.next_sequence - 1  # after "first"
            held = producer._accs[("sparse", 0)].records.count
            # The first goes to an idle ring; then one frame per send while fewer than
            # max_in_flight are unacknowledged; the rest wait in one batch.
            assert (frames, held) == (max_in_flight, 7 - max_in_flight)
        finally:
            os.kill(pids[("sparse", 0)], signal.SIGCONT)
        assert [f.result(timeout=10).offset for f in futures] == list(range(1, 8))
    finally:
        producer.close()
    assert [r.value for r in read_partition(broker.data_dir, "sparse", 0)] == \
        [b"first"] + [b"v%d" % i for i in range(7)]
    with pytest.raises(errors.ConfigError, match="max_in_flight"):
        Producer(broker=broker.data_dir, max_in_flight=0)


def test_a_record_larger_than_batch_bytes_max_is_sent_alone_up_to_the_topic_limit(broker):
    """As Kafka's producer: batch.size (batch_bytes_max, 256 KiB by default) is when a batch
    is full, not a limit on a record; max.message.bytes (1 MiB by default) is."""
    from shmbroker import records
    from shmbroker.layout import record_batch as RB

    create_topic(broker.data_dir, "big", 1)
    with Admin(broker=broker.data_dir) as admin:
        limit = admin.describe_topic("big").config["batch_bytes_max"]
    large = make_value(1, 0, 600_000)
    largest = make_value(2, 0, limit - RB.HEADER_SIZE - 64)  # the record's framing: < 64 B
    # A long linger: records wait to be joined, so only the batch.size rule splits them.
    with Producer(broker=broker.data_dir, batch_bytes_max=256 * 1024,
                  linger_ms=5_000) as producer:
        futures = [producer.send("big", b"small-0", partition=0),
                   producer.send("big", large, partition=0),
                   producer.send("big", b"small-1", partition=0),
                   producer.send("big", largest, partition=0)]
        with pytest.raises(errors.RecordTooLargeError, match="max.message.bytes"):
            producer.send("big", b"x" * limit, partition=0)
        pieces = producer.send_batch("big", [b"a", large, b"b"], partition=0)
        producer.flush(timeout=30)
        assert [f.result(timeout=30).offset for f in futures] == [0, 1, 2, 3]
        assert list(pieces.offsets(timeout=30)) == [4, 5, 6]
    wait_for(lambda: len(read_partition(broker.data_dir, "big", 0)) == 7,
             what="the 7 records in the log")
    got = read_partition(broker.data_dir, "big", 0)
    assert [r.value for r in got] == [b"small-0", large, b"small-1", largest, b"a", large, b"b"]
    assert [r.offset for r in got] == list(range(7))
    # Each large record is a batch of its own (nothing was added to it).
    data = b"".join(open(path, "rb").read() for path in sorted(
        glob.glob(os.path.join(broker.data_dir, "big-0", "*.log"))))
    counts = {b.base_offset: b.records_count for b in records.scan_batches(data).batches}
    assert counts[1] == 1 and counts[3] == 1 and counts[5] == 1
    # A ring smaller than the topic allows binds first, and the error says how to lift it.
    with Producer(broker=broker.data_dir, ring_bytes=1 << 20) as producer:
        with pytest.raises(errors.RecordTooLargeError, match="a larger ring_bytes"):
            producer.send("big", large, partition=0)


def test_bad_input_gives_typed_errors_and_the_broker_keeps_serving(broker):
    create_topic(broker.data_dir, "good", 1, {"max.message.bytes": 4096})
    pids_before = broker.partition_pids(broker.wait_running())
    with Producer(broker=broker.data_dir) as producer:
        with pytest.raises(errors.UnknownTopicOrPartitionError):
            producer.send("no-such-topic", b"x")
        with pytest.raises(errors.UnknownTopicOrPartitionError):
            producer.send("good", b"x", partition=5)
        with pytest.raises(errors.RecordTooLargeError):
            producer.send("good", b"x" * 5000)
        with pytest.raises(TypeError):
            producer.send("good", "not bytes")
        with pytest.raises(ValueError, match="must be >= 0"):  # as Kafka's producer
            producer.send("good", b"x", timestamp=-5)
        # A frame that is not a RecordBatch (a buggy or hostile producer) is rejected with a
        # typed error for that frame only.
        producer.send("good", b"first").result(timeout=10)
        writer = producer._writers[("good", 0)]
        bad = producer.send("good", b"corrupt me")
        producer._write(producer._accs[("good", 0)])
        # Corrupt the CRC of the batch now in the ring: simulate by writing a garbage frame.
        seq = writer.ring.send(b"\0" * 80)
        writer.next_sequence = seq + 1
        from shmbroker.client.producer import _Batch
        garbage = _Batch(producer, "good", 0)
        garbage.count, garbage.writer, garbage.sequence = 1, writer, seq
        writer.inflight.append(garbage)
        with pytest.raises(errors.CorruptRecordError):
            garbage.wait(10)
        assert bad.result(timeout=10).offset == 1
        # The garbage frame took offset 2 at its commit (decision 0005): the partition fills
        # it with an empty batch, which readers skip.
        assert producer.send("good", b"after").result(timeout=10).offset == 3
    assert broker.partition_pids(broker.wait_running()) == pids_before
    assert [r.value for r in read_partition(broker.data_dir, "good", 0)] == \
        [b"first", b"corrupt me", b"after"]


def test_a_ring_overwritten_while_its_frame_waits_for_the_ack_fails_the_future_at_once(broker):
    """The ring's header is overwritten after a frame went in but before the partition process
    read it: the partition drops the ring and never completes the frame. The waiting future
    raises RingCorruptError within an ack-wait slice, not RequestTimeoutError at its timeout
    (as it did under load in test_end_to_end.py). The partition process is stopped (SIGSTOP)
    meanwhile so that the overwrite certainly comes first."""
    import signal
    import struct
    import time

    create_topic(broker.data_dir, "torn", 1)
    pids = broker.partition_pids(broker.wait_running())
    producer = Producer(broker=broker.data_dir)
    try:
        assert producer.send("torn", b"first", partition=0).result(timeout=10).offset == 0
        writer = producer._writers[("torn", 0)]
        os.kill(pids[("torn", 0)], signal.SIGSTOP)
        try:
            future = producer.send("torn", b"second", partition=0)
            producer._write(producer._accs[("torn", 0)])  # in the ring, not in the accumulator
            assert future._batch.writer is writer and not future.done()
            struct.pack_into("<Q", writer.buf, L.RING["write_position"], 1 << 60)
            t0 = time.monotonic()
            with pytest.raises(errors.RingCorruptError, match="ring"):
                future.result(timeout=5)
            assert time.monotonic() - t0 < 2
        finally:
            os.kill(pids[("torn", 0)], signal.SIGCONT)
    finally:
        producer.close(timeout=2)  # bounded: close() without a timeout used to wait forever
    assert broker.partition_pids(broker.wait_running()) == pids
    wait_for(lambda: f"ring {writer.ring.name} (producer pid {os.getpid()}) is corrupt" in
             broker.log(), 5, "the broker to log the corrupt ring")


def test_a_broker_that_is_not_running_is_named_in_the_error(broker_dir):
    with pytest.raises(errors.BrokerNotRunningError, match=broker_dir):
        Producer(broker=broker_dir)


def test_a_closed_producer_refuses_sends(broker):
    create_topic(broker.data_dir, "closed", 1)
    producer = Producer(broker=broker.data_dir)
    producer.send("closed", b"x").result(timeout=10)
    producer.close()
    with pytest.raises(errors.IllegalStateError):
        producer.send("closed", b"y", partition=0)


def test_clean_stop_drains_rings_and_leaves_no_shared_memory(make_broker, tmp_path):
    broker = make_broker()
    create_topic(broker.data_dir, "drain", 2)
    producer = Producer(broker=broker.data_dir, acks=0)
    for i in range(10_000):
        producer.send("drain", b"r%d" % i, partition=i % 2)
    producer.flush()  # acks=0: in the rings, maybe not appended yet
    assert broker.stop() == 0
    assert sum(len(read_partition(broker.data_dir, "drain", p)) for p in range(2)) == 10_000
    with pytest.raises(errors.BrokerNotRunningError):
        producer.send("drain", b"late", partition=0).result(timeout=5)
    producer.close()
    prefix = names.broker_prefix(broker.data_dir)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


def test_cli_produce_reads_lines_with_keys(broker):
    create_topic(broker.data_dir, "lines", 2)
    proc = subprocess.run(
        [sys.executable, "-m", "shmbroker", "produce", "lines", "--data-dir", broker.data_dir,
         "--key-separator", ":", "--verbose"],
        input="a:one\nb:two\nc:three\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "3" in proc.stdout + proc.stderr
    got = {r.key: r.value for p in range(2) for r in read_partition(broker.data_dir, "lines", p)}
    assert got == {b"a": b"one", b"b": b"two", b"c": b"three"}
    bad = run_cli("produce", "nope", "--data-dir", broker.data_dir)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "nope" in bad.stderr


def test_records_a_dead_broker_never_acknowledges_fail_after_delivery_timeout_ms(make_broker):
    """No wait is endless: against a broker killed for good, result() and flush() without a
    timeout end once delivery_timeout_ms has passed, with a typed error in the futures (and
    flush() itself does not raise it, as Kafka's flush does not)."""
    broker = make_broker()
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("d", 1)
    producer = Producer(broker=broker.data_dir, delivery_timeout_ms=1_000)
    try:
        assert producer.send("d", b"before", partition=0).result(timeout=WAIT_S_MAX).offset == 0
        broker.kill9()
        future = producer.send("d", b"after", partition=0)
        started = time.monotonic()
        with pytest.raises(errors.RequestTimeoutError,
                           match=r"delivery_timeout_ms=1000 \(the broker on .* is not running\)"):
            future.result()
        waited = time.monotonic() - started
        assert 0.9 < waited < 5, waited
        late = producer.send("d", b"later", partition=0)
        producer.flush()  # returns: the batch's error is in its future
        assert late.done() and isinstance(late.exception(), errors.RequestTimeoutError)
    finally:
        producer.close(timeout=1)
        broker.start()  # reclaims the killed broker's shared memory
        assert broker.stop() == 0


def test_a_client_waits_for_a_control_region_its_partition_is_still_creating(broker):
    """A client that attaches between the partition process's shm_open and its header's magic
    (a topic created a moment ago, a restarted partition) waits as for a region not there
    yet, instead of failing with a header error (seen once in a full suite run)."""
    import signal
    import threading

    from shmbroker.client.metadata import LocalMetadata
    from shmbroker.shm import names
    from shmbroker.shm.control import ControlRegion
    from shmbroker.shm.region import Region

    supervisor = broker.proc.pid
    os.kill(supervisor, signal.SIGSTOP)  # its partition process for the topic waits
    creating = threading.Thread(target=create_topic, args=(broker.data_dir, "early", 1))
    made, timer = [], None
    try:
        creating.start()
        meta = LocalMetadata(broker.data_dir)
        wait_for(lambda: "early" in meta.topics(), 10, "the topic's metadata")
        name = names.control_name(names.broker_prefix(broker.data_dir), "early", 0)
        made.append(Region.create(name, L.control_region_bytes(1)))  # magic still 0

        def finish():  # as a partition process would: the whole header, magic last
            made[0].unlink()
            made[0].close()
            made.append(ControlRegion.create(name, 0, registry_slots=1))

        with pytest.raises(errors.BrokerNotRunningError, match="not initialised yet"):
            meta.control("early", 0)  # no wait: not served yet, and why
        timer = threading.Timer(0.3, finish)
        timer.start()
        t0 = time.monotonic()
        attached = meta.control("early", 0, wait_ms=10_000)
        assert time.monotonic() - t0 >= 0.2 and len(made) == 2  # it waited for the header
        assert attached.registry_slots == 1
        meta.close()
    finally:
        if timer is not None:
            timer.cancel()
            timer.join(10)
        if made:  # before the partition process makes its own
            made[-1].unlink()
            made[-1].close()
        os.kill(supervisor, signal.SIGCONT)
        creating.join(30)
    with Producer(broker=broker.data_dir) as producer:  # the partition's own region now
        assert producer.send("early", b"x").result(timeout=20).offset == 0


def test_a_producer_waits_for_a_partition_of_a_topic_created_a_moment_ago(broker):
    """The topic exists (its metadata is written) but the supervisor, stopped here so that the
    race is certain, has not started its partition process: the first send waits for it, as
    Kafka's producer waits for metadata, instead of failing with BrokerNotRunningError. (A
    broker that is not running is still reported at once: test_bad_input_... and the client
    tests.)"""
    import signal
    import threading

    from shmbroker.client.metadata import LocalMetadata
    from shmbroker.shm import names

    supervisor = broker.proc.pid
    os.kill(supervisor, signal.SIGSTOP)
    creating = threading.Thread(target=create_topic, args=(broker.data_dir, "fresh", 1))
    try:
        creating.start()  # answers once the supervisor has started the partition
        meta = LocalMetadata(broker.data_dir)
        wait_for(lambda: "fresh" in meta.topics(), 10, "the topic's metadata")
        region = names.control_name(names.broker_prefix(broker.data_dir), "fresh", 0)
        assert not os.path.exists(f"/dev/shm/{region}")  # not served yet
        with Producer(broker=broker.data_dir) as producer:
            threading.Timer(0.3, os.kill, (supervisor, signal.SIGCONT)).start()
            t0 = time.monotonic()
            assert producer.send("fresh", b"x").result(timeout=20).offset == 0
            assert time.monotonic() - t0 >= 0.2  # it did wait for the partition
    finally:
        os.kill(supervisor, signal.SIGCONT)
        creating.join(30)


@pytest.mark.parametrize("fast_resolve", [True, False])
def test_an_ack_after_earlier_frames_timed_out_carries_the_record_s_own_offset(broker,
                                                                              monkeypatch,
                                                                              fast_resolve):
    """Frames whose delivery timeout passed are still in the ring and are appended when the
    partition gets to them: a later record's offset must count their records. It came back
    as the completion's base offset (the first timed-out frame's), e.g. 4911 for a record
    the log holds at 5000 (found by filling a disk: the partition restarted for seconds)."""
    import signal

    from shmbroker.client import producer as producer_module

    monkeypatch.setattr(producer_module, "FAST_RESOLVE", fast_resolve)
    create_topic(broker.data_dir, "late", 1)
    pid = broker.partition_pids(broker.runtime())[("late", 0)]
    producer = Producer(broker=broker.data_dir, delivery_timeout_ms=300, linger_ms=0)
    try:
        assert producer.send("late", b"first", partition=0).result(timeout=WAIT_S_MAX).offset == 0
        os.kill(pid, signal.SIGSTOP)
        try:
            timed_out = []
            for i in range(3):
                timed_out.append([producer.send("late", b"t%d-%d" % (i, j), partition=0)
                                  for j in range(i + 2)])
                producer.flush()  # one frame each: 2, 3 and 4 records
            for futures in timed_out:
                for f in futures:
                    error = f.exception(timeout=WAIT_S_MAX)
                    assert isinstance(error, errors.RequestTimeoutError)
                    assert "partition process runs but has not appended" in str(error)
            last = producer.send("late", b"last", partition=0)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert last.result(timeout=WAIT_S_MAX).offset == 1 + 2 + 3 + 4
    finally:
        producer.close(timeout=5)
    with Consumer("late", broker=broker.data_dir, auto_offset_reset="earliest") as consumer:
        got = []
        deadline = time.monotonic() + WAIT_S_MAX
        while len(got) < 11 and time.monotonic() < deadline:  # bounded
            got += consumer.poll(timeout_ms=200)
    # The timed-out records were appended after all ("may or may not"), "last" after them.
    assert [r.value for r in got] == [b"first"] + [b"t%d-%d" % (i, j) for i in range(3)
                                                    for j in range(i + 2)] + [b"last"]
    assert got[-1].offset == 10


def test_a_delivery_timeout_says_the_partition_process_is_not_running(broker):
    """The supervisor is stopped (SIGSTOP) so the partition, killed, stays dead for a while:
    the timeout names that (not "is the broker running?", which it is), and once the
    partition is back the frame is appended after all and the next record follows it."""
    import signal

    from shmbroker.shm.liveness import process_alive

    create_topic(broker.data_dir, "gone", 1)
    pid = broker.partition_pids(broker.runtime())[("gone", 0)]
    producer = Producer(broker=broker.data_dir, delivery_timeout_ms=500)
    try:
        assert producer.send("gone", b"a", partition=0).result(timeout=WAIT_S_MAX).offset == 0
        os.kill(broker.proc.pid, signal.SIGSTOP)
        try:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not process_alive(pid), WAIT_S_MAX,
                     "the partition process to die")  # a zombie: its supervisor is stopped
            with pytest.raises(errors.RequestTimeoutError,
                               match="its partition process is not running"):
                producer.send("gone", b"b", partition=0).result(timeout=WAIT_S_MAX)
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        assert producer.send("gone", b"c", partition=0).result(timeout=WAIT_S_MAX).offset == 2
    finally:
        producer.close(timeout=5)
