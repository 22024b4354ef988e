"""Consumer.offsets_for_times (Kafka's offsetsForTimes): replay from a point in time, found
through the segments' time indexes, locally and through the router. Real broker processes,
real segment files (several, with small segments and index intervals), real TCP."""
from __future__ import annotations


import pytest
from broker_harness import poll_until

from shmbroker import Admin, Consumer, OffsetAndTimestamp, Producer, TopicPartition, errors

BASE_MS = 1_700_000_000_000
#: Record i of partition 0 has timestamp BASE_MS + 10 * i: 200 records over several segments.
COUNT = 200
CONFIG = {"segment.bytes": 1024, "index.interval.bytes": 128}


def _fill(data_dir: str, name: str) -> None:
    with Admin(broker=data_dir) as admin:
        admin.create_topic(name, 2, CONFIG)
    with Producer(broker=data_dir, linger_ms=0) as producer:
        for i in range(COUNT):
            producer.send(name, b"v%03d" % i, partition=0, timestamp=BASE_MS + 10 * i)
            if i % 17 == 0:
                producer.flush()  # batches of different sizes, so entries fall inside batches
        producer.flush()


def _answers(consumer, tp) -> dict:
    asked = {
        "before all": BASE_MS - 5_000,
        "the first": BASE_MS,
        "between 41 and 42": BASE_MS + 415,
        "exactly 137": BASE_MS + 1370,
        "the last": BASE_MS + 10 * (COUNT - 1),
        "after all": BASE_MS + 10 * COUNT,
    }
    return {what: consumer.offsets_for_times({tp: ts})[tp] for what, ts in asked.items()}


EXPECTED = {
    "before all": OffsetAndTimestamp(0, BASE_MS),
    "the first": OffsetAndTimestamp(0, BASE_MS),
    "between 41 and 42": OffsetAndTimestamp(42, BASE_MS + 420),
    "exactly 137": OffsetAndTimestamp(137, BASE_MS + 1370),
    "the last": OffsetAndTimestamp(COUNT - 1, BASE_MS + 10 * (COUNT - 1)),
    "after all": None,
}


def test_offsets_for_times_finds_the_first_record_at_or_after_each_time(local_or_remote):
    import os

    data_dir, where = local_or_remote
    _fill(data_dir, "ts")
    segments = [f for f in os.listdir(os.path.join(data_dir, "ts-0")) if f.endswith(".log")]
    assert len(segments) >= 3, segments  # the lookup crosses sealed segments
    tp = TopicPartition("ts", 0)
    with Consumer("ts", broker=where) as consumer:
        assert _answers(consumer, tp) == EXPECTED
        # An empty partition has no record at any time; several partitions in one call.
        both = consumer.offsets_for_times({tp: BASE_MS + 995, ("ts", 1): 0})
        assert both == {tp: OffsetAndTimestamp(100, BASE_MS + 1000),
                        TopicPartition("ts", 1): None}
        # Replay from a time: seek to the answer, poll from there.
        consumer.seek(tp, both[tp].offset)
        got = poll_until(consumer, COUNT - 100)
        assert [r.value for r in got] == [b"v%03d" % i for i in range(100, COUNT)]


def test_offsets_for_times_refuses_a_timestamp_that_is_not_ms_since_the_epoch(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("tb", 1)
    with Consumer("tb", broker=broker.data_dir) as consumer:
        for bad in (-1, 1.5, "1700000000000", None, True, 1 << 63):
            with pytest.raises(errors.ConfigError, match="ms since the epoch"):
                consumer.offsets_for_times({("tb", 0): bad})
        with pytest.raises(errors.ConfigError, match="mapping"):
            consumer.offsets_for_times([("tb", 0)])
        with pytest.raises(errors.IllegalStateError, match="not assigned"):
            consumer.offsets_for_times({("other", 0): 0})
