"""Consumers in other processes: futex wake-ups, idle CPU, fork and spawn."""
from __future__ import annotations

import multiprocessing
import time

import psutil
import pytest
from fake_partitions import FakePartitions, wait_until

from shmbroker import Consumer

pytestmark = pytest.mark.usefixtures("stop_resource_tracker")

POLL_TIMEOUT_MS = 10_000


@pytest.fixture
def parts(data_dir):
    fake = FakePartitions(data_dir)
    yield fake
    fake.close()



def _blocked_consumer(data_dir, tps, conn) -> None:
    consumer = Consumer(broker=data_dir)
    consumer.assign(tps)
    consumer.seek_to_end()
    conn.send("ready")
    got = consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
    received = time.monotonic()
    conn.send(([(r.partition, r.offset, r.value) for r in got], received))
    consumer.close()


def _run_blocked(data_dir, tps, publish, wakeups=None) -> tuple[list, float, float]:
    """Start a consumer blocked in poll, check it idles, publish, return what it got and when.
    ``wakeups``: a list that gets the consumer's voluntary context switches in the idle 0.5 s."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_blocked_consumer, args=(str(data_dir), tps, child))
    proc.start()
    try:
        assert parent.poll(30), "consumer process did not start"
        assert parent.recv() == "ready"
        time.sleep(0.1)  # let it go to sleep in poll
        ps = psutil.Process(proc.pid)
        before, switches = ps.cpu_times(), ps.num_ctx_switches().voluntary
        time.sleep(0.5)
        after = ps.cpu_times()
        if wakeups is not None:
            wakeups.append(ps.num_ctx_switches().voluntary - switches)
        idle_cpu_s = (after.user - before.user) + (after.system - before.system)
        published = time.monotonic()
        publish()
        assert parent.poll(POLL_TIMEOUT_MS / 1000 + 10), "consumer never returned from poll"
        got, received = parent.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert proc.exitcode == 0
    return got, received - published, idle_cpu_s


def test_a_consumer_blocked_in_poll_in_another_process_is_woken_by_the_publish(parts, data_dir):
    parts.create_topic("t", 1)
    parts.fill("t", 0, 5)
    got, latency_s, idle_cpu_s = _run_blocked(
        data_dir, [("t", 0)], lambda: parts.append("t", 0, [b"wake up"]))
    assert got == [(0, 5, b"wake up")]
    assert latency_s < 1.0, f"woken {latency_s:.3f} s after the publish"  # poll timeout: 10 s
    assert idle_cpu_s < 0.05, f"a blocked consumer used {idle_cpu_s:.3f} s CPU in 0.5 s"


def test_a_consumer_of_several_partitions_sleeps_on_all_of_them_and_is_woken_by_any(
        parts, data_dir):
    parts.create_topic("t", 3)
    wakeups: list = []
    got, latency_s, idle_cpu_s = _run_blocked(
        data_dir, [("t", 0), ("t", 1), ("t", 2)], lambda: parts.append("t", 2, [b"on p2"]),
        wakeups)
    assert got == [(2, 0, b"on p2")]
    assert latency_s < 1.0, f"woken {latency_s:.3f} s after the publish"
    assert idle_cpu_s < 0.05, f"a blocked consumer used {idle_cpu_s:.3f} s CPU in 0.5 s"
    # One futex_waitv sleep on the three words: no 5 ms rotation (that made ~100 wake-ups in
    # 0.5 s). A few context switches may come from the interpreter itself.
    assert wakeups[0] < 20, f"{wakeups[0]} wake-ups in 0.5 s of an idle poll"


def _drain_in_child(consumer_or_args, conn) -> None:
    if isinstance(consumer_or_args, Consumer):
        consumer = consumer_or_args  # inherited through fork
    else:
        data_dir, = consumer_or_args
        consumer = Consumer("t", broker=data_dir, auto_offset_reset="earliest")
    values = []
    while True:  # bounded: the topic holds a fixed number of records
        got = consumer.poll(timeout_ms=200)
        if not got:
            break
        values.extend(r.value for r in got)
    consumer.close()
    conn.send(values)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_consumers_created_in_forked_and_spawned_workers_read_everything(parts, data_dir, method):
    parts.create_topic("t", 1)
    values = parts.fill("t", 0, 200, per_batch=7)
    ctx = multiprocessing.get_context(method)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_drain_in_child, args=((str(data_dir),), child))
    proc.start()
    try:
        assert parent.poll(30)
        assert parent.recv() == values
    finally:
        proc.join(30)
    assert proc.exitcode == 0


def test_a_forked_child_rebuilds_an_inherited_consumer_and_the_parent_carries_on(parts, data_dir):
    parts.create_topic("t", 1)
    values = parts.fill("t", 0, 100, per_batch=10)
    consumer = Consumer("t", broker=data_dir, auto_offset_reset="earliest")
    try:
        first = consumer.poll(max_records=30)
        assert len(first) == 30
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_drain_in_child, args=(consumer, child))
        proc.start()
        try:
            assert parent.poll(30)
            assert parent.recv() == values[30:]  # the child starts at the parent's position
        finally:
            proc.join(30)
        assert proc.exitcode == 0
        # The parent's maps and regions were not touched by the child's rebuild or close.
        rest = []
        wait_until(lambda: rest.extend(consumer.poll(timeout_ms=100)) or len(rest) >= 70,
                   what="parent to read the rest")
        assert [r.value for r in first + rest] == values
    finally:
        consumer.close()
