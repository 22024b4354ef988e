"""Remote produce and fetch through the router (`serve --listen`), over real TCP on 127.0.0.1,
between separate processes: the same Producer and Consumer API as locally, a raw client
written from docs/protocol.md alone, malformed input, acks levels, groups, a router kill -9."""
from __future__ import annotations

import ast
import os
import random
import signal
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
        # A long poll with nothing to read waits max_wait_ms, then answers empty.
        start = time.monotonic()
        row, recs = client.fetch("raw", 0, len(sent[0]), max_wait_ms=300)
        assert recs == [] and 0.25 <= time.monotonic() - start < 5
    finally:
        client.close()


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

def worker(role: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [HERE, os.path.dirname(os.path.dirname(HERE)), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, os.path.join(HERE, "remote_workers.py"), role,
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


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
