"""The supervisor's shared memory: one control region per partition, one counters region per
child process, and what a previous run of this data dir left in /dev/shm.

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
  that are gone, rings of such topics, counters regions, unreadable headers -- is unlinked
  here.
* A counters region (shm/counters.py) is created before its process first starts and kept
  across its restarts, so a restarted process continues its counters; it goes with its
  partition (clean stop, deleted topic) or, for the coordinator and router, at a clean stop.
  One left by a killed broker is not adopted: counters are derived, a new run starts at 0.
* A local consumer's counters region is the consumer's (it creates and unlinks it). One left
  by a consumer killed with -9 is unlinked by ``sweep_consumer_counters``, which the
  supervisor runs every CONSUMER_COUNTERS_SWEEP_MS, and at a clean stop for every consumer
  (a consumer that outlives its broker keeps counting in a mapping nobody reads).

Owned by the supervisor's main thread; not thread-safe.
"""
from __future__ import annotations

import logging
from typing import Iterable

from .. import errors
from ..layout import counters as counters_layout
from ..shm import names, stale
from ..shm.control import ControlRegion
from ..shm.counters import CountersRegion
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


def rings_kept(prefix: str) -> list[str]:
    """Rings under ``prefix`` of dead producers that still hold committed frames: after a
    clean stop, what a partition process killed before it drained them (it ignored SIGTERM)
    left. They stay: the next start's partition process adopts them as orphans and appends
    their frames (partition/ingress.py), as after a kill -9 of the broker."""
    return sorted(info.name for info in stale.find_stale(prefix, remove=False).to_drain
                  if info.kind == names.RING_KIND)


_COUNTER_KINDS = {"partition": counters_layout.KIND_PARTITION,
                  "coordinator": counters_layout.KIND_COORDINATOR,
                  "router": counters_layout.KIND_ROUTER}


def counters_name_for(prefix: str, key: tuple) -> str | None:
    """The counters region of the child with supervisor key ``key``; None for a child that
    keeps none (the metrics server)."""
    if key[0] not in _COUNTER_KINDS:
        return None
    return names.counters_name(prefix, *key)


class CountersRegions:
    """Counters regions owned by this supervisor, by child key (see the module doc)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.regions: dict[tuple, CountersRegion] = {}

    def ensure(self, key: tuple) -> None:
        """Creates the child's region (0600, O_EXCL) unless this supervisor has it already.
        One of that name left by a dead broker that stale cleanup did not get to (or one
        that is unreadable) is replaced."""
        name = counters_name_for(self.prefix, key)
        if name is None or key in self.regions:
            return
        kind = _COUNTER_KINDS[key[0]]
        try:
            region = CountersRegion.create(name, kind)
        except errors.RegionExistsError:
            log.warning("replacing counters region %s left by an earlier run", name)
            unlink(name)
            region = CountersRegion.create(name, kind)
        self.regions[key] = region

    def remove(self, key: tuple) -> None:
        region = self.regions.pop(key, None)
        if region is not None:
            region.unlink()
            region.close()

    def close_all(self) -> None:
        for key in list(self.regions):
            self.remove(key)


def sweep_consumer_counters(prefix: str, everything: bool = False) -> list[str]:
    """Unlinks the counters regions of local consumers whose process is gone (``everything``:
    of all consumers, at a clean stop); returns the names removed. Regions with an unreadable
    header (a consumer killed while creating one) count as gone."""
    removed = []
    for name in stale.list_names(names.consumer_counters_prefix(prefix)):
        info = stale.inspect(name, prefix)
        if (everything or not info.owner_alive) and unlink(name):
            removed.append(name)
    if removed:
        log.info("removed the counters regions of %d consumer(s)%s: %s", len(removed),
                 "" if everything else " that died", removed)
    return removed
