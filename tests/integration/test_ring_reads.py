"""Consumers read committed frames from the producers' rings past the log's end (decision 0005
steps 5-6, client/ring_reads.py): records reach a consumer while the partition process is
stopped, at the offsets and with the bytes the log then holds; a frame the partition refuses
is never handed out; a copy torn by the ring's reuse is never handed out (stress, values carry
their own offset); the records a consumer read from a ring are in the log after a kill -9 of
the whole broker."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
from broker_harness import wait_for
from produce_helpers import RAW_PRODUCER

from shmbroker import Admin, Consumer, Producer
from shmbroker.shm import names
from shmbroker.shm.control import ControlRegion

pytestmark = pytest.mark.timeout(120)


def _control(data_dir: str, topic: str) -> ControlRegion:
    return ControlRegion.attach(names.control_name(names.broker_prefix(data_dir), topic, 0),
                                readonly=True)


def _poll_until(consumer, count: int, timeout_s: float = 20.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:  # bounded by the deadline
        got += consumer.poll(timeout_ms=200)
    return got


def _fields(rs) -> list:
    return [(r.offset, r.timestamp, r.key, r.value, r.headers) for r in rs]


@pytest.fixture
def topic(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("r", 1)
    (pid,) = broker.partition_pids(broker.wait_running({("r", 0)})).values()
    return broker, pid


def test_records_reach_a_ring_reader_while_the_partition_process_is_stopped(topic):
    broker, pid = topic
    reader = Consumer("r", broker=broker.data_dir, auto_offset_reset="earliest")
    log_only = Consumer("r", broker=broker.data_dir, auto_offset_reset="earliest",
                        read_rings=False)
    control = _control(broker.data_dir, "r")
    try:
        assert reader.poll(timeout_ms=50) == [] and log_only.poll(timeout_ms=50) == []
        with Producer(broker=broker.data_dir, acks=0) as producer:
            os.kill(pid, signal.SIGSTOP)
            try:
                for i in range(20):
                    producer.send("r", b"v%d" % i, key=b"k%d" % i, headers=[("h", b"%d" % i)])
                producer.flush()
                got = _poll_until(reader, 20)
                assert [(r.offset, r.value) for r in got] == [(i, b"v%d" % i) for i in range(20)]
                assert control.read_state().high_watermark == 0, "nothing was appended yet"
                assert log_only.poll(timeout_ms=300) == [], "the log path waits for the log"
            finally:
                os.kill(pid, signal.SIGCONT)
        from_log = _poll_until(log_only, 20)
        assert _fields(from_log) == _fields(got), "the log holds what the ring reader got"
        wait_for(lambda: control.read_state().high_watermark == 20, 10, "the append")
        assert reader.poll(timeout_ms=200) == [], "nothing twice"
    finally:
        control.close()
        reader.close()
        log_only.close()


def test_frames_larger_than_a_latency_poll_takes_on_its_stack_are_read_from_a_ring_whole(topic):
    """ring_take copies a small frame and decodes its few records on the stack, others on the
    heap (native/src/module.c, ring_poll_frame): a 6,000-byte value, a 40-record batch and a
    one-record frame between them all come from the ring (the partition is stopped), each
    record whole at its offset, as the log then holds them."""
    broker, pid = topic
    reader = Consumer("r", broker=broker.data_dir, auto_offset_reset="earliest")
    log_only = Consumer("r", broker=broker.data_dir, auto_offset_reset="earliest",
                        read_rings=False)
    big = bytes(range(256)) * 23 + b"end"  # 5,891 bytes
    many = [b"m%02d" % i * (i + 1) for i in range(40)]
    expected = [big, b"small"] + many + [b"last"]
    try:
        assert reader.poll(timeout_ms=50) == []
        with Producer(broker=broker.data_dir, acks=0) as producer:
            os.kill(pid, signal.SIGSTOP)
            try:
                producer.send("r", big, key=b"k" * 300)
                producer.flush()
                producer.send("r", b"small")
                producer.flush()
                producer.send_batch("r", many)
                producer.flush()
                producer.send("r", b"last")
                producer.flush()
                got = _poll_until(reader, len(expected))
            finally:
                os.kill(pid, signal.SIGCONT)
        assert [r.offset for r in got] == list(range(len(expected)))
        assert [r.value for r in got] == expected
        assert got[0].key == b"k" * 300
        from_log = _poll_until(log_only, len(expected))
        assert _fields(from_log) == _fields(got), "the log holds what the ring reader got"
    finally:
        reader.close()
        log_only.close()


#: A producer process that commits a frame whose batch CRC is wrong (the C writer does not
#: check CRCs: a buggy producer), then a good one, and exits.
_BAD_THEN_GOOD = RAW_PRODUCER + r"""
bad = bytearray(records.encode_batch([b"bad-%d" % i for i in range(3)]))
bad[-1] ^= 0xFF
ring.send(bytes(bad))
ring.send(records.encode_batch([b"good"]))
print("written", flush=True)
"""


def test_a_frame_the_partition_refuses_is_never_handed_out_from_a_ring(topic):
    broker, pid = topic
    reader = Consumer("r", broker=broker.data_dir, auto_offset_reset="earliest")
    try:
        assert reader.poll(timeout_ms=50) == []
        os.kill(pid, signal.SIGSTOP)
        try:
            child = subprocess.run([sys.executable, "-c", _BAD_THEN_GOOD, broker.data_dir, "r"],
                                   capture_output=True, timeout=60,
                                   env={**os.environ, "PYTHONPATH": os.getcwd()})
            assert child.returncode == 0 and b"written" in child.stdout, child.stderr.decode()
            # Offsets 0..2 are the refused frame's: the reader waits for the log there.
            assert reader.poll(timeout_ms=500) == []
        finally:
            os.kill(pid, signal.SIGCONT)
        got = _poll_until(reader, 1)
        assert [(r.offset, r.value) for r in got] == [(3, b"good")]
    finally:
        reader.close()
    with Consumer("r", broker=broker.data_dir, auto_offset_reset="earliest",
                  read_rings=False) as log_only:
        assert [(r.offset, r.value) for r in _poll_until(log_only, 1)] == [(3, b"good")]


def _value(i: int) -> bytes:
    return b"%d:" % i + hashlib.sha256(b"%d" % i).hexdigest().encode() * (1 + i % 5)


_FAST_PRODUCER = r"""
import hashlib, sys
from shmbroker import Producer
def value(i):
    return b"%d:" % i + hashlib.sha256(b"%d" % i).hexdigest().encode() * (1 + i % 5)
n = int(sys.argv[2])
with Producer(broker=sys.argv[1], acks=0, ring_bytes=1 << 14) as p:
    for i in range(n):
        p.send("r", value(i))
    p.flush()
"""


def test_ring_reads_under_constant_reuse_hand_out_only_whole_records_at_their_offsets(topic):
    """A small ring reused all the time while a consumer reads it: every record it hands out
    has its own offset's value (a torn copy would show another), each offset once."""
    broker, _ = topic
    n = 30_000
    reader = Consumer("r", broker=broker.data_dir, auto_offset_reset="earliest")
    try:
        assert reader.poll(timeout_ms=50) == []
        child = subprocess.Popen([sys.executable, "-c", _FAST_PRODUCER, broker.data_dir, str(n)],
                                 env={**os.environ, "PYTHONPATH": os.getcwd()})
        got = _poll_until(reader, n, timeout_s=90)
        assert child.wait(timeout=60) == 0
    finally:
        reader.close()
    assert [r.offset for r in got] == list(range(n))
    bad = [r.offset for r in got if r.value != _value(r.offset)]
    assert bad == []


def test_records_read_from_a_ring_are_in_the_log_after_a_kill_9_of_the_whole_broker(topic):
    broker, pid = topic
    reader = Consumer("r", broker=broker.data_dir, auto_offset_reset="earliest")
    try:
        assert reader.poll(timeout_ms=50) == []
        with Producer(broker=broker.data_dir, acks=0) as producer:
            os.kill(pid, signal.SIGSTOP)  # nothing reaches the log before the kill
            for i in range(10):
                producer.send("r", b"x%d" % i)
            producer.flush()
            got = _poll_until(reader, 10)
            assert [r.value for r in got] == [b"x%d" % i for i in range(10)]
            broker.kill9()
    finally:
        reader.close()
    broker.start()
    broker.wait_running({("r", 0)})
    with Consumer("r", broker=broker.data_dir, auto_offset_reset="earliest",
                  read_rings=False) as log_only:
        assert _fields(_poll_until(log_only, 10)) == _fields(got)


def test_a_position_producers_took_past_the_log_is_waited_at_by_every_reader_not_reset(
        make_broker):
    """A ring reader's position (and so a committed offset) may run ahead of the log. A
    reader that reads only the log, here or through the router (as the Kafka listener's
    fetch does), waits there until the log comes; it is not out of range (Kafka clients would
    reset their position)."""
    broker = make_broker(serve_args=("--listen", "tcp://127.0.0.1:*"))
    address = broker.wait_running()["router_endpoint"]
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("r", 1)
    (pid,) = broker.partition_pids(broker.wait_running({("r", 0)})).values()
    control = _control(broker.data_dir, "r")
    with Producer(broker=broker.data_dir, acks=0) as producer:
        producer.send("r", b"first")
        producer.flush()
        wait_for(lambda: control.read_state().high_watermark == 1, 10, "the first append")
        os.kill(pid, signal.SIGSTOP)
        try:
            producer.send("r", b"second")
            producer.send("r", b"third")
            producer.flush()  # acks=0: in the ring
            ring_reader = Consumer("r", broker=broker.data_dir, auto_offset_reset="earliest")
            got = _poll_until(ring_reader, 3)
            assert [r.value for r in got] == [b"first", b"second", b"third"]
            ring_reader.close()
            ahead = 3  # past the log's end (1): a committed offset could be this
            local = Consumer("r", broker=broker.data_dir, auto_offset_reset="earliest",
                             read_rings=False)
            remote = Consumer("r", broker=address, auto_offset_reset="earliest")
            local.assign([("r", 0)])
            remote.assign([("r", 0)])
            local.seek(("r", 0), ahead)
            remote.seek(("r", 0), ahead)
            assert local.poll(timeout_ms=300) == [] and remote.poll(timeout_ms=300) == []
            assert local.position(("r", 0)) == ahead and remote.position(("r", 0)) == ahead
        finally:
            os.kill(pid, signal.SIGCONT)
        producer.send("r", b"fourth")
        producer.flush()
        assert [(r.offset, r.value) for r in _poll_until(local, 1)] == [(3, b"fourth")]
        assert [(r.offset, r.value) for r in _poll_until(remote, 1)] == [(3, b"fourth")]
        local.close()
        remote.close()
    control.close()


def test_a_frame_released_before_the_consumer_looked_is_read_from_the_log_in_one_call(
        topic, monkeypatch):
    """A caught-up ring reader whose next record's frame the partition already appended and
    released (a ping-pong's slow hop) gets it from the log in the same poll: ring_take does
    not sleep on an offset the published high watermark already passed (nor count itself as
    an hw waiter, which would wake a dozing partition), and poll reads it with one tail_read
    call, not the general path. Every record comes once, in order."""
    import shmbroker.client.consumer as consumer_module
    from shmbroker.layout import shm as L
    from shmbroker.native import _native

    calls: list = []

    class Observed:  # the real extension, with tail_read's statuses recorded
        def tail_read(self, *args):
            result = _native.tail_read(*args)
            calls.append(result[0])
            return result

        def __getattr__(self, name):
            return getattr(_native, name)

    broker, _ = topic
    control = _control(broker.data_dir, "r")
    consumer = Consumer("r", broker=broker.data_dir, auto_offset_reset="earliest")
    try:
        assert consumer.poll(timeout_ms=50) == []  # caught up, ring reads set up
        monkeypatch.setattr(consumer_module, "_native", Observed())
        collects = []
        original = Consumer._collect
        monkeypatch.setattr(Consumer, "_collect",
                            lambda self, n: collects.append(n) or original(self, n))
        with Producer(broker=broker.data_dir, acks=1) as producer:
            for i in range(5):  # bounded
                producer.send("r", b"r%d" % i, partition=0).result(timeout=10)  # appended
                writer = producer._writers[("r", 0)]
                wait_for(lambda: _native.atomic_load_u64(writer.buf, L.RING["read_position"])
                         == writer.written_position, what="the frame's space released")
                assert control.read_state().high_watermark == i + 1
                calls.clear()
                got = consumer.poll(timeout_ms=5_000, max_records=10)
                assert [(r.offset, r.value) for r in got] == [(i, b"r%d" % i)]
                if i == 0:  # the first log read finds the segment (the general path)
                    collects.clear()
                    continue
                assert calls == [_native.TAIL_RECORDS]
        assert collects == [], "the general path ran only for the first log read"
    finally:
        consumer.close()
        control.close()
