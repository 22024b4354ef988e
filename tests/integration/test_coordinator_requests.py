"""Malformed requests to a real coordinator get error replies, and it keeps serving."""
from __future__ import annotations

import os
import random

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
