"""The Kafka listener (`serve --kafka-listen`): unmodified kafka-python clients create topics,
produce (acks 0, 1, all) and consume over Kafka's wire protocol against a real broker on
127.0.0.1; Kafka and shmbroker clients read each other's records; malformed frames close
connections without disturbing other clients or the process."""
from __future__ import annotations

import os
import random
import re
import socket
import struct
import threading
import time

import pytest
from broker_harness import run_cli, wait_for

from shmbroker import Consumer, Producer, records
from shmbroker.kafka import messages as M

kafka = pytest.importorskip("kafka")
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from kafka.admin import NewTopic  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def kbroker(make_broker):
    """A broker with the Kafka listener on a free loopback port (no router)."""
    broker = make_broker(serve_args=("--kafka-listen", "127.0.0.1:0"))
    doc = broker.wait_running()
    address = doc["kafka_endpoint"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0"), doc
    broker.address = address
    return broker


def kafka_pid(broker) -> tuple[int, int]:
    entry = next(e for e in broker.runtime()["processes"] if e["role"] == "kafka")
    return entry["pid"], entry["restarts"]


def create_topic(address: str, name: str, partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=address)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()


def read_all(address: str, topic: str, partitions: int, count: int) -> list:
    consumer = KafkaConsumer(bootstrap_servers=address, consumer_timeout_ms=2_000,
                             enable_auto_commit=False)
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        consumer.seek_to_beginning()
        got = []
        deadline = time.monotonic() + 30
        while len(got) < count and time.monotonic() < deadline:  # bounded by the deadline
            for batch in consumer.poll(timeout_ms=500).values():
                got.extend(batch)
        got.extend(m for b in consumer.poll(timeout_ms=300).values() for m in b)  # no extras
        return got
    finally:
        consumer.close()


def test_kafka_python_produces_with_acks_0_1_all_and_reads_back_exactly(kbroker):
    create_topic(kbroker.address, "orders", 3)
    sent, acked = [], {}
    for acks in (0, 1, "all"):
        # idempotence off here so that acks 0 and 1 are allowed too (kafka-python refuses them
        # with it); its idempotent producer has its own test below
        producer = KafkaProducer(bootstrap_servers=kbroker.address, acks=acks,
                                 enable_idempotence=False, linger_ms=5)
        futures = []
        for i in range(40):
            key, value = f"{acks}-key-{i % 7}".encode(), f"{acks}-value-{i}".encode()
            headers = [("n", str(i).encode()), ("acks", str(acks).encode())]
            sent.append((key, value, headers))
            futures.append((key, value, producer.send("orders", key=key, value=value,
                                                      headers=headers)))
        producer.flush(timeout=30)
        if acks != 0:
            for key, value, future in futures:
                meta = future.get(timeout=30)
                acked[(key, value)] = (meta.partition, meta.offset)
        producer.close(timeout=10)
    got = read_all(kbroker.address, "orders", 3, len(sent))
    assert len(got) == len(sent)
    assert sorted((m.key, m.value, list(m.headers)) for m in got) == sorted(sent)
    for m in got:
        # kafka-python's default partitioner is Kafka's murmur2; so is records.partition_for_key
        assert m.partition == (records.murmur2(m.key) & 0x7FFFFFFF) % 3
        if (m.key, m.value) in acked:
            assert acked[(m.key, m.value)] == (m.partition, m.offset)
    for p in range(3):
        offsets = [m.offset for m in got if m.partition == p]
        assert offsets == list(range(len(offsets)))  # offsets assigned by the partitions, dense
    order = [m.value for m in got if m.partition == 0]
    assert order == [v for k, v, _ in sent if (records.murmur2(k) & 0x7FFFFFFF) % 3 == 0]


def test_a_native_producer_feeds_a_kafka_consumer_and_a_kafka_producer_a_native_consumer(
        kbroker):
    create_topic(kbroker.address, "mixed", 2)
    with Producer(broker=kbroker.data_dir, acks=1) as producer:
        for i in range(25):
            producer.send("mixed", f"native-{i}".encode(), key=f"k{i}".encode(), partition=i % 2,
                          headers=[("from", b"shmbroker")])
        producer.flush()
    got = read_all(kbroker.address, "mixed", 2, 25)
    assert sorted(m.value for m in got) == sorted(f"native-{i}".encode() for i in range(25))
    assert all(m.headers == [("from", b"shmbroker")] and m.key == b"k" + m.value[7:]
               for m in got)
    assert all(m.partition == int(m.value[7:]) % 2 for m in got)

    producer = KafkaProducer(bootstrap_servers=kbroker.address, acks=1, enable_idempotence=False)
    for i in range(25):
        producer.send("mixed", key=f"kk{i}".encode(), value=f"kafka-{i}".encode(),
                      headers=[("from", b"kafka-python")], partition=i % 2).get(timeout=30)
    producer.close(timeout=10)
    with Consumer("mixed", broker=kbroker.data_dir, auto_offset_reset="earliest") as consumer:
        seen = []
        deadline = time.monotonic() + 30
        while len(seen) < 50 and time.monotonic() < deadline:  # bounded by the deadline
            seen.extend(consumer.poll(timeout_ms=500))
    kafka_made = [r for r in seen if r.value.startswith(b"kafka-")]
    assert sorted(r.value for r in kafka_made) == sorted(f"kafka-{i}".encode() for i in range(25))
    for r in kafka_made:
        i = int(r.value[6:])
        assert r.key == f"kk{i}".encode() and r.partition == i % 2
        assert [(k, bytes(v)) for k, v in r.headers] == [("from", b"kafka-python")]
    assert len(seen) == 50
    for p in range(2):
        offsets = [r.offset for r in seen if r.partition == p]
        assert offsets == list(range(26 if p == 0 else 24))  # 13 + 13 / 12 + 12, dense


def frame(api_key: int, version: int, correlation_id: int, body: bytes = b"",
          client_id: bytes = b"t") -> bytes:
    head = struct.pack(">hhih", api_key, version, correlation_id, len(client_id)) + client_id
    return struct.pack(">i", len(head) + len(body)) + head + body


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:  # bounded: every recv returns bytes or ends the loop
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def response(sock: socket.socket) -> tuple[int, bytes]:
    size = struct.unpack(">i", recv_exact(sock, 4))[0]
    data = recv_exact(sock, size)
    return struct.unpack(">i", data[:4])[0], data[4:]


def connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def test_api_versions_above_ours_get_kafkas_fallback_and_requests_are_answered_in_order(
        kbroker):
    with connect(kbroker.address) as sock:
        # librdkafka's opening: ApiVersions v3 with a flexible (v2) header: not parsed.
        sock.sendall(frame(M.API_VERSIONS, 3, 77, b"\x00\x05rdkaf\x00\x00"))
        assert response(sock) == (77, bytes.fromhex("0023 00000001 0012 0000 0002"))
        # Pipelined: ApiVersions v2, Metadata v8 (all topics), ApiVersions v0, one write.
        sock.sendall(frame(M.API_VERSIONS, 2, 1) + frame(M.METADATA, 8, 2, b"\xff\xff\xff\xff\x00\x00\x00")
                     + frame(M.API_VERSIONS, 0, 3))
        ids = []
        for _ in range(3):
            cid, body = response(sock)
            ids.append(cid)
            if cid == 1:
                assert body[:2] == b"\x00\x00"
                count = struct.unpack(">i", body[2:6])[0]
                ranges = {struct.unpack(">hhh", body[6 + 6 * i:12 + 6 * i])[0]:
                          struct.unpack(">hhh", body[6 + 6 * i:12 + 6 * i])[1:]
                          for i in range(count)}
                assert ranges == M.SUPPORTED
        assert ids == [1, 2, 3]


def fuzz_frames(rng: random.Random, count: int):
    """Malformed frames of every kind we could think of; each one alone on its connection."""
    good = frame(M.METADATA, 5, 9, b"\x00\x00\x00\x01\x00\x06orders\x01")
    for i in range(count):  # bounded by count
        kind = i % 8
        if kind == 0:
            yield os.urandom(rng.randrange(1, 300))
        elif kind == 1:  # absurd or negative sizes
            yield struct.pack(">i", rng.choice([-1, 0, 3, 2 ** 31 - 1, 1 << 30])) + os.urandom(20)
        elif kind == 2:  # truncated valid frame (then the client stops sending)
            yield good[:rng.randrange(1, len(good))]
        elif kind == 3:  # unknown api keys / versions
            yield frame(rng.choice([4, 5, 17, 99, 32767, -5]), rng.randrange(-3, 20), i)
        elif kind == 4:  # served key, unserved version
            yield frame(M.FETCH, rng.choice([0, 1, 2, 3, 12, 17, 400]), i, os.urandom(30))
        elif kind == 5:  # mutated body of a valid request
            body = bytearray(good[4:])
            for _ in range(rng.randrange(1, 4)):
                body[rng.randrange(8, len(body))] = rng.randrange(256)
            yield struct.pack(">i", len(body)) + bytes(body)
        elif kind == 6:  # absurd array counts / string lengths inside a produce
            yield frame(M.PRODUCE, 7, i, b"\xff\xff\x00\x01\x00\x00\x03\xe8"
                        + struct.pack(">i", rng.choice([2 ** 31 - 1, -7, 100000])) + os.urandom(8))
        else:  # a produce with garbage records (a well-formed request, a bad batch)
            records_ = os.urandom(rng.randrange(0, 120))
            yield frame(M.PRODUCE, 7, i, b"\xff\xff\x00\x01\x00\x00\x03\xe8\x00\x00\x00\x01"
                        b"\x00\x06orders\x00\x00\x00\x01\x00\x00\x00\x00"
                        + struct.pack(">i", len(records_)) + records_)


def test_thousands_of_malformed_frames_close_connections_while_others_are_served(kbroker):
    create_topic(kbroker.address, "orders", 1)
    pid_before = kafka_pid(kbroker)
    stop = threading.Event()
    served, problems = [], []

    def good_client() -> None:
        producer = KafkaProducer(bootstrap_servers=kbroker.address, acks=1,
                                 enable_idempotence=False)
        try:
            i = 0
            while not stop.is_set():  # bounded by the fuzzing below
                meta = producer.send("orders", key=b"good", value=b"%d" % i).get(timeout=10)
                served.append(meta.offset)
                i += 1
        except Exception as exc:  # noqa: BLE001  (reported below)
            problems.append(exc)
        finally:
            producer.close(timeout=5)

    thread = threading.Thread(target=good_client)
    thread.start()
    rng = random.Random(7)
    answered = closed = 0
    try:
        for data in fuzz_frames(rng, 2_400):
            with connect(kbroker.address) as sock:
                sock.settimeout(5)
                try:
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                    while sock.recv(65536):  # bounded: the broker answers or closes
                        answered += 1
                    closed += 1
                except (ConnectionResetError, BrokenPipeError):
                    closed += 1
    finally:
        stop.set()
        thread.join(30)
    assert closed >= 2_400
    assert not problems, problems
    assert len(served) > 10 and served == sorted(served)
    assert kafka_pid(kbroker) == pid_before  # never crashed, never restarted
    # The garbage never reached the log: only the good client's records are there.
    got = read_all(kbroker.address, "orders", 1, len(served))
    assert [m.offset for m in got] == list(range(len(served)))
    assert {m.key for m in got} == {b"good"}


def test_a_non_loopback_kafka_listen_is_refused_with_the_reason(tmp_path):
    result = run_cli("serve", "--data-dir", str(tmp_path / "d"), "--listen", "none",
                     "--kafka-listen", "10.1.2.3:9092")
    assert result.returncode == 2
    assert "only loopback addresses" in result.stderr and "no authentication" in result.stderr
    assert not (tmp_path / "d").exists() or not os.listdir(tmp_path / "d")


def test_kafka_listen_from_the_config_file_starts_the_listener(make_broker, tmp_path):
    config = tmp_path / "broker.toml"
    config.write_text('listen = "none"\nkafka_listen = "127.0.0.1:0"\n')
    broker = make_broker(serve_args=("--config", str(config)))
    doc = broker.wait_running()
    with connect(doc["kafka_endpoint"]) as sock:
        sock.sendall(frame(M.API_VERSIONS, 0, 5))
        assert response(sock)[0] == 5


def test_confluent_kafka_creates_produces_with_each_acks_and_consumes(kbroker):
    ck = pytest.importorskip("confluent_kafka")
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.admin import NewTopic as CkNewTopic

    admin = AdminClient({"bootstrap.servers": kbroker.address})  # kept: its futures need it
    for name, future in admin.create_topics([CkNewTopic("ck", 2, 1)]).items():
        assert future.result(30) is None, name
    delivered, sent = [], []
    for acks in ("0", "1", "all"):
        # murmur2_random: Java's partitioner (librdkafka's default is CRC-32, brief §7)
        producer = ck.Producer({"bootstrap.servers": kbroker.address, "acks": acks,
                                "partitioner": "murmur2_random"})
        for i in range(15):
            key, value = f"k{i}".encode(), f"{acks}-{i}".encode()
            sent.append((key, value))
            producer.produce("ck", key=key, value=value, headers=[("acks", acks.encode())],
                             on_delivery=lambda err, m: delivered.append((err, m.partition())))
        assert producer.flush(30) == 0
    assert len(delivered) == 45 and all(err is None for err, _ in delivered)
    consumer = ck.Consumer({"bootstrap.servers": kbroker.address, "group.id": "unused",
                            "enable.auto.commit": False})
    consumer.assign([ck.TopicPartition("ck", p, ck.OFFSET_BEGINNING) for p in range(2)])
    got, deadline = [], time.monotonic() + 30
    try:
        while len(got) < 45 and time.monotonic() < deadline:  # bounded by the deadline
            m = consumer.poll(0.5)
            if m is not None:
                assert m.error() is None, m.error()
                got.append(m)
    finally:
        consumer.close()
    assert sorted((m.key(), m.value()) for m in got) == sorted(sent)
    for m in got:
        assert m.partition() == (records.murmur2(m.key()) & 0x7FFFFFFF) % 2
        assert m.headers() == [("acks", m.value().split(b"-")[0])]
    for p in range(2):
        assert [m.offset() for m in got if m.partition() == p] == \
            list(range(sum(1 for m in got if m.partition() == p)))


def test_aiokafka_creates_produces_with_each_acks_and_consumes(kbroker):
    pytest.importorskip("aiokafka")
    import asyncio

    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka import TopicPartition as AioTopicPartition
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin import NewTopic as AioNewTopic

    async def scenario() -> tuple[list, list]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kbroker.address)
        await admin.start()
        try:
            await admin.create_topics([AioNewTopic("ak", 2, 1)])
        finally:
            await admin.close()
        sent = []
        for acks in (0, 1, "all"):
            producer = AIOKafkaProducer(bootstrap_servers=kbroker.address, acks=acks)
            await producer.start()
            try:
                for i in range(15):
                    key, value = f"k{i}".encode(), f"{acks}-{i}".encode()
                    sent.append((key, value))
                    await producer.send_and_wait("ak", key=key, value=value,
                                                 headers=[("acks", str(acks).encode())])
            finally:
                await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=kbroker.address, enable_auto_commit=False)
        await consumer.start()
        got = []
        try:
            consumer.assign([AioTopicPartition("ak", p) for p in range(2)])
            await consumer.seek_to_beginning()
            deadline = time.monotonic() + 30
            while len(got) < len(sent) and time.monotonic() < deadline:  # bounded
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend(batch)
        finally:
            await consumer.stop()
        return sent, got

    sent, got = asyncio.run(scenario())
    assert sorted((m.key, m.value) for m in got) == sorted(sent)
    for m in got:
        assert m.partition == (records.murmur2(m.key) & 0x7FFFFFFF) % 2  # aiokafka: murmur2
        assert list(m.headers) == [("acks", m.value.split(b"-")[0])]


def init_producer_id(sock: socket.socket, correlation_id: int) -> int:
    sock.sendall(frame(M.INIT_PRODUCER_ID, 1, correlation_id, struct.pack(">hi", -1, 60_000)))
    cid, body = response(sock)
    _, error, producer_id, epoch = struct.unpack(">ihqh", body)
    assert (cid, error, epoch) == (correlation_id, 0, 0) and producer_id >= 0
    return producer_id


def produce_v8(sock: socket.socket, correlation_id: int, topic: str, batch: bytes) -> tuple[int, int]:
    """One batch to partition 0 with acks=all; (error code, base offset)."""
    name = topic.encode()
    body = struct.pack(">hhii", -1, -1, 10_000, 1) + struct.pack(">h", len(name)) + name
    body += struct.pack(">iii", 1, 0, len(batch)) + batch
    sock.sendall(frame(M.PRODUCE, 8, correlation_id, body))
    cid, data = response(sock)
    assert cid == correlation_id
    at = 4 + 2 + len(name) + 4 + 4  # topics count, name, partitions count, partition index
    return struct.unpack_from(">hq", data, at)


def test_an_idempotent_producers_retried_batch_is_appended_once_and_a_gap_is_refused(kbroker):
    """What InitProducerId promises: the same (producer id, epoch, sequence) batch sent again,
    as a client does after a lost response, is answered with its first offset and not appended
    again; a batch whose sequence skips ahead gets OUT_OF_ORDER_SEQUENCE_NUMBER."""
    create_topic(kbroker.address, "idem", 1)
    with connect(kbroker.address) as sock:
        pid = init_producer_id(sock, 1)
        assert init_producer_id(sock, 2) != pid, "every producer gets its own id"

        def batch(values, sequence, epoch=0):
            return records.encode_batch([v.encode() for v in values], producer_id=pid,
                                        producer_epoch=epoch, base_sequence=sequence)

        first = batch(["a0", "a1", "a2"], 0)
        assert produce_v8(sock, 3, "idem", first) == (0, 0)
        assert produce_v8(sock, 4, "idem", first) == (0, 0), "a retry: first offset, no append"
        second = batch(["b0", "b1"], 3)
        assert produce_v8(sock, 5, "idem", second) == (0, 3)
        assert produce_v8(sock, 6, "idem", first) == (0, 0), "still known among the last five"
        assert produce_v8(sock, 7, "idem", second) == (0, 3)
        assert produce_v8(sock, 8, "idem", batch(["gap"], 9))[0] == 45  # OUT_OF_ORDER_SEQUENCE
        assert produce_v8(sock, 9, "idem", batch(["c0"], 5)) == (0, 5)
        assert produce_v8(sock, 10, "idem", batch(["old"], 6, epoch=-1))[0] == 47  # INVALID_PRODUCER_EPOCH
    got = read_all(kbroker.address, "idem", 1, 6)
    assert [m.value for m in got] == [b"a0", b"a1", b"a2", b"b0", b"b1", b"c0"]


def segment_file(broker, topic: str) -> bytes:
    with open(os.path.join(broker.data_dir, f"{topic}-0", "00000000000000000000.log"), "rb") as f:
        return f.read()


def test_a_kafka_producers_batches_are_stored_byte_for_byte_but_offset_and_leader_epoch(
        kbroker):
    """Produce writes a client's batch into the log as it is: read from the segment file, each
    batch equals the client's bytes except baseOffset (assigned) and partitionLeaderEpoch
    (set by the partition, as Kafka's leader does; both outside the CRC). Producer id, epoch
    and base sequence are the client's, and so is the CRC."""
    create_topic(kbroker.address, "bytes", 1)
    sent = []
    with connect(kbroker.address) as sock:
        pid = init_producer_id(sock, 1)
        sequence = 0
        for i, n in enumerate((3, 1, 2)):
            batch = records.encode_batch([b"v%d-%d" % (i, k) for k in range(n)],
                                         keys=[b"k%d" % k for k in range(n)], producer_id=pid,
                                         producer_epoch=0, base_sequence=sequence)
            assert produce_v8(sock, 2 + i, "bytes", batch) == (0, sum((3, 1, 2)[:i]))
            sent.append(batch)
            sequence += n
    stored = segment_file(kbroker, "bytes")
    at = 0
    for i, batch in enumerate(sent):
        got = stored[at:at + len(batch)]
        assert struct.unpack_from(">q", got)[0] == sum((3, 1, 2)[:i])  # baseOffset
        assert got[8:12] == batch[8:12] and got[16:] == batch[16:]  # all the rest
        header = records.read_header(got)
        assert (header.producer_id, header.producer_epoch) == (pid, 0)
        at += len(batch)
    assert at == len(stored)


def test_kafka_pythons_idempotent_producer_keeps_its_id_and_sequences_in_the_log(kbroker):
    """A real client with enable_idempotence: the segment file holds its producer id (from
    InitProducerId), epoch and consecutive base sequences, with its CRC intact."""
    create_topic(kbroker.address, "kp", 1)
    producer = KafkaProducer(bootstrap_servers=kbroker.address, acks="all",
                             enable_idempotence=True, linger_ms=0)
    try:
        for i in range(5):
            producer.send("kp", b"v%d" % i, partition=0).get(timeout=30)
    finally:
        producer.close()
    stored = segment_file(kbroker, "kp")
    scan = records.scan_batches(stored, verify_crc=True)
    assert scan.ok and scan.valid_bytes == len(stored)
    headers = [records.read_header(stored, b.position) for b in scan.batches]
    assert len({h.producer_id for h in headers}) == 1 and headers[0].producer_id >= 0
    assert {h.producer_epoch for h in headers} == {0}
    sequences = [(h.base_sequence, h.records_count) for h in headers]
    assert sequences[0][0] == 0 and all(
        b[0] == a[0] + a[1] for a, b in zip(sequences, sequences[1:])), sequences
    assert sum(n for _, n in sequences) == 5


def test_an_idempotent_retry_after_the_listener_is_killed_and_restarted_is_a_duplicate(
        kbroker):
    """Kafka rebuilds a producer's sequences from its log; so does a restarted listener. The
    listener is kill -9'd after appending two batches of an idempotent producer, the
    supervisor restarts it, and the client's retry of the second batch (its response lost
    with the connection) is answered with the first append's offset, not appended again;
    the next sequence goes on, a gap is still refused."""
    create_topic(kbroker.address, "idem2", 1)
    with connect(kbroker.address) as sock:
        pid = init_producer_id(sock, 1)

        def batch(values, sequence):
            return records.encode_batch([v.encode() for v in values], producer_id=pid,
                                        producer_epoch=0, base_sequence=sequence)

        first, second = batch(["a0", "a1", "a2"], 0), batch(["b0", "b1"], 3)
        assert produce_v8(sock, 2, "idem2", first) == (0, 0)
        assert produce_v8(sock, 3, "idem2", second) == (0, 3)
    before, restarts = kafka_pid(kbroker)
    os.kill(before, 9)

    def listening_again():
        pid_now, restarts_now = kafka_pid(kbroker)
        if pid_now == before or restarts_now <= restarts:
            return False
        try:
            connect(kbroker.address).close()
        except OSError:
            return False
        return True

    wait_for(listening_again, what="the kafka listener to be restarted")
    with connect(kbroker.address) as sock:
        assert produce_v8(sock, 4, "idem2", second) == (0, 3), "a retry: its first offset"
        assert produce_v8(sock, 5, "idem2", first) == (0, 0)
        assert produce_v8(sock, 6, "idem2", batch(["gap"], 9))[0] == 45  # OUT_OF_ORDER
        assert produce_v8(sock, 7, "idem2", batch(["c0"], 5)) == (0, 5)
    got = read_all(kbroker.address, "idem2", 1, 6)
    assert [m.value for m in got] == [b"a0", b"a1", b"a2", b"b0", b"b1", b"c0"]


def produce_frame(correlation_id: int, topic: str, batch: bytes) -> bytes:
    """Produce v8, acks=1, one batch to partition 0."""
    name = topic.encode()
    body = struct.pack(">hhii", -1, 1, 10_000, 1) + struct.pack(">h", len(name)) + name
    body += struct.pack(">iii", 1, 0, len(batch)) + batch
    return frame(M.PRODUCE, 8, correlation_id, body)


def test_frames_split_anywhere_big_and_small_pipelined_are_each_handled_once_in_order(kbroker):
    """The receive buffer (frames handled in place, moved only when they straddle its end,
    grown for big ones): 150 requests pipelined beyond the in-flight limit, written in pieces
    of 1 byte to 300 KiB, small ApiVersions and produce frames mixed with produce frames far
    bigger than the buffer; every response comes in order and the log holds every value."""
    create_topic(kbroker.address, "frames", 1)
    rng = random.Random(7)
    frames, values, kinds = [], [], []
    for cid in range(150):
        if rng.random() < 0.35:
            frames.append(frame(M.API_VERSIONS, 0, cid))
            kinds.append(None)
        else:
            value = rng.randbytes(rng.choice([10, 3_000, 70_000, 300_000, 900_000]))
            frames.append(produce_frame(cid, "frames", records.encode_batch([value])))
            kinds.append(len(values))
            values.append(value)
    stream = b"".join(frames)
    with connect(kbroker.address) as sock:
        sock.settimeout(60)

        def write() -> None:
            pieces = random.Random(8)
            at = 0
            while at < len(stream):  # bounded: each step sends at least one byte
                n = pieces.choice([1, 2, 3, 4, 5, 17, 4096, 65_536, 300_000])
                sock.sendall(stream[at:at + n])
                at += n

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        for cid, kind in enumerate(kinds):
            got_cid, body = response(sock)
            assert got_cid == cid
            if kind is None:
                assert struct.unpack_from(">h", body)[0] == 0  # ApiVersions: no error
            else:
                at = 4 + 2 + len("frames") + 4 + 4
                assert struct.unpack_from(">hq", body, at) == (0, kind)  # error, base offset
        writer.join(30)
    with Consumer("frames", broker=kbroker.data_dir, auto_offset_reset="earliest") as consumer:
        seen = []
        deadline = time.monotonic() + 30
        while len(seen) < len(values) and time.monotonic() < deadline:  # bounded by the deadline
            seen.extend(bytes(r.value) for r in consumer.poll(timeout_ms=500))
    assert seen == values
    # Batches went from the receive buffer into the ring stamped in place, unless the ring
    # was full at that moment (then copied to wait): at least some never were copied.
    assert kbroker.stop() == 0
    in_place, batches = map(int, re.search(r"produce batches: (\d+) of (\d+) written",
                                           kbroker.log()).groups())
    assert batches == len(values) and 0 < in_place <= batches
