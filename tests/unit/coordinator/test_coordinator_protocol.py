"""The coordinator's request format, and the server's handling of requests, without processes."""
from __future__ import annotations

import os

import msgpack
import pytest

from shmbroker import errors
from shmbroker.coordinator import protocol
from shmbroker.coordinator.server import CoordinatorServer
from shmbroker.coordinator.topics import load_topics


def test_a_request_round_trips_with_its_fields_checked():
    body = protocol.request(7, "create_topic", name="t", partitions=2, config={"retention.ms": 1})
    assert protocol.decode_request(body) == (7, "create_topic", {"name": "t", "partitions": 2,
                                                                 "config": {"retention.ms": 1}})


@pytest.mark.parametrize("message,cls,text", [
    ({"v": 1, "id": 1, "type": "create_topic", "name": "t", "partitions": True}, errors.InvalidRequestError, "wrong type"),
    ({"v": 1, "id": -1, "type": "ping"}, errors.InvalidRequestError, "unsigned"),
    ({"v": 1, "id": 1.5, "type": "ping"}, errors.InvalidRequestError, "unsigned"),
    ({"v": 0, "id": 1, "type": "ping"}, errors.UnsupportedVersionError, "version 0"),
    ({"v": 1, "id": 1, "type": "ping", "extra": 1}, errors.InvalidRequestError, "unknown field"),
    ({"v": 1, "id": 1, "type": None}, errors.InvalidRequestError, "unknown request type"),
])
def test_bad_requests_raise_typed_errors_that_keep_the_request_id(message, cls, text):
    with pytest.raises(cls, match=text) as info:
        protocol.decode_request(msgpack.packb(message))
    assert info.value.request_id == (1 if message["id"] == 1 else None)


@pytest.mark.parametrize("exc", [errors.TopicAlreadyExistsError("x"), errors.InvalidTopicError("y"),
                                 errors.ConfigError("z"), errors.UnknownTopicOrPartitionError("w"),
                                 errors.InvalidPartitionsError("v"), errors.RequestTimeoutError("u")])
def test_error_replies_come_back_as_the_same_class_with_the_message(exc):
    request_id, result = protocol.decode_reply(protocol.error_reply(5, exc))
    assert request_id == 5 and type(result) is type(exc) and str(result) == str(exc)
    assert result.code == exc.code


def test_an_unknown_error_name_falls_back_to_the_class_for_its_code():
    body = msgpack.packb({"v": 1, "id": 1, "ok": False,
                          "error": {"code": 36, "name": "os.system", "message": "m"}})
    assert type(protocol.decode_reply(body)[1]) is errors.TopicAlreadyExistsError


@pytest.fixture
def server(tmp_path):
    data_dir = str(tmp_path)
    if len(os.path.join(data_dir, "coordinator.sock")) > 107:
        pytest.skip("tmp path too long for a Unix socket")
    server = CoordinatorServer(data_dir)  # no supervisor link: changes are confirmed at once
    yield server
    server.close()


def call(server, request_type, **fields):
    body = protocol.request(1, request_type, **fields)
    request_id, result = protocol.decode_reply(server.handle([b"peer"], body))
    assert request_id == 1
    if isinstance(result, Exception):
        raise result
    return result


def test_server_creates_alters_deletes_and_persists_before_answering(server, tmp_path):
    assert call(server, "create_topic", name="t", partitions=2)["partitions"] == 2
    assert load_topics(str(tmp_path)).names() == ["t"]
    os.makedirs(tmp_path / "t-0")
    assert call(server, "alter_partitions", name="t", partitions=3)["partitions"] == 3
    assert call(server, "list_topics") == {"topics": [{"name": "t", "partitions": 3}]}
    call(server, "delete_topic", name="t")
    assert load_topics(str(tmp_path)).names() == [] and not (tmp_path / "t-0").exists()
    assert load_topics(str(tmp_path)).deleting == {}
    with pytest.raises(errors.UnknownTopicOrPartitionError):
        call(server, "describe_topic", name="t")


def test_server_answers_garbage_with_an_error_reply(server):
    request_id, result = protocol.decode_reply(server.handle([b"peer"], b"\xc1"))
    assert request_id is None and isinstance(result, errors.InvalidRequestError)
    request_id, result = protocol.decode_reply(server.handle([b"peer"], b"x" * (1 << 17)))
    assert isinstance(result, errors.InvalidRequestError) and "limit" in str(result)
