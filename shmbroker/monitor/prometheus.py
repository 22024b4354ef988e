"""A Snapshot as Prometheus text exposition format (version 0.0.4): what the metrics process
(metrics_server.py) serves on ``/metrics``. Pure: a Snapshot in, text out.

Names follow Prometheus conventions: ``shmbroker_<subsystem>_<name>``, counters end in
``_total``, base units (seconds, bytes, ratios), one HELP and one TYPE line per metric before
its samples, labels for what varies (topic, partition, group, kind, type). What is exported:

* every counter of every counters region (layout/counters.py: its ``metric``, ``label`` and
  ``scale``), labelled ``topic``/``partition`` for partitions;
* per partition ``shmbroker_partition_up``: 1 when its counters region was readable;
* per consumer group: ``shmbroker_group_members``, ``shmbroker_group_generation``,
  ``shmbroker_group_state{state=...}`` 1, and per partition it committed to
  ``shmbroker_group_committed_offset`` and ``shmbroker_group_lag`` (end offset - committed,
  the same figure as `shmbroker groups describe`), plus ``shmbroker_group_lag_sum``;
* per process (runtime.json, psutil): ``shmbroker_process_restarts_total``,
  ``shmbroker_process_resident_memory_bytes``, ``shmbroker_process_cpu_ratio``;
* ``shmbroker_scrape_problems``: what could not be read this time (details in the log).
"""
from __future__ import annotations

from collections import OrderedDict

from ..layout import counters as CL
from .snapshot import Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, object]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class _Families:
    """Samples grouped by metric name, so that each name's HELP and TYPE come once, first."""

    def __init__(self) -> None:
        self._families: OrderedDict[str, tuple[str, str, list[str]]] = OrderedDict()

    def add(self, name: str, type_: str, help_: str, labels: dict[str, object], value) -> None:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = (type_, help_, [])
        assert family[0] == type_, (name, family[0], type_)
        family[2].append(f"{name}{_labels(labels)} {_value(value)}")

    def text(self) -> str:
        out = []
        for name, (type_, help_, samples) in self._families.items():
            out.append(f"# HELP {name} {_escape(help_)}")
            out.append(f"# TYPE {name} {type_}")
            out.extend(samples)
        return "\n".join(out) + "\n"


def _add_counters(families: _Families, subsystem: str, table, values: dict[str, int],
                  labels: dict[str, object]) -> None:
    for counter in table:
        value = values[counter.name]
        if counter.scale != 1:
            value = value * counter.scale
        extra = dict(labels)
        if counter.label is not None:
            extra[counter.label[0]] = counter.label[1]
        help_ = CL.SHARED_HELP.get(counter.metric, counter.help) if counter.label else counter.help
        families.add(f"shmbroker_{subsystem}_{counter.metric}", counter.type, help_, extra, value)


def render(snap: Snapshot) -> str:
    families = _Families()
    families.add("shmbroker_up", "gauge", "1: the broker's runtime file was read.", {}, 1)
    for p in snap.partitions:
        labels = {"topic": p.topic, "partition": p.partition}
        families.add("shmbroker_partition_up", "gauge",
                     "1: the partition process's counters region was readable.", labels,
                     int(p.counters is not None))
        if p.counters is not None:
            _add_counters(families, "partition", CL.PARTITION_COUNTERS, p.counters, labels)
    for proc in snap.processes:
        labels = {"role": proc.role, "name": proc.name}
        if proc.role in ("coordinator", "router") and proc.counters is not None:
            table = CL.COORDINATOR_COUNTERS if proc.role == "coordinator" else CL.ROUTER_COUNTERS
            _add_counters(families, proc.role, table, proc.counters, {})
        if proc.role != "supervisor":
            families.add("shmbroker_process_restarts_total", "counter",
                         "Restarts of the process by the supervisor.", labels, proc.restarts)
        if proc.rss_bytes is not None:
            families.add("shmbroker_process_resident_memory_bytes", "gauge",
                         "Resident memory of the process.", labels, proc.rss_bytes)
        if proc.cpu_percent is not None:
            families.add("shmbroker_process_cpu_ratio", "gauge",
                         "CPU used by the process since the previous scrape (1.0: one core).",
                         labels, proc.cpu_percent / 100)
    for c in snap.consumers:
        consumer = {"consumer": c.name, "pid": c.pid}
        for counter in ("records_out", "bytes_out"):
            families.add(f"shmbroker_consumer_{counter}_total", "counter",
                         CL.CONSUMER_COUNTERS[CL.CONSUMER[counter]].help, consumer,
                         c.counters[counter])
        for row in c.partitions:
            if row["topic"] is None:
                continue  # a topic deleted since the consumer read it
            labels = {**consumer, "topic": row["topic"], "partition": row["partition"]}
            families.add("shmbroker_consumer_partition_records_out_total", "counter",
                         "Records a local consumer handed out from the partition.", labels,
                         row["records_out"])
            families.add("shmbroker_consumer_partition_bytes_out_total", "counter",
                         "Bytes of record batches a local consumer read from the partition.",
                         labels, row["bytes_out"])
    for g in snap.groups:
        group = {"group": g.group_id}
        families.add("shmbroker_group_members", "gauge", "Members of the consumer group.",
                     group, g.members)
        families.add("shmbroker_group_generation", "gauge", "Generation of the group.", group,
                     g.generation_id)
        families.add("shmbroker_group_state", "gauge", "1 for the group's current state.",
                     {**group, "state": g.state}, 1)
        if g.lag is not None:
            families.add("shmbroker_group_lag_sum", "gauge",
                         "Records behind the end over the partitions the group committed to.",
                         group, g.lag)
        for row in g.partitions:
            if row.get("committed", -1) < 0:
                continue  # nothing committed: no lag to speak of (as groups describe shows)
            labels = {**group, "topic": row["topic"], "partition": row["partition"]}
            families.add("shmbroker_group_committed_offset", "gauge",
                         "Offset the group committed (the next record it will read).", labels,
                         row["committed"])
            if row.get("lag") is not None:
                families.add("shmbroker_group_lag", "gauge",
                             "Records between the group's committed offset and the end of the "
                             "partition.", labels, row["lag"])
    families.add("shmbroker_scrape_problems", "gauge",
                 "Things that could not be read for this scrape (see the metrics log).", {},
                 len(snap.errors))
    return families.text()
