"""The partition process's view of its producers: which ingress rings exist, which to read,
which to let go.

A producer announces a ring by setting its registry slot READY (control region) and bumping
``registry_changes``; :meth:`Ingress.refresh` attaches every READY ring it has not attached yet
(one atomic load per drain round when nothing changed). :meth:`Ingress.reap` (periodic, every
``DOORBELL_SLEEP_MS_MAX`` at most) finds producers that died: their rings are drained like any
other (shared memory outlives the process, so what they committed is appended), then unlinked
and their slots freed. A ring whose producer closed it cleanly is detached once drained; the
producer unlinks it and frees its slot itself (docs/design/shm.md, "Registry").

Owned by the partition process's main thread; not thread-safe.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from .. import errors
from ..layout import shm as L
from ..shm import names
from ..shm.control import ControlRegion
from ..shm.region import unlink
from ..shm.ring import RingConsumer
from ..shm.stale import list_names

log = logging.getLogger("shmbroker.partition")


@dataclass(eq=False)
class IngressRing:
    """One attached ring and what the partition process knows about its producer."""

    consumer: RingConsumer
    slot: int | None          # None: an orphan ring found in /dev/shm, in no registry slot
    generation: int
    pid: int
    dead: bool = False        # its producer is gone: drain, then unlink and free the slot
    broken: str | None = None  # its bytes broke an invariant: no longer read
    #: Completions and releases of frames in the log that wait for the producer to read its
    #: completions (Drainer._settle): (first, last, base offset, error code, position).
    owed: deque = field(default_factory=deque)

    @property
    def name(self) -> str:
        return self.consumer.name

    def readable(self) -> bool:
        """A committed frame waits and the ring is not held back (cheap: two atomic loads)."""
        consumer = self.consumer
        return self.broken is None and consumer.has_unread() and not consumer.completions_full()


class Ingress:
    """Every ring of one partition (see the module docstring)."""

    def __init__(self, control: ControlRegion, prefix: str, topic: str, partition: int):
        self.control = control
        self.prefix = prefix
        self.topic = topic
        self.partition = partition
        self.rings: dict[tuple[int | None, int, str], IngressRing] = {}
        #: registry_changes when the registry was last scanned.
        self.registry_seen: int | None = None
        #: Dead producers whose ring (or slot without a ring) was reclaimed (counters).
        self.producers_gone = 0
        #: ring_list() and live_consumers(), kept until a ring comes, goes or breaks
        #: (_changed): the loop asks for them every pass.
        self._ring_list: list[IngressRing] | None = None
        self._live: list[RingConsumer] | None = None

    def __iter__(self):
        return iter(list(self.rings.values()))

    def __len__(self) -> int:
        return len(self.rings)

    def ring_list(self) -> list[IngressRing]:
        """Every attached ring, in attach order. The same list until a ring comes or goes:
        do not change it."""
        rings = self._ring_list
        if rings is None:
            rings = self._ring_list = list(self.rings.values())
        return rings

    def live_consumers(self) -> list[RingConsumer]:
        """The consumers of the rings that are read (not broken); kept like ring_list."""
        live = self._live
        if live is None:
            live = self._live = [r.consumer for r in self.rings.values() if r.broken is None]
        return live

    def mark_broken(self, ring: IngressRing, why: str) -> None:
        """The ring's bytes broke an invariant: it is no longer read (see IngressRing)."""
        ring.broken = why
        self._changed()

    def _changed(self) -> None:
        self._ring_list = self._live = None

    # -- finding rings -------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> int:
        """Attach READY rings not attached yet; returns how many were attached."""
        changes = self.control.registry_changes
        if not force and changes == self.registry_seen:
            return 0
        self.registry_seen = changes
        attached = 0
        for info in self.control.slots():
            if info.state not in (L.SLOT_READY, L.SLOT_CLOSING):
                continue
            name = names.ring_name(self.prefix, self.topic, self.partition, info.slot,
                                   info.generation)
            if (info.slot, info.generation, name) in self.rings:
                continue
            if self._attach(name, info.slot, info.generation, info.pid):
                attached += 1
        return attached

    def _attach(self, name: str, slot: int | None, generation: int, pid: int,
                unlink_unreadable: bool = False) -> bool:
        try:
            consumer = RingConsumer.attach(name)
        except errors.RegionNotFoundError:
            return False  # closed and unlinked by its producer, or not created yet
        except errors.RegionHeaderError as exc:
            log.error("partition %s/%d: cannot read ring %s%s: %s", self.topic, self.partition,
                      name, " (removed)" if unlink_unreadable else "", exc)
            if unlink_unreadable:
                unlink(name)
            return False
        self.rings[(slot, generation, name)] = IngressRing(consumer, slot, generation, pid)
        self._changed()
        return True

    def adopt_orphans(self) -> int:
        """At start: rings of this partition left in /dev/shm by dead producers that no
        registry slot names any more (e.g. the previous broker died between unlinking and
        freeing). They are drained like dead producers' rings, then unlinked."""
        known = {key[2] for key in self.rings}
        adopted = 0
        start = names.ring_name_prefix(self.prefix, self.topic, self.partition)
        for name in list_names(self.prefix):
            parsed = names.parse_ring_name(name, self.prefix)
            if not name.startswith(start) or parsed is None or name in known:
                continue
            _, _, slot, generation = parsed
            slot_info = self.control.slot(slot) if slot < self.control.registry_slots else None
            if slot_info is not None and slot_info.pid and slot_info.generation == generation:
                continue  # a live registration: refresh/reap handle it
            if self._attach(name, None, generation, 0, unlink_unreadable=True):
                ring = self.rings[(None, generation, name)]
                if ring.consumer.owner_alive():
                    ring.consumer.close()  # a live producer still setting up: not ours
                    del self.rings[(None, generation, name)]
                    self._changed()
                    continue
                ring.dead = True
                ring.consumer.stop_holding_back()
                adopted += 1
                log.info("partition %s/%d: draining orphan ring %s", self.topic,
                         self.partition, name)
        return adopted

    # -- producers that died or left -----------------------------------------------------------

    def reap(self) -> None:
        """Mark rings of dead producers (drained next, then retired) and free registry slots
        of dead producers that have no ring (killed before creating it)."""
        for ring in self:
            if not ring.dead and not ring.consumer.owner_alive():
                ring.dead = True
                ring.consumer.stop_holding_back()
                log.info("partition %s/%d: producer pid %d of ring %s is gone; draining what it "
                         "committed", self.topic, self.partition, ring.consumer.owner_pid,
                         ring.name)
        attached = {(key[0], key[1]) for key in self.rings}
        for info in self.control.dead_slots():
            if (info.slot, info.generation) in attached:
                continue
            name = names.ring_name(self.prefix, self.topic, self.partition, info.slot,
                                   info.generation)
            if self._attach(name, info.slot, info.generation, info.pid):
                ring = self.rings[(info.slot, info.generation, name)]
                ring.dead = True
                ring.consumer.stop_holding_back()
            else:
                unlink(name)  # unreadable or absent: nothing we can drain
                self.control.release_slot(info.slot, info.pid)
                self.producers_gone += 1

    def retire_finished(self) -> list[str]:
        """Let go of rings that are drained and whose producer closed them or died; returns
        their names. Dead producers' rings are unlinked and their slots freed here."""
        retired = []
        for key, ring in list(self.rings.items()):
            consumer = ring.consumer
            if ring.owed and ring.broken is None:
                continue  # its completions are still to be written
            if ring.broken is not None:
                if not ring.dead:
                    continue  # keep it (not read) until its producer goes away
            elif ring.dead:
                if consumer.has_unread():
                    continue
            elif not (consumer.producer_closed and not consumer.has_unread()):
                continue
            if ring.dead or consumer.handed_over:
                unlink(ring.name)
                if ring.slot is not None:
                    self.control.release_slot(ring.slot, ring.pid)
                self.producers_gone += 1
            consumer.close()
            del self.rings[key]
            self._changed()
            retired.append(ring.name)
        return retired

    def close(self) -> None:
        """Detach every ring (shutdown). Drained rings of dead producers are retired first."""
        self.retire_finished()
        for ring in self.rings.values():
            ring.consumer.close()
        self.rings.clear()
        self._changed()
