"""Topics through the CLI and through Admin against a real broker; metadata survives restarts."""
from __future__ import annotations

import json
import os

import pytest
from broker_harness import run_cli

from shmbroker import Admin, errors
from shmbroker.client.admin import TopicDescription

pytestmark = pytest.mark.timeout(120)


def cli_ok(*args: str) -> str:
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def cli_error(*args: str) -> str:
    """A failing command prints one line on stderr, exits 1, and shows no traceback."""
    proc = run_cli(*args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shmbroker: error: "), proc.stderr
    return lines[0]


def test_topics_create_list_describe_alter_delete_via_cli_persist_across_restart(make_broker):
    broker = make_broker()
    d = ("--data-dir", broker.data_dir)
    out = cli_ok("topics", "create", "orders", "--partitions", "2", "--config", "retention.ms=3600000",
                 "--config", "segment.bytes=1048576", *d)
    assert "Created topic orders with 2 partition(s)." in out
    cli_ok("topics", "create", "audit", "--partitions", "1", *d)
    assert cli_ok("topics", "list", *d).split() == ["audit", "orders"]
    described = cli_ok("topics", "describe", "orders", *d)
    assert "PartitionCount: 2" in described
    assert "retention_ms=3600000" in described and "segment_bytes=1048576" in described
    broker.wait_running({("orders", 0), ("orders", 1), ("audit", 0)})

    assert broker.stop() == 0
    broker.start()
    broker.wait_running({("orders", 0), ("orders", 1), ("audit", 0)})
    assert cli_ok("topics", "list", *d).split() == ["audit", "orders"]
    assert "retention_ms=3600000" in cli_ok("topics", "describe", "orders", *d)

    assert "now has 4 partition(s)" in cli_ok("topics", "alter", "orders", "--partitions", "4", *d)
    broker.wait_running({("orders", p) for p in range(4)} | {("audit", 0)})
    assert "Deleted topic audit." in cli_ok("topics", "delete", "audit", *d)
    broker.wait_running({("orders", p) for p in range(4)})
    assert not os.path.exists(os.path.join(broker.data_dir, "audit-0"))
    assert cli_ok("topics", "list", *d).split() == ["orders"]

    assert broker.stop() == 0
    broker.start()
    broker.wait_running({("orders", p) for p in range(4)})
    assert "PartitionCount: 4" in cli_ok("topics", "describe", "orders", *d)


def test_admin_manages_topics_and_raises_the_coordinators_error_classes(broker):
    with Admin(broker=broker.data_dir) as admin:
        topic = admin.create_topic("events", 3, config={"retention.bytes": "1000000", "flush.messages": 1})
        assert isinstance(topic, TopicDescription)
        assert topic.partitions == 3
        assert topic.overrides == {"retention_bytes": 1000000, "flush_messages": 1}
        assert topic.config["retention_bytes"] == 1000000 and topic.config["segment_ms"] == 7 * 86400000
        broker.wait_running({("events", p) for p in range(3)})
        assert admin.list_topics() == ["events"]
        assert admin.describe_topic("events") == topic

        with pytest.raises(errors.TopicAlreadyExistsError, match="'events' already exists"):
            admin.create_topic("events", 1)
        with pytest.raises(errors.UnknownTopicOrPartitionError, match="unknown topic 'nope'"):
            admin.describe_topic("nope")
        with pytest.raises(errors.UnknownTopicOrPartitionError):
            admin.delete_topic("nope")
        with pytest.raises(errors.InvalidPartitionsError, match="can only be increased"):
            admin.alter_partitions("events", 2)
        for bad in ("", ".", "..", "a" * 250, "has space", "slash/name", "ünïcode"):
            with pytest.raises(errors.InvalidTopicError):
                admin.create_topic(bad, 1)
        with pytest.raises(errors.ConfigError, match="unknown topic config 'retention.hours'"):
            admin.create_topic("x", 1, config={"retention.hours": 1})
        with pytest.raises(errors.ConfigError, match="segment_bytes=10 is outside"):
            admin.create_topic("x", 1, config={"segment.bytes": 10})
        with pytest.raises(errors.InvalidPartitionsError):
            admin.create_topic("x", 0)
        assert admin.list_topics() == ["events"]  # nothing half-created

        assert admin.alter_partitions("events", 5).partitions == 5
        broker.wait_running({("events", p) for p in range(5)})
        admin.delete_topic("events")
        assert admin.list_topics() == []
        assert not any(name.startswith("events-") for name in os.listdir(broker.data_dir))
        broker.wait_running(set())
        admin.create_topic("events", 1)  # the name is free again; the old data is gone
        broker.wait_running({("events", 0)})
    with open(os.path.join(broker.data_dir, "topics.json")) as f:
        stored = json.load(f)
    assert stored["format"] == "shmbroker-topics" and stored["version"] == 1
    assert [t["name"] for t in stored["topics"]] == ["events"] and stored["deleting"] == []


def test_bad_names_and_configs_give_one_line_cli_errors(broker):
    d = ("--data-dir", broker.data_dir)
    assert "character other than" in cli_error("topics", "create", "a/b", "--partitions", "1", *d)
    assert "cannot be '..'" in cli_error("topics", "create", "..", "--partitions", "1", *d)
    assert "249" in cli_error("topics", "create", "x" * 250, "--partitions", "1", *d)
    assert "unknown topic config" in cli_error("topics", "create", "t", "--partitions", "1",
                                               "--config", "bogus=1", *d)
    assert "expected an integer" in cli_error("topics", "create", "t", "--partitions", "1",
                                              "--config", "retention.ms=soon", *d)
    assert "key=value" in cli_error("topics", "create", "t", "--partitions", "1", "--config", "novalue", *d)
    assert "outside [1, 1024]" in cli_error("topics", "create", "t", "--partitions", "0", *d)
    assert "unknown topic 'nope'" in cli_error("topics", "describe", "nope", *d)
    assert cli_ok("topics", "list", *d).strip() == ""


def test_no_broker_running_is_a_typed_error_naming_the_data_dir(broker_dir):
    with pytest.raises(errors.BrokerNotRunningError, match=f"no broker is running on data dir {broker_dir}"):
        Admin(broker=broker_dir)
    line = cli_error("topics", "list", "--data-dir", broker_dir)
    assert f"no broker is running on data dir {broker_dir}" in line


def test_a_data_dir_too_deep_for_a_unix_socket_is_refused_clearly(tmp_path):
    deep = tmp_path / ("d" * 100)
    line = cli_error("serve", "--data-dir", str(deep), "--listen", "none")
    assert "too deep" in line and "shorter --data-dir" in line
