"""Consumer.poll's one-call fast path (``_native.poll_ring``, client/consumer.py FAST_POLL)
against the Python path it leaves everything unusual to (``Consumer._poll``, the reference):
the same records at the same positions, whatever the frames and ``max_records``; a ring read
the fast path did but does not finish (records before the position, more than asked) is
finished by the Python path, not dropped; a poll that waits for nothing returns after its
timeout, not after twice it (the fast path's wait counts)."""
from __future__ import annotations

import os
import signal
import time

import pytest

import shmbroker.client.consumer as consumer_module
from shmbroker import Admin, Consumer, Producer
from shmbroker.client.types import TopicPartition

pytestmark = pytest.mark.timeout(120)

POLL_S_MAX = 20.0


@pytest.fixture
def topic(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("f", 1)
    (pid,) = broker.partition_pids(broker.wait_running({("f", 0)})).values()
    return broker, pid


@pytest.fixture(params=[True, False], ids=["fast_poll", "python_poll"])
def fast_poll(request, monkeypatch):
    monkeypatch.setattr(consumer_module, "FAST_POLL", request.param)
    return request.param


def _fields(records) -> list:
    return [(r.offset, r.key, r.value, r.headers) for r in records]


def _drain(consumer, count: int, max_records: int) -> tuple[list, list]:
    """Polls until ``count`` records came; every poll's size and the records."""
    got, sizes = [], []
    deadline = time.monotonic() + POLL_S_MAX
    while len(got) < count and time.monotonic() < deadline:  # bounded by the deadline
        batch = consumer.poll(timeout_ms=200, max_records=max_records)
        sizes.append(len(batch))
        got += batch
    return got, sizes


def _assert_from(got: list, sent: list, first: int) -> None:
    """``got`` is every record ``sent`` from offset ``first`` on, each once, in order."""
    assert [r.offset for r in got] == list(range(first, len(sent)))
    assert [(r.key, r.value) for r in got] == sent[first:]


def _produce_while_stopped(data_dir: str, pid: int) -> list:
    """Frames of several shapes committed to the rings of a stopped partition: single
    records, a 7-record batch, keyed records with headers. Returns their (key, value)."""
    sent = []
    with Producer(broker=data_dir, acks=0) as producer:
        os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(5):
                producer.send("f", b"one-%d" % i, partition=0)
                producer.flush()
                sent.append((None, b"one-%d" % i))
            batch = [b"batch-%d" % i for i in range(7)]
            producer.send_batch("f", batch, partition=0)
            producer.flush()
            sent += [(None, v) for v in batch]
            for i in range(4):
                producer.send("f", b"keyed-%d" % i, key=b"k%d" % i, partition=0,
                              headers=[("h", b"%d" % i)])
                producer.flush()
                sent.append((b"k%d" % i, b"keyed-%d" % i))
        except BaseException:
            os.kill(pid, signal.SIGCONT)
            raise
    return sent


@pytest.mark.parametrize("max_records", [1, 3, 500])
def test_records_from_rings_come_whole_in_order_whatever_max_records(topic, fast_poll,
                                                                     max_records):
    """All frames there before the first poll: one ring read takes them, the polls hand them
    out max_records at a time (the rest pending: those polls are _poll's)."""
    broker, pid = topic
    consumer = Consumer("f", broker=broker.data_dir, auto_offset_reset="earliest")
    try:
        assert consumer.poll(timeout_ms=50) == []
        try:
            sent = _produce_while_stopped(broker.data_dir, pid)
            got, sizes = _drain(consumer, len(sent), max_records)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert [(r.key, r.value) for r in got] == sent
        assert [r.offset for r in got] == list(range(len(sent)))
        assert max(sizes) <= max_records
        assert got[-1].headers == (("h", b"3"),)
        assert consumer.position(TopicPartition("f", 0)) == len(sent)
        assert consumer.poll(timeout_ms=100) == [], "nothing twice"
    finally:
        consumer.close()


def test_records_sent_one_at_a_time_are_handed_out_by_the_fast_path(topic, fast_poll,
                                                                    monkeypatch):
    """A ping-pong's shape: each poll finds one new frame (single records, a 3-record batch
    now and then, keys and headers), the partition stopped. Every record once, in order;
    with FAST_POLL, poll_ring itself answered nearly every poll."""
    broker, pid = topic
    served = []  # the polls poll_ring answered with records itself
    real = consumer_module._poll_ring

    def counted(*args):
        got = real(*args)
        if got.__class__ is list:
            served.append(len(got))
        return got
    monkeypatch.setattr(consumer_module, "_poll_ring", counted)
    consumer = Consumer("f", broker=broker.data_dir, auto_offset_reset="earliest")
    expected, got = [], []
    try:
        assert consumer.poll(timeout_ms=50) == []
        with Producer(broker=broker.data_dir, acks=0) as producer:
            os.kill(pid, signal.SIGSTOP)
            try:
                for i in range(60):  # bounded
                    if i % 10 == 9:
                        values = [b"b%d-%d" % (i, j) for j in range(3)]
                        producer.send_batch("f", values, partition=0)
                        expected += [(None, v) for v in values]
                    else:
                        producer.send("f", b"v%d" % i, key=b"k%d" % i, partition=0,
                                      headers=[("i", b"%d" % i)])
                        expected.append((b"k%d" % i, b"v%d" % i))
                    producer.flush()
                    got += _drain(consumer, len(expected) - len(got), 500)[0]
            finally:
                os.kill(pid, signal.SIGCONT)
        assert [(r.key, r.value) for r in got] == expected
        assert [r.offset for r in got] == list(range(len(expected)))
        assert got[0].headers == (("i", b"0"),)
        if fast_poll:
            assert len(served) >= 40, f"poll_ring answered {len(served)} of 60 polls"
        else:
            assert served == []
    finally:
        consumer.close()


def test_a_seek_into_a_ring_frame_hands_out_the_rest_of_it(topic, fast_poll):
    """A position inside a 7-record frame: the ring read finds the frame with records before
    the position (poll_ring leaves that to _poll); the rest comes, from the position on."""
    broker, pid = topic
    consumer = Consumer(broker=broker.data_dir)
    consumer.assign([TopicPartition("f", 0)])
    try:
        assert consumer.poll(timeout_ms=50) == []
        try:
            sent = _produce_while_stopped(broker.data_dir, pid)
            consumer.seek(TopicPartition("f", 0), 7)  # frame 5..11 holds the batch
            got, _ = _drain(consumer, len(sent) - 7, 2)
        finally:
            os.kill(pid, signal.SIGCONT)
        _assert_from(got, sent, 7)
    finally:
        consumer.close()


def test_a_caught_up_position_inside_a_ring_frame_gets_only_the_records_from_it_on(topic,
                                                                                  fast_poll):
    """A position inside a frame while the fetch is otherwise caught up (what a log read
    that ended inside a frame's batches leaves; set directly here): ring_take finds the
    frame with records before the position, and only those from it on are handed out."""
    broker, pid = topic
    consumer = Consumer(broker=broker.data_dir, auto_offset_reset="earliest")
    consumer.assign([TopicPartition("f", 0)])
    try:
        assert consumer.poll(timeout_ms=50) == []
        try:
            sent = _produce_while_stopped(broker.data_dir, pid)
            first, _ = _drain(consumer, len(sent), 500)  # (also: the rings are known now)
            assert len(first) == len(sent)
            (fetch,) = consumer._order
            assert fetch.rings is not None and not fetch.pending and fetch.hw == 0
            fetch.position = 7  # back into frame 5..11 (the partition is stopped: still there)
            # Counters not due, so that the next poll is poll_ring's whole (it leaves a due
            # publish to _poll).
            consumer._publish_counters(consumer._order, 0)
            got, _ = _drain(consumer, len(sent) - 7, 500)
        finally:
            os.kill(pid, signal.SIGCONT)
        _assert_from(got, sent, 7)
    finally:
        consumer.close()


def test_both_paths_hand_out_the_same_records_and_counters(topic):
    """The same frames read twice, once with each path (one consumer each, assigned from
    offset 0): equal records, and each consumer counted every record it handed out."""
    broker, pid = topic
    readers = {}
    try:
        sent = None
        for fast in (True, False):
            consumer_module.FAST_POLL = fast
            consumer = readers[fast] = Consumer(broker=broker.data_dir,
                                                auto_offset_reset="earliest")
            consumer.assign([TopicPartition("f", 0)])
            assert consumer.poll(timeout_ms=50) == []
        try:
            sent = _produce_while_stopped(broker.data_dir, pid)
            results = {}
            for fast, consumer in readers.items():
                consumer_module.FAST_POLL = fast
                results[fast] = _drain(consumer, len(sent), 1)[0]
        finally:
            os.kill(pid, signal.SIGCONT)
        assert _fields(results[True]) == _fields(results[False])
        assert len(results[True]) == len(sent)
        for consumer in readers.values():
            consumer._publish_counters(consumer._order, 0)  # what is still only mirrored
            assert consumer._counters.values[1] == len(sent), "records out, counted"
            assert consumer.position(TopicPartition("f", 0)) == len(sent)
    finally:
        consumer_module.FAST_POLL = True
        for consumer in readers.values():
            consumer.close()


def test_a_poll_with_nothing_to_read_returns_after_its_timeout_not_twice_it(topic, fast_poll):
    """Caught up at the rings' end, nothing coming: the fast path's wait ends with nothing
    and _poll goes on with what is left of the timeout, not a new one."""
    broker, _ = topic
    consumer = Consumer("f", broker=broker.data_dir, auto_offset_reset="earliest")
    try:
        with Producer(broker=broker.data_dir) as producer:
            producer.send("f", b"first", partition=0).result(timeout=10)
        assert [r.value for r in _drain(consumer, 1, 10)[0]] == [b"first"]
        for timeout_ms in (300, 300.5):
            t0 = time.monotonic()
            assert consumer.poll(timeout_ms=timeout_ms) == []
            waited = time.monotonic() - t0
            # Twice the timeout would be >= 0.6 s; the slack below it is for a busy CI host.
            assert 0.29 <= waited < 0.58, f"poll({timeout_ms}) returned after {waited:.3f} s"
    finally:
        consumer.close()
