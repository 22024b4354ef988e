"""Counters regions: what each broker process has done, in shared memory, for `shmbroker top`
and the Prometheus endpoint. Layout and the counter tables: shmbroker/layout/counters.py.

* :meth:`CountersRegion.create` (the supervisor, before the process first starts; 0600,
  O_EXCL). A region left by a broker killed with -9 is stale: the next start unlinks it and
  creates a new one (counters are derived, the log is the truth; Prometheus takes a reset).
* :class:`CountersWriter` (the process itself): attaches read-write, claims the writer line,
  keeps a private mirror of every counter (plain Python ints: ``w.values[i] += n`` costs what
  an addition costs) and stores runs of them with one C call (``store``/``store_range``,
  relaxed atomic stores: untorn words, no lock). It starts from the values in the region, so
  a restarted process continues its predecessor's counters. :meth:`CountersWriter.private`
  is the same object over process memory, for a process not run by a supervisor (tests).
* :class:`CountersReader` (tools): attaches read-only, checks magic, version, size, kind and
  counter count first (RegionHeaderError naming the region otherwise), and loads every
  counter with one C call.

Owned by one thread of one process; not thread-safe.
"""
from __future__ import annotations

import itertools
import os
import struct
import time
from typing import NamedTuple

from .. import errors
from ..layout import counters as L
from ..native import _native
from . import names
from .liveness import my_start_time
from .region import Region

H = L.HEADER
_OWNER = struct.Struct("<iIQI")  # owner_pid, kind, owner_start_time, counters_count
_WRITER = struct.Struct("<iIQQ")  # writer_pid, writer_attaches, writer_start_time, attached_ns


class CountersHeader(NamedTuple):
    kind: int
    owner_pid: int
    owner_start_time: int
    created_ns: int
    writer_pid: int
    writer_attaches: int
    writer_start_time: int
    writer_attached_ns: int


class CountersRegion:
    """The creator's handle (the supervisor): creates and unlinks; writes no counter."""

    def __init__(self, region: Region, kind: int):
        self.region = region
        self.kind = kind
        self.name = region.name

    @classmethod
    def create(cls, name: str, kind: int) -> "CountersRegion":
        table = L.TABLES[kind]
        region = Region.create(name, L.region_bytes(kind))
        try:
            buf = region.buf
            _OWNER.pack_into(buf, H["owner_pid"], os.getpid(), kind, my_start_time(), len(table))
            struct.pack_into("<Q", buf, H["created_ns"], time.time_ns())
            region.write_prefix(L.COUNTERS_MAGIC, L.COUNTERS_LAYOUT_VERSION, L.COUNTERS_OFFSET)
        except BaseException:
            region.unlink()
            region.close()
            raise
        return cls(region, kind)

    def close(self) -> None:
        self.region.close()

    def unlink(self) -> None:
        self.region.unlink()


def _attach(name: str, kind: int | None, readonly: bool) -> tuple[Region, int]:
    """Maps ``name`` and checks it all before anything is trusted: the common prefix (magic,
    version, size), then header bytes, kind (``kind`` None: any known one) and counter count."""
    region = Region.attach(name, magic=L.COUNTERS_MAGIC, layout_version=L.COUNTERS_LAYOUT_VERSION,
                           readonly=readonly, what="counters region")
    try:
        buf = region.buf
        header_bytes = struct.unpack_from("<I", buf, H["header_bytes"])[0]
        _, found_kind, _, count = _OWNER.unpack_from(buf, H["owner_pid"])
        if found_kind not in L.TABLES or (kind is not None and found_kind != kind):
            raise errors.RegionHeaderError(
                f"counters region {name!r}: kind {found_kind}, expected "
                f"{L.KIND_NAMES.get(kind, 'a known kind') if kind else 'a known kind'}",
                H["kind"])
        if header_bytes != L.COUNTERS_OFFSET or count != len(L.TABLES[found_kind]) \
                or region.size != L.region_bytes(found_kind):
            raise errors.RegionHeaderError(
                f"counters region {name!r}: header_bytes {header_bytes}, {count} counters in "
                f"{region.size} bytes; layout version {L.COUNTERS_LAYOUT_VERSION} has "
                f"{len(L.TABLES[found_kind])} {L.KIND_NAMES[found_kind]} counters",
                H["counters_count"])
        return region, found_kind
    except BaseException:
        region.close()
        raise


def read_header(buf) -> CountersHeader:
    owner_pid, kind, owner_start, _ = _OWNER.unpack_from(buf, H["owner_pid"])
    created = struct.unpack_from("<Q", buf, H["created_ns"])[0]
    return CountersHeader(kind, owner_pid, owner_start, created,
                          *_WRITER.unpack_from(buf, H["writer_pid"]))


class CountersWriter:
    """The one writer of a region's counters (see the module doc)."""

    def __init__(self, buf, kind: int, name: str, region: Region | None = None):
        self.buf = buf
        self.kind = kind
        self.name = name
        self._region = region
        self.table = L.TABLES[kind]
        #: The mirror: the truth for this process, stored to the region by store*().
        self.values: list[int] = list(_native.atomic_load_u64_many(buf, L.COUNTERS_OFFSET,
                                                                   len(self.table)))

    @classmethod
    def attach(cls, name: str, kind: int) -> "CountersWriter":
        region, _ = _attach(name, kind, readonly=False)
        buf = region.buf
        attaches = struct.unpack_from("<I", buf, H["writer_attaches"])[0]
        _WRITER.pack_into(buf, H["writer_pid"], os.getpid(), (attaches + 1) & 0xFFFFFFFF,
                          my_start_time(), time.time_ns())
        return cls(buf, kind, name, region)

    @classmethod
    def private(cls, kind: int) -> "CountersWriter":
        """Counters nobody else can see (a process the supervisor did not start)."""
        return cls(bytearray(L.region_bytes(kind)), kind, "(private)")

    def store(self) -> None:
        """Every counter, one C call."""
        _native.atomic_store_u64_many(self.buf, L.COUNTERS_OFFSET, self.values)

    def store_range(self, start: int, stop: int) -> None:
        """Counters [start, stop), one C call."""
        _native.atomic_store_u64_many(self.buf, L.counter_offset(start), self.values[start:stop])

    def add(self, index: int, delta: int = 1) -> None:
        """An event's counter: mirror and region (one store; not for the per-round path)."""
        self.values[index] += delta
        _native.atomic_store_u64(self.buf, L.counter_offset(index), self.values[index])

    def set(self, index: int, value: int) -> None:
        self.values[index] = value
        _native.atomic_store_u64(self.buf, L.counter_offset(index), value)

    def close(self) -> None:
        self.buf = bytearray(L.region_bytes(self.kind))  # late stores go nowhere
        if self._region is not None:
            self._region.close()
            self._region = None


class CountersReader:
    """A read-only view of one process's counters (tools)."""

    def __init__(self, region: Region, kind: int):
        self.region = region
        self.kind = kind
        self.name = region.name
        self.table = L.TABLES[kind]

    @classmethod
    def attach(cls, name: str, kind: int | None = None) -> "CountersReader":
        region, found = _attach(name, kind, readonly=True)
        return cls(region, found)

    def header(self) -> CountersHeader:
        return read_header(self.region.buf)

    def read(self) -> dict[str, int]:
        """name -> value of every counter (each loaded atomically; see the layout's doc)."""
        values = _native.atomic_load_u64_many(self.region.buf, L.COUNTERS_OFFSET,
                                              len(self.table))
        return {c.name: v for c, v in zip(self.table, values)}

    def close(self) -> None:
        self.region.close()

    def __enter__(self) -> "CountersReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- a local consumer's own region -----------------------------------------------------------

_consumer_regions_made = itertools.count()


_SLOT_OUT_OFFSETS = [L.slot_offset(i) + L.SLOT["records_out"] for i in range(L.CONSUMER_SLOTS_MAX)]


class ConsumerCounters:
    """A local Consumer's counters region (layout/counters.py, KIND_CONSUMER): created by the
    consumer itself (owner and writer both), unlinked by :meth:`close`. Totals live in the
    table, per-partition records and bytes out in slots; a partition gets its slot the first
    time it hands out records and keeps it (slots only grow). Everything is mirrored in
    Python and stored by :meth:`publish`, once per poll that returned records (for a poll
    served by the ring fast path, at the start of the next poll: docs/design/monitor.md)."""

    def __init__(self, region: CountersRegion):
        self._region = region
        self.name = region.name
        self.writer = CountersWriter(region.region.buf, L.KIND_CONSUMER, region.name)
        self.values = self.writer.values
        self._slots: dict[tuple[str, int], int] = {}
        #: slot index -> [records_out, bytes_out] (the mirror of its two words).
        self._slot_values: list[list[int]] = []

    @classmethod
    def create(cls, prefix: str) -> "ConsumerCounters":
        name = names.consumer_counters_name(prefix, os.getpid(), next(_consumer_regions_made))
        region = CountersRegion.create(name, L.KIND_CONSUMER)
        try:
            _WRITER.pack_into(region.region.buf, H["writer_pid"], os.getpid(), 1,
                              my_start_time(), time.time_ns())
            return cls(region)
        except BaseException:
            region.unlink()
            region.close()
            raise

    def slot(self, topic: str, partition: int) -> int:
        """The slot index of ``topic/partition``; -1 when every slot is taken."""
        key = (topic, partition)
        index = self._slots.get(key)
        if index is not None:
            return index
        used = len(self._slot_values)
        if used >= L.CONSUMER_SLOTS_MAX:
            self._slots[key] = -1
            return -1
        buf, offset = self.writer.buf, L.slot_offset(used)
        # Identity first, then slots_used: a reader that sees the count sees the slot's name.
        _native.atomic_store_u64_many(buf, offset, [L.topic_hash(topic), partition & (2**64 - 1)])
        self._slots[key] = used
        self._slot_values.append([0, 0])
        self.writer.set(L.CONSUMER["slots_used"], used + 1)
        return used

    def publish(self, fetches, polls: int = 1) -> None:
        """``polls`` polls' worth, from ``fetches`` (objects with ``topic``, ``partition``,
        ``counter_slot``, ``records_out`` and ``bytes_out`` read since the last publish, which
        are reset): each touched slot's two words and the table, one C call each. Kept lean:
        it runs on most polls that return records."""
        v = self.values
        buf = self.writer.buf
        store = _native.atomic_store_u64_many
        v[0] += polls
        v[3] = len(fetches)
        for fetch in fetches:  # bounded by the consumer's partitions
            records, bytes_ = fetch.records_out, fetch.bytes_out
            if not (records or bytes_):
                continue
            fetch.records_out = fetch.bytes_out = 0
            slot = fetch.counter_slot
            if slot is None:
                slot = fetch.counter_slot = self.slot(fetch.topic, fetch.partition)
            v[1] += records
            v[2] += bytes_
            if slot < 0:
                v[5] += records
                continue
            pair = self._slot_values[slot]
            pair[0] += records
            pair[1] += bytes_
            store(buf, _SLOT_OUT_OFFSETS[slot], pair)
        store(buf, L.COUNTERS_OFFSET, v)

    def close(self) -> None:
        """Unlinks the region (its figures go with it) and unmaps it."""
        self.writer.close()
        try:
            self._region.unlink()
        except errors.ShmbrokerError:
            pass  # a broker's clean stop or sweep removed it already
        self._region.close()


class ConsumerSlot(NamedTuple):
    topic_hash: int
    partition: int
    records_out: int
    bytes_out: int


def read_consumer_slots(buf) -> list[ConsumerSlot]:
    """The used slots of a consumer region (``slots_used`` loaded first; see the layout)."""
    used = _native.atomic_load_u64_many(buf, L.counter_offset(L.CONSUMER["slots_used"]), 1)[0]
    used = min(used, L.CONSUMER_SLOTS_MAX)
    out = []
    for i in range(used):
        h, p, r, b = _native.atomic_load_u64_many(buf, L.slot_offset(i), L.SLOT_WORDS)
        out.append(ConsumerSlot(h, p - 2**64 if p >= 2**63 else p, r, b))
    return out
