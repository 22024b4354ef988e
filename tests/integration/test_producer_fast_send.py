"""Producer.send's C fast path (_native.SendPath) against its Python reference
(Producer._send_python): the same sends give the same offsets, records, futures and errors,
and concurrent sends from several threads lose nothing."""
from __future__ import annotations

import multiprocessing
import re
import threading
import time

import pytest
from produce_helpers import read_partition

from shmbroker import Admin, Producer, _native, errors
from shmbroker.client import producer as producer_module

pytestmark = [pytest.mark.usefixtures("stop_resource_tracker"), pytest.mark.timeout(120)]


def create_topic(data_dir, name, partitions, config=None):
    with Admin(broker=data_dir) as admin:
        admin.create_topic(name, partitions, config)


def _outcome(call):
    """What a send gave: ("ok", future) or ("error", type name, message)."""
    try:
        return ("ok", call())
    except (errors.ShmbrokerError, TypeError, ValueError) as e:
        # The message names the topics the broker knows (both modes' ones: cut off), and a
        # record's encoded size, whose varints (timestamp and offset deltas) depend on the
        # wall clock and on which records share its batch, i.e. on timing: masked.
        message = re.sub(r"a record of \d+ bytes", "a record of N bytes", str(e))
        return ("error", type(e).__name__, message.split(" (known")[0])


def _sequence(producer: Producer, topic: str) -> list:
    """Sends that take the fast path and sends that fall back (first send of an accumulator,
    keys, headers, timestamps, keywords, bad types, unknown partitions, a record too large,
    full batches), in one fixed order."""
    send, out = producer.send, []
    for i in range(300):
        out.append(_outcome(lambda: send(topic, b"p%d" % i, partition=i % 2)))
        out.append(_outcome(lambda: send(topic, b"k%d" % i, key=b"key-%d" % (i % 5))))
        out.append(_outcome(lambda: producer.send(topic, bytearray(b"pos"), None, 1,
                                                  [("h", b"v")], 1_700_000_000_000 + i)))
        out.append(_outcome(lambda: send(topic=topic, value=memoryview(b"kw"), partition=0,
                                         timestamp=1_700_000_000_000)))
    out.append(_outcome(lambda: send(topic, "not bytes", partition=0)))
    out.append(_outcome(lambda: send(topic, b"x", partition=7)))
    out.append(_outcome(lambda: send(topic, b"x", partition="0")))
    out.append(_outcome(lambda: send(topic, b"x", partition=0, timestamp="now")))
    out.append(_outcome(lambda: send(topic, b"x", partition=0, headers=5)))
    out.append(_outcome(lambda: send(topic, b"x", partition=0, bogus=1)))
    out.append(_outcome(lambda: send(topic, b"x", b"k", 0, None, None, "extra")))
    out.append(_outcome(lambda: send(topic, b"x" * 2_000_000, partition=0)))
    out.append(_outcome(lambda: send("no-such-topic", b"x", partition=0)))
    for i in range(3000):  # several full batches (batch_bytes_max below)
        out.append(_outcome(lambda: send(topic, b"f" * 200, partition=i % 2)))
    producer.flush()
    return [(o[0], tuple(o[1].result(timeout=10))[1:]) if o[0] == "ok"
            else (o[0], o[1], o[2].replace(topic, "TOPIC")) for o in out]


def _count_reference_calls(monkeypatch) -> list[int]:
    """Counts the calls of Producer._send_python (the reference the C path falls back to)
    from now on: ``[n]``."""
    calls = [0]
    reference = Producer._send_python

    def counted(*args, **kwargs):
        calls[0] += 1
        return reference(*args, **kwargs)
    monkeypatch.setattr(Producer, "_send_python", counted)
    return calls


@pytest.mark.parametrize("linger_ms", [0, 50])
def test_fast_and_reference_send_give_the_same_offsets_records_and_errors(broker, monkeypatch,
                                                                           linger_ms):
    results, logs, slow_calls = {}, {}, {}
    for mode in ("ref", "fast", "fast-python-write"):
        topic = f"same-{mode}-{linger_ms}"
        create_topic(broker.data_dir, topic, 2)
        monkeypatch.setattr(producer_module, "FAST_SEND", mode != "ref")
        monkeypatch.setattr(producer_module, "FAST_WRITE", mode == "fast")
        reference = Producer._send_python
        calls = _count_reference_calls(monkeypatch)
        with Producer(broker=broker.data_dir, linger_ms=linger_ms,
                      batch_bytes_max=64 * 1024) as producer:
            results[mode] = _sequence(producer, topic)
        monkeypatch.setattr(Producer, "_send_python", reference)
        slow_calls[mode] = calls[0]
        logs[mode] = [[(r.offset, r.key, r.value, r.headers) for r in
                       read_partition(broker.data_dir, topic, p)] for p in (0, 1)]
    assert results["fast"] == results["ref"] == results["fast-python-write"]
    assert logs["fast"] == logs["ref"] == logs["fast-python-write"]
    sends = len(results["ref"])
    assert slow_calls["ref"] == sends
    # The fast path took most sends (keyed ones included): the first of each accumulator, the
    # full batches and the errors went to the reference.
    assert slow_calls["fast"] < sends // 2, slow_calls


def test_concurrent_sends_from_8_threads_lose_nothing_and_offsets_are_dense(broker):
    create_topic(broker.data_dir, "threads", 2)
    threads_n, per_thread = 8, 5000
    futures: list[list] = [[] for _ in range(threads_n)]
    with Producer(broker=broker.data_dir, batch_bytes_max=16 * 1024) as producer:
        start = threading.Barrier(threads_n)

        def work(t: int) -> None:
            send = producer.send
            start.wait()
            for i in range(per_thread):
                value = b"%d:%d" % (t, i)
                futures[t].append(send("threads", value, partition=t % 2) if i % 2
                                  else send("threads", value))
        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
        producer.flush()
        where = [f.result(timeout=10) for fs in futures for f in fs]
    assert len(where) == threads_n * per_thread
    assert len({(w.partition, w.offset) for w in where}) == len(where)
    values = []
    for p in (0, 1):
        log = read_partition(broker.data_dir, "threads", p)
        assert [r.offset for r in log] == list(range(len(log)))
        values += [r.value for r in log]
    assert sorted(values) == sorted(b"%d:%d" % (t, i) for t in range(threads_n)
                                    for i in range(per_thread))
    # each thread's records stay in its order within a partition
    for p in (0, 1):
        seen: dict[int, int] = {}
        for r in read_partition(broker.data_dir, "threads", p):
            t, i = map(int, r.value.split(b":"))
            assert seen.get(t, -1) < i
            seen[t] = i


def test_send_on_the_class_is_the_python_reference_and_a_bound_send_survives_the_producer(
        broker):
    create_topic(broker.data_dir, "bound", 1)
    assert Producer.send is Producer._send_python
    producer = Producer(broker=broker.data_dir)
    send = producer.send
    del producer  # the bound send keeps it alive, as a bound method did
    future = send("bound", b"v", partition=0)
    send.__self__.flush()
    assert future.result(timeout=10).offset == 0
    send.__self__.close()


def _child_sends_with_the_parents_bound_send(send, queue) -> None:
    """In a forked child: `send` was bound in the parent; after the fork it must reach the
    child's own (new) accumulators, never the parent's."""
    future = send("forked-fast", b"child", partition=0)
    send.__self__.flush()
    queue.put(tuple(future.result(timeout=10)))
    send.__self__.close()


def test_a_send_bound_before_a_fork_uses_the_childs_accumulators(broker):
    create_topic(broker.data_dir, "forked-fast", 1)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with Producer(broker=broker.data_dir, linger_ms=60_000) as parent:
        send = parent.send
        send("forked-fast", b"parent before", partition=0).result(timeout=10)
        pending = send("forked-fast", b"parent pending", partition=0)  # held: linger
        child = ctx.Process(target=_child_sends_with_the_parents_bound_send,
                            args=(send, queue))
        child.start()
        result = queue.get(timeout=30)
        child.join(30)
        assert child.exitcode == 0
        pending.result(timeout=10)
    values = [r.value for r in read_partition(broker.data_dir, "forked-fast", 0)]
    assert sorted(values) == [b"child", b"parent before", b"parent pending"]
    assert result[:2] == ("forked-fast", 0)


def test_a_send_after_the_broker_restarts_reaches_the_new_partition_not_the_dropped_ring(
        make_broker):
    """The fast path remembers the last (topic, partition) -> accumulator. A broker that stops
    makes the producer drop that accumulator and its ring; the next send, with the very same
    topic object, must go to a new ring of the restarted broker, not to the dropped one."""
    broker = make_broker()
    topic = "restart-cache"
    create_topic(broker.data_dir, topic, 1)
    producer = Producer(broker=broker.data_dir)
    try:
        for i in range(50):  # the fast path, with the cached accumulator
            last = producer.send(topic, b"before-%d" % i, partition=0)
        assert last.result(timeout=10) == (topic, 0, 49)
        assert broker.stop() == 0
        with pytest.raises(errors.BrokerNotRunningError):
            producer.send(topic, b"lost", partition=0).result(timeout=5)
        broker.start()
        broker.wait_running()
        futures = [producer.send(topic, b"after-%d" % i, partition=0) for i in range(50)]
        assert [f.result(timeout=10)[2] for f in futures] == list(range(50, 100))
    finally:
        producer.close(timeout=5)
    assert [r.value for r in read_partition(broker.data_dir, topic, 0)] == \
        [b"before-%d" % i for i in range(50)] + [b"after-%d" % i for i in range(50)]


def _count_python_writes(monkeypatch) -> list:
    """Counts calls of Producer._write (the reference's write) in the returned [n]."""
    writes = [0]
    reference = Producer._write

    def counted(self, acc):
        writes[0] += 1
        return reference(self, acc)
    monkeypatch.setattr(Producer, "_write", counted)
    return writes


@pytest.mark.parametrize("fast_write", [True, False])
def test_a_due_batch_is_written_in_c_with_the_same_offsets_and_the_reference_is_not_called(
        broker, monkeypatch, fast_write):
    """A send to an idle ring with an int partition writes its batch in C (SendPath's write):
    Producer._write is not called, and the futures, offsets and log are those of the
    reference, which writes every one of these batches when the C write is off."""
    create_topic(broker.data_dir, f"cwrite-{fast_write}", 1)
    topic = f"cwrite-{fast_write}"
    monkeypatch.setattr(producer_module, "FAST_WRITE", fast_write)
    writes = _count_python_writes(monkeypatch)
    # More than _REAP_COMPLETIONS: each send here finds the ring idle, so the partition
    # acknowledges each frame with a completion of its own, and the C write declines once
    # half the ring's completion slots are unread (the reference reads them).
    sends = 40
    with Producer(broker=broker.data_dir, linger_ms=0) as producer:
        producer.send(topic, b"first", partition=0).result(timeout=10)
        writer = producer._writers[(topic, 0)]
        futures, python_writes = [], 0
        for i in range(sends):
            deadline = time.monotonic() + 10
            while not writer.idle() and time.monotonic() < deadline:  # bounded
                time.sleep(0.0005)
            assert writer.idle()
            before = writes[0]
            futures.append(producer.send(topic, b"r%d" % i, partition=0))
            python_writes += writes[0] - before
        assert [f.result(timeout=10) for f in futures] == \
            [(topic, 0, 1 + i) for i in range(sends)]
    if fast_write:
        # Only the sends that found completions due went to the reference (it reaps them).
        assert 1 <= python_writes <= sends // producer_module._REAP_COMPLETIONS + 1, \
            python_writes
    else:
        assert python_writes == sends
    assert [r.value for r in read_partition(broker.data_dir, topic, 0)] == \
        [b"first"] + [b"r%d" % i for i in range(sends)]


def test_the_c_write_makes_the_next_batch_as_batch_init_does_and_fills_the_written_one(
        broker, monkeypatch):
    """SendPath's write makes the accumulator's next batch without running _Batch.__init__
    (slots set at their offsets): every slot equals a _Batch made in Python; the written
    batch has the count, writer, sequence and deadline the reference gives it."""
    topic = "cbatch"
    create_topic(broker.data_dir, topic, 1)
    with Producer(broker=broker.data_dir, linger_ms=0) as producer:
        producer.send(topic, b"first", partition=0).result(timeout=10)
        writer = producer._writers[(topic, 0)]
        deadline = time.monotonic() + 10
        while not writer.idle() and time.monotonic() < deadline:  # bounded
            time.sleep(0.0005)
        writes = _count_python_writes(monkeypatch)
        acc = producer._accs[(topic, 0)]
        written = acc.records.batch
        before = time.monotonic()
        future = producer.send(topic, b"second", partition=0)
        assert writes[0] == 0, "the reference wrote the batch: the C write was not exercised"
        made = acc.records.batch
        assert made is not written and type(made) is producer_module._Batch
        reference = producer_module._Batch(producer, topic, 0)
        for name in producer_module._Batch.__slots__:
            assert getattr(made, name) == getattr(reference, name), name
        assert made.producer is producer and made.topic is acc.topic
        assert written.count == 1 and written.writer is writer
        assert written.sequence == writer.next_sequence - 1
        timeout_s = producer.delivery_timeout_ms / 1000
        assert before + timeout_s <= written.deadline <= time.monotonic() + timeout_s
        assert future.result(timeout=10) == (topic, 0, 1)


def test_the_c_write_refuses_a_batch_class_whose_slots_it_does_not_know():
    from shmbroker.shm.ring import Completion

    class Other:
        __slots__ = ("producer", "topic")
    path = _native.SendPath(producer_module._Accumulator, Producer._send_python,
                            Producer._after_append)
    path.configure(producer_module._Batch, 1, 1000, 8, 8, 4, Completion, 2)  # the real ones
    with pytest.raises(TypeError, match="__slots__"):
        path.configure(Other, 1, 1000, 8, 8, 4, Completion, 2)
    with pytest.raises(TypeError, match="completion_type"):
        path.configure(producer_module._Batch, 1, 1000, 8, 8, 4, dict, 2)
    with pytest.raises(ValueError, match="reap_some_batches"):
        path.configure(producer_module._Batch, 1, 1000, 8, 8, 4, Completion, 0)


def test_keyed_sends_take_the_c_path_and_land_on_kafkas_murmur2_partitions(broker, monkeypatch):
    """A bytes key without a partition is mapped in C (murmur2, with the partition count the
    reference cached) once the reference has made the accumulators; every record lands where
    records.partition_for_key says, as with the reference."""
    from shmbroker import records

    topic = "keyed-fast"
    create_topic(broker.data_dir, topic, 4)
    calls = _count_reference_calls(monkeypatch)
    keys = [b"user-%d" % (i % 16) for i in range(2000)]
    with Producer(broker=broker.data_dir) as producer:
        futures = [producer.send(topic, b"v%d" % i, key=k) for i, k in enumerate(keys)]
        got = [f.result(timeout=10) for f in futures]
    assert [g[1] for g in got] == [records.partition_for_key(k, 4) for k in keys]
    # The reference made the four accumulators (and the partition count) on first use; a
    # batch that filled up goes there too. Everything else was C.
    assert calls[0] < 100, calls[0]
    by_partition = {p: [r.key for r in read_partition(broker.data_dir, topic, p)]
                    for p in range(4)}
    for p in range(4):
        assert by_partition[p] == [k for k in keys if records.partition_for_key(k, 4) == p]


def _idle_after_first(producer: Producer, topic: str):
    """Sends b"first" to partition 0, waits for its ack and for the ring to be idle (the
    partition took every frame); returns the partition's writer."""
    producer.send(topic, b"first", partition=0).result(timeout=10)
    writer = producer._writers[(topic, 0)]
    deadline = time.monotonic() + 10
    while not writer.idle() and time.monotonic() < deadline:  # bounded
        time.sleep(0.0005)
    assert writer.idle()
    return writer


def test_sparse_sends_to_a_partition_that_acknowledges_nothing_are_written_in_c_up_to_the_default_bound(
        broker, monkeypatch):
    """A partition that dozes acknowledges a whole round's frames at once, so a sparse
    sender (a spinning ping-pong: ~100 frames a millisecond) has many frames in flight and
    few completions. Each such send is still written at once and in C: up to the default
    max_in_flight (1024) frames in flight, and the reference (which reads completions) only
    when half the ring's completion slots are unread, not at 32 batches in flight. The
    partition process is stopped (SIGSTOP): it acknowledges nothing meanwhile."""
    import os
    import signal

    from shmbroker.config import PRODUCER_MAX_IN_FLIGHT_DEFAULT
    create_topic(broker.data_dir, "inflight", 1)
    pids = broker.partition_pids(broker.wait_running())
    writes = _count_python_writes(monkeypatch)
    sends = 100
    assert 32 < sends < PRODUCER_MAX_IN_FLIGHT_DEFAULT
    with Producer(broker=broker.data_dir) as producer:
        writer = _idle_after_first(producer, "inflight")
        os.kill(pids[("inflight", 0)], signal.SIGSTOP)
        try:
            futures, before = [], writes[0]
            for i in range(sends):
                time.sleep(0.0002)  # sparse: well past PRODUCER_SPARSE_GAP_US
                futures.append(producer.send("inflight", b"s%d" % i, partition=0))
            assert writer.next_sequence - 1 == sends, "every send written at once"
            assert producer._accs[("inflight", 0)].records.count == 0, "none held"
            assert writes[0] == before, "the reference wrote some"
        finally:
            os.kill(pids[("inflight", 0)], signal.SIGCONT)
        assert [f.result(timeout=10).offset for f in futures] == list(range(1, sends + 1))
    assert [r.value for r in read_partition(broker.data_dir, "inflight", 0)] == \
        [b"first"] + [b"s%d" % i for i in range(sends)]


def _pile_acknowledged(producer, partition_pid: int, topic: str, piled: int):
    """``piled`` sparse sends (each writes a frame of its own) while the partition process is
    stopped (SIGSTOP), then the partition resumed and waited for until it has acknowledged
    them all (one round: a few completions): (writer, futures)."""
    import os
    import signal

    writer = _idle_after_first(producer, topic)
    futures = []
    os.kill(partition_pid, signal.SIGSTOP)
    try:
        for i in range(piled):
            time.sleep(0.0002)  # sparse: well past PRODUCER_SPARSE_GAP_US
            futures.append(producer.send(topic, b"s%d" % i, partition=0))
    finally:
        os.kill(partition_pid, signal.SIGCONT)
    _wait_acknowledged(writer)
    return writer, futures


def _wait_acknowledged(writer) -> None:
    """Waits (10 s at most) until the partition acknowledged every frame written so far."""
    last = writer.next_sequence - 1
    deadline = time.monotonic() + 10
    while writer.ring.acked_sequence <= last and time.monotonic() < deadline:  # bounded
        time.sleep(0.001)
    assert writer.ring.acked_sequence > last, "the partition acknowledged the pile"


@pytest.mark.parametrize("fast_reap_some", [True, False])
def test_a_round_of_acknowledged_sparse_frames_is_resolved_a_few_batches_per_send(
        broker, monkeypatch, fast_reap_some):
    """A dozing partition acknowledges a round of a few hundred sparse frames at once. The
    sends after it resolve at most _REAP_SOME_BATCHES of those batches each (a send that
    resolved them all stalled a ping-pong by ~50-100 us), and every future still gets its
    own offset. The partition is stopped (SIGSTOP) while the frames pile up. In C (the
    send path's write reads the completions and resolves them: no Producer._write), and
    the same with the Python reference, Producer._reap_some (FAST_REAP_SOME off)."""
    monkeypatch.setattr(producer_module, "FAST_REAP_SOME", fast_reap_some)
    create_topic(broker.data_dir, "reapsome", 1)
    pids = broker.partition_pids(broker.wait_running())
    piled = 200
    assert piled > producer_module._REAP_SOME_INFLIGHT + 2 * producer_module._REAP_SOME_BATCHES
    writes = _count_python_writes(monkeypatch)
    with Producer(broker=broker.data_dir) as producer:
        writer, futures = _pile_acknowledged(producer, pids[("reapsome", 0)], "reapsome", piled)
        assert len(writer.inflight) == piled, "nothing resolved before the next send"
        resolved_per_send = []
        before_writes = writes[0]
        for i in range(piled // producer_module._REAP_SOME_BATCHES + 2):
            before = len(writer.inflight)
            time.sleep(0.0002)
            futures.append(producer.send("reapsome", b"t%d" % i, partition=0))
            resolved_per_send.append(before + 1 - len(writer.inflight))
        python_writes = writes[0] - before_writes
        assert (python_writes == 0) if fast_reap_some else (python_writes >= 3), python_writes
        assert max(resolved_per_send) == producer_module._REAP_SOME_BATCHES, resolved_per_send
        assert sum(resolved_per_send) >= piled - producer_module._REAP_SOME_INFLIGHT, \
            resolved_per_send
        assert all(f.done() for f in futures[:piled - producer_module._REAP_SOME_INFLIGHT])
        assert [f.result(timeout=10).offset for f in futures] == \
            list(range(1, len(futures) + 1))


@pytest.mark.parametrize("fast_reap_some", [True, False])
def test_a_rejected_frame_inside_an_acknowledged_pile_is_left_to_the_reference(
        broker, monkeypatch, fast_reap_some):
    """A round's completions include one with an error code (a frame the partition rejected:
    here a garbage frame written into the ring, as a buggy producer would). The budgeted
    reap resolves the batches before it, then leaves that completion to the reference
    (Producer._reap): the garbage batch fails with CorruptRecordError, every other batch
    gets its own offset, the garbage's offset is skipped. The partition is stopped
    (SIGSTOP) while the pile is written."""
    import os
    import signal

    from shmbroker.client.producer import _Batch

    monkeypatch.setattr(producer_module, "FAST_REAP_SOME", fast_reap_some)
    create_topic(broker.data_dir, "rejected", 1)
    pid = broker.partition_pids(broker.wait_running())[("rejected", 0)]
    half = producer_module._REAP_SOME_INFLIGHT + producer_module._REAP_SOME_BATCHES
    writes = _count_python_writes(monkeypatch)
    with Producer(broker=broker.data_dir) as producer:
        writer = _idle_after_first(producer, "rejected")
        futures = []

        def sparse(prefix: bytes, n: int) -> None:
            for i in range(n):
                time.sleep(0.0002)  # sparse: each send writes a frame of its own
                futures.append(producer.send("rejected", prefix + b"%d" % i, partition=0))

        os.kill(pid, signal.SIGSTOP)
        try:
            sparse(b"a", half)
            with producer._lock:  # a frame that is not a RecordBatch, in flight as a batch
                seq = writer.ring.send(b"\0" * 80)
                writer.next_sequence = seq + 1
                garbage = _Batch(producer, "rejected", 0)
                garbage.count, garbage.writer, garbage.sequence = 1, writer, seq
                writer.inflight.append(garbage)
            sparse(b"b", half)
        finally:
            os.kill(pid, signal.SIGCONT)
        _wait_acknowledged(writer)
        before_writes = writes[0]
        sparse(b"c", 2 * half // producer_module._REAP_SOME_BATCHES + 2)
        assert garbage.done, "the sends after the pile reached the rejected frame"
        assert writes[0] > before_writes, "the error completion went to the reference"
        with pytest.raises(errors.CorruptRecordError):
            garbage.wait(10)
        offsets = [f.result(timeout=10).offset for f in futures]
        assert offsets == list(range(1, half + 1)) + list(range(half + 2, len(futures) + 2))
    assert [r.value for r in read_partition(broker.data_dir, "rejected", 0)] == \
        [b"first"] + [f"a{i}".encode() for i in range(half)] + \
        [f"b{i}".encode() for i in range(half)] + \
        [f"c{i}".encode() for i in range(2 * half // producer_module._REAP_SOME_BATCHES + 2)]


def test_batches_acknowledged_before_a_clean_stop_resolve_though_not_yet_resolved_by_sends(
        make_broker):
    """A clean stop after a partition acknowledged a pile of frames that the producer was
    still resolving a few per send: the next send reports the stop, and every acknowledged
    batch gets its offset, none the stop's error (a producer told "not acknowledged" about
    appended records would send them again)."""
    broker = make_broker()
    create_topic(broker.data_dir, "stopped", 1)
    pids = broker.partition_pids(broker.wait_running())
    piled = 200
    with Producer(broker=broker.data_dir) as producer:
        writer, futures = _pile_acknowledged(producer, pids[("stopped", 0)], "stopped", piled)
        time.sleep(0.0002)
        futures.append(producer.send("stopped", b"one more", partition=0))
        assert writer.ring._completions, "a completion's rest waits to be resolved"
        resolved = sum(f._batch.done for f in futures)  # (done() would resolve them all)
        assert resolved <= producer_module._REAP_SOME_BATCHES, resolved
        assert broker.stop() == 0
        with pytest.raises(errors.BrokerNotRunningError):
            producer.send("stopped", b"after the stop", partition=0).result(timeout=10)
        assert [f.result(timeout=10).offset for f in futures] == list(range(1, piled + 2))


def test_a_tight_send_loop_batches_behind_its_frames_in_flight(broker):
    """The sparse-send gap counts from the end of a send's own write: a loop sending as fast
    as it can, whose sends each take microseconds when they write a frame (4 KiB values:
    copied and checksummed), must not look sparse to itself (it did: a chain of records
    written as frames of their own, ~30% fewer messages a second in the 1 -> 1 bench). The
    partition process is stopped (SIGSTOP), so frames stay in flight and records that are
    not written at once batch behind them."""
    import os
    import signal

    create_topic(broker.data_dir, "tight", 1)
    pids = broker.partition_pids(broker.wait_running())
    sends = 200
    value = b"v" * 4096
    with Producer(broker=broker.data_dir) as producer:
        writer = _idle_after_first(producer, "tight")
        os.kill(pids[("tight", 0)], signal.SIGSTOP)
        try:
            send = producer.send
            futures = [send("tight", value, partition=0) for _ in range(sends)]
            frames = writer.next_sequence - 1  # after "first"
            # Full batches (batch_bytes_max) are written as they fill: about a dozen here.
            assert 1 <= frames <= sends // 10, frames
        finally:
            os.kill(pids[("tight", 0)], signal.SIGCONT)
        assert [f.result(timeout=10).offset for f in futures] == list(range(1, sends + 1))
