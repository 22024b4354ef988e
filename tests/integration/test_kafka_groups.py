"""Kafka consumer groups over the Kafka listener are the coordinator's groups: three Kafka-client
members share a 6-partition topic while one leaves and one is kill -9'd, and every record is
consumed exactly once with the commits visible to `shmbroker groups describe`; a Kafka member
and a native shmbroker Consumer share one group and resume from each other's commits.

Members run as their own processes (kafka_group_member.py), each writing what it received to
its own file before committing it; a member is stopped by a file, or by SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
from broker_harness import run_cli, wait_for

from shmbroker import Admin, Consumer, errors

pytestmark = pytest.mark.timeout(120)
kafka = pytest.importorskip("kafka")
from kafka import KafkaAdminClient, KafkaProducer  # noqa: E402
from kafka.admin import NewTopic  # noqa: E402

TOPIC = "orders"
PARTITIONS = 6
MEMBER = os.path.join(os.path.dirname(__file__), "kafka_group_member.py")
#: Long enough for a join phase and a session timeout (kafka_group_member: 3 s) on a busy host.
SETTLE_S_MAX = 40.0


@pytest.fixture
def kbroker(make_broker):
    broker = make_broker(serve_args=("--kafka-listen", "127.0.0.1:0"))
    broker.address = broker.wait_running()["kafka_endpoint"]
    admin = KafkaAdminClient(bootstrap_servers=broker.address)
    try:
        admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])
    finally:
        admin.close()
    broker.wait_running({(TOPIC, p) for p in range(PARTITIONS)})
    return broker


class Members:
    """Kafka-client member processes; at teardown the survivors are told to stop, then killed."""

    def __init__(self, broker, tmp_path, group: str):
        self.broker, self.tmp_path, self.group = broker, tmp_path, group
        self.procs: list[subprocess.Popen] = []

    def start(self, client: str) -> subprocess.Popen:
        n = len(self.procs)
        proc = subprocess.Popen([sys.executable, MEMBER, client, self.broker.address, self.group,
                                 TOPIC, str(self.tmp_path / f"m{n}.jsonl"),
                                 str(self.tmp_path / f"stop{n}")])
        proc.index = n
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        """A clean leave (LeaveGroup), waited for."""
        (self.tmp_path / f"stop{proc.index}").touch()
        proc.wait(timeout=30)

    def records(self) -> list:
        out = []
        for proc in self.procs:
            path = self.tmp_path / f"m{proc.index}.jsonl"
            if path.exists():
                for line in path.read_text().splitlines():
                    if line.endswith("}"):  # a kill -9 may leave half a line
                        event = json.loads(line)
                        out += [tuple(r) + (proc.index,) for r in event.get("records", [])]
        return out

    def report(self) -> str:
        """Why a wait may have failed: each member's exit status and last events, and the
        group as the coordinator has it."""
        lines = []
        for proc in self.procs:
            path = self.tmp_path / f"m{proc.index}.jsonl"
            events = path.read_text().splitlines()[-4:] if path.exists() else []
            lines.append(f"member {proc.index} pid {proc.pid} exit {proc.poll()}: "
                         + " | ".join(e[:300] for e in events))
        with Admin(self.broker.data_dir) as admin:
            try:
                described = admin.describe_group(self.group)
                described["members"] = [(m["member_id"], m["assignment"])
                                        for m in described["members"]]
            except errors.ShmbrokerError as exc:
                described = repr(exc)
        lines.append(f"group: {described}")
        # The broker's side of it: the listener's and the coordinator's lines on this group.
        log_path = getattr(self.broker, "log_path", None)
        if log_path and os.path.exists(log_path):
            with open(log_path, errors="replace") as f:
                mine = [line.rstrip() for line in f if self.group in line or "kafka" in line]
            lines.append("broker log (this group, the listener), last 40 lines:")
            lines += [line[:300] for line in mine[-40:]]
        return "\n".join(lines)

    def settle(self, predicate, what: str) -> None:
        """wait_for, and on a timeout say what the members and the group were doing."""
        try:
            wait_for(predicate, SETTLE_S_MAX, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.report()}") from None

    def close(self) -> None:
        for proc in self.procs:
            (self.tmp_path / f"stop{proc.index}").touch()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def members(kbroker, tmp_path):
    made = []

    def make(group: str) -> Members:
        made.append(Members(kbroker, tmp_path, group))
        return made[-1]

    yield make
    for m in made:
        m.close()


def produce(address: str, first: int, count: int) -> list[str]:
    """kafka-python's default producer: idempotent, acks=all (InitProducerId first)."""
    producer = KafkaProducer(bootstrap_servers=address)
    values = [f"v{i}" for i in range(first, first + count)]
    try:
        for i, value in enumerate(values):
            producer.send(TOPIC, key=f"k{first + i}".encode(), value=value.encode())
        producer.flush(timeout=20)
    finally:
        producer.close()
    return values


def committed_by_cli(broker, group: str) -> dict[int, tuple[int, int]]:
    """partition -> (committed, end), read from `shmbroker groups describe`'s table."""
    result = run_cli("groups", "describe", group, "--data-dir", broker.data_dir)
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        cols = line.split()
        if len(cols) == 5 and cols[0] == TOPIC and cols[1].isdigit():
            rows[int(cols[1])] = tuple(-1 if c == "-" else int(c) for c in cols[2:4])
    return rows


def all_committed(broker, group: str, total: int) -> bool:
    rows = committed_by_cli(broker, group)
    return len(rows) == PARTITIONS and all(c == e for c, e in rows.values()) \
        and sum(e for _, e in rows.values()) == total


def assignments(data_dir: str, group: str) -> dict[str, list]:
    """member id -> its partitions, as the coordinator has them ({} before the first join)."""
    with Admin(data_dir) as admin:
        try:
            described = admin.describe_group(group)
        except errors.GroupIdNotFoundError:
            return {}
    return {m["member_id"]: sorted(p for _, p in m["assignment"]) for m in described["members"]}


@pytest.mark.parametrize("client", ["kafka-python", "confluent-kafka", "aiokafka"])
def test_three_kafka_members_share_six_partitions_through_a_leave_and_a_kill_9_exactly_once(
        kbroker, members, client):
    pytest.importorskip({"kafka-python": "kafka", "confluent-kafka": "confluent_kafka",
                         "aiokafka": "aiokafka"}[client])
    group = members(f"g-{client}")
    a, b, c = (group.start(client) for _ in range(3))

    def split_three_ways():
        shares = assignments(kbroker.data_dir, group.group)
        return len(shares) == 3 and sorted(len(p) for p in shares.values()) == [2, 2, 2]

    group.settle(split_three_ways, "the six partitions split over three members")
    sent = produce(kbroker.address, 0, 60)  # after the split: every member gets a share
    group.settle(lambda: all_committed(kbroker, group.group, 60), "60 records committed")

    group.stop(a)  # LeaveGroup: the other two take its partitions at once
    sent += produce(kbroker.address, 60, 60)
    group.settle(lambda: all_committed(kbroker, group.group, 120), "120 committed")

    def split_two_ways():
        # Not asserted at once after the commits: one member may have rejoined and taken all
        # six (and committed them) before the other rejoins; kafka-python learns of the
        # rebalance at its next heartbeat (seen once here: one member with all six).
        shares = assignments(kbroker.data_dir, group.group)
        return len(shares) == 2 and sorted(p for ps in shares.values() for p in ps) == \
            list(range(PARTITIONS))

    group.settle(split_two_ways, "the two members left share the six partitions")

    # kill -9 while idle (all it read is committed): the coordinator has no pid of a Kafka
    # member to watch, so its session timeout (3 s) removes it and c takes all six.
    os.kill(b.pid, signal.SIGKILL)
    b.wait(timeout=10)
    sent += produce(kbroker.address, 120, 60)
    group.settle(lambda: all_committed(kbroker, group.group, 180), "180 committed")
    assert list(assignments(kbroker.data_dir, group.group).values()) == [list(range(PARTITIONS))]

    got = group.records()
    values = [r[2] for r in got]
    assert sorted(values) == sorted(sent), "every record consumed exactly once overall"
    assert {r[3] for r in got} == {a.index, b.index, c.index}, "each member consumed a share"
    # Offsets per partition come in order without gaps: 0..end-1, each once.
    by_partition = {}
    for partition, offset, _, _ in got:
        by_partition.setdefault(partition, []).append(offset)
    ends = committed_by_cli(kbroker, group.group)
    assert {p: sorted(o) for p, o in by_partition.items()} == {
        p: list(range(e)) for p, (_, e) in ends.items()}


def test_a_kafka_member_and_a_native_consumer_share_a_group_and_resume_from_each_others_commits(
        kbroker, members):
    group = members("mixed")
    got_native: list = []
    native = Consumer(TOPIC, broker=kbroker.data_dir, group=group.group,
                      auto_offset_reset="earliest", enable_auto_commit=False,
                      heartbeat_interval_ms=50)
    try:
        kmember = group.start("kafka-python")

        def poll_native() -> None:
            batch = native.poll(timeout_ms=50)
            if batch:
                got_native.extend(batch)
                native.commit()

        def both_have_three():
            poll_native()
            shares = assignments(kbroker.data_dir, group.group)
            return len(shares) == 2 and sorted(len(p) for p in shares.values()) == [3, 3]

        wait_for(both_have_three, SETTLE_S_MAX, "a 3/3 split between the Kafka and native member")
        sent = produce(kbroker.address, 0, 60)  # after the split: both members get some
        wait_for(lambda: poll_native() or all_committed(kbroker, group.group, 60), SETTLE_S_MAX,
                 "60 committed by the two members")
        assert got_native and group.records(), "both members consumed"
    finally:
        native.close()  # leaves: the Kafka member resumes the native one's partitions

    sent += produce(kbroker.address, 60, 60)
    wait_for(lambda: all_committed(kbroker, group.group, 120), SETTLE_S_MAX, "120 committed")
    group.stop(kmember)

    # The native consumer comes back alone: it resumes where the Kafka member committed.
    sent += produce(kbroker.address, 120, 30)
    again = Consumer(TOPIC, broker=kbroker.data_dir, group=group.group,
                     auto_offset_reset="earliest", enable_auto_commit=False)
    try:
        later: list = []
        wait_for(lambda: later.extend(again.poll(timeout_ms=100)) or len(later) >= 30,
                 SETTLE_S_MAX, "the 30 new records")
        later.extend(again.poll(timeout_ms=300))
    finally:
        again.close()
    values = [r.value.decode() for r in got_native + later] + [r[2] for r in group.records()]
    assert sorted(values) == sorted(sent), "every record consumed once across both clients"
    assert sorted(r.value.decode() for r in later) == sent[120:]


def test_group_errors_are_kafkas_codes_and_a_bad_partition_does_not_spoil_a_commit(kbroker):
    """FindCoordinator names this listener; a heartbeat from an unknown member is
    UNKNOWN_MEMBER_ID (25); an OffsetCommit with one unknown partition commits the others and
    marks that one UNKNOWN_TOPIC_OR_PARTITION (3); OffsetFetch reads the commit back."""
    from test_kafka_listener import connect, frame, response

    from shmbroker.kafka import messages as M

    def s(text: str) -> bytes:
        return struct.pack(">h", len(text)) + text.encode()

    host, port = kbroker.address.rsplit(":", 1)
    with connect(kbroker.address) as sock:
        sock.sendall(frame(M.FIND_COORDINATOR, 2, 1, s("g") + b"\x00"))
        _, body = response(sock)
        assert body == struct.pack(">ihh", 0, 0, -1) + struct.pack(">i", 0) + s(host) + \
            struct.pack(">i", int(port))
        sock.sendall(frame(M.HEARTBEAT, 3, 2, s("g") + struct.pack(">i", 1) + s("nobody") +
                           struct.pack(">h", -1)))
        assert response(sock) == (2, struct.pack(">ih", 0, 25))
        commit = s("g") + struct.pack(">i", -1) + s("") + struct.pack(">h", -1) + \
            struct.pack(">i", 1) + s(TOPIC) + struct.pack(">i", 2) + \
            struct.pack(">iqi", 1, 42, -1) + s("m") + struct.pack(">iqi", 99, 7, -1) + s("")
        sock.sendall(frame(M.OFFSET_COMMIT, 7, 3, commit))
        assert response(sock) == (3, struct.pack(">ii", 0, 1) + s(TOPIC) + struct.pack(
            ">iihih", 2, 1, 0, 99, 3))
        sock.sendall(frame(M.OFFSET_FETCH, 5, 4, s("g") + struct.pack(">i", 1) + s(TOPIC) +
                           struct.pack(">iii", 2, 1, 2)))
        assert response(sock) == (4, struct.pack(">ii", 0, 1) + s(TOPIC) + struct.pack(">i", 2) +
                                  struct.pack(">iqi", 1, 42, -1) + s("m") + b"\x00\x00" +
                                  struct.pack(">iqi", 2, -1, -1) + s("") + b"\x00\x00" +
                                  b"\x00\x00")
    assert committed_by_cli(kbroker, "g")[1][0] == 42


def test_kafka_admin_lists_and_describes_the_coordinators_groups_native_members_included(
        kbroker, members):
    """ListGroups and DescribeGroups show the coordinator's groups, as `shmbroker groups`
    does: a group with a Kafka and a native member, Stable, each member's subscription and
    assignment in the consumer protocol's bytes; an unknown group is Dead, no error."""
    group = members("admin-view")
    native = Consumer(TOPIC, broker=kbroker.data_dir, group=group.group,
                      auto_offset_reset="earliest", heartbeat_interval_ms=50, client_id="native-1")
    admin = KafkaAdminClient(bootstrap_servers=kbroker.address)
    try:
        group.start("kafka-python")

        def stable_3_3():
            native.poll(timeout_ms=50)
            shares = assignments(kbroker.data_dir, group.group)
            if len(shares) != 2 or sorted(len(p) for p in shares.values()) != [3, 3]:
                return None
            described = admin.describe_groups([group.group])[group.group]
            return described if described["group_state"] == "Stable" else None

        described = wait_for(stable_3_3, SETTLE_S_MAX, "a Stable 3/3 group")
        listed = admin.list_groups()
        assert {"group_id": "admin-view", "protocol_type": "consumer"} in listed, listed
        assert described["error"] is None and described["protocol_type"] == "consumer"
        assert described["protocol_data"] == "range"
        by_host = {m["client_host"].startswith("/127.0.0.1"): m for m in described["members"]}
        assert set(by_host) == {True, False}, described["members"]  # one Kafka, one native
        assert by_host[False]["client_id"] == "native-1"
        coordinator = assignments(kbroker.data_dir, group.group)
        covered = []
        for m in described["members"]:
            assert m["member_metadata"]["topics"] == [TOPIC]
            owned = sorted(p for t in m["member_assignment"]["assigned_partitions"]
                           if t["topic"] == TOPIC for p in t["partitions"])
            assert owned == coordinator[m["member_id"]]
            covered += owned
        assert sorted(covered) == list(range(PARTITIONS))

        nobody = admin.describe_groups(["no-such-group"])["no-such-group"]
        assert nobody["error"] is None and nobody["group_state"] == "Dead"
        assert nobody["members"] == []

        # librdkafka's AdminClient reads the same answers (ListGroups v2 carries no state).
        ck_admin = pytest.importorskip("confluent_kafka.admin").AdminClient(
            {"bootstrap.servers": kbroker.address})
        assert "admin-view" in [g.group_id for g in ck_admin.list_consumer_groups().result(30).valid]
        ck_described = ck_admin.describe_consumer_groups(["admin-view"])["admin-view"].result(30)
        assert ck_described.state.name == "STABLE" and ck_described.partition_assignor == "range"
        assert sorted(p.partition for m in ck_described.members
                      for p in m.assignment.topic_partitions) == list(range(PARTITIONS))
    finally:
        admin.close()
        native.close()
