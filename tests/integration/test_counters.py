"""The counters regions of a live broker (issue 6 §1, §4): what the partition processes count
is what was produced, `top --once --json` shows it under load, the Prometheus endpoint parses
and its lag is the committed offset's, and the regions live and die with the broker."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
from broker_harness import run_cli, wait_for
from prometheus_text import parse, value

from shmbroker import Admin, Consumer, Producer
from shmbroker.client.types import TopicPartition
from shmbroker.config import PARTITION_LOOP_BUDGET_MS
from shmbroker.layout import counters as CL
from shmbroker.layout import record_batch as RB
from shmbroker.shm import names
from shmbroker.shm.counters import CountersReader

pytestmark = pytest.mark.timeout(120)


def counters(data_dir: str, topic: str, partition: int) -> dict[str, int]:
    name = names.counters_name(names.broker_prefix(data_dir), "partition", topic, partition)
    with CountersReader.attach(name, CL.KIND_PARTITION) as reader:
        return reader.read()


def region_header(data_dir: str, topic: str, partition: int):
    name = names.counters_name(names.broker_prefix(data_dir), "partition", topic, partition)
    with CountersReader.attach(name) as reader:
        return reader.header()


def ours_in_shm(data_dir: str) -> list[str]:
    prefix = names.broker_prefix(data_dir)
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


def produce(data_dir: str, topic: str, partition: int, count: int, value_bytes: int) -> None:
    with Producer(broker=data_dir) as producer:
        for _ in range(count):
            producer.send(topic, b"v" * value_bytes, partition=partition)
        producer.flush()


def test_partition_counters_match_what_was_produced(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("c", 1)
    broker.wait_running({("c", 0)})
    produce(broker.data_dir, "c", 0, 500, 100)
    got = wait_for(lambda: (lambda c: c if c["records_in"] == 500 else None)(
        counters(broker.data_dir, "c", 0)), 10, "records_in to reach 500")
    assert got["high_watermark"] == 500
    # Each record is 100 bytes of value plus a few of record header; each batch adds
    # RB.HEADER_SIZE (61). All of it is in the one segment.
    assert 500 * 100 < got["bytes_in"] <= 500 * 110 + got["batches_in"] * RB.HEADER_SIZE
    log_file = os.path.join(broker.data_dir, "c-0", "00000000000000000000.log")
    assert got["log_bytes"] == got["bytes_in"] == os.path.getsize(log_file)
    assert 1 <= got["batches_in"] <= got["frames_in"] <= 500 and got["drain_rounds"] >= 1
    assert got["segments"] == 1 and got["log_start_offset"] == 0
    assert got["frames_rejected"] == got["rings_broken"] == 0
    assert 0 <= got["ring_fill_percent"] <= 100
    # The coordinator counted the topic's creation.
    name = names.counters_name(names.broker_prefix(broker.data_dir), "coordinator")
    with CountersReader.attach(name) as reader:
        assert reader.read()["requests_create_topic"] == 1


def test_top_once_json_counters_match_the_truth_under_load(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("load", 1)
    broker.wait_running({("load", 0)})
    sent = [0]
    stop = threading.Event()

    def feed() -> None:
        with Producer(broker=broker.data_dir) as producer:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:  # bounded
                for _ in range(200):
                    producer.send("load", b"z" * 200, partition=0)
                producer.flush()
                sent[0] += 200

    feeder = threading.Thread(target=feed, daemon=True)
    started = time.monotonic()
    feeder.start()
    try:
        wait_for(lambda: sent[0] >= 1000, 30, "the feeder to get going")
        low = sent[0]
        proc = run_cli("top", "--data-dir", broker.data_dir, "--once", "--json",
                       "--interval", "1", timeout=60)
        high = sent[0] + 200  # a flush may be in flight
        rate = sent[0] / (time.monotonic() - started)
    finally:
        stop.set()
        feeder.join(60)
    assert proc.returncode == 0, proc.stderr
    snap = json.loads(proc.stdout)
    assert snap["errors"] == []
    [row] = [p for p in snap["partitions"] if p["topic"] == "load"]
    c = row["counters"]
    # The partition counts a C call's rounds when the call returns (at most
    # PARTITION_LOOP_BUDGET_MS of rounds, which ack and publish as they go): the counters may
    # be that far behind the acks and the published high watermark, and no further.
    lag = 200 + int(2 * rate * PARTITION_LOOP_BUDGET_MS / 1000)
    assert low - lag <= c["records_in"] <= high
    assert abs(c["high_watermark"] - row["high_watermark"]) <= lag  # two reads, a call apart
    assert row["records_per_s"] > 100 and row["bytes_in_per_s"] > 100 * 200
    assert 0 <= row["ring_fill_percent"] <= 100
    coordinator = [p for p in snap["processes"] if p["role"] == "coordinator"][0]
    assert coordinator["counters"]["requests_create_topic"] == 1
    # Once the load stops, the counters are exactly what was sent; the text view shows them.
    wait_for(lambda: counters(broker.data_dir, "load", 0)["records_in"] == sent[0], 10,
             "the last records to be counted")
    text = run_cli("top", "--data-dir", broker.data_dir, "--once", "--interval", "0.2",
                   timeout=60).stdout
    assert "MB/S" in text and "RING%" in text and "load/0" in text


def test_metrics_endpoint_parses_and_its_lag_is_the_committed_offsets(make_broker):
    broker = make_broker(serve_args=("--metrics-listen", "127.0.0.1:0"))
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("m", 2)
    doc = broker.wait_running({("m", 0), ("m", 1)})
    assert any(p["role"] == "metrics" and p["title"] == "shmbroker: metrics"
               for p in doc["processes"])
    with Producer(broker=broker.data_dir) as producer:
        for i in range(30):
            producer.send("m", b"x" * 50, partition=i % 2)
        producer.flush()
    with Consumer("m", broker=broker.data_dir, group="g", enable_auto_commit=False) as c:
        c.poll(timeout_ms=100)
        c.commit({TopicPartition("m", 0): 10, TopicPartition("m", 1): 15})
    endpoint = broker.runtime()["metrics_endpoint"]
    assert endpoint.startswith("127.0.0.1:")
    deadline = time.monotonic() + 10
    while True:  # bounded: the coordinator stores its counters after the pass that replied
        with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=30) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            families = parse(response.read().decode())
        if value(families, "shmbroker_coordinator_commits_total") or \
                time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert value(families, "shmbroker_group_lag", group="g", topic="m", partition=0) == 5
    assert value(families, "shmbroker_group_lag", group="g", topic="m", partition=1) == 0
    assert value(families, "shmbroker_group_committed_offset", group="g", topic="m",
                 partition=0) == 10
    assert value(families, "shmbroker_group_lag_sum", group="g") == 5
    for p in (0, 1):
        assert value(families, "shmbroker_partition_records_in_total", topic="m",
                     partition=p) == 15
        assert value(families, "shmbroker_partition_high_watermark", topic="m",
                     partition=p) == 15
    assert value(families, "shmbroker_coordinator_commits_total") == 1
    assert value(families, "shmbroker_coordinator_offsets_committed_total") == 2
    assert value(families, "shmbroker_scrape_problems") == 0
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://{endpoint}/other", timeout=30)
    assert missing.value.code == 404


def test_metrics_listen_refuses_a_remote_address_unless_allowed(broker_dir):
    proc = run_cli("serve", "--data-dir", broker_dir, "--listen", "none", "--metrics-listen",
                   "0.0.0.0:9644", timeout=30)
    assert proc.returncode == 1 and "only loopback addresses" in proc.stderr
    assert "--metrics-allow-remote" in proc.stderr and "Traceback" not in proc.stderr


def test_counters_outlive_a_partition_kill9_and_a_clean_stop_leaves_no_shared_memory(
        make_broker):
    broker = make_broker()
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("k", 1)
    doc = broker.wait_running({("k", 0)})
    produce(broker.data_dir, "k", 0, 100, 10)
    wait_for(lambda: counters(broker.data_dir, "k", 0)["records_in"] == 100, 10, "100 counted")
    assert region_header(broker.data_dir, "k", 0).writer_attaches == 1
    old_pid = broker.partition_pids(doc)[("k", 0)]
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: (lambda d: d and broker.partition_pids(d).get(("k", 0)) not in
                      (None, old_pid) and d["state"] == "running")(broker.runtime()), 30,
             "the partition process to be restarted")
    # The same region, reattached by the new process: its counters go on from 100.
    header = wait_for(lambda: (lambda h: h if h.writer_attaches == 2 else None)(
        region_header(broker.data_dir, "k", 0)), 10, "the new process to attach")
    assert header.writer_pid == broker.partition_pids(broker.runtime())[("k", 0)]
    produce(broker.data_dir, "k", 0, 50, 10)
    wait_for(lambda: counters(broker.data_dir, "k", 0)["records_in"] == 150, 10, "150 counted")
    assert counters(broker.data_dir, "k", 0)["high_watermark"] == 150
    # kill -9 of the whole broker leaves the regions; the next start reclaims them (new
    # counters regions, counting from the log's truth again), and a clean stop removes all.
    broker.kill9()
    assert any(".m.partition.k.0" in n for n in ours_in_shm(broker.data_dir))
    broker.start()
    broker.wait_running({("k", 0)})
    fresh = wait_for(lambda: (lambda c: c if c["high_watermark"] == 150 else None)(
        counters(broker.data_dir, "k", 0)), 10, "the new region to be written")
    assert fresh["records_in"] == 0 and region_header(broker.data_dir, "k", 0).writer_attaches == 1
    assert broker.stop() == 0
    assert ours_in_shm(broker.data_dir) == []
