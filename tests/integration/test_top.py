"""`shmbroker top --once [--json]` against a live broker under load: the processes, the
partitions' watermarks and rates, and a group's lag match what the test did."""
from __future__ import annotations

import json
import threading
import time

import pytest
from broker_harness import run_cli

from shmbroker import Admin, Consumer, Producer
from shmbroker.client.types import TopicPartition

pytestmark = pytest.mark.timeout(120)


def top(data_dir: str, *args: str) -> str:
    proc = run_cli("top", "--data-dir", data_dir, "--once", *args, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout


def test_top_once_json_shows_processes_watermarks_rates_and_group_lag(broker):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("busy", 1)
        admin.create_topic("quiet", 2)
    doc = broker.wait_running({("busy", 0), ("quiet", 0), ("quiet", 1)})
    with Producer(broker=broker.data_dir) as producer:
        for i in range(30):
            producer.send("quiet", b"x" * 50, partition=i % 2)
        producer.flush()
    # A group that committed 10 of quiet/0's 15 records and 0 of quiet/1's: lag 5 + 15.
    with Consumer("quiet", broker=broker.data_dir, group="g", enable_auto_commit=False) as c:
        c.poll(timeout_ms=100)
        c.commit({TopicPartition("quiet", 0): 10, TopicPartition("quiet", 1): 0})
    stop = threading.Event()

    def feed() -> None:  # keeps "busy" busy while top samples
        with Producer(broker=broker.data_dir) as producer:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:  # bounded
                for _ in range(100):
                    producer.send("busy", b"y" * 100, partition=0)
                producer.flush()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        time.sleep(0.3)
        snap = json.loads(top(broker.data_dir, "--json", "--interval", "1"))
    finally:
        stop.set()
        feeder.join(60)
    assert snap["broker_state"] == "running" and snap["errors"] == []
    expected = {(e["role"], e["pid"]) for e in doc["processes"]}
    assert {(p["role"], p["pid"]) for p in snap["processes"]} == expected
    assert all(p["rss_bytes"] > 0 and p["cpu_percent"] is not None for p in snap["processes"])
    rows = {(p["topic"], p["partition"]): p for p in snap["partitions"]}
    assert sorted(rows) == [("busy", 0), ("quiet", 0), ("quiet", 1)]
    assert rows[("quiet", 0)]["high_watermark"] == rows[("quiet", 1)]["high_watermark"] == 15
    assert rows[("quiet", 0)]["records_per_s"] == 0
    assert rows[("busy", 0)]["records_per_s"] > 100  # the feeder wrote thousands meanwhile
    assert rows[("busy", 0)]["disk_bytes"] > rows[("quiet", 0)]["disk_bytes"] > 0
    [group] = snap["groups"]
    assert group["group_id"] == "g" and group["members"] == 0 and group["lag"] == 20
    # The plain text view names the same things.
    text = top(broker.data_dir, "--interval", "0.2")
    for needle in ("coordinator", "partition busy/0", "quiet/1", "GROUP", "\ng "):
        assert needle in text, text


def test_top_without_a_broker_says_so(broker_dir):
    proc = run_cli("top", "--data-dir", broker_dir, "--once", timeout=30)
    assert proc.returncode == 1 and "no broker is running" in proc.stderr
    assert "Traceback" not in proc.stderr
