"""Malformed requests to a real coordinator get error replies, and it keeps serving."""
from __future__ import annotations

import os
import random
import socket

import msgpack
import pytest
import zmq

from shmbroker import Admin, errors
from shmbroker.coordinator import protocol

pytestmark = pytest.mark.timeout(120)
REPLY_TIMEOUT_MS = 5000


@pytest.fixture
def dealer(broker):
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect("ipc://" + os.path.join(broker.data_dir, "coordinator.sock"))
    yield sock
    sock.close(linger=0)


def ask(sock, body: bytes) -> dict:
    sock.send(body)
    assert sock.poll(REPLY_TIMEOUT_MS), "the coordinator did not answer"
    return msgpack.unpackb(sock.recv(), raw=False)


def assert_error(reply: dict, code: int, text: str, request_id=None) -> None:
    assert reply["v"] == 1 and reply["ok"] is False, reply
    assert reply["id"] == request_id
    assert reply["error"]["code"] == code, reply
    assert text in reply["error"]["message"], reply


def test_garbage_wrong_versions_and_unknown_types_get_error_replies_and_serving_goes_on(broker, dealer):
    rng = random.Random(1234)
    for _ in range(200):
        body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        reply = ask(dealer, body)
        assert reply["ok"] is False and reply["error"]["code"] in (42, 35), (body, reply)
    assert_error(ask(dealer, b""), 42, "not a msgpack message")
    assert_error(ask(dealer, msgpack.packb([1, 2, 3])), 42, "must be a msgpack map")
    assert_error(ask(dealer, msgpack.packb({"v": 1, "type": "list_topics"})), 42, "request id")
    assert_error(ask(dealer, msgpack.packb({"v": 99, "id": 7, "type": "list_topics"})), 35,
                 "version 99 is not supported", 7)
    assert_error(ask(dealer, msgpack.packb({"v": 1, "id": 8, "type": "steal_data"})), 42,
                 "unknown request type 'steal_data'", 8)
    assert_error(ask(dealer, msgpack.packb({"v": 1, "id": 9, "type": "create_topic", "name": "t"})),
                 42, "missing field 'partitions'", 9)
    assert_error(ask(dealer, msgpack.packb({"v": 1, "id": 10, "type": "create_topic", "name": "t",
                                            "partitions": "3"})), 42, "wrong type", 10)
    assert_error(ask(dealer, msgpack.packb({"v": 1, "id": 11, "type": "create_topic", "name": "t",
                                            "partitions": 1, "config": {"retention.ms": [1]}})), 40,
                 "expected an integer", 11)
    assert_error(ask(dealer, msgpack.packb({"v": 1, "id": 11, "type": "list_topics", 1: 2})), 42,
                 "not a msgpack message")  # non-string map keys are refused by the decoder
    assert_error(ask(dealer, msgpack.packb({"v": 1, "id": 12, "type": "list_topics", "x": 1})), 42,
                 "unknown field", 12)
    assert_error(ask(dealer, b"\x80" * (70 * 1024)), 42, "the limit is 65536")
    # A pickle is just bytes that are not msgpack: refused, never loaded.
    assert_error(ask(dealer, b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94."), 42, "")

    ok = ask(dealer, protocol.request(13, "ping"))
    assert ok == {"v": 1, "id": 13, "ok": True, "result": ok["result"]} and ok["result"]["protocol_version"] == 1
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("still-serving", 1)
        assert admin.list_topics() == ["still-serving"]
    broker.wait_running({("still-serving", 0)})
    assert broker.proc.poll() is None


def test_a_late_reply_to_a_timed_out_request_is_not_taken_for_the_next_one(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.ping()  # connected, so the next request is surely sent
        admin.request_timeout_ms = 1
        with pytest.raises(errors.RequestTimeoutError):
            admin.create_topic("slow", 2)  # answered only once both processes are up
        admin.request_timeout_ms = 10_000
        assert admin.list_topics() == ["slow"]


def test_malformed_group_requests_get_typed_error_replies_and_serving_goes_on(broker, dealer):
    """Fuzz-ish: every group request type with random, often wrong, field values. Each gets a
    reply; none is an internal error (code -1: a handler bug)."""
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("t", 2)
    rng = random.Random(4321)
    values = [None, -1, 0, 1, 2 ** 63, True, 1.5, "", "g", "x" * 300, b"\x00", [], ["t"],
              ["range"], [[1]], {}, {"t": [[0, 1, "m"]]}, {"t": "x"}, {"t": [[0]]},
              {"t": [["a", 1, 2]]}, {"t": [[0, -5, None]]}, {"t": [1.5]}, {"t": None},
              os.getpid(), socket.gethostname()]
    for request_type, spec in sorted(protocol.REQUEST_FIELDS.items()):
        if request_type not in protocol.GROUP_REQUEST_TYPES:
            continue
        for _ in range(40):
            fields = {name: rng.choice(values) for name in spec if rng.random() < 0.9}
            body = msgpack.packb({"v": 1, "id": 5, "type": request_type, **fields}, use_bin_type=True)
            reply = ask(dealer, body)
            assert reply["id"] == 5
            if not reply["ok"]:
                assert reply["error"]["code"] != -1, (request_type, fields, reply)
    join = {"group_id": "g", "member_id": "", "client_id": "c", "pid": os.getpid(),
            "host": socket.gethostname(), "topics": ["t"], "protocols": ["range"]}
    commit = {"group_id": "g", "member_id": "", "generation_id": -1}
    for request_type, fields, code, text in [
        ("join", {**join, "pid": (1 << 22) + 1}, 42, "not a running process"),
        ("join", {**join, "pid": 0}, 42, "pid must be a positive integer"),
        ("join", {**join, "protocols": [[1]]}, 42, "array of strings"),
        ("join", {**join, "protocols": ["best"]}, 40, "best"),
        ("join", {**join, "group_id": ""}, 24, "group id"),
        ("join", {**join, "session_timeout_ms": 1}, 26, "session_timeout_ms=1"),
        ("heartbeat", {"group_id": "nope", "member_id": "m", "generation_id": 1}, 25, "no such group"),
        ("offset_commit", {**commit, "offsets": {"t": [[0, 1]]}}, 42, "[partition, offset, metadata]"),
        ("offset_commit", {**commit, "offsets": {"t": "x"}}, 42, "must be an array"),
        ("offset_commit", {**commit, "offsets": {"u": [[0, 1, ""]]}}, 3, "no partition 'u'/0"),
        ("offset_commit", {**commit, "offsets": {"t": [[0, 1, ""], [0, 2, ""]]}}, 42, "twice"),
        ("offset_commit", {**commit, "offsets": {"t": [[0, -5, ""]]}}, 42, ""),
        ("offset_fetch", {"group_id": "g", "topics": {"t": [1.5]}}, 42, "array of integers"),
        ("group_describe", {"group_id": "nope"}, 69, "no group"),
        ("group_delete", {"group_id": "nope"}, 69, "no group"),
    ]:
        assert_error(ask(dealer, protocol.request(7, request_type, **fields)), code, text, 7)
    assert ask(dealer, protocol.request(6, "ping"))["result"]["protocol_version"] == 1
    assert broker.proc.poll() is None
    assert "internal error" not in broker.log()
