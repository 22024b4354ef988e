"""One look at a live broker, from the outside: what `shmbroker top` shows.

Everything comes from what the broker already publishes, read-only, with no request on the
data path: ``runtime.json`` (processes), psutil (their CPU, memory, threads), each partition's
control region (high watermark, log start, active segment; a seqlock read, which never blocks
the writer), each process's counters region (shm/counters.py: records and bytes in, ring
fill, fsyncs, errors, requests...; mapped read-only, magic and version checked first), the
partition directories (bytes on disk), and the coordinator (groups, through the same
``Admin`` calls as `shmbroker groups describe`). Rates are differences between two samples,
so a :class:`Monitor` keeps the previous one: records/s and bytes/s in from the counters
(from the high watermark and the directory where a partition has no counters region).

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
from ..layout import counters as CL
from ..shm import stale
from ..shm.counters import CountersReader, read_consumer_slots
from ..shm.region import SHM_DIR as _SHM_DIR
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
    #: The process's counters region (coordinator, router, partitions), name -> value;
    #: None where it has none or it could not be read.
    counters: dict[str, int] | None = None


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
    #: Bytes of record batches appended per second (counters region).
    bytes_in_per_s: float | None = None
    #: The partition's fullest ingress ring, percent (counters region, sampled).
    ring_fill_percent: int | None = None
    #: Every counter of the partition process (layout/counters.py), name -> value.
    counters: dict[str, int] | None = None
    #: Records and bytes local consumers handed out / read per second (their own counters
    #: regions); None before the second sample.
    records_out_per_s: float | None = None
    bytes_out_per_s: float | None = None


@dataclass
class ConsumerRow:
    """One local consumer's counters region: totals, and per partition it has read."""

    name: str  # "<pid>.<n>"
    pid: int
    counters: dict[str, int]
    #: [{"topic", "partition", "records_out", "bytes_out"}] (topic None: not a known topic).
    partitions: list[dict[str, Any]] = field(default_factory=list)


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
    consumers: list[ConsumerRow] = field(default_factory=list)

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
        self._counters: dict[str, tuple[CountersReader, int]] = {}
        self._last: dict[tuple[str, int], tuple[float, int | None, int, dict | None]] = {}
        #: (region name, inode, topic, partition) -> (records_out, bytes_out) last sampled.
        self._last_out: dict[tuple, tuple[int, int]] = {}
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
        processes = [self._process_row(entry, problems) for entry in doc.get("processes", [])]
        supervisor = next((e for e in doc.get("processes", []) if e.get("role") == "supervisor"),
                          None)
        uptime = time.time() - supervisor["started_at"] if supervisor else None
        partitions = self._partitions(now, interval, problems)
        consumers = self._consumers(partitions, interval, problems)
        groups = self._groups(problems)
        return Snapshot(self.data_dir, time.time(), interval, str(doc.get("state")), uptime,
                        processes, partitions, groups, problems, consumers)

    # -- processes --------------------------------------------------------------------------------

    def _process_row(self, entry: dict, problems: list[str]) -> ProcessRow:
        pid = entry.get("pid")
        name = str(entry.get("title", entry.get("role"))).removeprefix("shmbroker: ")
        row = ProcessRow(str(entry.get("role")), name, pid, str(entry.get("state")),
                         int(entry.get("restarts", 0)), None, None, None)
        if row.role in ("coordinator", "router"):
            row.counters = self.read_counters(names.counters_name(self._prefix, row.role),
                                              problems)
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
        counters = self.read_counters(names.counters_name(self._prefix, "partition", topic, p),
                                      problems)
        control = self._control(topic, p)
        if control is not None:
            try:
                state = control.read_state()
                hw, start = state.high_watermark, state.log_start_offset
                producers = sum(1 for s in control.slots() if s.pid)
            except errors.ShmbrokerError as exc:
                problems.append(f"{topic}/{p}: {exc}")
        disk, segments = _disk_usage(partition_dir(self.data_dir, topic, p))
        rate = disk_rate = bytes_rate = None
        last = self._last.get((topic, p))
        if last is not None and interval:
            last_at, last_hw, last_disk, last_counters = last
            elapsed = now - last_at
            if counters is not None and last_counters is not None:
                # A restarted partition process continues its counters (the supervisor keeps
                # the region); a new region (broker restart) starts at 0: no negative rate.
                rate = max(0, counters["records_in"] - last_counters["records_in"]) / elapsed
                bytes_rate = max(0, counters["bytes_in"] - last_counters["bytes_in"]) / elapsed
            elif hw is not None and last_hw is not None:
                rate = max(0, hw - last_hw) / elapsed
            disk_rate = max(0, disk - last_disk) / elapsed
        self._last[(topic, p)] = (now, hw, disk, counters)
        return PartitionRow(topic, p, hw, start, rate, disk, disk_rate, segments, producers,
                            bytes_rate, None if counters is None else
                            counters["ring_fill_percent"], counters)

    def read_counters(self, name: str, problems: list[str]) -> dict[str, int] | None:
        """name -> value of the counters region ``name``; None when there is none (a broker
        without them, a process not started yet). A region that is not ours or not of this
        layout version is reported in ``problems``, never guessed at. A broker restarted
        meanwhile made a new region: that one is mapped."""
        reader = self._attach_counters(name, problems)
        return None if reader is None else reader.read()

    # -- local consumers --------------------------------------------------------------------------

    def _consumers(self, partitions: list[PartitionRow], interval: float | None,
                   problems: list[str]) -> list[ConsumerRow]:
        """Every live consumer region; adds their records and bytes out per second to the
        partition rows. A rate is the sum of each (consumer, partition)'s growth since the
        previous sample; a region (or slot) new since then grew from 0 within the interval.
        A consumer that closed in between takes what it read since the previous sample with
        it (the rate is low for that interval, never negative)."""
        by_hash = {CL.topic_hash(t): t for t in {p.topic for p in partitions}}
        rows: list[ConsumerRow] = []
        last, self._last_out = self._last_out, {}
        grown: dict[tuple[str, int], list[int]] = {}
        start = names.consumer_counters_prefix(self._prefix)
        listed = stale.list_names(start)
        for gone in [n for n in self._counters if n.startswith(start) and n not in listed]:
            self._counters.pop(gone)[0].close()  # a consumer that closed: unmap it
        for name in listed:
            reader = self._attach_counters(name, problems)
            if reader is None:
                continue
            header = reader.header()
            inode = self._counters[name][1]
            row = ConsumerRow(".".join(name.rsplit(".", 2)[-2:]), header.owner_pid,
                              reader.read())
            for slot in read_consumer_slots(reader.region.buf):
                topic = by_hash.get(slot.topic_hash)
                row.partitions.append({"topic": topic, "partition": slot.partition,
                                       "records_out": slot.records_out,
                                       "bytes_out": slot.bytes_out})
                if topic is None:
                    continue
                key = (name, inode, topic, slot.partition)
                self._last_out[key] = (slot.records_out, slot.bytes_out)
                before = last.get(key, (0, 0))
                acc = grown.setdefault((topic, slot.partition), [0, 0])
                acc[0] += max(0, slot.records_out - before[0])
                acc[1] += max(0, slot.bytes_out - before[1])
            rows.append(row)
        if interval:
            for p in partitions:
                records_out, bytes_out = grown.get((p.topic, p.partition), (0, 0))
                p.records_out_per_s = records_out / interval
                p.bytes_out_per_s = bytes_out / interval
        return rows

    def _attach_counters(self, name: str, problems: list[str]) -> CountersReader | None:
        """The cached reader of region ``name`` (re-attached when the name's inode changed);
        None when it is gone or not readable (reported in ``problems``)."""
        try:
            inode = os.stat(os.path.join(_SHM_DIR, name)).st_ino
        except OSError:
            inode = None
        cached = self._counters.get(name)
        if cached is not None and cached[1] != inode:
            del self._counters[name]
            cached[0].close()
            cached = None
        if inode is None:
            return None
        if cached is None:
            try:
                cached = self._counters[name] = (CountersReader.attach(name), inode)
            except errors.RegionNotFoundError:
                return None
            except errors.ShmbrokerError as exc:
                problems.append(f"counters: {exc}")
                return None
        return cached[0]

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
        for reader, _ in self._counters.values():
            reader.close()
        self._counters.clear()


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
