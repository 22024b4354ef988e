"""Consumer(..., group=...) against a real broker (`shmbroker serve`): partitions shared out
within a group, every group sees every record, committed offsets resume, a kill -9'd member's
partitions move to the survivors; commit_async and commit metadata; static membership; the
heartbeat thread. Members run in spawned processes (``_member``), each writing what it
received and its assignment changes as JSON lines to its own file, or in threads (``Polling``)
where the test drives another member from its own thread."""
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

    options = {"heartbeat_interval_ms": HEARTBEAT_MS, **options}
    consumer = Consumer(TOPIC, broker=data_dir, group=group, auto_offset_reset="earliest",
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


def coordinator_counters(data_dir: str) -> dict[str, int]:
    from shmbroker.layout import counters as CL
    from shmbroker.shm import names
    from shmbroker.shm.counters import CountersReader

    reader = CountersReader.attach(names.counters_name(names.broker_prefix(data_dir), "coordinator"),
                                   CL.KIND_COORDINATOR)
    try:
        return reader.read()
    finally:
        reader.close()


@pytest.mark.parametrize("protocols", [["cooperative-sticky", "range"], ["cooperative-sticky"]],
                         ids=["eager", "cooperative"])
def test_members_learn_of_a_rebalance_from_the_group_wake_word_long_before_their_heartbeat(
        broker, topic, members, protocols):
    slow = dict(heartbeat_interval_ms=20_000, session_timeout_ms=60_000, group_protocols=protocols)
    [a] = members.start(1, **slow)
    wait_for(lambda: owned(a) == set(range(PARTITIONS)), what="the first member owns everything")
    time.sleep(0.5)  # a's next heartbeat (from poll or its thread) is ~19 s away
    before = coordinator_counters(broker.data_dir)
    started = time.monotonic()
    [b] = members.start(1, **slow)
    # Only the wake word can tell a in time: its heartbeat would take ~19 s more.
    wait_for(lambda: balanced([a, b], PARTITIONS // 2), timeout_s=8.0,
             what="both members own three partitions")
    assert time.monotonic() - started < 8.0
    time.sleep(1.0)  # both keep polling: a spurious wake would show as another join
    after = coordinator_counters(broker.data_dir)
    # a rejoined on the word alone, with no heartbeat first; and neither member rejoined
    # again once settled (the answers named the word's value after their generation began).
    # Joins: b's and a's, plus, cooperative, both again for the follow-up generation.
    assert after["requests_heartbeat"] == before["requests_heartbeat"]
    assert after["requests_join"] - before["requests_join"] == (2 if len(protocols) > 1 else 4)


@pytest.mark.parametrize("protocols", [["cooperative-sticky", "range"], ["cooperative-sticky"]],
                         ids=["eager", "cooperative"])
def test_a_rejoin_is_one_join_round_trip_and_starts_at_the_offsets_the_previous_owner_committed(
        broker, topic, members, protocols):
    produce(broker.data_dir, 0, 60)
    # No periodic auto-commit in the window: the only commits are the revocations'.
    quiet = dict(group_protocols=protocols, auto_commit_interval_ms=600_000)
    [a] = members.start(1, **quiet)
    wait_for(lambda: len(received(a)) == 60 and owned(a) == set(range(PARTITIONS)),
             what="the first member consumed everything")
    before = coordinator_counters(broker.data_dir)
    [b] = members.start(1, **quiet)
    wait_for(lambda: balanced([a, b], PARTITIONS // 2), what="both members own three partitions")
    moved = coordinator_counters(broker.data_dir)
    # a committed what it gave up: eager, inside its join (no offset_commit request);
    # cooperative, alone, ahead of the follow-up join (docs/design/groups.md, "Decision: the
    # revocation commit rides on the join").
    assert moved["commits"] - before["commits"] == 1
    assert moved["requests_offset_commit"] - before["requests_offset_commit"] == \
        (0 if len(protocols) > 1 else 1)
    produce(broker.data_dir, 60, 60)
    wait_for(lambda: len(received(a)) + len(received(b)) >= 120, what="every record consumed")
    # b started where a had committed (at its revocation), not at auto_offset_reset: it
    # received nothing before sequence 60, and nothing came twice.
    assert min(seq for _, _, seq in received(b)) >= 60
    assert sorted(seq for _, _, seq in received(a) + received(b)) == list(range(120))
    after = coordinator_counters(broker.data_dir)
    # The share and the offsets came with each join's answer: no sync, no offset fetch.
    assert after["requests_sync"] == before["requests_sync"] == 0
    assert after["requests_offset_fetch"] == before["requests_offset_fetch"] == 0
    assert after["requests_join"] > before["requests_join"]


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


# --- commit_async, commit metadata ---------------------------------------------------------------

def test_commit_async_stores_the_offsets_and_runs_the_callbacks_in_order_from_a_later_poll(
        broker, topic):
    produce(broker.data_dir, 0, 60)
    calls: list = []
    with Consumer(TOPIC, broker=broker.data_dir, group="g", auto_offset_reset="earliest",
                  enable_auto_commit=False) as consumer:
        assert len(drain(consumer, 60)) == 60
        for offset in (3, 5, 7):
            consumer.commit_async({TopicPartition(TOPIC, 0): offset},
                                  callback=lambda offsets, error: calls.append((offsets, error)))
            # A callback runs from a later call only, never from the one that sent it.
            assert len(calls) <= [3, 5, 7].index(offset)
        deadline = time.monotonic() + WAIT_S_MAX
        while len(calls) < 3 and time.monotonic() < deadline:  # bounded by the deadline
            consumer.poll(timeout_ms=20)
        assert [(dict(o), e) for o, e in calls] == [
            ({TopicPartition(TOPIC, 0): offset}, None) for offset in (3, 5, 7)]
        assert consumer.committed((TOPIC, 0)) == 7
        # No offsets: the positions of every assigned partition, as commit() does.
        consumer.commit_async()
    # close() waited for that reply: the positions are stored.
    with Consumer(TOPIC, broker=broker.data_dir, group="g") as again:
        assert all(again.committed((TOPIC, p)) == 10 for p in range(PARTITIONS))


def test_commit_async_reports_a_failure_to_its_callback_and_a_sync_commit_runs_it_first(
        broker, topic):
    produce(broker.data_dir, 0, 6)
    with Consumer(TOPIC, broker=broker.data_dir, group="g", auto_offset_reset="earliest",
                  enable_auto_commit=False) as consumer:
        drain(consumer, 6)
        calls: list = []
        # A partition that does not exist: the coordinator refuses the whole commit.
        consumer.commit_async({TopicPartition(TOPIC, PARTITIONS + 3): 1},
                              callback=lambda offsets, error: calls.append(error))
        consumer.commit({TopicPartition(TOPIC, 1): 1})  # its reply comes after the first's
        assert len(calls) == 1 and isinstance(calls[0], errors.UnknownTopicOrPartitionError)
        # A callback that raises is logged; the consumer carries on.
        consumer.commit_async({TopicPartition(TOPIC, 2): 1}, callback=lambda o, e: 1 / 0)
        consumer.commit()
        assert consumer.committed((TOPIC, 2)) == 1


def test_commit_metadata_is_stored_with_the_offset_and_read_back(broker, topic):
    from shmbroker.client.types import OffsetAndMetadata

    produce(broker.data_dir, 0, 12)
    with Consumer(TOPIC, broker=broker.data_dir, group="g", auto_offset_reset="earliest",
                  enable_auto_commit=False) as consumer:
        drain(consumer, 12)
        consumer.commit({TopicPartition(TOPIC, 0): OffsetAndMetadata(2, "batch 17 of run 4"),
                         TopicPartition(TOPIC, 1): 1})
        assert consumer.committed((TOPIC, 0)) == 2
        assert consumer.committed((TOPIC, 0), metadata=True) == \
            OffsetAndMetadata(2, "batch 17 of run 4")
        assert consumer.committed((TOPIC, 1), metadata=True) == OffsetAndMetadata(1, "")
        assert consumer.committed((TOPIC, 2), metadata=True) is None
        with pytest.raises(errors.ConfigError, match="metadata"):
            consumer.commit({TopicPartition(TOPIC, 0): OffsetAndMetadata(2, b"bytes")})
        with pytest.raises(errors.InvalidRequestError):
            consumer.commit({TopicPartition(TOPIC, 0): OffsetAndMetadata(2, "x" * 100_000)})
        assert consumer.committed((TOPIC, 0), metadata=True).metadata == "batch 17 of run 4"


class Polling:
    """A group member polling in its own thread (a member blocked in a held join must not
    stop the others: in one thread two members would wait for each other). ``assignment``
    is a copy of its assignment after every poll; ``revoked`` what on_revoke was told."""

    def __init__(self, **options):
        import threading

        self.assignment: set = set()
        self.revoked: list = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._options = options
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(WAIT_S_MAX)

    def _run(self) -> None:
        try:
            consumer = Consumer(TOPIC, on_revoke=self.revoked.extend, **self._options)
        except BaseException as e:
            self.error = e
            self._ready.set()
            raise
        self._ready.set()
        try:
            deadline = time.monotonic() + MEMBER_LIFETIME_S
            while not self._stop.is_set() and time.monotonic() < deadline:  # bounded
                consumer.poll(timeout_ms=20)
                self.assignment = set(consumer.assignment())
        except BaseException as e:
            self.error = e
            raise
        finally:
            consumer.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S_MAX)
        assert not self._thread.is_alive()
        assert self.error is None, self.error


def poll_until(consumer: Consumer, condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S_MAX
    while not condition() and time.monotonic() < deadline:  # bounded by the deadline
        consumer.poll(timeout_ms=20)
    assert condition(), f"timed out waiting for {what}"


# --- static membership ---------------------------------------------------------------------------

def test_a_static_member_restarted_under_its_instance_id_gets_its_partitions_back_without_a_rebalance(
        broker, topic):
    options = dict(broker=broker.data_dir, group="g", auto_offset_reset="earliest",
                   heartbeat_interval_ms=HEARTBEAT_MS, session_timeout_ms=10_000)
    half = PARTITIONS // 2
    other = Polling(group_instance_id="w1", **options)
    first = Consumer(TOPIC, group_instance_id="w0", **options)
    try:
        poll_until(first, lambda: len(first.assignment()) == len(other.assignment) == half,
                   "two static members owning half each")
        mine = first.assignment()
        assert not mine & other.assignment
        revoked_before = list(other.revoked)
        with Admin(broker=broker.data_dir) as admin:
            generation = admin.describe_group("g")["generation_id"]
            first.close()  # a static member does not leave the group
            described = admin.describe_group("g")
            assert described["generation_id"] == generation
            assert sorted(m["group_instance_id"] for m in described["members"]) == ["w0", "w1"]
            time.sleep(0.3)  # the other member carries on meanwhile
            first = Consumer(TOPIC, group_instance_id="w0", **options)
            first.poll(timeout_ms=100)
            assert first.assignment() == mine
            time.sleep(0.3)
            assert admin.describe_group("g")["generation_id"] == generation
        assert other.revoked == revoked_before and len(other.assignment) == half
    finally:
        first.close()
        other.close()


# --- the heartbeat thread ------------------------------------------------------------------------

def test_a_member_busy_longer_than_its_session_timeout_between_polls_stays_in_the_group(
        broker, topic):
    options = dict(broker=broker.data_dir, group="g", heartbeat_interval_ms=50)
    half = PARTITIONS // 2
    other = Polling(**options)
    busy = Consumer(TOPIC, session_timeout_ms=400, **options)
    try:
        poll_until(busy, lambda: len(busy.assignment()) == len(other.assignment) == half,
                   "two members owning half each")
        mine = busy.assignment()
        with Admin(broker=broker.data_dir) as admin:
            generation = admin.describe_group("g")["generation_id"]
            time.sleep(1.6)  # "processing" for 4 session timeouts: the heartbeat thread speaks
            assert admin.describe_group("g")["generation_id"] == generation
        busy.poll()
        assert busy.assignment() == mine
    finally:
        busy.close()
        other.close()


def test_a_member_that_does_not_poll_within_max_poll_interval_leaves_and_rejoins_at_its_next_poll(
        broker, topic):
    revoked: list = []
    options = dict(broker=broker.data_dir, group="g", heartbeat_interval_ms=50)
    half = PARTITIONS // 2
    other = Polling(**options)
    stuck = Consumer(TOPIC, max_poll_interval_ms=1_000, on_revoke=revoked.extend, **options)
    try:
        poll_until(stuck, lambda: len(stuck.assignment()) == len(other.assignment) == half,
                   "two members owning half each")
        mine = stuck.assignment()
        # Joining first, it may have owned everything and given half away: only what it loses
        # by leaving counts below.
        revoked.clear()
        wait_for(lambda: len(other.assignment) == PARTITIONS,
                 what="the stuck member to leave and the other to own everything")
        stuck.poll()  # it learns that it left: its partitions are lost, it rejoins
        assert set(revoked) == mine
        poll_until(stuck, lambda: len(stuck.assignment()) == len(other.assignment) == half,
                   "the stuck member back with half")
    finally:
        stuck.close()
        other.close()


# --- a coordinator restart -----------------------------------------------------------------------

def test_a_member_rides_out_a_kill9_of_the_coordinator_and_resumes_from_its_committed_offsets(
        broker, topic):
    produce(broker.data_dir, 0, 60)
    member = Polling(broker=broker.data_dir, group="g", auto_offset_reset="earliest",
                     heartbeat_interval_ms=HEARTBEAT_MS, auto_commit_interval_ms=50)
    try:
        wait_for(lambda: len(member.assignment) == PARTITIONS, what="the member to own everything")
        with Admin(broker=broker.data_dir) as admin:
            wait_for(lambda: all(r["committed"] == 10
                                 for r in admin.describe_group("g")["partitions"]),
                     what="the first 60 records committed")
        doc = broker.runtime()
        coordinator = [e["pid"] for e in doc["processes"] if e["role"] == "coordinator"][0]
        os.kill(coordinator, signal.SIGKILL)
        killed_at = time.monotonic()
        # The restarted coordinator does not know the member: it finds its partitions lost
        # (on_revoke), joins anew and gets them back; poll() never raised (Polling.close checks).
        wait_for(lambda: len(member.revoked) >= PARTITIONS and
                 len(member.assignment) == PARTITIONS, what="the member to rejoin")
        print(f"kill -9 of the coordinator -> member owns every partition again: "
              f"{(time.monotonic() - killed_at) * 1000:.0f} ms")
        produce(broker.data_dir, 60, 60)
        with Admin(broker=broker.data_dir) as admin:
            try:
                wait_for(lambda: all(r["committed"] == 20
                                     for r in admin.describe_group("g")["partitions"]),
                         what="the next 60 records consumed and committed")
            except AssertionError:
                raise AssertionError(f"not all committed: {admin.describe_group('g')}, member "
                                     f"owns {member.assignment}, error {member.error!r}")
            described = admin.describe_group("g")
        assert len(described["members"]) == 1 and described["state"] == "Stable"
    finally:
        member.close()


def test_close_after_a_kill9_of_the_whole_broker_returns_promptly_and_quietly(broker, topic):
    """A worker whose broker died under it can still shut down: poll() raises the typed
    BrokerNotRunningError, and close() of a group member (with auto-commit due) and of a
    producer (with records sent but not acknowledged) return within seconds, without raising."""
    produce(broker.data_dir, 0, 30)
    consumer = Consumer(TOPIC, broker=broker.data_dir, group="g", auto_offset_reset="earliest",
                        heartbeat_interval_ms=HEARTBEAT_MS, auto_commit_interval_ms=50)
    producer = Producer(broker=broker.data_dir)
    try:
        got = []
        deadline = time.monotonic() + WAIT_S_MAX
        while len(got) < 30 and time.monotonic() < deadline:  # bounded
            got += consumer.poll(timeout_ms=100)
        assert len(got) == 30
        broker.kill9()
        futures = [producer.send(TOPIC, b"after", partition=p) for p in range(PARTITIONS)]
        with pytest.raises(errors.BrokerNotRunningError):
            for _ in range(50):  # bounded: the first polls may still find records or no news
                consumer.poll(timeout_ms=100)
        started = time.monotonic()
        consumer.close()
        consumer_s = time.monotonic() - started
        started = time.monotonic()
        producer.close(timeout=2)
        producer_s = time.monotonic() - started
        print(f"close() after the broker died: consumer {consumer_s:.2f} s, "
              f"producer {producer_s:.2f} s")
        assert consumer_s < 5 and producer_s < 5
        # The records sent into a dead broker are not silently "delivered": they fail, typed.
        for future in futures:
            with pytest.raises(errors.ShmbrokerError):
                future.result(timeout=1)
    finally:
        consumer.close()
        producer.close(timeout=1)
        broker.start()  # reclaims the dead broker's shared memory, as any restart does
        assert broker.stop() == 0


class RequestLog:
    """Records, for each request ``consumer``'s group membership sends, its type, whether it
    waited for its reply, and which ``_request_later`` replies were still unread then, and the commit it carried."""

    def __init__(self, consumer: Consumer):
        self.sent: list[tuple[str, bool, list[str], dict | None]] = []
        admin = consumer._membership()._admin
        request, request_later = admin._request, admin._request_later

        def logged_request(request_type, *args, **fields):
            self.sent.append((request_type, True, [t for _, t, _ in admin._later.values()],
                              fields.get("commit")))
            return request(request_type, *args, **fields)

        def logged_request_later(request_type, *args, **fields):
            self.sent.append((request_type, False, [t for _, t, _ in admin._later.values()],
                              fields.get("commit")))
            return request_later(request_type, *args, **fields)

        admin._request, admin._request_later = logged_request, logged_request_later


def test_an_eager_member_sends_its_revocation_commit_inside_its_join(broker, topic, members):
    produce(broker.data_dir, 0, 60)
    with Consumer(TOPIC, broker=broker.data_dir, group="g", auto_offset_reset="earliest",
                  heartbeat_interval_ms=HEARTBEAT_MS) as a:
        assert sorted(parse_value(r.value)[1] for r in drain(a, 60)) == list(range(60))
        sent = RequestLog(a).sent
        [b] = members.start(1)
        poll_until(a, lambda: len(a.assignment()) == PARTITIONS // 2, "a keeps three partitions")
        # The commit rode on the join: one request, not two, and no commit of a's sent alone
        # between the rebalance and its join (docs/design/groups.md, "rides on the join").
        i = next(i for i, (t, _, _, _) in enumerate(sent) if t == "join")
        carried = sent[i][3]
        assert carried is not None and carried["generation_id"] == 1, sent
        assert sorted(p for p, _, _ in carried["offsets"][TOPIC]) == list(range(PARTITIONS))
        assert not any(t == "offset_commit" for t, _, _, _ in sent[:i + 1]), sent
        # And it was stored before the join phase ended: b starts where a stopped (no record
        # read twice), and every record after the rebalance is read once.
        wait_for(lambda: len(owned(b)) == PARTITIONS // 2, what="b owns three partitions")
        produce(broker.data_dir, 60, 60)
        got_a = [parse_value(r.value)[1] for r in drain(a, 30)]
    wait_for(lambda: len(received(b)) >= 30, what="b consumed its half")
    assert sorted(got_a + [seq for _, _, seq in received(b)]) == list(range(60, 120))


def test_a_pipelined_revocation_commit_refused_for_another_reason_is_raised_from_the_next_poll(
        broker, topic, members):
    produce(broker.data_dir, 0, 6)
    with Consumer(TOPIC, broker=broker.data_dir, group="g", auto_offset_reset="earliest",
                  heartbeat_interval_ms=HEARTBEAT_MS) as a:
        drain(a, 6)
        a._next_auto_commit = time.monotonic() + 3600  # only the revocation commits here
        positions = a._positions
        # A partition the topic does not have: the coordinator refuses the whole commit with
        # an error that is not "the group moved on".
        a._positions = lambda tps: {**positions(tps), TopicPartition(TOPIC, PARTITIONS + 1): 1}
        members.start(1)
        deadline = time.monotonic() + WAIT_S_MAX
        with pytest.raises(errors.UnknownTopicOrPartitionError):
            while time.monotonic() < deadline:  # bounded by the deadline
                a.poll(timeout_ms=20)
        a._positions = positions
        # Raised once the rebalance was done: a holds its new share and goes on polling.
        assert len(a.assignment()) == PARTITIONS // 2
        a.poll(timeout_ms=20)
