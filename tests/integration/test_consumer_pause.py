"""Consumer.pause / resume / paused (Kafka's flow control): a paused partition hands out
nothing and keeps its position, a consumer with everything paused sleeps out its poll, and
records an iterator holds are neither lost nor doubled by a pause or a seek of another
partition. Real broker processes, locally and through the router."""
from __future__ import annotations

import time

import pytest
from broker_harness import create_topic
from broker_harness import poll_until as _drain

from shmbroker import Admin, Consumer, Producer, TopicPartition, errors

P0, P1 = TopicPartition("pz", 0), TopicPartition("pz", 1)


def _produce(data_dir: str, per_partition: int, tag: bytes = b"") -> None:
    with Producer(broker=data_dir) as producer:
        for i in range(per_partition):
            for p in (0, 1):
                producer.send("pz", b"%s%d-%03d" % (tag, p, i), partition=p)
        producer.flush()


@pytest.fixture
def source(local_or_remote):
    """(data dir, what a Consumer is given as broker=), with topic pz of 2 partitions."""
    create_topic(local_or_remote[0], "pz", 2)
    return local_or_remote


def test_a_paused_partition_hands_out_nothing_until_resumed_from_its_position(source):
    data_dir, where = source
    _produce(data_dir, 5)
    with Consumer("pz", broker=where, auto_offset_reset="earliest") as consumer:
        consumer.pause(P0)
        assert consumer.paused() == {P0}
        got = _drain(consumer, 5)
        assert [(r.partition, r.offset) for r in got] == [(1, i) for i in range(5)]
        assert consumer.poll(timeout_ms=300) == []  # p0 has 5 records, paused
        _produce(data_dir, 2, b"more")
        got = _drain(consumer, 2)
        assert {r.partition for r in got} == {1} and len(got) == 2
        consumer.resume(P0)
        assert consumer.paused() == set()
        got = _drain(consumer, 7)
        assert [(r.partition, r.offset) for r in got] == [(0, i) for i in range(7)]


def test_a_consumer_with_every_partition_paused_sleeps_out_its_poll(source):
    data_dir, where = source
    _produce(data_dir, 3)
    with Consumer("pz", broker=where, auto_offset_reset="earliest") as consumer:
        consumer.pause(P0, ("pz", 1))
        started, cpu = time.monotonic(), time.process_time()
        assert consumer.poll(timeout_ms=500) == []  # not "no partitions assigned"
        assert time.monotonic() - started >= 0.45
        assert time.process_time() - cpu < 0.25  # slept, did not spin on the new records
        consumer.resume(P0, P1)
        assert len(_drain(consumer, 6)) == 6


def test_pausing_a_partition_the_iterator_holds_records_of_loses_none(source):
    data_dir, where = source
    _produce(data_dir, 50)
    with Consumer("pz", broker=where, auto_offset_reset="earliest",
                  consumer_timeout_ms=1500) as consumer:
        it = iter(consumer)
        seen = [next(it) for _ in range(3)]  # one poll buffered records of both partitions
        held = {r.partition for r in consumer._iter_buffer[consumer._iter_at:]}
        assert held == {0, 1}, "the test needs a buffer holding both partitions"
        consumer.pause(P0)
        while True:  # bounded: consumer_timeout_ms ends it
            try:
                seen.append(next(it))
            except StopIteration:
                break
        assert {r.partition for r in seen[3:]} == {1}
        consumer.resume(P0)
        seen += _drain(consumer, 100 - len(seen))
    for p in (0, 1):
        assert [r.offset for r in seen if r.partition == p] == list(range(50))


def test_a_seek_of_one_partition_keeps_what_the_iterator_holds_of_the_others(source):
    # A seek dropped every buffered record, and the other partitions' positions were past
    # them already: they were never handed out.
    data_dir, where = source
    _produce(data_dir, 20)
    with Consumer("pz", broker=where, auto_offset_reset="earliest",
                  consumer_timeout_ms=1500) as consumer:
        it = iter(consumer)
        first = next(it)
        other = 1 - first.partition
        assert any(r.partition == other for r in consumer._iter_buffer[consumer._iter_at:])
        consumer.seek(TopicPartition("pz", first.partition), 0)
        rest = list(it)
    mine = [r.offset for r in rest if r.partition == first.partition]
    theirs = [r.offset for r in rest if r.partition == other]
    assert mine == list(range(20)) and theirs == list(range(20))


def test_pause_of_a_partition_not_assigned_is_an_illegal_state(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("pz", 2)
    with Consumer(broker=broker.data_dir) as consumer:
        consumer.assign([P0])
        with pytest.raises(errors.IllegalStateError, match="not assigned"):
            consumer.pause(P1)
        with pytest.raises(errors.IllegalStateError, match="not assigned"):
            consumer.resume(P1)
        consumer.pause(P0)
        consumer.assign([P1])  # a partition no longer assigned is no longer paused
        assert consumer.paused() == set()
        consumer.assign([P0])
        assert consumer.paused() == set() and consumer.poll(timeout_ms=0) == []


def test_a_group_member_keeps_its_paused_partitions_and_commits_their_positions(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("pz", 2)
    _produce(broker.data_dir, 4)
    with Consumer("pz", broker=broker.data_dir, group="pg", auto_offset_reset="earliest",
                  enable_auto_commit=False) as consumer:
        got = _drain(consumer, 8)
        assert len(got) == 8
        consumer.pause(P0)
        _produce(broker.data_dir, 3, b"x")
        got = _drain(consumer, 3)
        assert {r.partition for r in got} == {1}
        consumer.commit()
        assert consumer.committed(P0) == 4 and consumer.committed(P1) == 7
        assert consumer.assignment() == {P0, P1} and consumer.paused() == {P0}
