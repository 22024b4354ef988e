"""One look at a live broker, from the outside: what `shmbroker top` shows.

Everything comes from what the broker already publishes, read-only, with no request on the
data path: ``runtime.json`` (processes), psutil (their CPU, memory, threads), each partition's
control region (high watermark, log start, active segment; a seqlock read, which never blocks
the writer), the partition directories (bytes on disk), and the coordinator (groups, through
the same ``Admin`` calls as `shmbroker groups describe`). Rates are differences between two
samples, so a :class:`Monitor` keeps the previous one.

Owned by one thread; not thread-safe.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from .. import errors
from ..broker.runtime import read_runtime
from ..coordinator.topics import load_topics, partition_dir
from ..shm import names
from ..shm.control import ControlRegion

#: Segment files counted on disk (Kafka's names): data, and the two indexes.
_SEGMENT_SUFFIXES = (".log", ".index", ".timeindex")


@dataclass
class ProcessRow:
    role: str
    name: str
    pid: int | None
    state: str
    restarts: int
    cpu_percent: float | None
    rss_bytes: int | None
    threads: int | None


@dataclass
class PartitionRow:
    topic: str
    partition: int
    high_watermark: int | None
    log_start_offset: int | None
    records_per_s: float | None
    disk_bytes: int
    disk_bytes_per_s: float | None
    segments: int
    producers: int | None


@dataclass
class GroupRow:
    group_id: str
    state: str
    generation_id: int
    members: int
    lag: int | None  # None: nothing committed anywhere
    partitions: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Snapshot:
    data_dir: str
    taken_at: float  # wall clock, seconds
    interval_s: float | None  # between the samples the rates come from; None: no rates yet
    broker_state: str
    uptime_s: float | None
    processes: list[ProcessRow]
    partitions: list[PartitionRow]
    groups: list[GroupRow]
    errors: list[str]  # what could not be read this time, one line each

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Monitor:
    """Samples the broker on ``data_dir``; each :meth:`sample` returns a Snapshot with rates
    since the previous one."""

    def __init__(self, data_dir: str):
        self.data_dir = os.path.abspath(data_dir)
        self._prefix = names.broker_prefix(os.path.realpath(self.data_dir))
        self._procs: dict[int, psutil.Process] = {}
        self._controls: dict[tuple[str, int], ControlRegion] = {}
        self._last: dict[tuple[str, int], tuple[float, int | None, int]] = {}
        self._last_at: float | None = None

    def sample(self) -> Snapshot:
        problems: list[str] = []
        doc = read_runtime(self.data_dir)
        if doc is None:
            raise errors.BrokerNotRunningError(
                f"no broker is running on data dir {self.data_dir} (no runtime.json; start one "
                f"with `shmbroker serve --data-dir {self.data_dir}`)")
        now = time.monotonic()
        interval = None if self._last_at is None else now - self._last_at
        self._last_at = now
        processes = [self._process_row(entry) for entry in doc.get("processes", [])]
        supervisor = next((e for e in doc.get("processes", []) if e.get("role") == "supervisor"),
                          None)
        uptime = time.time() - supervisor["started_at"] if supervisor else None
        partitions = self._partitions(now, interval, problems)
        groups = self._groups(problems)
        return Snapshot(self.data_dir, time.time(), interval, str(doc.get("state")), uptime,
                        processes, partitions, groups, problems)

    # -- processes --------------------------------------------------------------------------------

    def _process_row(self, entry: dict) -> ProcessRow:
        pid = entry.get("pid")
        name = str(entry.get("title", entry.get("role"))).removeprefix("shmbroker: ")
        row = ProcessRow(str(entry.get("role")), name, pid, str(entry.get("state")),
                         int(entry.get("restarts", 0)), None, None, None)
        if not isinstance(pid, int):
            return row
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # starts its CPU clock; the next sample has a figure
            else:
                row.cpu_percent = proc.cpu_percent(None)
            with proc.oneshot():
                row.rss_bytes = proc.memory_info().rss
                row.threads = proc.num_threads()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            self._procs.pop(pid, None)
        return row

    # -- partitions -------------------------------------------------------------------------------

    def _partitions(self, now: float, interval: float | None, problems: list[str]
                    ) -> list[PartitionRow]:
        try:
            registry = load_topics(self.data_dir)
        except errors.ShmbrokerError as exc:
            problems.append(f"topics: {exc}")
            return []
        rows = []
        for topic in sorted(registry.topics):
            for p in range(registry.topics[topic].partitions):
                rows.append(self._partition_row(topic, p, now, interval, problems))
        return rows

    def _partition_row(self, topic: str, p: int, now: float, interval: float | None,
                       problems: list[str]) -> PartitionRow:
        hw = start = producers = None
        control = self._control(topic, p)
        if control is not None:
            try:
                state = control.read_state()
                hw, start = state.high_watermark, state.log_start_offset
                producers = sum(1 for s in control.slots() if s.pid)
            except errors.ShmbrokerError as exc:
                problems.append(f"{topic}/{p}: {exc}")
        disk, segments = _disk_usage(partition_dir(self.data_dir, topic, p))
        rate = disk_rate = None
        last = self._last.get((topic, p))
        if last is not None and interval:
            last_at, last_hw, last_disk = last
            if hw is not None and last_hw is not None:
                rate = max(0, hw - last_hw) / (now - last_at)
            disk_rate = max(0, disk - last_disk) / (now - last_at)
        self._last[(topic, p)] = (now, hw, disk)
        return PartitionRow(topic, p, hw, start, rate, disk, disk_rate, segments, producers)

    def _control(self, topic: str, p: int) -> ControlRegion | None:
        region = self._controls.get((topic, p))
        if region is None:
            try:
                region = ControlRegion.attach(names.control_name(self._prefix, topic, p),
                                              readonly=True)
            except errors.ShmbrokerError:
                return None  # not served (yet): shown without live figures
            self._controls[(topic, p)] = region
        return region

    # -- groups -----------------------------------------------------------------------------------

    def _groups(self, problems: list[str]) -> list[GroupRow]:
        from ..client.admin import Admin

        try:
            with Admin(broker=self.data_dir, request_timeout_ms=2_000) as admin:
                rows = []
                for summary in admin.list_groups():
                    described = admin.describe_group(summary["group_id"])
                    lags = [r["lag"] for r in described["partitions"] if r["lag"] is not None]
                    rows.append(GroupRow(summary["group_id"], described["state"],
                                         described["generation_id"], len(described["members"]),
                                         sum(lags) if lags else None, described["partitions"]))
                return rows
        except errors.ShmbrokerError as exc:
            problems.append(f"groups: {type(exc).__name__}: {exc}")
            return []

    def close(self) -> None:
        for region in self._controls.values():
            region.close()
        self._controls.clear()


def _disk_usage(directory: str) -> tuple[int, int]:
    """(bytes of segment files, segments) in a partition directory; (0, 0) if it is gone."""
    total = segments = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:  # bounded by the directory
                if entry.name.endswith(_SEGMENT_SUFFIXES):
                    try:
                        total += entry.stat().st_size
                    except FileNotFoundError:
                        continue  # deleted by retention meanwhile
                    segments += entry.name.endswith(".log")
    except FileNotFoundError:
        pass
    return total, segments
