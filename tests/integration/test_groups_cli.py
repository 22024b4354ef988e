"""`shmbroker groups list | describe | reset-offsets | delete` against a real broker, like
kafka-consumer-groups: committed, end and lag per partition; resets refused while the group
has live members; every way of choosing the new offsets."""
from __future__ import annotations

import os
import socket

from broker_harness import run_cli

from shmbroker import Admin, Producer


def _rows(out: str, header: str) -> list[list[str]]:
    """The tab-separated rows printed after ``header``, up to the next header or the end."""
    lines = out.splitlines()
    start = lines.index(header) + 1
    rows = []
    for line in lines[start:]:
        if line.isupper() or line.startswith(("MEMBER-ID", "TOPIC\t")):
            break
        rows.append(line.split("\t"))
    return rows


def _fill(data_dir: str) -> None:
    """Topic "events", 2 partitions: 10 records on 0 (timestamps 1,000,000 + 1,000 * i ms),
    4 on 1."""
    with Admin(broker=data_dir) as admin:
        admin.create_topic("events", 2)
    with Producer(broker=data_dir) as producer:
        for i in range(10):
            producer.send("events", b"e%d" % i, partition=0, timestamp=1_000_000 + 1_000 * i)
        for i in range(4):
            producer.send("events", b"f%d" % i, partition=1, timestamp=1_000_000)
        producer.flush()


def test_reset_offsets_every_way_and_describe_shows_committed_end_and_lag(broker):
    _fill(broker.data_dir)
    d = ("--data-dir", broker.data_dir)
    done = run_cli("groups", "reset-offsets", "workers", "--topic", "events", "--to-offset",
                   "6", *d)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["workers\tevents\t0\t6", "workers\tevents\t1\t4"]  # clamped
    described = run_cli("groups", "describe", "workers", *d)
    assert described.returncode == 0, described.stderr
    assert "State: Empty" in described.stdout
    assert _rows(described.stdout, "TOPIC\tPARTITION\tCOMMITTED\tEND\tLAG") == [
        ["events", "0", "6", "10", "4"], ["events", "1", "4", "4", "0"]]
    listed = run_cli("groups", "list", *d)
    assert listed.returncode == 0 and listed.stdout.startswith("workers\tEmpty"), listed.stdout

    for flag, want in [(("--to-earliest",), ["0", "0"]), (("--to-latest",), ["10", "4"]),
                       (("--to-datetime", "1970-01-01T00:16:44.500+00:00"), ["5", "4"])]:
        done = run_cli("groups", "reset-offsets", "workers", "--topic", "events", *flag, *d)
        assert done.returncode == 0, done.stderr
        assert [line.split("\t")[3] for line in done.stdout.splitlines()] == want, flag


def test_reset_is_refused_while_the_group_has_a_member_and_delete_removes_it(broker):
    _fill(broker.data_dir)
    d = ("--data-dir", broker.data_dir)
    with Admin(broker=broker.data_dir) as admin:
        joined = admin._request("join", group_id="busy", member_id="", client_id="test",
                                pid=os.getpid(), host=socket.gethostname(), topics=["events"],
                                protocols=["range"], session_timeout_ms=30_000)
        admin._request("sync", group_id="busy", member_id=joined["member_id"],
                       generation_id=joined["generation_id"])
        refused = run_cli("groups", "reset-offsets", "busy", "--topic", "events",
                          "--to-earliest", *d)
        assert refused.returncode == 1 and "live member" in refused.stderr, refused.stderr
        described = run_cli("groups", "describe", "busy", *d)
        member = _rows(described.stdout, "MEMBER-ID\tCLIENT-ID\tHOST\tPID\tASSIGNMENT")[0]
        assert member[0] == joined["member_id"] and member[3] == str(os.getpid())
        assert member[4] == "events/0,events/1"
        assert run_cli("groups", "delete", "busy", *d).returncode == 1  # NON_EMPTY_GROUP
        admin._request("leave", group_id="busy", member_id=joined["member_id"])
    assert run_cli("groups", "reset-offsets", "busy", "--topic", "events", "--to-latest",
                   *d).returncode == 0
    deleted = run_cli("groups", "delete", "busy", *d)
    assert deleted.returncode == 0 and "2 committed offset(s)" in deleted.stdout, deleted.stdout
    gone = run_cli("groups", "describe", "busy", *d)
    assert gone.returncode == 1 and "busy" in gone.stderr and "Traceback" not in gone.stderr
    bad = run_cli("groups", "reset-offsets", "x", "--topic", "events", "--to-datetime",
                  "yesterday", *d)
    assert bad.returncode == 1 and "ISO 8601" in bad.stderr
