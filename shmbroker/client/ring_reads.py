"""A consumer's reads of committed records still in the producers' rings (decision 0005, step 5).

A producer takes its frame's offsets at the commit, so a committed frame in its ring already
holds records at their final offsets, ahead of the partition's append to the log. A consumer
that has read everything the log holds (its position is at or past the high watermark) finds
the frame holding its position in one of the partition's rings and hands out a checked copy,
instead of waiting for the partition process to append and publish: one wake-up (the
producer's commit) instead of two on the way from producer to consumer.

What a ring read may hand out is exactly what the log will hold at those offsets:

* the frame is committed (its length word), so the partition appends it at those offsets,
  also after a crash of any of our processes (a restart drains the rings first);
* ``shmb_frame_ok`` with the topic's ``max.message.bytes`` from the control region is the
  rule the partition's round applies (one C function for both); a frame it refuses gets an
  empty batch in the log, and here it is ``REFUSED``: the consumer waits for the log;
* the copy is checked against the ring's ``read_position`` after it was taken: once the
  partition released the frame's space the producer may have written over it, so the copy
  is thrown away (``TORN``) and the record is read from the log, where it is by then;
* rings of acks="all" producers are not read (their records become visible once fsynced),
  nor any ring of a partition whose process did not allow it (``ring_reads``: topics with a
  flush policy).

Holds read-only mappings of the rings it found in the control region's registry; a consumer
thread owns it (not thread-safe). Design: docs/design/consumer.md, "Reading the rings".
"""
from __future__ import annotations

import struct

from .. import errors
from ..config import BATCH_RECORDS_MAX
from ..layout import shm as L
from ..native import _native
from ..shm import names
from ..shm.control import ControlRegion
from ..shm.region import Region

S = L.FRAME_AT_STATUS
FOUND, NONE, TORN, REFUSED = S["FOUND"], S["NONE"], S["TORN"], S["REFUSED"]
#: ring_take: ring reads are off, or the rings must be looked up again first.
DECLINED = _native.RING_TAKE_DECLINED
_C = L.CONTROL
_LIMIT = struct.Struct("<q")
_RING_READS, _BATCH_BYTES_MAX = _C["ring_reads"], _C["batch_bytes_max"]
_STATUS, _REGISTRY_CHANGES = _C["partition_status"], _C["registry_changes"]
_load_u32 = _native.atomic_load_u32


class RingReads:
    """The committed ring frames of one partition, read by one consumer."""

    # Slots: _native.poll_ring reads control, _bufs, _hints, _froms and _registry_seen by
    # their offsets, as it reads client.consumer._Fetch's.
    __slots__ = ("control", "prefix", "topic", "partition", "_rings", "_registry_seen", "_keys",
                 "_bufs", "_hints", "_froms")

    def __init__(self, control: ControlRegion, prefix: str, topic: str, partition: int):
        self.control = control
        self.prefix, self.topic, self.partition = prefix, topic, partition
        #: (slot, generation) -> ring mapping; rings whose slot moved on are closed at a refresh.
        self._rings: dict[tuple[int, int], Region] = {}
        self._registry_seen = -1
        #: The rings in one order, as ring_take takes them: their keys, mappings, and per ring
        #: shmb_ring_frame_at's next_hint, good for offsets from its hint_from on.
        self._keys: list[tuple[int, int]] = []
        self._bufs: list = []
        self._hints: list[int] = []
        self._froms: list[int] = []

    def limit(self) -> int:
        """The topic's max.message.bytes when the partition allows ring reads, else 0."""
        buf = self.control.buf
        if not _load_u32(buf, _RING_READS):
            return 0
        return _LIMIT.unpack_from(buf, _BATCH_BYTES_MAX)[0]

    def read(self, offset: int) -> tuple[int, bytes | None, int, int]:
        """(status, payload, base, span) of the committed frame holding ``offset``: FOUND with
        a checked copy whose batches are at their offsets; REFUSED or TORN (the log will
        have it: wait for the high watermark); NONE (no ring holds it now)."""
        limit = self._readable()
        if not limit:
            return NONE, None, -1, 0
        control = self.control.buf
        hints, froms = self._hints, self._froms
        for i, buf in enumerate(self._bufs):  # bounded by the registry's slots
            hint = hints[i] if offset >= froms[i] else 0
            status, payload, base, span, next_hint = _native.ring_frame_at(
                buf, control, offset, hint, limit, BATCH_RECORDS_MAX)
            if status == NONE:
                if offset >= froms[i]:
                    hints[i], froms[i] = next_hint, offset
                continue
            if status == FOUND:
                hints[i], froms[i] = next_hint, base + span
            return status, payload, base, span
        return NONE, None, -1, 0

    def take(self, offset: int, records_max: int, topic: str, partition: int, wait_ms: int,
             spin_ns: int, seen_hw_seq: int) -> tuple:
        """:meth:`read`, decoded, and when nothing holds ``offset`` a sleep until a commit
        (or a publish) and a second look, in one C call (``_native.ring_take``): what a
        caught-up consumer of one partition does between a producer's commit and its records.
        (status, records or None, index of the record at ``offset`` (len(records) if it is
        not there), the offset after the frames read, commit_seq seen before the last look,
        beyond_taken); status None when ring reads are off (or the partition stopped
        cleanly)."""
        for _ in range(2):  # bounded: a second call only after a registry refresh
            got = _native.ring_take(self.control.buf, self._bufs, self._hints, self._froms,
                                    offset, self._registry_seen, records_max, topic, partition,
                                    wait_ms, spin_ns, seen_hw_seq)
            if got[0] != DECLINED:
                return got
            if not self._readable():  # refreshes the rings when the registry changed
                break
        return None, None, 0, -1, 0, False

    def _readable(self) -> int:
        """The limit to read with (the rings found in the registry attached), or 0 when ring
        reads are off, or the partition stopped cleanly: what is committed from then on is
        never appended. (limit(), partition_status and the registry check as three loads:
        this runs before every ring read, on a caught-up consumer's every poll.)"""
        buf = self.control.buf
        if not _load_u32(buf, _RING_READS) or \
                _load_u32(buf, _STATUS) == L.PARTITION_STATUS_STOPPED:
            return 0
        limit = _LIMIT.unpack_from(buf, _BATCH_BYTES_MAX)[0]
        if limit <= 0:
            return 0
        if _load_u32(buf, _REGISTRY_CHANGES) != self._registry_seen:
            self._refresh()
        return limit

    def _refresh(self) -> None:
        changes = self.control.registry_changes
        if changes == self._registry_seen:
            return
        self._registry_seen = changes
        live = set()
        for info in self.control.slots():  # bounded by the registry's slots
            if info.state not in (L.SLOT_READY, L.SLOT_CLOSING):
                continue
            key = (info.slot, info.generation)
            live.add(key)
            if key in self._rings:
                continue
            name = names.ring_name(self.prefix, self.topic, self.partition, info.slot,
                                   info.generation)
            try:
                region = Region.attach(name, magic=L.RING_MAGIC,
                                       layout_version=L.RING_LAYOUT_VERSION, readonly=True,
                                       what="ingress ring")
            except (errors.RegionNotFoundError, errors.RegionHeaderError, OSError):
                continue  # gone, or not readable: its records come through the log
            self._rings[key] = region
        for key in [k for k in self._rings if k not in live]:
            self._rings.pop(key).close()
        kept = {k: (h, f) for k, h, f in zip(self._keys, self._hints, self._froms)}
        self._keys = list(self._rings)
        self._bufs = [self._rings[k].buf for k in self._keys]
        self._hints = [kept.get(k, (0, 0))[0] for k in self._keys]
        self._froms = [kept.get(k, (0, 0))[1] for k in self._keys]

    def close(self) -> None:
        self._keys, self._bufs, self._hints, self._froms = [], [], [], []
        for region in self._rings.values():
            region.close()
        self._rings.clear()
        self._registry_seen = -1
