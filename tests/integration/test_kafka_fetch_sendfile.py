"""Fetch record bytes leave the Kafka listener with sendfile from the segment files
(docs/design/kafka.md, "Fetch record bytes are sent from the segment file"): real clients
read them, a big response to a slow reader with a tiny receive buffer arrives byte for byte
through many partial sends, and a segment rolled and deleted by retention while its bytes
are being sent is still sent whole. The listener's counters are read from its stop line in
the broker's log (the only place they are shown for now)."""
from __future__ import annotations

import os
import re
import socket
import struct
import time

import pytest
from broker_harness import wait_for

from shmbroker import Producer
from shmbroker.coordinator.topics import partition_dir
from shmbroker.kafka import messages as M

kafka = pytest.importorskip("kafka")
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition  # noqa: E402
from kafka.admin import NewTopic  # noqa: E402

pytestmark = pytest.mark.timeout(180)

_STOP_LINE = re.compile(r"fetch record bytes: (\d+) sent with sendfile, (\d+) copied")
#: A receive buffer this small makes the listener's sends partial many times over.
SLOW_RCVBUF_BYTES = 4096
MiB = 1 << 20


@pytest.fixture
def kbroker(make_broker):
    """A broker with the Kafka listener on a free loopback port (no router)."""
    broker = make_broker(serve_args=("--kafka-listen", "127.0.0.1:0"))
    broker.address = broker.wait_running()["kafka_endpoint"]
    return broker


def listener_counters(broker) -> tuple[int, int]:
    """(bytes sent with sendfile, record bytes copied) from the stopped listener's log line."""
    assert broker.stop() == 0
    found = _STOP_LINE.findall(broker.log())
    assert len(found) == 1, broker.log()[-3000:]
    return int(found[0][0]), int(found[0][1])


def create_topic(address: str, name: str, configs: dict | None = None) -> None:
    admin = KafkaAdminClient(bootstrap_servers=address)
    try:
        admin.create_topics([NewTopic(name, 1, 1, topic_configs=configs or {})])
    finally:
        admin.close()


def produce(data_dir: str, topic: str, total_bytes: int, tag: int) -> None:
    """``total_bytes`` of distinct 1 KiB values to partition 0, appended when it returns."""
    with Producer(broker=data_dir, acks=1) as producer:
        for i in range(total_bytes // 1024):  # bounded by the count
            producer.send(topic, struct.pack(">ii", tag, i) * 128, partition=0)
        producer.flush()


def segment_path(data_dir: str, topic: str, base: int) -> str:
    return os.path.join(partition_dir(data_dir, topic, 0), f"{base:020d}.log")


def fetch_v4_frame(topic: str, offset: int, max_bytes: int, correlation_id: int,
                   offsets: list[int] | None = None) -> bytes:
    """Fetch v4 of partition 0 at ``offset`` (or once per entry of ``offsets``)."""
    name = topic.encode()
    offsets = [offset] if offsets is None else offsets
    body = struct.pack(">iiiib", -1, 0, 0, max_bytes, 0)  # replica, wait 0, min 0, max, isolation
    body += struct.pack(">ih", 1, len(name)) + name + struct.pack(">i", len(offsets))
    body += b"".join(struct.pack(">iqi", 0, at, max_bytes) for at in offsets)
    head = struct.pack(">hhih", M.FETCH, 4, correlation_id, 1) + b"t"
    return struct.pack(">i", len(head) + len(body)) + head + body


def slow_connection(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF_BYTES)  # before connect
    sock.settimeout(30)
    sock.connect((host, int(port)))
    return sock


def read_some(sock: socket.socket, n: int, into: bytearray) -> None:
    """Append ``n`` bytes to ``into``, a few KiB per recv with a pause now and then."""
    goal = len(into) + n
    calls = 0
    while len(into) < goal:  # bounded: every recv returns bytes or raises
        chunk = sock.recv(min(SLOW_RCVBUF_BYTES, goal - len(into)))
        if not chunk:
            raise ConnectionError("closed")
        into += chunk
        calls += 1
        if calls % 256 == 0:
            time.sleep(0.002)


def fetch_v4_partitions(raw: bytes, correlation_id: int) -> list[tuple[int, int, bytes]]:
    """[(error, high watermark, record bytes)] of a one-topic Fetch v4 response frame."""
    size, got_id = struct.unpack_from(">ii", raw, 0)
    assert size == len(raw) - 4 and got_id == correlation_id
    at = 8 + 4  # throttle
    assert struct.unpack_from(">i", raw, at)[0] == 1
    name_len = struct.unpack_from(">h", raw, at + 4)[0]
    at += 6 + name_len
    count = struct.unpack_from(">i", raw, at)[0]
    at += 4
    out = []
    for _ in range(count):  # bounded by the response
        _, error, hw, _, aborted, length = struct.unpack_from(">ihqqii", raw, at)
        assert aborted == 0
        at += struct.calcsize(">ihqqii")
        out.append((error, hw, raw[at:at + length]))
        at += length
    assert at == len(raw)
    return out


def fetch_v4_records(raw: bytes, correlation_id: int) -> tuple[int, int, bytes]:
    """(error, high watermark, record bytes) of a one-partition Fetch v4 response frame."""
    (only,) = fetch_v4_partitions(raw, correlation_id)
    return only


def test_a_kafka_consumer_reads_records_sent_with_sendfile(kbroker):
    create_topic(kbroker.address, "sf")
    produce(kbroker.data_dir, "sf", 2 * MiB, tag=1)
    log_bytes = os.path.getsize(segment_path(kbroker.data_dir, "sf", 0))
    consumer = KafkaConsumer(bootstrap_servers=kbroker.address, enable_auto_commit=False)
    try:
        consumer.assign([TopicPartition("sf", 0)])
        consumer.seek_to_beginning()
        got, deadline = [], time.monotonic() + 30
        while len(got) < 2048 and time.monotonic() < deadline:  # bounded by the deadline
            for batch in consumer.poll(timeout_ms=500).values():
                got.extend(batch)
    finally:
        consumer.close()
    assert [m.offset for m in got] == list(range(2048))
    assert all(m.value == struct.pack(">ii", 1, m.offset) * 128 for m in got)
    sendfile_bytes, copied = listener_counters(kbroker)
    # Every byte of the segment went out from the file at least once; none was copied.
    assert sendfile_bytes >= log_bytes and copied == 0


def test_a_big_fetch_to_a_slow_reader_arrives_byte_exact_through_partial_sends(kbroker):
    create_topic(kbroker.address, "big")
    produce(kbroker.data_dir, "big", 9 * MiB, tag=2)
    with open(segment_path(kbroker.data_dir, "big", 0), "rb") as f:
        on_disk = f.read()
    with slow_connection(kbroker.address) as sock:
        sock.sendall(fetch_v4_frame("big", 0, 32 * MiB, 7))
        raw = bytearray()
        read_some(sock, 64 * 1024, raw)
        # While that response waits on the slow reader, the loop serves others.
        host, port = kbroker.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as other:
            other.sendall(struct.pack(">ihhih", 11, M.API_VERSIONS, 0, 5, 1) + b"t")
            assert struct.unpack(">ii", other.recv(8))[1] == 5
        read_some(sock, struct.unpack_from(">i", raw)[0] + 4 - len(raw), raw)
    error, hw, records = fetch_v4_records(bytes(raw), 7)
    assert error == 0 and hw == 9 * 1024
    assert len(records) == len(on_disk) >= 9 * MiB  # every committed batch of the segment
    assert records == on_disk
    sendfile_bytes, copied = listener_counters(kbroker)
    assert sendfile_bytes == len(records) and copied == 0


def test_a_segment_rolled_and_deleted_while_its_bytes_are_sent_still_arrives_whole(kbroker):
    create_topic(kbroker.address, "gone", {"segment.bytes": str(12 * MiB)})
    produce(kbroker.data_dir, "gone", 9 * MiB, tag=3)
    first = segment_path(kbroker.data_dir, "gone", 0)
    with open(first, "rb") as f:
        on_disk = f.read()
    with slow_connection(kbroker.address) as sock:
        sock.sendall(fetch_v4_frame("gone", 0, 32 * MiB, 9))
        raw = bytearray()
        read_some(sock, 64 * 1024, raw)
        size = struct.unpack_from(">i", raw)[0] + 4
        produce(kbroker.data_dir, "gone", 4 * MiB, tag=4)  # the segment rolls at 12 MiB
        directory = os.path.dirname(first)
        wait_for(lambda: sum(n.endswith(".log") for n in os.listdir(directory)) >= 2, 30,
                 "the segment to roll")
        os.unlink(first)  # as retention would (its check runs every 5 minutes)
        # More is left to send than the kernel's buffers can hold (the listener's send buffer
        # grows to tcp_wmem's max at most), so part of it is read from the unlinked file.
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            send_buffer_max = int(f.read().split()[2])
        assert size - len(raw) > send_buffer_max + 2 * SLOW_RCVBUF_BYTES
        read_some(sock, size - len(raw), raw)
    error, _, records = fetch_v4_records(bytes(raw), 9)
    assert error == 0 and len(records) == len(on_disk) >= 9 * MiB
    assert records == on_disk
    sendfile_bytes, copied = listener_counters(kbroker)
    assert sendfile_bytes == len(records) and copied == 0


def test_records_from_a_segment_the_reader_closed_go_from_the_mapping_in_the_same_response(
        kbroker):
    """The memoryview fallback: one request names the partition once per segment, five
    segments, and the reader keeps four open, so the first slice's segment is closed before
    its descriptor could be pinned; its records go from the mapping, the others by sendfile,
    all byte for byte in one response."""
    create_topic(kbroker.address, "many", {"segment.bytes": str(64 * 1024)})
    for tag in range(8):  # a 40 KiB batch each: every 64 KiB segment holds one
        produce(kbroker.data_dir, "many", 40 * 1024, tag=tag)
    directory = partition_dir(kbroker.data_dir, "many", 0)
    bases = sorted(int(n[:-4]) for n in os.listdir(directory) if n.endswith(".log"))
    assert len(bases) >= 6  # five sealed segments and the active one
    sealed = []
    for base in bases[:5]:
        with open(segment_path(kbroker.data_dir, "many", base), "rb") as f:
            sealed.append(f.read())
    with slow_connection(kbroker.address) as sock:
        sock.sendall(fetch_v4_frame("many", 0, 32 * MiB, 11, offsets=bases[:5]))
        raw = bytearray()
        read_some(sock, 4, raw)
        read_some(sock, struct.unpack_from(">i", raw)[0], raw)
    parts = fetch_v4_partitions(bytes(raw), 11)
    assert [error for error, _, _ in parts] == [0] * 5
    assert [records for _, _, records in parts] == sealed  # each sealed segment, whole
    sendfile_bytes, copied = listener_counters(kbroker)
    assert copied == len(sealed[0]) and sendfile_bytes == sum(map(len, sealed[1:]))


def segment_fds(broker, path: str) -> int:
    """Descriptors the kafka process holds on the segment file ``path``."""
    pid = next(e["pid"] for e in broker.runtime()["processes"] if e["role"] == "kafka")
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):  # bounded by the process's descriptors
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in (path, path + " (deleted)"):
                count += 1
        except FileNotFoundError:
            pass  # closed meanwhile
    return count


def test_a_client_gone_mid_response_leaves_no_segment_descriptor_behind(kbroker):
    create_topic(kbroker.address, "cut")
    produce(kbroker.data_dir, "cut", 9 * MiB, tag=6)
    path = segment_path(kbroker.data_dir, "cut", 0)
    sock = slow_connection(kbroker.address)
    try:
        sock.sendall(fetch_v4_frame("cut", 0, 32 * MiB, 13))
        read_some(sock, 64 * 1024, bytearray())
        # The reader's own descriptor and the one pinned for the unsent response.
        wait_for(lambda: segment_fds(kbroker, path) == 2, 10, "a pinned descriptor")
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset: the next sendfile fails and the connection is closed
    wait_for(lambda: segment_fds(kbroker, path) == 1, 10, "the pinned descriptor closed")
    sendfile_bytes, copied = listener_counters(kbroker)
    assert 0 < sendfile_bytes < 9 * MiB and copied == 0
