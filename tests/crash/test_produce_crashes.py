"""kill -9 in the data plane: of a producer, of a partition process, of the whole broker.
Nothing acknowledged is lost, nothing is appended twice, nothing wedges, no partial record
reaches the log, and the shared memory of the dead is reclaimed."""
from __future__ import annotations

import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from broker_harness import WAIT_S_MAX, wait_for
from produce_helpers import (assert_logs_whole, check_exactly_once, read_acked,
                             spawn_producer)

from shmbroker import Admin, Consumer
from shmbroker.shm import names
from shmbroker.shm.control import ControlRegion

pytestmark = pytest.mark.slow


def create_topic(data_dir, name, partitions):
    with Admin(broker=data_dir) as admin:
        admin.create_topic(name, partitions)


def acked_count(path: str) -> int:
    try:
        return len(read_acked(path)[0])
    except FileNotFoundError:
        return 0


def our_shm(data_dir: str) -> list[str]:
    prefix = names.broker_prefix(data_dir)
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


def slots_of(data_dir: str, topic: str, partitions: int) -> list:
    out = []
    for p in range(partitions):
        ctl = ControlRegion.attach(names.control_name(names.broker_prefix(data_dir), topic, p),
                                   readonly=True)
        try:
            out += ctl.slots()
        finally:
            ctl.close()
    return out


def test_kill_9_of_a_producer_mid_stream_wedges_nothing_and_its_slot_is_reclaimed(
        make_broker, tmp_path):
    broker = make_broker()
    create_topic(broker.data_dir, "s", 2)
    ctx = multiprocessing.get_context("spawn")
    outs = {i: str(tmp_path / f"p{i}.json") for i in range(3)}
    procs = {i: spawn_producer(ctx, broker.data_dir, "s", i, 150_000, 2, outs[i], chunk=5_000)
             for i in range(3)}
    wait_for(lambda: acked_count(outs[0]) >= 10_000, what="the victim to be under way")
    victim = procs.pop(0)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(WAIT_S_MAX)
    for proc in procs.values():
        proc.join(120)
        assert proc.exitcode == 0
    # Its committed frames were drained, its rings unlinked and its slots freed.
    wait_for(lambda: not [s for s in slots_of(broker.data_dir, "s", 2) if s.pid == victim.pid],
             10, "the dead producer's registry slots to be freed")
    wait_for(lambda: not [n for n in our_shm(broker.data_dir) if ".r." in n], 10,
             "every ring to be gone")
    assert broker.stop() == 0
    check_exactly_once(broker.data_dir, "s", 2, {1: outs[1], 2: outs[2]}, 150_000,
                       partial={0: outs[0]})
    assert_logs_whole(broker.data_dir, "s", 2)


def test_kill_9_of_a_partition_process_under_load_loses_and_duplicates_nothing(
        make_broker, tmp_path):
    broker = make_broker()
    create_topic(broker.data_dir, "k", 2)
    ctx = multiprocessing.get_context("spawn")
    outs = {i: str(tmp_path / f"p{i}.json") for i in range(2)}
    procs = [spawn_producer(ctx, broker.data_dir, "k", i, 200_000, 2, outs[i], chunk=5_000)
             for i in range(2)]
    for kill in range(3):
        wait_for(lambda: acked_count(outs[0]) >= 20_000 * (kill + 1), 60,
                 "producers to make progress")
        pids = broker.partition_pids(broker.wait_running())
        os.kill(pids[("k", kill % 2)], signal.SIGKILL)
        wait_for(lambda: broker.partition_pids(broker.wait_running()).get(("k", kill % 2))
                 not in (None, pids[("k", kill % 2)]), 5, "the partition to be restarted")
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0  # the producers carried on without restarting
    assert broker.stop() == 0
    check_exactly_once(broker.data_dir, "k", 2, outs, 200_000)
    assert_logs_whole(broker.data_dir, "k", 2)


def test_kill_9_of_the_whole_broker_under_load_then_restart_keeps_every_acked_record(
        make_broker, tmp_path):
    broker = make_broker()
    create_topic(broker.data_dir, "w", 2)
    ctx = multiprocessing.get_context("spawn")
    outs = {i: str(tmp_path / f"p{i}.json") for i in range(3)}
    procs = {i: spawn_producer(ctx, broker.data_dir, "w", i, 150_000, 2, outs[i], chunk=5_000)
             for i in range(3)}
    wait_for(lambda: min(acked_count(outs[i]) for i in range(3)) >= 10_000, 60,
             "producers to make progress")
    # The whole broker and one producer die at once: that producer's committed frames are in
    # shared memory only, and the next broker must move them into the log.
    victim = procs.pop(0)
    os.kill(victim.pid, signal.SIGKILL)
    broker.kill9()
    victim.join(WAIT_S_MAX)
    time.sleep(0.3)  # the survivors block on full rings / missing acks meanwhile
    restarted = make_broker()  # same data dir: adopts the control regions, drains the rings
    for proc in procs.values():
        proc.join(120)
        assert proc.exitcode == 0
    wait_for(lambda: not [n for n in our_shm(broker.data_dir) if ".r." in n], 10,
             "the dead producer's rings to be drained and unlinked")
    assert restarted.stop() == 0
    seen = check_exactly_once(broker.data_dir, "w", 2, {1: outs[1], 2: outs[2]}, 150_000,
                              partial={0: outs[0]})
    assert_logs_whole(broker.data_dir, "w", 2)
    assert our_shm(broker.data_dir) == []  # nothing of ours left after the clean stop
    assert "adopted 2 control region(s)" in restarted.log()
    assert any(k[0] == 0 for k in seen)


#: A producer that commits records while its partition process is stopped, says so, and
#: waits to be killed.
_COMMIT_THEN_WAIT = r"""
import sys, time
from shmbroker import Producer
data_dir, topic, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
producer = Producer(broker=data_dir, acks=0)
for i in range(n):
    producer.send(topic, b"held-%d" % i, partition=0)
producer.flush()
print("committed", flush=True)
time.sleep(120)
"""


def test_a_clean_stop_that_has_to_kill_a_stuck_partition_keeps_its_frames_for_the_next_start(
        make_broker):
    """The partition process is stopped (SIGSTOP) while a producer commits 50 records (acks=0:
    in its ring, not in the log), then the producer is killed -9. SIGTERM of the broker: the
    stopped partition ignores it and is SIGKILLed after child_stop_timeout_ms; the stop still
    ends 0, and the ring holding the 50 frames is kept in /dev/shm (unlinking it would lose
    them) and named in the log. The next start on the data dir appends all 50, in order, and
    its clean stop leaves nothing behind."""
    broker = make_broker()
    create_topic(broker.data_dir, "h", 1)
    (pid,) = broker.partition_pids(broker.wait_running({("h", 0)})).values()
    os.kill(pid, signal.SIGSTOP)
    child = subprocess.Popen([sys.executable, "-c", _COMMIT_THEN_WAIT, broker.data_dir, "h", "50"],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        ready, _, _ = select.select([child.stdout], [], [], WAIT_S_MAX)
        assert ready and child.stdout.readline().strip() == "committed"
    finally:
        child.kill()
        child.wait(WAIT_S_MAX)
        child.stdout.close()
    assert broker.stop() == 0
    rings = [n for n in our_shm(broker.data_dir) if ".r." in n]
    assert len(rings) == 1, our_shm(broker.data_dir)
    log = broker.log()
    assert "ignored SIGTERM" in log
    assert "kept for the next start" in log and rings[0] in log
    restarted = make_broker()
    with Consumer("h", broker=broker.data_dir, auto_offset_reset="earliest") as consumer:
        got: list = []
        deadline = time.monotonic() + WAIT_S_MAX
        while len(got) < 50 and time.monotonic() < deadline:  # bounded by the deadline
            got += consumer.poll(timeout_ms=200)
    assert [(r.offset, r.value) for r in got] == [(i, b"held-%d" % i) for i in range(50)]
    assert restarted.stop() == 0
    assert our_shm(broker.data_dir) == []
