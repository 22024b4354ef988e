"""The Prometheus text of a snapshot (shmbroker/monitor/prometheus.py) parses strictly, names
every counter of every region by the conventions, and escapes label values."""
from __future__ import annotations

import time

import pytest
from prometheus_text import parse, value

from shmbroker.layout import counters as CL
from shmbroker.monitor.prometheus import render
from shmbroker.monitor.snapshot import GroupRow, PartitionRow, ProcessRow, Snapshot

pytestmark = pytest.mark.timeout(30)


def _snapshot() -> Snapshot:
    part = {c.name: i for i, c in enumerate(CL.PARTITION_COUNTERS)}
    part.update(records_in=1000, ring_fill_percent=42, last_fsync_time_ms=1_700_000_000_500)
    coordinator = {c.name: 0 for c in CL.COORDINATOR_COUNTERS}
    coordinator["requests_join"] = 3
    odd = 'we"ird\\topic\nname'
    return Snapshot("/d", time.time(), 1.0, "running", 10.0,
                    [ProcessRow("coordinator", "coordinator", 10, "running", 0, 1.5, 1 << 20, 3,
                                coordinator),
                     ProcessRow("partition", "partition t/0", 11, "running", 2, None, None,
                                None)],
                    [PartitionRow("t", 0, 1000, 0, 5.0, 4096, 1.0, 1, 1, 100.0, 42, part),
                     PartitionRow(odd, 1, None, None, None, 0, None, 0, None)],
                    [GroupRow("g", "Stable", 4, 2, 7, [
                        {"topic": "t", "partition": 0, "committed": 993, "end": 1000, "lag": 7},
                        {"topic": "t", "partition": 1, "committed": -1, "end": 5,
                         "lag": None}])],
                    [])


def test_every_counter_is_exported_once_with_help_type_and_base_units():
    families = parse(render(_snapshot()))
    t0 = {"topic": "t", "partition": 0}
    assert value(families, "shmbroker_partition_records_in_total", **t0) == 1000
    assert value(families, "shmbroker_partition_ring_fill_ratio", **t0) == pytest.approx(0.42)
    assert value(families, "shmbroker_partition_last_fsync_timestamp_seconds", **t0) == \
        pytest.approx(1_700_000_000.5)
    assert value(families, "shmbroker_partition_errors_total", kind="bad_frame", **t0) == \
        CL.PARTITION["frames_rejected"]
    assert value(families, "shmbroker_coordinator_requests_total", type="join") == 3
    assert value(families, "shmbroker_group_lag", group="g", topic="t", partition=0) == 7
    assert value(families, "shmbroker_group_lag_sum", group="g") == 7
    assert value(families, "shmbroker_group_state", group="g", state="Stable") == 1
    assert value(families, "shmbroker_process_restarts_total", role="partition",
                 name="partition t/0") == 2
    # Nothing committed on t/1: no lag sample (as `groups describe` shows "-").
    assert len(families["shmbroker_group_lag"]["samples"]) == 1
    for name, family in families.items():
        assert name.startswith("shmbroker_") and family["help"], name
    expected = {f"shmbroker_partition_{c.metric}" for c in CL.PARTITION_COUNTERS}
    assert expected <= set(families)


def test_label_values_are_escaped_and_a_partition_without_counters_is_down():
    odd = 'we"ird\\topic\nname'
    families = parse(render(_snapshot()))
    assert value(families, "shmbroker_partition_up", topic=odd, partition=1) == 0
    assert value(families, "shmbroker_partition_up", topic="t", partition=0) == 1
