"""Find what a previous run left in /dev/shm (a broker or producers killed with -9).

Shared memory outlives a crashed process just as the page cache does: a ring whose producer
died may still hold committed frames that were never appended. So stale cleanup never unlinks
a ring with committed unread frames; it returns it, the caller (the broker at start) drains it
into the log with a RingConsumer, then unlinks it (``RingConsumer.unlink_for_dead_owner``).

Everything is judged by the owner pid and start time written in each region's header.
Regions whose header cannot be read (a creator killed before it wrote the magic, or garbage)
are reported with their error and unlinked only when their owner cannot be identified at all
and the caller asks for it.
"""
from __future__ import annotations

import os
from typing import NamedTuple

from .. import errors
from ..layout import shm as L
from . import names
from .liveness import process_alive
from .region import SHM_DIR, unlink


class RegionInfo(NamedTuple):
    name: str
    kind: str | None         # names.CONTROL_KIND, RING_KIND, COUNTERS_KIND or None
    owner_pid: int           # 0 when the header could not be read
    owner_alive: bool
    committed_unread: bool   # rings: a committed frame waits at read_position
    error: str | None        # why the header could not be read, if it could not


class StaleReport(NamedTuple):
    removed: list[str]             # unlinked: dead owner, nothing committed left in it
    to_drain: list[RegionInfo]     # dead owner, committed frames inside: drain, then unlink
    unreadable: list[RegionInfo]   # header unreadable (left alone unless remove_unreadable)
    alive: list[RegionInfo]        # owner alive: not ours to touch


def list_names(prefix: str) -> list[str]:
    assert prefix.startswith(names.NAME_PREFIX), prefix
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def inspect(name: str, prefix: str) -> RegionInfo:
    """Reads the header of ``name`` (read-only, without trusting it beyond its checks)."""
    from .control import ControlRegion
    from .ring import RingConsumer
    from .region import Region

    kind = names.kind_of(name, prefix)
    try:
        if kind == names.CONTROL_KIND:
            ctl = ControlRegion.attach(name, readonly=True)
            try:
                pid, start = ctl.owner_pid, ctl.owner_start_time
                return RegionInfo(name, kind, pid, process_alive(pid, start), False, None)
            finally:
                ctl.close()
        if kind == names.RING_KIND:
            region = Region.attach(name, magic=L.RING_MAGIC,
                                   layout_version=L.RING_LAYOUT_VERSION, what="ring")
            try:
                ring = RingConsumer(region)
                return RegionInfo(name, kind, ring.owner_pid, ring.owner_alive(),
                                  ring.has_unread(), None)
            finally:
                region.close()
        if kind == names.COUNTERS_KIND:
            from .counters import CountersReader

            with CountersReader.attach(name) as counters:
                header = counters.header()
                return RegionInfo(name, kind, header.owner_pid,
                                  process_alive(header.owner_pid, header.owner_start_time),
                                  False, None)
        return RegionInfo(name, kind, 0, False, False, "unknown kind of name")
    except errors.RegionNotFoundError as exc:
        return RegionInfo(name, kind, 0, False, False, str(exc))
    except errors.RegionHeaderError as exc:
        return RegionInfo(name, kind, 0, False, False, str(exc))


def list_regions(prefix: str) -> list[RegionInfo]:
    return [inspect(n, prefix) for n in list_names(prefix)]


def find_stale(prefix: str, remove: bool = True, remove_unreadable: bool = False) -> StaleReport:
    """Sorts the regions under ``prefix`` by their owner's state and (with ``remove``) unlinks
    those of dead owners that hold nothing committed."""
    removed, to_drain, unreadable, alive = [], [], [], []
    for info in list_regions(prefix):
        if info.error is not None:
            unreadable.append(info)
            if remove and remove_unreadable and unlink(info.name):
                removed.append(info.name)
        elif info.owner_alive:
            alive.append(info)
        elif info.committed_unread:
            to_drain.append(info)
        elif remove and unlink(info.name):
            removed.append(info.name)
    return StaleReport(removed, to_drain, unreadable, alive)
