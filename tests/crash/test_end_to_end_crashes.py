"""kill -9 under load, end to end: producer processes and consumer processes run against a real
`shmbroker serve` while a partition process, or the whole broker, is killed. Acknowledged
records are never lost or duplicated, and consumers carry on without a restart.

Workers and checks: tests/integration/e2e_workers.py."""
from __future__ import annotations

import os
import signal
import time

import pytest
from broker_harness import WAIT_S_MAX, wait_for
from e2e_workers import (SPAWN, check_consumed_partition, consume, create_topic, join_all,
                         load_consumed, our_shm, produce, read_acks, start, stop_all)

pytestmark = pytest.mark.slow


def test_kill_9_of_partition_processes_while_consumers_consume(make_broker, tmp_path):
    """2 producers x 100k records into 2 partitions; consumer A reads both partitions,
    consumer B partition 1, while the test kill -9s a partition process three times. Each is
    restarted; the producers finish (exit 0); the same consumer processes carry on and read
    every offset exactly once, in order, each acknowledged record at its acked offset with its
    producer's crc32."""
    broker = make_broker()
    create_topic(broker.data_dir, "k", 2)
    count, producers = 100_000, 2
    outs = {i: str(tmp_path / f"p{i}.acks") for i in range(producers)}
    got = {"a": str(tmp_path / "a.npz"), "b": str(tmp_path / "b.npz")}
    progress = {c: SPAWN.Array("q", 1, lock=False) for c in got}
    procs = []
    try:
        readies = {c: SPAWN.Event() for c in got}
        consumers = {
            "a": start(consume, broker.data_dir, "k", None, count * producers, got["a"],
                       ready=readies["a"], progress=progress["a"], deadline_s=90),
            "b": start(consume, broker.data_dir, "k", [1], count * producers // 2, got["b"],
                       ready=readies["b"], progress=progress["b"], deadline_s=90)}
        procs += consumers.values()
        assert all(r.wait(WAIT_S_MAX) for r in readies.values())
        procs += [start(produce, broker.data_dir, "k", i, count, 2, outs[i], chunk=5_000)
                  for i in range(producers)]
        seen_at_kill = []
        for kill in range(3):
            wait_for(lambda: len(read_acks(outs[0])) >= 20_000 * (kill + 1), 60,
                     "the producers to make progress")
            wait_for(lambda: progress["a"][0] > (seen_at_kill[-1] if seen_at_kill else 0), 30,
                     "consumer A to make progress")
            seen_at_kill.append(progress["a"][0])
            victim = ("k", kill % 2)
            old = broker.partition_pids(broker.wait_running())[victim]
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: broker.partition_pids(broker.wait_running()).get(victim)
                     not in (None, old), 5, "the partition to be restarted")
        join_all(procs, 120)
    finally:
        stop_all(procs)
    assert broker.stop() == 0
    acks = {i: read_acks(outs[i]) for i in range(producers)}
    assert all(len(a) == count for a in acks.values())
    a, b = load_consumed(got["a"]), load_consumed(got["b"])
    # The same processes read before, across and after the kills: no consumer restarted.
    assert (int(a["pid"]), int(b["pid"])) == (consumers["a"].pid, consumers["b"].pid)
    assert 0 < seen_at_kill[0] and seen_at_kill[-1] < count * producers
    for consumed in (a, b):
        assert consumed["extra"] == 0, "a consumer saw more records than were produced"
    assert check_consumed_partition(a, 0, acks) == count
    assert check_consumed_partition(a, 1, acks) == count
    assert check_consumed_partition(b, 1, acks) == count
    assert "partition k/0 open" in broker.log() and broker.log().count("partition k/1 open") >= 2


def test_kill_9_of_the_whole_broker_under_load_then_restart_every_acked_record_is_read(
        make_broker, tmp_path):
    """3 producers x 60k records into 2 partitions and a consumer of both run while the whole
    broker is killed (kill -9 of its process group) and started again. The producers and the
    consumer carry on; a fresh consumer reading from the beginning finds every acknowledged
    record exactly once at its acked offset, intact; after the clean stop nothing of ours is
    left in /dev/shm."""
    broker = make_broker()
    create_topic(broker.data_dir, "w", 2)
    count, producers = 60_000, 3
    total = count * producers
    outs = {i: str(tmp_path / f"p{i}.acks") for i in range(producers)}
    live, fresh = str(tmp_path / "live.npz"), str(tmp_path / "fresh.npz")
    progress = SPAWN.Array("q", 1, lock=False)
    procs = []
    try:
        ready = SPAWN.Event()
        live_consumer = start(consume, broker.data_dir, "w", None, total, live, ready=ready,
                              progress=progress, deadline_s=90)
        procs.append(live_consumer)
        assert ready.wait(WAIT_S_MAX)
        producer_procs = [start(produce, broker.data_dir, "w", i, count, 2, outs[i],
                                chunk=5_000) for i in range(producers)]
        procs += producer_procs
        wait_for(lambda: min(len(read_acks(o)) for o in outs.values()) >= 10_000
                 and progress[0] > 0, 60, "producers and the consumer to make progress")
        broker.kill9()
        acked_before = {i: read_acks(outs[i]).copy() for i in range(producers)}
        wait_for(lambda: not broker.group_alive(), 10, "every broker process to be gone")
        time.sleep(0.3)  # producers block on acks / full rings meanwhile
        restarted = make_broker()
        join_all(producer_procs, 120)
        join_all([live_consumer], 60)
        procs.append(start(consume, broker.data_dir, "w", None, total, fresh))
        join_all(procs, 60)
    finally:
        stop_all(procs)
    acks = {i: read_acks(outs[i]) for i in range(producers)}
    assert all(len(a) == count for a in acks.values())
    assert sum(len(a) for a in acked_before.values()) >= 30_000
    for name in (live, fresh):
        consumed = load_consumed(name)
        assert consumed["extra"] == 0, f"{name}: more records than were produced"
        seen = sum(check_consumed_partition(consumed, p, acks) for p in range(2))
        assert seen == total
        # Everything acknowledged before the kill is there too, at the same offsets (a
        # subset of the final acks, checked explicitly because it is the crash guarantee).
        assert sum(check_consumed_partition(consumed, p, acked_before)
                   for p in range(2)) == total
    assert int(load_consumed(live)["pid"]) == live_consumer.pid
    assert restarted.stop() == 0
    assert "adopted 2 control region(s)" in restarted.log()
    assert our_shm(broker.data_dir) == []  # nothing of ours left after the clean stop
