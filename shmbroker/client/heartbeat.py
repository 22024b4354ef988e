"""The heartbeat thread of a group member: keeps its session while the application processes
records between polls, and enforces ``max_poll_interval_ms``.

Kafka's consumer heartbeats from a background thread for the same reason: without one, a
worker that spends longer than the session timeout on one poll's records is removed from its
group and its partitions move, although it is alive and working. With it, the only limit on
processing time is ``max_poll_interval_ms`` (Kafka's max.poll.interval.ms, 5 minutes by
default): a member that has not polled for that long is taken to be stuck, leaves the group
(a dynamic member; a static one stops heartbeating and its session decides) and rejoins at
its next poll, as a new member, after ``on_revoke`` is told its partitions are lost.

The thread only heartbeats when the owner has not: while the application sits in ``poll()``,
the poll heartbeats itself (it must act on "rebalance" at once, and it would only learn it
from the thread at its next wake-up). It never acts on an answer: it posts the error to the
membership (``GroupMembership.post``) and the owner's next poll rejoins. It has its own
coordinator socket (a ZeroMQ socket belongs to one thread) and never touches the owner's.

A daemon thread: a process that exits without ``close()`` is not held up by it (the
coordinator then notices the dead pid, docs/design/groups.md).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from .. import errors
from .admin import Admin

if TYPE_CHECKING:
    from .group_membership import GroupMembership

log = logging.getLogger("shmbroker.consumer")

#: Longest a heartbeat request waits for its reply. Short, so that ``stop()`` (from close)
#: is not held up by a coordinator that is restarting; a missed heartbeat is retried at the
#: next interval, and the session timeout is what really decides.
HEARTBEAT_REQUEST_TIMEOUT_MS = 2_000
#: How long ``stop()`` waits for the thread to finish its current request.
STOP_WAIT_S = HEARTBEAT_REQUEST_TIMEOUT_MS / 1000 + 0.5


class HeartbeatThread(threading.Thread):
    """Heartbeats for ``membership`` when its owner does not (see the module doc)."""

    def __init__(self, membership: "GroupMembership"):
        super().__init__(name=f"shmbroker-heartbeat-{membership.group_id}", daemon=True)
        self._membership = membership
        self._stopping = threading.Event()
        self._left_generation = -1  # the generation this thread left over max_poll_interval

    def stop(self) -> None:
        """Ask the thread to end and wait (bounded) for it. Safe from any thread but its own."""
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(STOP_WAIT_S)

    def run(self) -> None:
        m = self._membership
        interval_s = m.heartbeat_interval_ms / 1000
        try:
            admin = Admin(broker=m.data_dir,
                          request_timeout_ms=min(HEARTBEAT_REQUEST_TIMEOUT_MS, m.session_timeout_ms),
                          **m.admin_kwargs)
        except errors.ShmbrokerError as e:  # the broker went away: polls will say so
            log.warning("group %r: no heartbeat thread: %s", m.group_id, e)
            return
        try:
            while not self._stopping.wait(interval_s):  # bounded: ends with stop()
                self._beat(admin, interval_s)
        finally:
            admin.close()

    def _beat(self, admin: Admin, interval_s: float) -> None:
        m = self._membership
        member_id, generation, joined, last_heartbeat, last_poll = m.snapshot()
        if not joined:
            return  # joining or told to rejoin: the owner's poll acts
        now = time.monotonic()
        if now - last_poll > m.rebalance_timeout_ms / 1000:
            self._poll_interval_exceeded(admin, member_id, generation, now - last_poll)
            return
        if now - last_heartbeat < interval_s:
            return  # the owner's poll heartbeated lately
        m.heartbeat_sent(now)
        fields = {} if m.group_instance_id is None else {"group_instance_id": m.group_instance_id}
        try:
            admin._request("heartbeat", group_id=m.group_id, member_id=member_id,
                           generation_id=generation, **fields)
        except (errors.RebalanceInProgressError, errors.UnknownMemberIdError,
                errors.IllegalGenerationError, errors.FencedInstanceIdError) as e:
            m.post(member_id, generation, e)
        except errors.ShmbrokerError as e:
            # A slow or restarting coordinator, a broker going away: try again next interval;
            # the owner's next request meets the same condition and raises it.
            log.debug("group %r: heartbeat failed: %s: %s", m.group_id, type(e).__name__, e)

    def _poll_interval_exceeded(self, admin: Admin, member_id: str, generation: int,
                                since_s: float) -> None:
        m = self._membership
        if self._left_generation == generation:
            return  # said and done; the owner's next poll rejoins
        self._left_generation = generation
        log.warning("group %r: no poll for %.1f s, more than max_poll_interval_ms=%d: the "
                    "application is stuck or processes too much per poll (lower max_records "
                    "or raise max_poll_interval_ms); %s", m.group_id, since_s,
                    m.rebalance_timeout_ms,
                    "leaving the group" if m.group_instance_id is None else
                    "no more heartbeats (static member)")
        error = errors.UnknownMemberIdError(
            f"left group {m.group_id!r}: no poll within max_poll_interval_ms")
        if m.group_instance_id is None:
            try:
                admin._request("leave", group_id=m.group_id, member_id=member_id)
            except errors.ShmbrokerError as e:
                log.debug("group %r: leave failed: %s", m.group_id, e)
            m.post(member_id, generation, error)
