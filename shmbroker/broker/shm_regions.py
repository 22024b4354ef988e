"""The supervisor's shared memory: one control region per partition, and what a previous run
of this data dir left in /dev/shm.

* A partition's control region is created before its first process starts and kept across
  restarts of that process (producers and consumers keep their mapping, a restarted process
  finds its producers' rings in the registry). It is unlinked when the partition stops for
  good: a clean stop of the broker, a deleted topic.
* At start (``reclaim_stale``), regions under this broker's prefix whose owner is dead are
  the previous run's (a kill -9 of the broker). A control region of a partition that is still
  wanted is *adopted*, not recreated: its registry still names the producers' rings, which may
  hold committed frames that were never appended (shared memory outlives a crashed process
  like the page cache), and its drain journal lets the new partition process recognise frames
  that were appended but not released. The partition process drains those rings, then unlinks
  them (partition/ingress.py). Everything else of a dead owner -- control regions of topics
  that are gone, rings of such topics, unreadable headers -- is unlinked here.

Owned by the supervisor's main thread; not thread-safe.
"""
from __future__ import annotations

import logging
from typing import Iterable

from .. import errors
from ..shm import names, stale
from ..shm.control import ControlRegion
from ..shm.region import unlink

log = logging.getLogger("shmbroker.supervisor")


class ControlRegions:
    """Control regions owned by this supervisor, by (topic, partition)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.regions: dict[tuple[str, int], ControlRegion] = {}

    def ensure(self, topic: str, partition: int) -> ControlRegion:
        """The partition's control region, created (O_EXCL, 0600) if this supervisor has none."""
        key = (topic, partition)
        region = self.regions.get(key)
        if region is None:
            name = names.control_name(self.prefix, topic, partition)
            try:
                region = ControlRegion.create(name, partition)
            except errors.RegionExistsError:
                # Left by a run we did not reclaim (e.g. created while we started): adopt it
                # if it is readable, else replace it.
                try:
                    region = ControlRegion.adopt(name)
                except errors.RegionHeaderError as exc:
                    log.warning("replacing unreadable control region %s: %s", name, exc)
                    unlink(name)
                    region = ControlRegion.create(name, partition)
            self.regions[key] = region
        return region

    def remove(self, topic: str, partition: int) -> None:
        region = self.regions.pop((topic, partition), None)
        if region is not None:
            region.unlink()
            region.close()

    def close_all(self) -> None:
        """Clean stop: every partition process has exited; unlink every control region."""
        for key in list(self.regions):
            self.remove(*key)

    def reclaim_stale(self, wanted: Iterable[tuple[str, int]]) -> None:
        """See the module doc. Live owners' regions (producers still running) are left alone."""
        wanted = set(wanted)
        controls = {names.control_name(self.prefix, t, p): (t, p) for t, p in wanted}
        ring_starts = tuple(names.ring_name_prefix(self.prefix, t, p) for t, p in wanted)
        adopted, removed, kept_rings = [], [], 0
        for info in stale.list_regions(self.prefix):
            if info.owner_alive:
                continue
            key = controls.get(info.name)
            if info.kind == names.CONTROL_KIND and key is not None and info.error is None:
                self.regions[key] = ControlRegion.adopt(info.name)
                adopted.append(info.name)
            elif info.kind == names.RING_KIND and info.name.startswith(ring_starts):
                kept_rings += 1  # its partition process drains it, then unlinks it
            elif unlink(info.name):
                removed.append(info.name)
        if adopted or removed or kept_rings:
            log.info("previous run's shared memory: adopted %d control region(s), left %d "
                     "ring(s) of dead producers to be drained by their partitions, removed %s",
                     len(adopted), kept_rings, removed or "nothing")
