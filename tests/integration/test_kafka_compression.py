"""Compressed batches through the Kafka listener: kafka-python and confluent-kafka producers
with gzip, snappy, lz4 and zstd; the log keeps each batch compressed as the client sent it
(only the header fields the broker owns change); a native Consumer and a kafka-python
consumer read every record back exactly."""
from __future__ import annotations

import glob
import gzip
import os
import socket
import struct
import time

import pytest
from test_kafka_listener import create_topic, kbroker, produce_v8, read_all  # noqa: F401

from shmbroker import Consumer, records
from shmbroker.layout import record_batch as RB

kafka = pytest.importorskip("kafka")
ck = pytest.importorskip("confluent_kafka")
from kafka import KafkaProducer  # noqa: E402

pytestmark = pytest.mark.timeout(120)

CODECS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


def stored_batches(data_dir: str, topic: str, partition: int) -> list[bytes]:
    """Every batch of the partition's segment files, as stored."""
    out = []
    for path in sorted(glob.glob(os.path.join(data_dir, f"{topic}-{partition}", "*.log"))):
        with open(path, "rb") as f:
            data = f.read()
        scan = records.scan_batches(data, verify_crc=True, verify_records=True)
        assert scan.ok, scan
        out += [data[b.position:b.position + struct.unpack_from(">i", data, b.position + 8)[0] + 12]
                for b in scan.batches]
    return out


@pytest.mark.parametrize("codec", list(CODECS))
def test_kafka_python_and_confluent_compressed_batches_read_back_exactly(kbroker, codec):
    topic = f"z-{codec}"
    create_topic(kbroker.address, topic, 1)
    sent = [(f"k{i % 5}".encode(), f"{codec}-kp-{i}-".encode() * 20) for i in range(60)]
    producer = KafkaProducer(bootstrap_servers=kbroker.address, compression_type=codec,
                             linger_ms=20, acks="all")
    for key, value in sent:
        producer.send(topic, key=key, value=value, partition=0)
    producer.flush(30)
    producer.close(timeout=10)
    more = [(f"c{i % 3}".encode(), f"{codec}-ck-{i}-".encode() * 20) for i in range(60)]
    cp = ck.Producer({"bootstrap.servers": kbroker.address, "compression.type": codec,
                      "linger.ms": 20})
    for key, value in more:
        cp.produce(topic, key=key, value=value, partition=0)
    assert cp.flush(30) == 0
    sent += more

    batches = stored_batches(kbroker.data_dir, topic, 0)
    assert all(b[22] & RB.COMPRESSION_MASK == CODECS[codec] for b in batches)
    assert sum(records.read_header(b).records_count for b in batches) == 120
    assert sum(len(b) for b in batches) < sum(len(v) for _, v in sent), "stored compressed"

    with Consumer(topic, broker=kbroker.data_dir, auto_offset_reset="earliest") as consumer:
        seen, deadline = [], time.monotonic() + 30
        while len(seen) < 120 and time.monotonic() < deadline:  # bounded by the deadline
            seen.extend(consumer.poll(timeout_ms=500))
    assert [(r.key, r.value) for r in seen] == sent
    assert [r.offset for r in seen] == list(range(120))
    got = read_all(kbroker.address, topic, 1, 120)
    assert [(m.key, m.value) for m in got] == sent and [m.offset for m in got] == list(range(120))


def test_a_compressed_batch_is_stored_as_sent_but_for_the_fields_the_broker_owns(kbroker):
    """The leader never decompresses: the compressed block, attributes, timestamps and count
    are the client's bytes; the base offset, leader epoch and the ring's producer stamp (and
    the CRC that covers it, docs/design/router.md) are the broker's."""
    create_topic(kbroker.address, "as-sent", 1)
    plain = records.encode_batch([f"value-{i}".encode() * 10 for i in range(50)],
                                 timestamp=1_700_000_000_000)
    block = gzip.compress(plain[RB.HEADER_SIZE:])
    sent = bytearray(plain[:RB.HEADER_SIZE]) + block
    struct.pack_into(">i", sent, 8, len(sent) - RB.LOG_OVERHEAD)
    sent[22] |= 1
    struct.pack_into(">I", sent, 17, records.crc32c(bytes(sent[21:])))
    host, port = kbroker.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        assert produce_v8(sock, 1, "as-sent", bytes(plain)) == (0, 0)
        assert produce_v8(sock, 2, "as-sent", bytes(sent)) == (0, 50)
    stored = stored_batches(kbroker.data_dir, "as-sent", 0)[1]
    assert len(stored) == len(sent) and stored[RB.HEADER_SIZE:] == block
    assert stored[21:43] == sent[21:43]  # attributes, last offset delta, both timestamps
    assert stored[57:61] == sent[57:61]  # records count
    assert struct.unpack_from(">q", stored, 0)[0] == 50
    got = records.decode_records(stored)
    assert [r.value for r in got] == [f"value-{i}".encode() * 10 for i in range(50)]
    assert [r.offset for r in got] == list(range(50, 100))


def test_offsets_for_times_answers_from_the_time_index_across_segments(kbroker):
    """kafka-python's offsets_for_times: the first offset whose timestamp is >= the target,
    with that record's timestamp; None (-1/-1 on the wire) past the newest record. Small
    segments, so sealed ones are skipped by their last time index entry."""
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
    from kafka.admin import NewTopic
    admin = KafkaAdminClient(bootstrap_servers=kbroker.address)
    try:
        admin.create_topics([NewTopic("times", 1, 1, topic_configs={"segment.bytes": "2048"})])
    finally:
        admin.close()
    t0 = 1_700_000_000_000
    producer = KafkaProducer(bootstrap_servers=kbroker.address, acks=1, linger_ms=0)
    for i in range(60):  # one batch per record: .get() before the next send
        # timestamps t0, t0+10, ... with a gap after offset 29
        at = t0 + i * 10 + (100_000 if i >= 30 else 0)
        producer.send("times", value=b"x" * 100, partition=0, timestamp_ms=at).get(timeout=30)
    producer.close(timeout=10)
    assert len(glob.glob(os.path.join(kbroker.data_dir, "times-0", "*.log"))) >= 3
    tp = TopicPartition("times", 0)
    consumer = KafkaConsumer(bootstrap_servers=kbroker.address, enable_auto_commit=False)
    try:
        def at(ts):
            found = consumer.offsets_for_times({tp: ts})[tp]
            return None if found is None else (found.offset, found.timestamp)
        assert at(0) == (0, t0)
        assert at(t0) == (0, t0)
        assert at(t0 + 1) == (1, t0 + 10)
        assert at(t0 + 250) == (25, t0 + 250)
        assert at(t0 + 300) == (30, t0 + 300 + 100_000), "inside the gap: the next record"
        assert at(t0 + 590 + 100_000) == (59, t0 + 590 + 100_000)
        assert at(t0 + 591 + 100_000) is None
    finally:
        consumer.close()
