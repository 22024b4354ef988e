"""A live Consumer outlives its broker: after a clean restart, or a kill -9 of the whole broker
and a restart, it reads on from its position without being made again (as Kafka's clients
reconnect); a deleted topic is an UnknownTopicOrPartitionError for its producer and consumer,
not a silent wait; a topic deleted and created again is read from the start its
auto_offset_reset gives. Real broker processes, shared memory and files."""
from __future__ import annotations

import time

import pytest
from broker_harness import WAIT_S_MAX, create_topic
from broker_harness import poll_until as _poll_until

from shmbroker import Admin, Consumer, Producer, errors


@pytest.mark.parametrize("how, partitions, read_rings", [
    ("sigterm", 1, True),   # poll's one-partition ring path (poll_ring, ring_take)
    ("kill9", 1, True),
    ("sigterm", 2, True),   # several partitions: the futex_waitv sleep
    ("kill9", 2, False),    # the log only
])
def test_a_live_consumer_reads_on_after_its_broker_restarts(make_broker, how, partitions,
                                                            read_rings):
    broker = make_broker()
    create_topic(broker.data_dir, "t", partitions)
    with Producer(broker=broker.data_dir) as producer, \
            Consumer("t", broker=broker.data_dir, auto_offset_reset="earliest",
                     read_rings=read_rings) as consumer:
        for p in range(partitions):
            producer.send("t", b"before-%d" % p, partition=p).result(timeout=10)
        assert len(_poll_until(consumer, partitions)) == partitions
        if how == "sigterm":
            assert broker.stop() == 0
        else:
            broker.kill9()
        assert consumer.poll(timeout_ms=300) == []  # nothing served: nothing, no error
        broker.start()
        for p in range(partitions):
            assert producer.send("t", b"after-%d" % p, partition=p).result(timeout=10).offset == 1
        got = _poll_until(consumer, partitions)
        assert sorted((r.partition, r.offset, r.value) for r in got) == \
            [(p, 1, b"after-%d" % p) for p in range(partitions)]


def test_a_deleted_topic_is_unknown_to_its_live_producer_and_consumer(broker):
    create_topic(broker.data_dir, "gone", 1)
    with Producer(broker=broker.data_dir) as producer, \
            Consumer("gone", broker=broker.data_dir, auto_offset_reset="earliest") as consumer:
        producer.send("gone", b"x", partition=0).result(timeout=10)
        assert [r.value for r in _poll_until(consumer, 1)] == [b"x"]
        with Admin(broker=broker.data_dir) as admin:
            admin.delete_topic("gone")
        with pytest.raises(errors.UnknownTopicOrPartitionError):  # not "the broker shut down"
            producer.send("gone", b"y", partition=0).result(timeout=10)
        deadline = time.monotonic() + WAIT_S_MAX
        with pytest.raises(errors.UnknownTopicOrPartitionError, match="gone"):
            while time.monotonic() < deadline:  # bounded; the recheck comes within ~0.5 s
                assert consumer.poll(timeout_ms=200) == []


def test_a_topic_created_again_is_read_from_its_start_by_a_live_consumer(broker):
    create_topic(broker.data_dir, "again", 1)
    with Producer(broker=broker.data_dir) as producer, \
            Consumer("again", broker=broker.data_dir, auto_offset_reset="earliest") as consumer:
        for i in range(3):
            producer.send("again", b"old-%d" % i, partition=0).result(timeout=10)
        assert len(_poll_until(consumer, 3)) == 3  # its position is 3 now
        with Admin(broker=broker.data_dir) as admin:
            admin.delete_topic("again")
            admin.create_topic("again", 1)
        assert producer.send("again", b"new", partition=0).result(timeout=10).offset == 0
        got = _poll_until(consumer, 1)
        assert [(r.offset, r.value) for r in got] == [(0, b"new")]


@pytest.mark.parametrize("keyed", [False, True])
def test_send_batch_after_a_clean_broker_restart_goes_to_the_restarted_broker(make_broker,
                                                                                keyed):
    # send_batch wrote its frames to the stopped broker's ring and failed once with
    # BrokerNotRunningError (only send followed the restart).
    broker = make_broker()
    create_topic(broker.data_dir, "b", 2)
    keys = [b"k%d" % i for i in range(4)] if keyed else None
    with Producer(broker=broker.data_dir) as producer:
        first = producer.send_batch("b", [b"a%d" % i for i in range(4)], keys=keys,
                                    partition=None if keyed else 1)
        assert len(first.offsets(timeout=10)) == 4
        assert broker.stop() == 0
        broker.start()
        second = producer.send_batch("b", [b"b%d" % i for i in range(4)], keys=keys,
                                     partition=None if keyed else 1)
        assert (second.offsets(timeout=10) >= 0).all()
    with Consumer("b", broker=broker.data_dir, auto_offset_reset="earliest") as consumer:
        got = _poll_until(consumer, 8)
    assert sorted(r.value for r in got) == sorted([b"a%d" % i for i in range(4)] +
                                                  [b"b%d" % i for i in range(4)])


def test_a_group_member_says_the_broker_is_gone_then_reads_on_from_its_commit(make_broker):
    # While the coordinator is gone a member's poll is a BrokerNotRunningError after its
    # timeout (not a hang, not a busy loop); after the restart it rejoins and reads on from
    # the committed offsets, which the restart kept.
    broker = make_broker()
    create_topic(broker.data_dir, "g", 2)
    with Producer(broker=broker.data_dir) as producer, \
            Consumer("g", broker=broker.data_dir, group="grp",
                     auto_offset_reset="earliest") as consumer:
        for i in range(4):
            producer.send("g", b"a%d" % i, partition=i % 2).result(timeout=10)
        assert len(_poll_until(consumer, 4)) == 4
        consumer.commit()
        assert broker.stop() == 0
        started = time.monotonic()
        with pytest.raises(errors.BrokerNotRunningError, match=broker.data_dir):
            consumer.poll(timeout_ms=300)
        assert time.monotonic() - started < WAIT_S_MAX
        broker.start()
        for i in range(4):
            producer.send("g", b"b%d" % i, partition=i % 2).result(timeout=10)
        got = _poll_until(consumer, 4)
        assert sorted((r.partition, r.offset, r.value) for r in got) == \
            [(0, 2, b"b0"), (0, 3, b"b2"), (1, 2, b"b1"), (1, 3, b"b3")]
