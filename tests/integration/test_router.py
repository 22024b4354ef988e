"""The router (`serve --listen`): coordinator requests from clients over TCP on 127.0.0.1,
in separate processes from the broker; bad input gets error replies and serving goes on."""
from __future__ import annotations

import os
import random
import signal
import socket

import msgpack
import pytest
import zmq
from broker_harness import WAIT_S_MAX, run_cli, wait_for

from shmbroker import Admin, errors
from shmbroker.client.group_membership import GroupMembership
from shmbroker.client.types import TopicPartition
from shmbroker.coordinator import protocol
from shmbroker.router.server import ROUTER_INFLIGHT_MAX

pytestmark = pytest.mark.timeout(120)
REPLY_TIMEOUT_MS = 5_000


@pytest.fixture
def routed(make_broker):
    """A broker with a router on a free loopback port; its tcp:// address."""
    broker = make_broker(serve_args=("--listen", "tcp://127.0.0.1:*"))
    doc = broker.wait_running()
    address = doc["router_endpoint"]
    assert address.startswith("tcp://127.0.0.1:") and not address.endswith(":*"), doc
    assert [e["role"] for e in doc["processes"]][:3] == ["supervisor", "coordinator", "router"]
    broker.address = address
    return broker


@pytest.fixture
def dealer(routed):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(routed.address)
    yield sock
    sock.close(linger=0)


def ask(sock, *frames: bytes) -> dict:
    sock.send_multipart(list(frames))
    assert sock.poll(REPLY_TIMEOUT_MS), "the router did not answer"
    return msgpack.unpackb(sock.recv(), raw=False)


def test_admin_over_tcp_manages_topics_and_gets_the_coordinators_error_classes(routed):
    with Admin(broker=routed.address) as admin:
        assert admin.remote
        admin.create_topic("orders", 3)
        assert admin.list_topics() == ["orders"]
        assert admin.describe_topic("orders").partitions == 3
        with pytest.raises(errors.TopicAlreadyExistsError):
            admin.create_topic("orders", 3)
        with pytest.raises(errors.UnsupportedFeatureError, match="not built yet"):
            admin.end_offsets("orders")
    routed.wait_running({("orders", p) for p in range(3)})
    # The same topic, seen locally: the router forwarded to the one coordinator.
    with Admin(broker=routed.data_dir) as local:
        assert local.list_topics() == ["orders"]


def test_a_group_forms_and_commits_over_tcp(routed):
    with Admin(broker=routed.address) as admin:
        admin.create_topic("t", 4)
    routed.wait_running({("t", p) for p in range(4)})
    a = GroupMembership(routed.address, "g", ["t"], "remote-a", heartbeat_interval_ms=50)
    try:
        assigned = a.join()
        assert assigned == {TopicPartition("t", p) for p in range(4)}
        a.commit({tp: 7 for tp in assigned})
        assert set(a.committed(assigned).values()) == {7}
        with Admin(broker=routed.address) as admin:
            described = admin.describe_group("g")
        assert described["state"] == "Stable" and len(described["members"]) == 1
        assert [row["committed"] for row in described["partitions"]] == [7, 7, 7, 7]
        a.leave()
    finally:
        a.close()


def test_malformed_messages_get_error_replies_and_the_router_keeps_serving(routed, dealer):
    rng = random.Random(20261128)
    bodies = [b"", b"\xc1", b"\x80", msgpack.packb([1, 2]), msgpack.packb({"v": 9, "id": 3}),
              msgpack.packb({"v": 1, "id": 4, "type": "nope"}),
              msgpack.packb({"v": 1, "id": 5, "type": "join"})]
    bodies += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
               for _ in range(300)]
    for body in bodies:
        reply = ask(dealer, body)
        assert reply["v"] == 1 and reply["ok"] is False, (body, reply)
        assert reply["error"]["code"] != -1, (body, reply)  # -1: an internal error (a bug)
    # Two body frames, an oversized body: refused by the router itself, id echoed if known.
    reply = ask(dealer, protocol.request(6, "ping"), b"extra")
    assert reply["ok"] is False and "one frame" in reply["error"]["message"]
    reply = ask(dealer, msgpack.packb({"v": 1, "id": 7, "type": "ping", "pad": "x" * 70_000}))
    assert reply["ok"] is False and "limit" in reply["error"]["message"] and reply["id"] is None
    reply = ask(dealer, protocol.request(8, "ping"))
    assert reply["ok"] is True and reply["id"] == 8
    # A REQ socket (its empty delimiter frame) works too.
    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(routed.address)
    try:
        assert ask(req, protocol.request(9, "list_topics"))["result"] == {"topics": []}
    finally:
        req.close(linger=0)


def test_a_client_with_too_many_requests_in_flight_is_refused_and_others_are_not(routed, dealer):
    with Admin(broker=routed.address) as admin:
        admin.create_topic("t", 1)
    routed.wait_running({("t", 0)})
    first = GroupMembership(routed.address, "g", ["t"], "first", rebalance_timeout_ms=60_000)
    try:
        first.join()
        # Joins of new members are held until the first member rejoins: they stay in flight.
        for i in range(ROUTER_INFLIGHT_MAX + 3):
            dealer.send(protocol.request(i + 1, "join", group_id="g", member_id="",
                                         client_id="flood", pid=os.getpid(),
                                         host=socket.gethostname(), topics=["t"],
                                         protocols=["range"], rebalance_timeout_ms=60_000))
        refused = []
        while dealer.poll(2_000):  # bounded: the refusals come at once, the joins are held
            refused.append(msgpack.unpackb(dealer.recv(), raw=False))
        assert len(refused) == 3, refused
        assert all(not r["ok"] and "limit is" in r["error"]["message"] for r in refused)
        assert sorted(r["id"] for r in refused) == [ROUTER_INFLIGHT_MAX + 1 + i for i in range(3)]
        with Admin(broker=routed.address) as other:  # another client is served meanwhile
            assert other.list_topics() == ["t"]
    finally:
        first.close()


def test_a_killed_router_is_restarted_on_the_same_port_and_clients_carry_on(routed):
    doc = routed.runtime()
    router_pid = [e["pid"] for e in doc["processes"] if e["role"] == "router"][0]
    with Admin(broker=routed.address) as admin:
        admin.create_topic("a", 1)
        os.kill(router_pid, signal.SIGKILL)
        wait_for(lambda: (d := routed.runtime()) and d["state"] == "running" and
                 [e["pid"] for e in d["processes"] if e["role"] == "router"][0] != router_pid,
                 WAIT_S_MAX, "the router to be back")
        assert routed.runtime()["router_endpoint"] == routed.address
        # The same Admin (its DEALER reconnects by itself) goes on.
        assert wait_for(lambda: _list_or_none(admin), WAIT_S_MAX, "a reply") == ["a"]


def _list_or_none(admin: Admin):
    try:
        return admin.list_topics()
    except (errors.CoordinatorNotAvailableError, errors.RequestTimeoutError):
        return None


def test_listen_must_be_loopback_tcp_without_curve_and_free(broker_dir, routed):
    proc = run_cli("serve", "--data-dir", broker_dir, "--listen", "tcp://0.0.0.0:7070",
                   timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "a non-loopback address needs CURVE authentication" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("serve", "--data-dir", broker_dir + "-x", "--listen",
                   routed.address, timeout=30)
    assert proc.returncode == 1 and "cannot bind" in proc.stderr, proc.stderr
