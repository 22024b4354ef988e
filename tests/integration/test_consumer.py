"""Consumer API against partitions written and published by the test process (fake_partitions)."""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest
from fake_partitions import FakePartitions

from shmbroker import Consumer, TopicPartition, errors
from shmbroker.client.consumer import ConsumerRecord, ViewRecord


@pytest.fixture
def parts(data_dir):
    fake = FakePartitions(data_dir)
    yield fake
    fake.close()


@pytest.fixture
def consumers(data_dir):
    made: list[Consumer] = []

    def make(*topics, **kwargs) -> Consumer:
        consumer = Consumer(*topics, broker=data_dir, **kwargs)
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        consumer.close()


def drain(consumer, timeout_ms=200, max_records=500) -> list:
    out = []
    while True:  # bounded: ends at the first empty poll
        got = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        if not got:
            return out
        out.extend(got)


def test_reads_every_record_with_topic_partition_key_value_headers(parts, consumers):
    parts.create_topic("t", 1)
    parts.append("t", 0, [b"v0", None, b"v2"], keys=[b"k0", b"k1", None],
                 headers=[[("h", b"1")], None, [("a", None), ("b", b"x")]])
    consumer = consumers("t", auto_offset_reset="earliest")
    got = consumer.poll(timeout_ms=1000)
    assert [(r.topic, r.partition, r.offset, r.key, r.value) for r in got] == [
        ("t", 0, 0, b"k0", b"v0"), ("t", 0, 1, b"k1", None), ("t", 0, 2, None, b"v2")]
    assert got[0].headers == (("h", b"1"),) and got[1].headers == ()
    assert got[2].headers == (("a", None), ("b", b"x"))
    assert all(isinstance(r, ConsumerRecord) and r.timestamp == 1_700_000_000_000 for r in got)
    assert got[0].topic_partition == TopicPartition("t", 0)
    assert consumer.position(("t", 0)) == 3
    assert consumer.poll() == []


def test_latest_starts_at_the_end_and_sees_only_new_records(parts, consumers):
    parts.create_topic("t", 1)
    parts.fill("t", 0, 30)
    consumer = consumers("t")  # auto_offset_reset="latest"
    assert consumer.poll() == []
    assert consumer.position(TopicPartition("t", 0)) == 30
    new = parts.fill("t", 0, 5, start=30)
    assert [r.value for r in consumer.poll(timeout_ms=1000)] == new


def test_max_records_splits_a_fetch_and_keeps_order_across_polls(parts, consumers):
    parts.create_topic("t", 1)
    values = parts.fill("t", 0, 1000, per_batch=100)
    consumer = consumers("t", auto_offset_reset="earliest")
    first = consumer.poll(max_records=7)
    assert [r.offset for r in first] == list(range(7))
    rest = drain(consumer, timeout_ms=0, max_records=333)
    assert [r.value for r in first + rest] == values


def test_assign_seek_position_beginning_end(parts, consumers):
    parts.create_topic("t", 2)
    v0 = parts.fill("t", 0, 50)
    v1 = parts.fill("t", 1, 20)
    consumer = consumers()
    consumer.assign([("t", 1)])  # a plain tuple is accepted
    assert consumer.assignment() == {TopicPartition("t", 1)}
    consumer.seek(TopicPartition("t", 1), 15)
    assert consumer.position(("t", 1)) == 15
    assert [r.value for r in drain(consumer)] == v1[15:]
    consumer.seek_to_beginning()
    assert consumer.position(("t", 1)) == 0
    consumer.assign([TopicPartition("t", 0), TopicPartition("t", 1)])
    consumer.seek(("t", 0), 44)
    got = drain(consumer)
    assert sorted((r.partition, r.value) for r in got) == sorted(
        [(0, v) for v in v0[44:]] + [(1, v) for v in v1])
    consumer.seek_to_end(("t", 0))
    assert consumer.position(("t", 0)) == 50
    assert consumer.end_offsets([("t", 0), ("t", 1)]) == {("t", 0): 50, ("t", 1): 20}
    with pytest.raises(errors.IllegalStateError):
        consumer.seek(("t", 5), 0)


def test_subscribing_without_group_assigns_every_partition(parts, consumers):
    parts.create_topic("a", 3)
    parts.create_topic("b", 1)
    consumer = consumers("a", "b", auto_offset_reset="earliest")
    assert consumer.assignment() == {("a", 0), ("a", 1), ("a", 2), ("b", 0)}
    for p in range(3):
        parts.fill("a", p, 10)
    parts.fill("b", 0, 10)
    got = drain(consumer)
    assert len(got) == 40
    for tp in consumer.assignment():  # per-partition order
        offsets = [r.offset for r in got if (r.topic, r.partition) == tp]
        assert offsets == list(range(10))


def test_group_without_a_coordinator_is_broker_not_running(parts, data_dir):
    """A group needs the coordinator (partitions alone are not enough): a typed error that
    names the data dir, not a hang. Groups with a real broker: test_consumer_groups.py."""
    parts.create_topic("t", 1)
    with pytest.raises(errors.BrokerNotRunningError, match=str(data_dir)):
        Consumer("t", broker=data_dir, group="g")


def test_unknown_topic_and_partition_are_typed_errors(parts, consumers):
    parts.create_topic("t", 1)
    with pytest.raises(errors.UnknownTopicOrPartitionError, match="nope"):
        consumers("nope")
    consumer = consumers()
    with pytest.raises(errors.UnknownTopicOrPartitionError, match="partition 3"):
        consumer.assign([("t", 3)])


@pytest.mark.parametrize("kwargs, words", [
    ({"max_records": 0}, "max_records must be an int >= 1, got 0"),
    ({"max_records": "5"}, "max_records must be an int >= 1, got '5'"),
    ({"timeout_ms": "100"}, "timeout_ms must be a number of ms, got '100'"),
    ({"timeout_ms": float("nan")}, "timeout_ms must be a number of ms, got nan"),
    ({"timeout_ms": None}, "timeout_ms must be a number of ms, got None"),
])
def test_bad_poll_arguments_are_config_errors_naming_them(parts, consumers, kwargs, words):
    parts.create_topic("t", 1)
    consumer = consumers("t")
    with pytest.raises(errors.ConfigError) as info:
        consumer.poll(**kwargs)
    assert words in str(info.value)


def test_broker_not_running_names_the_data_dir(tmp_path, data_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(errors.BrokerNotRunningError, match=str(missing)):
        Consumer("t", broker=missing)
    # A data dir with topics but no partition being served (no control region).
    from shmbroker.coordinator.topics import load_topics, save_topics
    save_topics(str(data_dir), load_topics(str(data_dir)).create("t", 1))
    with pytest.raises(errors.BrokerNotRunningError, match=str(data_dir)):
        Consumer("t", broker=data_dir)


def test_offset_out_of_range_after_retention_resets_or_raises(data_dir, consumers):
    parts = FakePartitions(data_dir)
    try:
        parts.create_topic("t", 1, segment_bytes=1024, retention_bytes=2048)
        values = parts.fill("t", 0, 300, per_batch=5)
        early = consumers("t", auto_offset_reset="earliest")
        strict = consumers("t", auto_offset_reset="error")
        strict.seek(("t", 0), 0)
        early.seek(("t", 0), 0)
        latest = consumers("t", auto_offset_reset="latest")
        latest.seek(("t", 0), 0)
        deleted = parts.delete_old_segments("t", 0)
        assert deleted
        start = parts.logs[("t", 0)].log_start_offset
        assert [r.value for r in drain(early)] == values[start:]
        with pytest.raises(errors.OffsetOutOfRangeError):
            strict.poll()
        assert latest.poll() == [] and latest.position(("t", 0)) == 300
        early.seek(("t", 0), 10_000)  # past the end: reset too, here to the log start
        assert [r.offset for r in drain(early)] == list(range(start, 300))
    finally:
        parts.close()


def test_reads_across_segment_rolls(data_dir, consumers):
    parts = FakePartitions(data_dir)
    try:
        parts.create_topic("t", 1, segment_bytes=2048)
        consumer = consumers("t", auto_offset_reset="earliest")
        values = []
        got = []
        for round_ in range(20):
            values += parts.fill("t", 0, 17, per_batch=3, start=len(values))
            got += drain(consumer, timeout_ms=0)
        assert len(parts.logs[("t", 0)].segments) > 5
        assert [r.value for r in got] == values
    finally:
        parts.close()


def test_value_memoryview_records_are_zero_copy_and_outlive_the_segment(data_dir, consumers):
    parts = FakePartitions(data_dir)
    try:
        parts.create_topic("t", 1, segment_bytes=1024, retention_bytes=1024)
        parts.append("t", 0, [b"first-value"], keys=[b"k"], headers=[[("h", b"v")]])
        values = [b"first-value"] + parts.fill("t", 0, 100, per_batch=5, start=1)
        consumer = consumers("t", auto_offset_reset="earliest", value_memoryview=True)
        got = drain(consumer)
        assert all(isinstance(r, ViewRecord) and isinstance(r.value, memoryview) for r in got)
        assert got[0].value.readonly and bytes(got[0].key) == b"k"
        assert got[0].headers == (("h", b"v"),)
        assert [bytes(r.value) for r in got] == values
        assert parts.delete_old_segments("t", 0)  # unlinks the files our views point into
        consumer.close()
        gc.collect()
        assert bytes(got[0].value) == b"first-value" and bytes(got[1].value) == values[1]
    finally:
        parts.close()


def test_poll_columnar_returns_numpy_columns_per_partition(parts, consumers):
    parts.create_topic("t", 2)
    v0 = parts.fill("t", 0, 250, per_batch=50, size=16)
    v1 = parts.fill("t", 1, 10, per_batch=10, size=16)
    consumer = consumers("t", auto_offset_reset="earliest")
    consumer.seek(("t", 0), 5)
    got = consumer.poll_columnar(timeout_ms=500, max_records=100)
    assert set(got) == {("t", 0), ("t", 1)}
    b0 = got[TopicPartition("t", 0)]
    assert list(b0.offsets) == list(range(5, 105))
    assert b0.values_2d().tobytes() == b"".join(v0[5:105])
    assert isinstance(b0.offsets, np.ndarray) and b0.value(0).tobytes() == v0[5]
    assert bytes(got[("t", 1)].values_2d().tobytes()) == b"".join(v1)
    assert consumer.position(("t", 0)) == 105
    rest = consumer.poll_columnar()
    assert list(rest[("t", 0)].offsets) == list(range(105, 250))
    assert consumer.poll_columnar() == {}
    # Mixing: records decoded by poll() but not handed out are read again as columns.
    parts.fill("t", 1, 30, start=10)
    assert [r.offset for r in consumer.poll(max_records=3)] == [10, 11, 12]
    assert list(consumer.poll_columnar()[("t", 1)].offsets) == list(range(13, 40))


def test_iteration_and_consumer_timeout(parts, consumers):
    parts.create_topic("t", 1)
    values = parts.fill("t", 0, 25)
    consumer = consumers("t", auto_offset_reset="earliest", consumer_timeout_ms=100)
    assert [r.value for r in consumer] == values


def test_close_and_context_manager(parts, data_dir):
    parts.create_topic("t", 1)
    parts.fill("t", 0, 3)
    with Consumer("t", broker=data_dir, auto_offset_reset="earliest") as consumer:
        got = consumer.poll(timeout_ms=200)
    assert consumer.closed and len(got) == 3 and got[2].value.startswith(b"0:2:")
    with pytest.raises(errors.IllegalStateError):
        consumer.poll()
    consumer.close()  # idempotent


def test_poll_with_nothing_assigned_is_an_error_not_a_hang(parts, consumers):
    consumer = consumers()
    assert consumer.poll() == []
    with pytest.raises(errors.IllegalStateError, match="assign"):
        consumer.poll(timeout_ms=10)


def test_never_sees_appended_records_that_are_not_published(parts, consumers):
    parts.create_topic("t", 1)
    parts.fill("t", 0, 10)
    consumer = consumers("t", auto_offset_reset="earliest")
    parts.append("t", 0, [b"unpublished"], publish=False)
    assert len(drain(consumer, timeout_ms=50)) == 10
    parts.publish("t", 0)
    assert [r.value for r in consumer.poll(timeout_ms=500)] == [b"unpublished"]
    assert os.getpid() == consumer._pid


def test_a_partition_stuck_mid_publish_is_skipped_by_poll_not_raised(parts, consumers):
    from shmbroker.layout.shm import CONTROL as C
    from shmbroker.native import _native

    parts.create_topic("t", 2)
    parts.append("t", 0, [b"a"])
    consumer = consumers("t", auto_offset_reset="earliest")
    assert [r.value for r in drain(consumer)] == [b"a"]
    buf = parts.controls[("t", 1)].buf
    # Partition 1's writer "dies" mid-publish (odd seqlock) after announcing a change.
    _native.atomic_store_u64(buf, C["state_seq"], _native.atomic_load_u64(buf, C["state_seq"]) + 1)
    _native.atomic_store_u32(buf, C["hw_seq"], _native.atomic_load_u32(buf, C["hw_seq"]) + 1)
    parts.append("t", 0, [b"b"])
    assert [r.value for r in consumer.poll(timeout_ms=2000)] == [b"b"]  # partition 0 goes on
    parts.controls[("t", 1)].take_ownership(1)  # the restarted partition process repairs it
    parts.append("t", 1, [b"c"])
    assert [r.value for r in drain(consumer)] == [b"c"]
