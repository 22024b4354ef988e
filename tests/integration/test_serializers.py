"""kafka-python's serializer arguments: Producer(key_serializer=, value_serializer=) and
Consumer(key_deserializer=, value_deserializer=), locally and through the router; None stays
None (a tombstone); a deserializer that raises stops the consumer at that record, which a
seek skips. Real broker processes."""
from __future__ import annotations

import json

import pytest
from broker_harness import WAIT_S_MAX, create_topic
from broker_harness import poll_until as _drain

from shmbroker import Consumer, Producer, TopicPartition, errors
from shmbroker.client.serde import DeserializedRecord

TP = TopicPartition("sd", 0)


def _json(v) -> bytes:
    return json.dumps(v).encode()


@pytest.fixture
def where(local_or_remote):
    create_topic(local_or_remote[0], "sd", 1)
    return local_or_remote[1]


def test_serializers_turn_objects_into_records_and_back(where):
    with Producer(broker=where, key_serializer=str.encode, value_serializer=_json) as producer:
        producer.send("sd", {"n": 1, "tags": ["a"]}, key="k1", partition=0)
        producer.send("sd", None, key="gone", partition=0)  # a tombstone stays one
        producer.send_batch("sd", [{"n": 2}, [3]], keys=["k2", "k3"], partition=0)
        producer.flush()
    with Consumer("sd", broker=where, auto_offset_reset="earliest") as raw:
        assert [(r.key, r.value) for r in _drain(raw, 4)] == [
            (b"k1", b'{"n": 1, "tags": ["a"]}'), (b"gone", None), (b"k2", b'{"n": 2}'),
            (b"k3", b"[3]")]
    with Consumer("sd", broker=where, auto_offset_reset="earliest",
                  key_deserializer=bytes.decode, value_deserializer=json.loads) as consumer:
        got = _drain(consumer, 4)
    assert all(isinstance(r, DeserializedRecord) for r in got)
    assert [(r.offset, r.key, r.value) for r in got] == [
        (0, "k1", {"n": 1, "tags": ["a"]}), (1, "gone", None), (2, "k2", {"n": 2}),
        (3, "k3", [3])]
    assert got[0].topic_partition == TP and got[0].headers == () and got[0].timestamp > 0


def test_a_serializer_that_fails_or_returns_no_bytes_is_a_clear_error(where):
    def boom(v):
        raise ValueError("no")

    with Producer(broker=where, value_serializer=boom) as producer:
        with pytest.raises(errors.SerializationError, match="value_serializer raised") as info:
            producer.send("sd", {"x": 1}, partition=0)
        assert isinstance(info.value.__cause__, ValueError)
    with Producer(broker=where, value_serializer=len) as producer:
        with pytest.raises(TypeError, match="bytes"):
            producer.send("sd", b"abc", partition=0).result(timeout=WAIT_S_MAX)
    with pytest.raises(errors.ConfigError, match="value_serializer"):
        Producer(broker=where, value_serializer="json")
    with pytest.raises(errors.ConfigError, match="key_deserializer"):
        Consumer("sd", broker=where, key_deserializer=42)


def test_a_deserializer_that_fails_stops_at_that_record_until_a_seek_skips_it(where):
    with Producer(broker=where) as producer:
        for v in (b"1", b"2", b"not json", b"4"):
            producer.send("sd", v, partition=0)
        producer.flush()
    with Consumer("sd", broker=where, auto_offset_reset="earliest",
                  value_deserializer=json.loads) as consumer:
        got = _drain(consumer, 2)
        assert [r.value for r in got] == [1, 2]  # the records before the bad one
        assert consumer.position(TP) == 2
        for _ in range(2):  # it stays there
            with pytest.raises(errors.SerializationError, match="sd/0 offset 2") as info:
                _drain(consumer, 1)
            assert isinstance(info.value.__cause__, json.JSONDecodeError)
            assert consumer.position(TP) == 2
        consumer.seek(TP, 3)
        assert [(r.offset, r.value) for r in _drain(consumer, 1)] == [(3, 4)]
