"""Group wake words: the coordinator tells a group's members at once that a rebalance began.

The words are the tail of the coordinator's counters region (layout and reasons:
shmbroker/layout/counters.py; the decision: docs/design/groups.md, "Decision: a futex word
tells members a rebalance began"). One u32 per slot, ``group_wake_slot(group id)``:

* the coordinator (:func:`wake`) adds 1 to its group's word and FUTEX_WAKEs it whenever the
  group starts a rebalance;
* a member (:class:`GroupWakeWord`) loads the word before each heartbeat or join, and sleeps
  on it beside its partitions' hw_seq words (futex_waitv). A value other than the one it
  loaded before its last heartbeat or join means "heartbeat now": that heartbeat, not the
  word, says whether to rejoin (groups whose ids hash alike share a word, so a wake may be
  another group's; it then costs one early heartbeat).

Race-free for the same reason as hw_seq (docs/design/shm.md): the member loads the word
*before* it asks the coordinator; a rebalance that starts after the coordinator answered
moves the word past that value, so the member's next sleep returns at once.
"""
from __future__ import annotations

from .. import errors
from ..layout import counters as L
from ..native import _native
from . import names, wake as futex
from .counters import _attach


def wake(buf, group_id: str) -> None:
    """Coordinator: a rebalance of ``group_id`` began. ``buf``: its counters region (or the
    private stand-in of a coordinator run without a supervisor)."""
    offset = L.group_wake_word_offset(group_id)
    _native.atomic_add_u32(buf, offset, 1)
    futex.wake(buf, offset)


class GroupWakeWord:
    """A member's read-only view of its group's word. Owned by the consumer's thread (the
    heartbeat thread never touches it)."""

    def __init__(self, region, group_id: str):
        self._region = region
        self.buf = region.buf
        self.offset = L.group_wake_word_offset(group_id)

    @classmethod
    def attach(cls, data_dir: str, group_id: str) -> "GroupWakeWord | None":
        """The word of ``group_id`` in the coordinator's region of the broker at ``data_dir``;
        None when there is none (a coordinator run without a supervisor, or an older broker
        whose region has no words): the member then learns of rebalances by heartbeat only."""
        name = names.counters_name(names.broker_prefix(data_dir), "coordinator")
        try:
            region, _ = _attach(name, L.KIND_COORDINATOR, readonly=True)
        except (errors.RegionNotFoundError, errors.RegionHeaderError):
            return None
        return cls(region, group_id)

    def load(self) -> int:
        return _native.atomic_load_u32(self.buf, self.offset)

    def word(self, expected: int) -> tuple:
        """``(buf, offset, expected)`` for a futex_waitv list."""
        return (self.buf, self.offset, expected)

    def close(self) -> None:
        if self._region is not None:
            self._region.close()
            self._region = None
