"""Arguments a kafka-python or confluent-kafka user may pass get what they mean or a clear
error naming them, the same locally and through the router (a 1-D array or a list of ints
for send_batch became records of the wrong bytes remotely; elsewhere bare TypeErrors from
deep inside). Real broker processes."""
from __future__ import annotations


import numpy as np
import pytest
from broker_harness import WAIT_S_MAX, create_topic, poll_until

from shmbroker import Consumer, Producer, TopicPartition, errors


@pytest.fixture
def where(local_or_remote):
    create_topic(local_or_remote[0], "ca", 2)
    return local_or_remote[1]


def test_send_batch_refuses_values_that_are_not_records(where):
    with Producer(broker=where) as producer:
        with pytest.raises(TypeError, match="2-D uint8"):
            producer.send_batch("ca", np.zeros(10, dtype=np.uint8), partition=0)
        with pytest.raises(TypeError, match="2-D uint8"):
            producer.send_batch("ca", np.zeros((2, 3), dtype=np.int64), partition=0)
        with pytest.raises(TypeError, match=r"values\[1\] must be bytes-like or None, got int"):
            producer.send_batch("ca", [b"ok", 7], partition=0)
        # A null value in a batch is a tombstone, as with send().
        producer.send_batch("ca", [b"a", None, b"c"], partition=1).offsets(timeout=WAIT_S_MAX)
    with Consumer(("ca",), broker=where, auto_offset_reset="earliest") as consumer:
        got = poll_until(consumer, 3)
    assert [(r.partition, r.value) for r in got] == [(1, b"a"), (1, None), (1, b"c")]


def test_topics_in_a_list_and_argument_types_are_taken_or_named(where):
    with Consumer(["ca"], broker=where) as listed, Consumer("ca", broker=where) as named:
        assert listed.assignment() == named.assignment() == {TopicPartition("ca", 0),
                                                              TopicPartition("ca", 1)}
        with pytest.raises(errors.ConfigError, match="max_records must be an int"):
            listed.poll(timeout_ms=0, max_records="5")
    with pytest.raises(TypeError, match="topics must be names"):
        Consumer([1], broker=where)
    with pytest.raises(errors.ConfigError, match="linger_ms='5' must be a number"):
        Producer(broker=where, linger_ms="5")
