"""Group wake words: the coordinator tells a group's members at once that a rebalance began.

The words are the tail of the coordinator's counters region (layout and reasons:
shmbroker/layout/counters.py; the decision: docs/design/groups.md, "Decision: a futex word
tells members a rebalance began"). One u32 per slot; the coordinator gives each group it holds
a slot of its own (:class:`WakeSlots`) and names it in every join answer, with the word's value:

* the coordinator (:func:`wake`) adds 1 to its group's word and FUTEX_WAKEs it whenever the
  group starts a rebalance;
* a member (:class:`GroupWakeWord`) sleeps on the word beside its partitions' hw_seq words
  (futex_waitv). A value other than the one its last join answer named means "your group is
  rebalancing": it rejoins at once, without the heartbeat that would tell it so.

Race-free for the same reason as hw_seq (docs/design/shm.md): the value in the answer is read
when the answer is made, after the generation it answers began and before any later rebalance
of the group bumps the word; a rebalance that starts after that moves the word past it, so the
member's next sleep returns at once. A slot is never shared by two groups at once, so a wake is
never another group's; a slot handed on after its group was forgotten (no members left) can
wake a process that was removed from that group, and a rejoin is what such a process needs.
"""
from __future__ import annotations

from .. import errors
from ..layout import counters as L
from ..native import _native
from . import names, wake as futex
from .counters import _attach


def wake(buf, slot: int) -> None:
    """Coordinator: the group of ``slot`` began a rebalance. ``buf``: its counters region (or
    the private stand-in of a coordinator run without a supervisor)."""
    offset = L.group_wake_word_offset(slot)
    _native.atomic_add_u32(buf, offset, 1)
    futex.wake(buf, offset)


def load(buf, slot: int) -> int:
    """The word of ``slot`` now (the coordinator puts it in join answers)."""
    return _native.atomic_load_u32(buf, L.group_wake_word_offset(slot))


class WakeSlots:
    """The coordinator's allocation of words to the groups it holds: one each, up to
    ``capacity`` groups at once; freed when the group is forgotten. Plain code."""

    def __init__(self, capacity: int = L.GROUP_WAKE_WORDS):
        assert 0 <= capacity <= L.GROUP_WAKE_WORDS, capacity
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out the lowest first
        self._slots: dict[str, int] = {}

    def slot(self, group_id: str) -> int | None:
        """``group_id``'s slot, given now if it has none; None when every slot is taken."""
        slot = self._slots.get(group_id)
        if slot is None and self._free:
            slot = self._slots[group_id] = self._free.pop()
        return slot

    def held(self, group_id: str) -> int | None:
        return self._slots.get(group_id)

    def release(self, group_id: str) -> None:
        slot = self._slots.pop(group_id, None)
        if slot is not None:
            self._free.append(slot)


class GroupWakeWord:
    """A member's read-only view of the coordinator's words, pointed at its group's slot by each
    join answer (:meth:`follow`). Owned by the consumer's thread (the heartbeat thread never
    touches it)."""

    def __init__(self, region):
        self._region = region
        self.buf = region.buf
        self.offset: int | None = None  # no slot named yet (or none left): heartbeats only

    @classmethod
    def attach(cls, data_dir: str) -> "GroupWakeWord | None":
        """The words of the coordinator of the broker at ``data_dir``; None when there are
        none (a coordinator run without a supervisor, or an older broker whose region has no
        words): the member then learns of rebalances by heartbeat only."""
        name = names.counters_name(names.broker_prefix(data_dir), "coordinator")
        try:
            region, _ = _attach(name, L.KIND_COORDINATOR, readonly=True)
        except (errors.RegionNotFoundError, errors.RegionHeaderError):
            return None
        return cls(region)

    def follow(self, slot) -> None:
        """The slot a join answer named (None or a bad value: no word, heartbeats only)."""
        self.offset = L.group_wake_word_offset(slot) if isinstance(slot, int) \
            and not isinstance(slot, bool) and 0 <= slot < L.GROUP_WAKE_WORDS else None

    def load(self) -> int:
        """The word now; -1 when no slot is followed."""
        if self.offset is None:
            return -1
        return _native.atomic_load_u32(self.buf, self.offset)

    def word(self, expected: int) -> tuple | None:
        """``(buf, offset, expected)`` for a futex_waitv list; None without a slot."""
        return None if self.offset is None else (self.buf, self.offset, expected)

    def close(self) -> None:
        if self._region is not None:
            self._region.close()
            self._region = None
