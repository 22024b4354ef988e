"""Remote produce and fetch through the router (`serve --listen`), over real TCP on 127.0.0.1,
between separate processes: the same Producer and Consumer API as locally, a raw client
written from docs/protocol.md alone, malformed input, acks levels, groups, a router kill -9."""
from __future__ import annotations

import ast
import os
import random
import signal
import struct
import subprocess
import sys
import time

import msgpack
import pytest
import zmq
from broker_harness import WAIT_S_MAX, wait_for

import raw_wire_client
from raw_wire_client import RawClient, encode_batch

pytestmark = pytest.mark.timeout(180)
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def routed(make_broker):
    """A broker with a router on a free loopback port; ``.address`` is its tcp:// address."""
    broker = make_broker(serve_args=("--listen", "tcp://127.0.0.1:*"))
    broker.address = broker.wait_running()["router_endpoint"]
    return broker


def create_topic(broker, name: str, partitions: int, **config) -> None:
    from shmbroker import Admin

    with Admin(broker=broker.address) as admin:
        admin.create_topic(name, partitions, config or None)
    broker.wait_running({(name, p) for p in range(partitions)} |
                        set(broker.partition_pids(broker.runtime())))


def router_pid(broker) -> int:
    return [e["pid"] for e in broker.runtime()["processes"] if e["role"] == "router"][0]


# -- the document is enough -----------------------------------------------------------------------

def test_the_raw_client_imports_nothing_of_shmbroker():
    with open(raw_wire_client.__file__) as f:
        tree = ast.parse(f.read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name and name.startswith("shmbroker") for name in imported), imported


def test_a_client_written_from_the_protocol_document_produces_and_fetches(routed):
    create_topic(routed, "raw", 2)
    client = RawClient(routed.address)
    try:
        assert client.partitions("raw") == 2
        sent = {0: [], 1: []}
        for i in range(40):
            values = [f"raw-{i}-{j}".encode() for j in range(i % 5 + 1)]
            reply = client.produce("raw", i % 2, values, acks=1 if i % 3 else -1)
            assert reply["ok"], reply
            assert reply["result"]["base_offset"] == len(sent[i % 2]), reply
            sent[i % 2].extend(values)
        for partition in (0, 1):
            got, offset = [], 0
            for _ in range(100):  # bounded: each fetch returns at least one batch
                row, recs = client.fetch("raw", partition, offset)
                assert row[2] == 0 and row[3] == len(sent[partition]) and row[4] == 0, row
                if not recs:
                    break
                got.extend(recs)
                offset = recs[-1][0] + 1
            assert [r[0] for r in got] == list(range(len(sent[partition])))
            assert [r[2] for r in got] == sent[partition]
        # A fetch in the middle of a batch starts at the batch; the client skips what it
        # did not ask for.
        row, recs = client.fetch("raw", 0, 3)
        assert row[5] <= 3 and recs[0][0] == 3
        # Offsets outside the log: error code 1 with the log's bounds.
        row, recs = client.fetch("raw", 1, 10_000)
        assert row[2] == 1 and row[3] == len(sent[1]) and row[4] == 0 and recs == []
        reply, _ = client.call({"type": "list_offsets", "partitions": [["raw", 0], ["raw", 9]]})
        assert reply["result"]["partitions"] == [["raw", 0, 0, 0, len(sent[0])],
                                                 ["raw", 9, 3, -1, -1]]
        # Record timestamps are the producer's (CreateTime): ask from before the first.
        reply, _ = client.call({"type": "offsets_for_times",
                                "partitions": [["raw", 0, 0], ["raw", 1, 1 << 62], ["raw", 9, 0]]})
        rows = reply["result"]["partitions"]
        assert rows[0][:4] == ["raw", 0, 0, 0] and rows[0][4] > 0, rows
        assert rows[1:] == [["raw", 1, 0, -1, -1], ["raw", 9, 3, -1, -1]], rows
        # A long poll with nothing to read waits max_wait_ms, then answers empty.
        start = time.monotonic()
        row, recs = client.fetch("raw", 0, len(sent[0]), max_wait_ms=300)
        assert recs == [] and 0.25 <= time.monotonic() - start < 5
    finally:
        client.close()


def test_the_router_stores_a_remote_producers_batches_byte_for_byte(routed):
    """Each batch in the segment file is the client's, byte for byte, but for the base offset
    and the partition leader epoch (both outside the CRC, set by the partition as Kafka's
    leader sets them): the router no longer stamps producer fields or rewrites the CRC.
    Read from the segment file itself; a producer id, epoch and sequence of the client's own
    choosing survive."""
    create_topic(routed, "st", 1)
    sent = []
    client = RawClient(routed.address)
    try:
        for i in range(3):
            batch = bytearray(encode_batch([b"a%d" % i, b"b%d" % i]))
            # A Kafka-style idempotent producer's fields (inside the CRC): id 77, epoch 3,
            # base sequence 2i; then the CRC over attributes.. as the client computes it.
            struct.pack_into(">qhi", batch, 43, 77, 3, 2 * i)
            struct.pack_into(">I", batch, 17, raw_wire_client.crc32c(bytes(batch[21:])))
            sent.append(bytes(batch))
            reply, _ = client.call({"type": "produce", "topic": "st", "partition": 0,
                                    "acks": 1}, bytes(batch))
            assert reply["ok"], reply
    finally:
        client.close()
    with open(os.path.join(routed.data_dir, "st-0", "00000000000000000000.log"), "rb") as f:
        stored = f.read()
    at = 0
    for i, batch in enumerate(sent):
        got = stored[at:at + len(batch)]
        assert struct.unpack_from(">q", got, 0)[0] == 2 * i  # base offset: assigned
        assert got[8:12] == batch[8:12]  # batch length
        assert got[16:] == batch[16:]  # magic, CRC, producer fields, records: unchanged
        at += len(batch)
    assert at == len(stored)


def test_fetch_hands_zeromq_views_of_the_mapped_segment_not_copies(routed):
    """The router's fetch data frames are memoryviews whose owner is the segment's mapping
    (so ZeroMQ sends from the page cache), and they stay readable after the reader closed."""
    from shmbroker.native import _native
    from shmbroker.router.fetch import Fetch, parse_fetch

    create_topic(routed, "zc", 1)
    client = RawClient(routed.address)
    try:
        values = [bytes([i]) * 1_000 for i in range(100)]
        assert client.produce("zc", 0, values)["ok"]
    finally:
        client.close()
    fetch = Fetch(routed.data_dir)
    try:
        request = parse_fetch([b"client"], 1, {"max_wait_ms": 0, "min_bytes": 1,
                                               "max_bytes": 1 << 20,
                                               "partitions": [["zc", 0, 0, 1 << 20]]})
        result, data = fetch.answer(request, final=True)
    finally:
        fetch.close()
    view = data[0]
    assert isinstance(view, memoryview) and isinstance(view.obj, _native.FileMap), type(view)
    assert result["partitions"][0][6] == len(view) > 100_000
    assert [r[2] for r in raw_wire_client.decode_batches(bytes(view))] == values
    view.release()


def test_a_long_poll_is_answered_when_records_arrive(routed):
    create_topic(routed, "lp", 1)
    waiter, writer = RawClient(routed.address), RawClient(routed.address)
    try:
        request_id = waiter.send({"type": "fetch", "max_wait_ms": 20_000, "min_bytes": 1,
                                  "max_bytes": 1 << 20, "partitions": [["lp", 0, 0, 1 << 20]]})
        assert not waiter.sock.poll(300), "answered before anything was produced"
        start = time.monotonic()
        assert writer.produce("lp", 0, [b"wake"])["ok"]
        reply, frames = waiter.recv()
        assert time.monotonic() - start < 2, "the parked fetch was not woken by the append"
        assert reply["id"] == request_id and reply["result"]["partitions"][0][6] > 0
        assert [r[2] for r in raw_wire_client.decode_batches(frames[0])] == [b"wake"]
    finally:
        waiter.close()
        writer.close()


# -- the same Producer and Consumer, over TCP ------------------------------------------------------

_WORKERS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_workers_left():
    """A test that fails midway must not leave its client processes running."""
    yield
    while _WORKERS:  # bounded by the workers started
        proc = _WORKERS.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=WAIT_S_MAX)


def worker(role: str, *args: str) -> subprocess.Popen:
    """A client process (remote_workers.py) that knows the router's address only."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [HERE, os.path.dirname(os.path.dirname(HERE)), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "remote_workers.py"), role,
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _WORKERS.append(proc)
    return proc


def finish(proc: subprocess.Popen, timeout_s: float = 120) -> None:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"worker did not finish in {timeout_s} s:\n{out.decode()}")
    assert proc.returncode == 0, out.decode()


def lines(path) -> list:
    import json

    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def test_remote_producer_and_consumer_processes_agree_on_every_record(routed, tmp_path):
    create_topic(routed, "orders", 3)
    acked, consumed = tmp_path / "acked.jsonl", tmp_path / "consumed.jsonl"
    count = 3_000
    consumer = worker("consume", "--broker", routed.address, "--topic", "orders", "--out",
                      str(consumed), "--expected", str(count))
    producer = worker("produce", "--broker", routed.address, "--topic", "orders", "--out",
                      str(acked), "--count", str(count), "--linger-ms", "2")
    finish(producer)
    finish(consumer)
    sent = lines(acked)
    got = lines(consumed)
    assert got[-1] == "done"
    got = got[:-1]
    assert len(sent) == count and sorted(map(tuple, got)) == sorted(map(tuple, sent))
    for partition in range(3):  # per partition: every offset once, in order, from 0
        offsets = [o for p, o, _ in got if p == partition]
        assert offsets == list(range(len(offsets))) and offsets, partition


@pytest.mark.parametrize("acks", [0, 1, "all"])
def test_each_acks_level_gives_the_futures_it_gives_locally(routed, acks):
    from shmbroker import Consumer, Producer
    from shmbroker.client.remote_producer import RemoteProducer

    create_topic(routed, "a", 2)
    with Producer(broker=routed.address, acks=acks) as producer:
        assert isinstance(producer, RemoteProducer) and isinstance(producer, Producer)
        futures = [producer.send("a", b"x%d" % i, partition=i % 2) for i in range(200)]
        producer.flush(timeout=30)
        metas = [f.result(timeout=10) for f in futures]
    assert all(f.done() for f in futures)
    if acks == 0:
        assert {m.offset for m in metas} == {-1}  # as Kafka: no offsets without acks
    else:
        for partition in (0, 1):
            assert [m.offset for m in metas if m.partition == partition] == list(range(100))
    with Consumer("a", broker=routed.address, auto_offset_reset="earliest") as consumer:
        got = []
        deadline = time.monotonic() + WAIT_S_MAX
        while len(got) < 200 and time.monotonic() < deadline:  # bounded by the deadline
            got += consumer.poll(timeout_ms=500)
        assert consumer.end_offsets([("a", 0), ("a", 1)]) == {("a", 0): 100, ("a", 1): 100}
    assert sorted(r.value for r in got) == sorted(b"x%d" % i for i in range(200))


def test_acks_0_batches_queued_at_close_still_reach_the_log(routed):
    """acks=0 futures resolve once a batch is queued on the socket; close() right after
    must let the queue drain (it used to close with linger 0 and drop the tail)."""
    from shmbroker import Consumer, Producer

    create_topic(routed, "a0", 1)
    count, value = 8_000, b"v" * 2_000  # ~16 MB: more than the kernel's socket buffers hold
    with Producer(broker=routed.address, acks=0) as producer:
        for i in range(count):
            producer.send("a0", value, partition=0)
        producer.flush(timeout=30)
    with Consumer("a0", broker=routed.address, auto_offset_reset="earliest") as consumer:
        wait_for(lambda: consumer.end_offsets([("a0", 0)])[("a0", 0)] == count,
                 what=f"all {count} acks=0 records in the log")


def test_a_remote_record_larger_than_batch_bytes_max_is_sent_alone_and_read_back(routed):
    """batch_bytes_max is batch.size (when a batch is full), not a limit on a record: a
    600 KB record goes over the router in a batch of its own (the topic allows 1 MiB)."""
    from shmbroker import Consumer, Producer

    create_topic(routed, "bigr", 1)
    large = bytes(range(256)) * 2_400  # 614,400 B
    with Producer(broker=routed.address, batch_bytes_max=64 * 1024) as producer:
        offsets = [producer.send("bigr", v, partition=0).result(timeout=30).offset
                   for v in (b"before", large, b"after")]
    assert offsets == [0, 1, 2]
    with Consumer("bigr", broker=routed.address, auto_offset_reset="earliest") as consumer:
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 3 and time.monotonic() < deadline:  # bounded
            got += consumer.poll(timeout_ms=500)
    assert [r.value for r in got] == [b"before", large, b"after"]


def test_remote_clients_raise_the_local_error_classes(routed):
    from shmbroker import Consumer, Producer, errors

    create_topic(routed, "small", 1, batch_bytes_max=1024)
    with Producer(broker=routed.address) as producer:
        with pytest.raises(errors.UnknownTopicOrPartitionError):
            producer.send("nope", b"x")
        with pytest.raises(errors.UnknownTopicOrPartitionError):
            producer.send("small", b"x", partition=5)
        with pytest.raises(errors.RecordTooLargeError):
            producer.send("small", b"x" * 4096)
        assert producer.send("small", b"fits").result(timeout=10).offset == 0
    with pytest.raises(errors.UnknownTopicOrPartitionError):
        Consumer("nope", broker=routed.address)
    with Consumer("small", broker=routed.address, auto_offset_reset="error") as consumer:
        consumer.seek(("small", 0), 99)
        with pytest.raises(errors.OffsetOutOfRangeError):
            consumer.poll(timeout_ms=100)
        consumer.seek_to_beginning()
        assert [r.value for r in consumer.poll(timeout_ms=5_000)] == [b"fits"]
        assert consumer.position(("small", 0)) == 1 and consumer.highwater(("small", 0)) == 1


def test_two_remote_consumers_in_a_group_share_four_partitions(routed, tmp_path):
    from shmbroker import Admin, Producer, errors

    create_topic(routed, "shared", 4)
    count = 2_000
    outs = [tmp_path / f"member-{i}.jsonl" for i in range(2)]
    # Each member owns two partitions once the group is stable: it expects their records.
    members = [worker("consume", "--broker", routed.address, "--topic", "shared", "--group",
                      "g", "--commit", "--out", str(out), "--expected", str(count // 2),
                      "--idle-s", "1", "--deadline-s", "90") for out in outs]

    def both_stable():
        with Admin(broker=routed.address) as admin:
            try:
                described = admin.describe_group("g")
            except errors.GroupIdNotFoundError:
                return None  # not joined yet
        return described["state"] == "Stable" and len(described["members"]) == 2 and described

    described = wait_for(both_stable, 60, "two members in a stable group")
    owned = {m["client_id"] + str(m["pid"]): sorted(map(tuple, m["assignment"]))
             for m in described["members"]}
    shares = sorted(owned.values())
    assert sorted(shares[0] + shares[1]) == [("shared", p) for p in range(4)]
    assert shares[0] and shares[1], owned
    with Producer(broker=routed.address) as producer:
        futures = [producer.send("shared", b"s-%05d" % i, partition=i % 4) for i in range(count)]
        producer.flush(timeout=30)
        assert all(f.result(timeout=1).offset >= 0 for f in futures)
    for member in members:
        finish(member, 120)
    per_member = [[tuple(r) for r in lines(out) if r != "done"] for out in outs]
    # Both consumed, each only its own partitions, and together every record exactly once.
    assert all(per_member), [len(m) for m in per_member]
    partitions = [{p for p, _, _ in got} for got in per_member]
    assert not partitions[0] & partitions[1], partitions
    got = per_member[0] + per_member[1]
    assert sorted(bytes.fromhex(v) for _, _, v in got) == [b"s-%05d" % i for i in range(count)]
    for partition in range(4):
        assert sorted(o for p, o, _ in got if p == partition) == list(range(count // 4))
    with Admin(broker=routed.address) as admin:
        committed = {row["partition"]: row["offset"]
                     for row in admin.describe_group("g")["offsets"]}
    assert committed == {p: count // 4 for p in range(4)}


# -- bad input, and a router that dies ---------------------------------------------------------------

def _mutated_batches(rng: random.Random, n: int) -> list[bytes]:
    """Produce record frames that must all be refused: truncated, a byte changed where the
    length, magic or CRC covers it, absurd lengths and counts, two batches, compressed."""
    out = []
    for _ in range(n):  # bounded by n
        good = bytearray(encode_batch([rng.randbytes(rng.randrange(0, 50))
                                       for _ in range(rng.randrange(1, 6))]))
        kind = rng.randrange(6)
        if kind == 0:
            out.append(bytes(good[:rng.randrange(0, len(good))]))
        elif kind == 1:
            at = rng.choice([*range(8, 12), *range(16, len(good))])
            good[at] ^= 1 << rng.randrange(8)
            out.append(bytes(good))
        elif kind == 2:
            good[8:12] = rng.choice([0x7FFFFFFF, 0x10000000, 3]).to_bytes(4, "big")
            out.append(bytes(good))
        elif kind == 3:
            good[57:61] = rng.choice([0x7FFFFFFF, 1 << 20]).to_bytes(4, "big")
            out.append(bytes(good))
        elif kind == 4:
            out.append(bytes(good) + bytes(good))
        else:
            good[22] |= 1  # gzip
            out.append(bytes(good))
    return out


def _bad_messages(rng: random.Random) -> list[list[bytes]]:
    pack = lambda **m: msgpack.packb(m, use_bin_type=True)  # noqa: E731
    produce = dict(v=1, type="produce", topic="fz", partition=0, acks=1)
    messages = [[pack(id=i, **produce), batch] for i, batch in
                enumerate(_mutated_batches(rng, 1_200), start=1_000)]
    messages += [[rng.randbytes(rng.randrange(0, 300))] for _ in range(500)]
    messages += [[rng.randbytes(rng.randrange(1, 100)), rng.randbytes(rng.randrange(0, 100))]
                 for _ in range(200)]
    messages += [
        [pack(v=2, id=1, type="fetch")], [pack(v=1, id=2, type="nope")],
        [pack(v=1, id=3, type=["x"])], [pack(**produce, id=4)],  # produce without records
        [pack(**{**produce, "acks": 7}, id=5), encode_batch([b"x"])],
        [pack(**{**produce, "partition": 99}, id=6), encode_batch([b"x"])],
        [pack(**{**produce, "topic": "missing"}, id=7), encode_batch([b"x"])],
        [pack(v=1, id=8, type="fetch", max_wait_ms=10**9, min_bytes=1, max_bytes=1,
              partitions=[["fz", 0, 0, 1]])],
        [pack(v=1, id=9, type="fetch", max_wait_ms=0, min_bytes=1, max_bytes=1 << 40,
              partitions=[["fz", 0, 0, 1]])],
        [pack(v=1, id=10, type="fetch", max_wait_ms=0, min_bytes=1, max_bytes=100,
              partitions=[["fz", 0, -5, 100]])],
        [pack(v=1, id=11, type="fetch", max_wait_ms=0, min_bytes=1, max_bytes=100,
              partitions=[["fz", "0"]])],
        [pack(v=1, id=12, type="fetch", max_wait_ms=0, min_bytes=1, max_bytes=100,
              partitions=[])],
        [pack(v=1, id=13, type="list_offsets", partitions=[["fz", 0]] * 2_000)],
        [pack(v=1, id=14, type="ping"), b"extra"],
        [pack(v=1, id=15, type="fetch", max_wait_ms=0, min_bytes=1, max_bytes=100,
              partitions=[["fz", 0, 0, 100]]), b"extra"],
        [b"a", b"b", b"c"],
        [pack(v=1, id=16, type="offsets_for_times", partitions=[["fz", 0]])],
        [pack(v=1, id=17, type="offsets_for_times", partitions=[["fz", 0, -1]])],
        [pack(v=1, id=18, type="offsets_for_times", partitions=[["fz", 0, "now"]])],
    ]
    return messages


def test_malformed_messages_by_the_thousand_get_error_replies_and_others_are_served(routed):
    create_topic(routed, "fz", 1)
    pid = router_pid(routed)
    rng = random.Random(20261128)
    fuzzer, good = RawClient(routed.address), RawClient(routed.address)
    try:
        messages = _bad_messages(rng)
        assert len(messages) >= 1_900
        rng.shuffle(messages)
        expected_good = []
        for i, frames in enumerate(messages):
            fuzzer.sock.send_multipart(frames)
            assert fuzzer.sock.poll(10_000), f"no reply to {frames!r:.200}"
            reply_frames = fuzzer.sock.recv_multipart()
            reply = msgpack.unpackb(reply_frames[0], raw=False)
            assert len(reply_frames) == 1 and reply["v"] == 1, reply_frames
            assert reply["ok"] is False, (frames, reply)
            assert reply["error"]["code"] not in (-1, 0), (frames, reply)
            if i % 200 == 0:  # another client is served meanwhile, and correctly
                value = b"good-%d" % i
                ok = good.produce("fz", 0, [value])
                assert ok["ok"], ok
                expected_good.append(value)
        row, recs = good.fetch("fz", 0, 0)
        assert [r[2] for r in recs] == expected_good  # no bad batch got into the log
        assert row[3] == len(expected_good)
        assert router_pid(routed) == pid, "the router restarted: it crashed on bad input"
    finally:
        fuzzer.close()
        good.close()


def test_clients_ride_out_a_router_kill_9_and_no_acked_record_is_lost(routed, tmp_path):
    create_topic(routed, "k", 2)
    acked, consumed = tmp_path / "acked.jsonl", tmp_path / "consumed.jsonl"
    count = 12_000
    consumer = worker("consume", "--broker", routed.address, "--topic", "k", "--out",
                      str(consumed), "--expected", str(count), "--idle-s", "2",
                      "--deadline-s", "120")
    producer = worker("produce", "--broker", routed.address, "--topic", "k", "--out",
                      str(acked), "--count", str(count), "--chunk", "300", "--pause-ms", "40",
                      "--deadline-s", "120")
    wait_for(lambda: os.path.exists(acked) and len(lines(acked)) >= 2_000, 60,
             "the producer to be under way")
    old = router_pid(routed)
    # Stop the router first, so that the producer surely has requests in flight (sent, never
    # to be answered) when it dies: they are what must be sent again.
    os.kill(old, signal.SIGSTOP)
    stalled_at = len(lines(acked))
    time.sleep(0.5)
    assert len(lines(acked)) < count, "the producer finished before the router was stopped"
    os.kill(old, signal.SIGKILL)
    assert stalled_at < count
    wait_for(lambda: (d := routed.runtime()) and d["state"] == "running" and
             router_pid(routed) != old, WAIT_S_MAX, "the router to be restarted")
    assert routed.runtime()["router_endpoint"] == routed.address
    killed_at = time.monotonic()
    finish(producer, 150)
    # Requests in flight at the kill are sent again as soon as the drop is seen, not after
    # the 30 s request timeout: the rest of the run takes seconds.
    assert time.monotonic() - killed_at < 20, "the producer waited out its request timeout"
    finish(consumer, 150)
    sent = lines(acked)
    assert len(sent) == count  # every future resolved with an offset, across the restart
    got = [tuple(r) for r in lines(consumed) if r != "done"]
    by_position = {(p, o): v for p, o, v in got}
    for partition, offset, value in sent:  # every acknowledged record is where its ack said
        assert by_position.get((partition, offset)) == value, (partition, offset)
    # Resent requests may be appended twice (at least once); nothing else is in the log.
    assert {v for _, _, v in got} == {v for _, _, v in sent}
    for partition in (0, 1):
        offsets = [o for p, o, _ in got if p == partition]
        assert offsets == list(range(len(offsets)))


def test_a_client_that_never_reads_its_fetch_replies_stalls_no_one(routed):
    create_topic(routed, "big", 1)
    writer = RawClient(routed.address)
    stuck = zmq.Context.instance().socket(zmq.DEALER)
    stuck.setsockopt(zmq.LINGER, 0)
    stuck.setsockopt(zmq.RCVHWM, 1)
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.connect(routed.address)
    try:
        for i in range(8):  # ~1.6 MB of records
            assert writer.produce("big", 0, [bytes([i]) * 10_000] * 20)["ok"]
        for i in range(60):  # ~60 x 1 MiB of replies it will never read
            stuck.send(msgpack.packb({"v": 1, "id": i, "type": "fetch", "max_wait_ms": 0,
                                      "min_bytes": 1, "max_bytes": 1 << 20,
                                      "partitions": [["big", 0, 0, 1 << 20]]}))
        start = time.monotonic()
        for i in range(20):  # others are served meanwhile, promptly
            assert writer.produce("big", 0, [b"after-%d" % i])["ok"]
            row, recs = writer.fetch("big", 0, row[3] if i else 160)
            assert recs and recs[-1][2] == b"after-%d" % i
        assert time.monotonic() - start < 10
    finally:
        stuck.close(linger=0)
        writer.close()


def test_a_metadata_refresh_cut_by_a_router_kill_keeps_the_producer_going(routed):
    """send() refreshes a topic's partition count every second; when that request dies with
    the router, the producer goes on with what it knew (as Kafka's clients do)."""
    import threading

    from shmbroker import Producer

    create_topic(routed, "md", 2)
    with Producer(broker=routed.address) as producer:
        assert producer.send("md", b"before").result(timeout=10).offset == 0
        old = router_pid(routed)
        os.kill(old, signal.SIGSTOP)  # the next refresh is sent and never answered
        time.sleep(1.2)  # past the metadata's age: the next keyless send refreshes
        outcome = {}

        def send():
            try:
                outcome["future"] = producer.send("md", b"during")
            except Exception as exc:  # noqa: BLE001 - the test reports it
                outcome["error"] = exc
        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(0.3)
        os.kill(old, signal.SIGKILL)
        sender.join(timeout=WAIT_S_MAX)
        assert "error" not in outcome, outcome
        assert outcome["future"].result(timeout=WAIT_S_MAX).offset >= 0


# -- what the router counts -------------------------------------------------------------------

def test_the_router_counts_produced_and_fetched_bytes_as_the_partition_sees_them(routed):
    from shmbroker import Consumer, Producer
    from shmbroker.client.types import TopicPartition
    from shmbroker.layout import counters as CL
    from shmbroker.shm import names
    from shmbroker.shm.counters import CountersReader

    create_topic(routed, "counted", 1)
    with Producer(broker=routed.address, acks=1) as producer:
        for i in range(300):
            producer.send("counted", b"%05d" % i * 10, partition=0)
        producer.flush(timeout=WAIT_S_MAX)
    with Consumer(broker=routed.address, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition("counted", 0)])
        got: list = []
        wait_for(lambda: got.extend(consumer.poll(timeout_ms=200, max_records=1000))
                 or len(got) >= 300, what="300 records back")
    prefix = names.broker_prefix(routed.data_dir)

    def read(*name) -> dict:
        with CountersReader.attach(names.counters_name(prefix, *name)) as reader:
            return reader.read()

    def settled():
        router, partition = read("router"), read("partition", "counted", 0)
        return (router, partition) if router["fetch_bytes"] >= partition["bytes_in"] > 0 else None

    router, partition = wait_for(settled, what="the router's counters to be stored")
    log_file = os.path.join(routed.data_dir, "counted-0", "00000000000000000000.log")
    # Every byte the partition appended came through the router, and went out once.
    assert router["produce_bytes"] == partition["bytes_in"] == os.path.getsize(log_file)
    assert router["fetch_bytes"] == partition["bytes_in"]
    assert router["produce_requests"] == partition["batches_in"]
    assert router["fetch_replies"] >= 1 and router["auth_refused"] == 0
    assert len(CL.ROUTER_COUNTERS) == len(router)


# -- the command line against a router --------------------------------------------------------------

def test_the_cli_produces_consumes_and_administers_through_a_router_with_broker(routed):
    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "shmbroker", *args, "--broker",
                               routed.address], input=stdin, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc

    assert "Created topic cli with 2 partition(s)" in cli("topics", "create", "cli",
                                                          "--partitions", "2").stdout
    routed.wait_running({("cli", 0), ("cli", 1)})
    assert "cli" in cli("topics", "list").stdout.split()
    cli("produce", "cli", "--key-separator", ":", stdin="".join(
        f"k{i}:v{i}\n" for i in range(50)))
    out = cli("consume", "cli", "--from-beginning", "--max-messages", "50",
              "--timeout-ms", "20000", "--group", "cli-g", "--format", r"%k=%s\n").stdout
    assert sorted(out.splitlines()) == sorted(f"k{i}=v{i}" for i in range(50))
    assert "cli-g" in cli("groups", "list").stdout
    # The local data dir is not touched for any of it: a wrong --broker is a one-line error.
    bad = subprocess.run([sys.executable, "-m", "shmbroker", "topics", "list", "--broker",
                          "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "expected tcp://HOST:PORT" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_router_counts_the_client_connections_open_now(routed):
    from shmbroker import Admin
    from shmbroker.shm import names
    from shmbroker.shm.counters import CountersReader

    name = names.counters_name(names.broker_prefix(routed.data_dir), "router")

    def connected() -> int:
        with CountersReader.attach(name) as reader:
            return reader.read()["clients_connected"]

    wait_for(lambda: connected() == 0, what="no client connected yet")
    admins = [Admin(broker=routed.address) for _ in range(3)]
    try:
        for admin in admins:
            admin.list_topics()  # connected and served
        wait_for(lambda: connected() == 3, what="three connections counted")
    finally:
        for admin in admins:
            admin.close()
    wait_for(lambda: connected() == 0, what="the closed connections uncounted")
