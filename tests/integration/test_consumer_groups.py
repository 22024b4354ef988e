"""Consumer(..., group=...) against a real broker (`shmbroker serve`): partitions shared out
within a group, every group sees every record, committed offsets resume, a kill -9'd member's
partitions move to the survivors. Members run in spawned processes (``_member``), each writing
what it received and its assignment changes as JSON lines to its own file."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from collections import Counter

import pytest
from broker_harness import WAIT_S_MAX, wait_for
from produce_helpers import make_value, parse_value

from shmbroker import Admin, Consumer, Producer, errors
from shmbroker.client.types import TopicPartition

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("stop_resource_tracker")]
TOPIC = "t"
PARTITIONS = 6
#: A member process exits by itself after this long (in case the test that started it died).
MEMBER_LIFETIME_S = 50.0
#: Members heartbeat this often, so rebalances take milliseconds.
HEARTBEAT_MS = 20
#: What "within a few seconds" means for a kill -9'd member's partitions to move.
DEAD_MEMBER_MOVE_S_MAX = 5.0


def _member(data_dir: str, group: str, out_path: str, stop_path: str, options: dict) -> None:
    """A group member in its own process: poll, record what came, until ``stop_path`` exists
    (a file rather than a multiprocessing Event: no semaphore for the resource tracker)."""
    out = open(out_path, "a", buffering=1)

    def emit(kind: str, **fields) -> None:
        out.write(json.dumps({"event": kind, "pid": os.getpid(), **fields}) + "\n")

    consumer = Consumer(TOPIC, broker=data_dir, group=group, auto_offset_reset="earliest",
                        heartbeat_interval_ms=HEARTBEAT_MS,
                        on_assign=lambda tps: emit("assign", partitions=[p for _, p in tps]),
                        on_revoke=lambda tps: emit("revoke", partitions=[p for _, p in tps]),
                        **options)
    deadline = time.monotonic() + MEMBER_LIFETIME_S
    try:
        while not os.path.exists(stop_path) and time.monotonic() < deadline:  # bounded
            got = consumer.poll(timeout_ms=50)
            if got:
                emit("records", records=[[r.partition, r.offset, parse_value(r.value)[1]]
                                         for r in got])
    finally:
        consumer.close()
        emit("closed")


class Members:
    """Spawned member processes; all stopped (or killed) at teardown."""

    def __init__(self, data_dir: str, tmp_path):
        self.data_dir = data_dir
        self.tmp_path = tmp_path
        self.ctx = multiprocessing.get_context("spawn")
        self.stop_path = str(tmp_path / "stop-members")
        self.procs: list = []

    def start(self, count: int, group: str = "g", **options) -> list:
        started = []
        for _ in range(count):
            path = str(self.tmp_path / f"member-{len(self.procs)}.jsonl")
            proc = self.ctx.Process(target=_member, args=(self.data_dir, group, path,
                                                          self.stop_path, options))
            proc.start()
            proc.out_path = path
            self.procs.append(proc)
            started.append(proc)
        return started

    def close(self) -> None:
        open(self.stop_path, "w").close()
        for proc in self.procs:
            proc.join(timeout=WAIT_S_MAX)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=WAIT_S_MAX)
        for proc in self.procs:
            assert proc.exitcode in (0, -signal.SIGKILL), f"member exited with {proc.exitcode}"


def events(proc) -> list[dict]:
    try:
        with open(proc.out_path) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def owned(proc) -> set[int]:
    """The partitions ``proc`` owns now, by its own on_assign / on_revoke events."""
    current: set[int] = set()
    for e in events(proc):
        if e["event"] == "assign":
            current |= set(e["partitions"])
        elif e["event"] == "revoke":
            current -= set(e["partitions"])
    return current


def received(proc) -> list[tuple[int, int, int]]:
    """(partition, offset, sequence) of every record ``proc`` processed."""
    return [tuple(r) for e in events(proc) if e["event"] == "records" for r in e["records"]]


def balanced(procs, per_member: int):
    """Each process owns ``per_member`` partitions and together they own each partition once."""
    shares = [owned(p) for p in procs]
    together = [p for share in shares for p in share]
    if all(len(s) == per_member for s in shares) and sorted(together) == list(range(PARTITIONS)):
        return shares
    return None


@pytest.fixture
def members(broker, tmp_path):
    made = Members(broker.data_dir, tmp_path)
    yield made
    made.close()



@pytest.fixture
def topic(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic(TOPIC, PARTITIONS)
    broker.wait_running(partitions={(TOPIC, p) for p in range(PARTITIONS)})
    return TOPIC


def produce(data_dir: str, first: int, count: int) -> None:
    """Records with sequences first..first+count-1, spread round robin over the partitions."""
    with Producer(broker=data_dir) as producer:
        for seq in range(first, first + count):
            producer.send(TOPIC, make_value(0, seq), partition=seq % PARTITIONS)
        producer.flush()


def drain(consumer: Consumer, want: int, timeout_s: float = WAIT_S_MAX) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:  # bounded by the deadline
        got.extend(consumer.poll(timeout_ms=100))
    return got


def test_three_member_processes_share_six_partitions_and_process_each_record_once(
        broker, topic, members):
    procs = members.start(3)
    shares = wait_for(lambda: balanced(procs, 2), what="3 members owning 2 partitions each")
    produce(broker.data_dir, 0, 600)
    wait_for(lambda: sum(len(received(p)) for p in procs) >= 600, what="600 records")
    time.sleep(0.2)  # a record processed twice would show up now
    everything = [r for p in procs for r in received(p)]
    assert sorted(seq for _, _, seq in everything) == list(range(600))  # once each
    for proc, share in zip(procs, shares):
        assert {partition for partition, _, _ in received(proc)} == share
    with Admin(broker=broker.data_dir) as admin:
        described = admin.describe_group("g")
    assert described["state"] == "Stable"
    assert sorted(len(m["assignment"]) for m in described["members"]) == [2, 2, 2]
    assert {m["pid"] for m in described["members"]} == {p.pid for p in procs}


def test_two_groups_on_one_topic_each_receive_every_record(broker, topic):
    with Consumer(TOPIC, broker=broker.data_dir, group="a", auto_offset_reset="earliest") as a, \
            Consumer(TOPIC, broker=broker.data_dir, group="b", auto_offset_reset="earliest") as b:
        assert a.poll() == [] and b.poll() == []  # joins: each alone in its group
        assert a.assignment() == b.assignment() == {TopicPartition(TOPIC, p)
                                                    for p in range(PARTITIONS)}
        produce(broker.data_dir, 0, 300)
        for consumer in (a, b):
            got = drain(consumer, 300)
            assert sorted(parse_value(r.value)[1] for r in got) == list(range(300))


def test_a_new_member_resumes_after_the_offsets_its_predecessor_committed(broker, topic):
    produce(broker.data_dir, 0, 120)
    first = Consumer(TOPIC, broker=broker.data_dir, group="g", auto_offset_reset="earliest",
                     enable_auto_commit=False)
    try:
        with pytest.raises(errors.IllegalStateError, match="group"):
            first.assign([(TOPIC, 0)])
        got = drain(first, 120)
        assert sorted(parse_value(r.value)[1] for r in got) == list(range(120))
        assert first.committed((TOPIC, 0)) is None
        first.commit()
        assert all(first.committed((TOPIC, p)) == 20 for p in range(PARTITIONS))
        # An explicit offset: partition 0 is committed back to 15, so 15..19 come again.
        first.commit(offsets={TopicPartition(TOPIC, 0): 15})
        assert first.committed((TOPIC, 0)) == 15
    finally:
        first.close()
    produce(broker.data_dir, 120, 60)
    with Consumer(TOPIC, broker=broker.data_dir, group="g", auto_offset_reset="earliest") as second:
        got = drain(second, 65)
        assert second.position((TOPIC, 1)) == 30
        again = sorted((r.partition, r.offset) for r in got if parse_value(r.value)[1] < 120)
        assert again == [(0, offset) for offset in range(15, 20)]
        assert sorted(parse_value(r.value)[1] for r in got if parse_value(r.value)[1] >= 120) \
            == list(range(120, 180))
    # close() committed the positions (auto-commit on): a third member starts at the end.
    with Consumer(TOPIC, broker=broker.data_dir, group="g", auto_offset_reset="earliest") as third:
        assert third.poll(timeout_ms=200) == []
        assert {third.position((TOPIC, p)) for p in range(PARTITIONS)} == {30}


@pytest.mark.parametrize("protocols", [["cooperative-sticky", "range"], ["cooperative-sticky"]],
                         ids=["eager", "cooperative"])
def test_a_kill9_members_partitions_move_to_the_survivors_and_no_record_is_lost(
        broker, topic, members, protocols):
    procs = members.start(3, auto_commit_interval_ms=100, group_protocols=protocols)
    wait_for(lambda: balanced(procs, 2), what="3 members owning 2 partitions each")
    produce(broker.data_dir, 0, 300)
    wait_for(lambda: sum(len(received(p)) for p in procs) >= 300, what="the first 300 records")
    victim, survivors = procs[0], procs[1:]
    victim_partitions = owned(victim)
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    victim.join(timeout=WAIT_S_MAX)
    wait_for(lambda: balanced(survivors, 3), timeout_s=DEAD_MEMBER_MOVE_S_MAX,
             what="the survivors to own every partition")
    moved_s = time.monotonic() - killed_at
    print(f"kill -9 -> survivors own every partition: {moved_s * 1000:.0f} ms")
    produce(broker.data_dir, 300, 300)
    wait_for(lambda: {s for p in procs for _, _, s in received(p)} == set(range(600)),
             what="every record, the dead member's included")
    time.sleep(0.2)
    counts = Counter((partition, offset) for p in procs for partition, offset, _ in received(p))
    twice = {key for key, n in counts.items() if n > 1}
    # Only records the dead member processed and had not committed come again.
    assert all(n <= 2 for n in counts.values())
    assert {partition for partition, _ in twice} <= victim_partitions
    assert twice <= {(partition, offset) for partition, offset, _ in received(victim)}


def _forked_child(consumer: Consumer, conn) -> None:
    """Use the parent's consumer in a forked child: it must join as a member of its own."""
    deadline = time.monotonic() + WAIT_S_MAX
    while len(consumer.assignment()) != PARTITIONS // 2 and time.monotonic() < deadline:
        consumer.poll(timeout_ms=20)  # bounded by the deadline
    conn.send(sorted(p for _, p in consumer.assignment()))
    while not conn.poll() and time.monotonic() < deadline:  # until the parent has seen its half
        consumer.poll(timeout_ms=20)
    consumer.close()


def test_a_forked_child_joins_as_a_new_member_and_the_partitions_are_shared(broker, topic):
    with Consumer(TOPIC, broker=broker.data_dir, group="g", auto_offset_reset="earliest",
                  heartbeat_interval_ms=HEARTBEAT_MS) as parent:
        parent.poll()
        assert len(parent.assignment()) == PARTITIONS
        ctx = multiprocessing.get_context("fork")
        mine, theirs = ctx.Pipe()
        child = ctx.Process(target=_forked_child, args=(parent, theirs))
        child.start()
        try:
            deadline = time.monotonic() + WAIT_S_MAX
            while not mine.poll() and time.monotonic() < deadline:  # bounded by the deadline
                parent.poll(timeout_ms=20)  # heartbeats: the parent takes part in the rebalance
            assert mine.poll(), "the forked child did not get its share"
            child_share = set(mine.recv())
            wait_for(lambda: parent.poll() == [] and len(parent.assignment()) == PARTITIONS // 2,
                     what="the parent to keep half")
            assert child_share | {p for _, p in parent.assignment()} == set(range(PARTITIONS))
            mine.send("done")
        finally:
            child.join(timeout=WAIT_S_MAX)
            if child.is_alive():
                child.kill()
                child.join(timeout=WAIT_S_MAX)
        assert child.exitcode == 0
        # The child left: the parent gets everything back.
        wait_for(lambda: parent.poll() == [] and len(parent.assignment()) == PARTITIONS,
                 what="the parent to own every partition again")
