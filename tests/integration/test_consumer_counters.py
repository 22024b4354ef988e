"""Records and bytes *out*: every local consumer counts what it hands out in a counters region
of its own (issue 6 §1); `shmbroker top` and the Prometheus text add them up per partition,
and a consumer's region goes with it: at close, or, after a kill -9, at the supervisor's
next sweep."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from broker_harness import run_cli, wait_for
from prometheus_text import parse, value

from shmbroker import Admin, Consumer, Producer
from shmbroker.client.types import TopicPartition
from shmbroker.monitor.prometheus import render
from shmbroker.monitor.snapshot import Monitor
from shmbroker.shm import names

pytestmark = pytest.mark.timeout(120)


def consumer_regions(data_dir: str) -> list[str]:
    start = names.consumer_counters_prefix(names.broker_prefix(data_dir))
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(start))


def produce(data_dir: str, counts: dict[int, int]) -> None:
    with Producer(broker=data_dir) as producer:
        for partition, count in counts.items():
            for i in range(count):
                producer.send("out", b"%05d" % i * 20, partition=partition)
        producer.flush()


def consume(consumer: Consumer, count: int, max_records: int = 10_000) -> list:
    got: list = []
    wait_for(lambda: got.extend(consumer.poll(timeout_ms=100, max_records=max_records))
             or len(got) >= count, what=f"{count} records")
    assert len(got) == count
    return got


def log_bytes(data_dir: str, partition: int) -> int:
    return os.path.getsize(os.path.join(data_dir, f"out-{partition}", "00000000000000000000.log"))


@pytest.fixture
def topic(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("out", 2)
    broker.wait_running({("out", 0), ("out", 1)})
    return "out"


def test_a_local_consumer_counts_records_and_bytes_out_per_partition_as_top_shows(broker, topic):
    produce(broker.data_dir, {0: 300, 1: 200})
    with Consumer(topic, broker=broker.data_dir, auto_offset_reset="earliest") as consumer:
        consume(consumer, 500)
        [region] = consumer_regions(broker.data_dir)
        assert oct(os.stat(f"/dev/shm/{region}").st_mode & 0o777) == "0o600"
        shown = json.loads(run_cli("top", "--once", "--json", "--data-dir",
                                   broker.data_dir).stdout)
        [row] = shown["consumers"]
        assert row["pid"] == os.getpid() and row["counters"]["records_out"] == 500
        by_partition = {r["partition"]: r for r in row["partitions"]}
        assert {p: r["records_out"] for p, r in by_partition.items()} == {0: 300, 1: 200}
        assert all(r["topic"] == "out" for r in row["partitions"])
        # Every batch of the log was read once: bytes out is the log's size.
        assert {p: r["bytes_out"] for p, r in by_partition.items()} == \
            {0: log_bytes(broker.data_dir, 0), 1: log_bytes(broker.data_dir, 1)}
        assert row["counters"]["bytes_out"] == sum(r["bytes_out"] for r in row["partitions"])
        assert row["counters"]["partitions"] == 2 and row["counters"]["polls"] >= 1
    assert consumer_regions(broker.data_dir) == []  # close() unlinked it


def test_records_out_per_second_is_what_consumers_read_between_two_samples(broker, topic):
    produce(broker.data_dir, {0: 400})
    monitor = Monitor(broker.data_dir)
    try:
        with Consumer(broker=broker.data_dir, auto_offset_reset="earliest") as first, \
                Consumer(broker=broker.data_dir, auto_offset_reset="earliest") as second:
            first.assign([TopicPartition(topic, 0)])
            second.assign([TopicPartition(topic, 0)])
            consume(first, 100, max_records=100)
            before = monitor.sample()
            consume(first, 150, max_records=150)
            consume(second, 400)
            after = monitor.sample()
        rows = {p.partition: p for p in after.partitions}
        assert rows[0].records_out_per_s * after.interval_s == pytest.approx(550)
        assert rows[1].records_out_per_s == 0
        assert rows[0].bytes_out_per_s > 0 and len(after.consumers) == 2
        assert before.consumers and {c.pid for c in after.consumers} == {os.getpid()}
        # The Prometheus text: one series per consumer and partition, parsed.
        families = parse(render(after))
        total = sum(value(families, "shmbroker_consumer_partition_records_out_total",
                          consumer=c.name, pid=str(c.pid), topic="out", partition="0")
                    for c in after.consumers)
        assert total == 650
        # Closed consumers: gone from the next sample, and no negative rate.
        later = monitor.sample()
        assert later.consumers == [] and {p.records_out_per_s for p in later.partitions} == {0}
    finally:
        monitor.close()


def test_a_consumer_killed_with_kill_9_has_its_region_swept_by_the_broker(broker, topic):
    produce(broker.data_dir, {0: 10})
    script = textwrap.dedent(f"""
        import sys, time
        from shmbroker import Consumer
        c = Consumer("out", broker={broker.data_dir!r}, auto_offset_reset="earliest")
        n = 0
        for _ in range(200):
            n += len(c.poll(timeout_ms=50))
            if n >= 10:
                break
        print(n, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "10"
        [region] = consumer_regions(broker.data_dir)
        assert f".consumer.{proc.pid}." in region
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: consumer_regions(broker.data_dir) == [], 15,
                 "the supervisor to sweep the dead consumer's region")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


def test_a_clean_stop_removes_the_regions_of_consumers_still_open(broker, topic):
    consumer = Consumer(topic, broker=broker.data_dir)
    try:
        assert len(consumer_regions(broker.data_dir)) == 1
        broker.stop()
        assert consumer_regions(broker.data_dir) == []
    finally:
        consumer.close()  # its region is gone already: close says nothing of it


def test_a_poll_served_from_a_ring_is_counted_at_the_start_of_the_next_poll(broker, topic):
    """The one-partition ring fast path hands records out without publishing its counters
    (the publish would sit between the producer's commit and the application): the next poll
    publishes them first thing, before it may sleep (none was published yet, so none is
    too recent). The partition process is stopped (SIGSTOP) meanwhile, so the record is
    certainly read from the ring, not from the log."""
    from shmbroker.shm.counters import CountersReader

    pids = broker.partition_pids(broker.wait_running())
    with Consumer(broker=broker.data_dir, auto_offset_reset="earliest") as consumer, \
            Producer(broker=broker.data_dir, acks=0) as producer:
        consumer.assign([TopicPartition(topic, 0)])
        assert consumer.poll(timeout_ms=50) == []  # caught up: at the high watermark
        [region] = consumer_regions(broker.data_dir)
        os.kill(pids[(topic, 0)], signal.SIGSTOP)
        try:
            with CountersReader.attach(region) as reader:
                producer.send(topic, b"from the ring", partition=0)
                got = consumer.poll(timeout_ms=5_000)
                assert [r.value for r in got] == [b"from the ring"]
                assert reader.read()["records_out"] == 0, "not published on the way out"
                assert consumer.poll(timeout_ms=0) == []
                assert reader.read()["records_out"] == 1
        finally:
            os.kill(pids[(topic, 0)], signal.SIGCONT)


def test_ring_fast_path_counters_are_published_at_most_once_per_interval(broker, topic,
                                                                         monkeypatch):
    """A publish costs about a microsecond of Python, a tenth of a spinning round trip: the
    fast path's counters wait for the first poll COUNTERS_PUBLISH_NS after the last publish,
    and then count every poll that returned records, none lost."""
    import shmbroker.client.consumer as consumer_module
    from shmbroker.shm.counters import CountersReader

    monkeypatch.setattr(consumer_module, "COUNTERS_PUBLISH_NS", 3_600 * 10**9)
    pids = broker.partition_pids(broker.wait_running())
    with Consumer(broker=broker.data_dir, auto_offset_reset="earliest") as consumer, \
            Producer(broker=broker.data_dir, acks=0) as producer:
        consumer.assign([TopicPartition(topic, 0)])
        assert consumer.poll(timeout_ms=50) == []
        [region] = consumer_regions(broker.data_dir)
        os.kill(pids[(topic, 0)], signal.SIGSTOP)
        try:
            with CountersReader.attach(region) as reader:
                producer.send(topic, b"first", partition=0)
                assert [r.value for r in consumer.poll(timeout_ms=5_000)] == [b"first"]
                assert consumer.poll(timeout_ms=0) == []  # publishes: none published before
                first = reader.read()
                assert (first["records_out"], first["polls"]) == (1, 1)
                for payload in (b"second", b"third"):
                    producer.send(topic, payload, partition=0)
                    assert [r.value for r in consumer.poll(timeout_ms=5_000)] == [payload]
                    assert consumer.poll(timeout_ms=0) == []
                    assert reader.read()["records_out"] == 1, "published within the interval"
                consumer._counters_next_ns = 0  # the interval has passed
                assert consumer.poll(timeout_ms=0) == []
                later = reader.read()
                assert (later["records_out"], later["polls"]) == (3, 3)
        finally:
            os.kill(pids[(topic, 0)], signal.SIGCONT)
