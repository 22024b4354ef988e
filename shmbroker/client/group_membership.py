"""One consumer's membership of its group: join, sync, heartbeat, leave, commit, fetch offsets.

The coordinator computes assignments (docs/design/groups.md, "Decision: the coordinator computes
the assignment"), so a member only asks and obeys::

    rejoin needed?  join (held by the coordinator until the join phase ends)
                    -> member id, generation, protocol
                    sync -> this member's assignment
    otherwise       heartbeat every heartbeat_interval_ms (driven by Consumer.poll);
                    RebalanceInProgressError -> rejoin (keep the partitions: cooperative;
                    revoke them all first: eager, which the Consumer does)
                    UnknownMemberIdError / IllegalGenerationError -> the partitions are lost
                    (maybe someone else's already): rejoin, as a new member if unknown

This class knows nothing of partitions being read; :class:`~shmbroker.client.consumer.Consumer`
applies the assignments. Requests travel through :class:`~shmbroker.client.admin.Admin`'s
``_request`` (one DEALER socket on the coordinator, typed errors raised), used as it is.
Owned by one thread; not fork-safe: a forked child makes a new membership (a new member).
"""
from __future__ import annotations

import os
import socket
import time
from typing import Iterable, Mapping

from .. import errors
from ..config import (ADMIN_REQUEST_TIMEOUT_MS, GROUP_HEARTBEAT_INTERVAL_MS_MIN,
                      GROUP_JOIN_ATTEMPTS_MAX, GROUP_JOIN_REPLY_MARGIN_MS,
                      GROUP_REBALANCE_TIMEOUT_MS_MAX, GROUP_REBALANCE_TIMEOUT_MS_MIN,
                      GROUP_SESSION_TIMEOUT_MS_MAX, GROUP_SESSION_TIMEOUT_MS_MIN)
from .admin import Admin
from .types import TopicPartition

#: Assignors offered by default, preferred first: cooperative sticky (only moved partitions
#: pause), else range (every member offers it, so a group with older members still forms).
DEFAULT_PROTOCOLS = ("cooperative-sticky", "range")
#: Assignors under which a member keeps its partitions while it rejoins (Kafka's rule: only
#: when every assignor it offers is cooperative).
COOPERATIVE_PROTOCOLS = frozenset({"cooperative-sticky"})
#: Errors after which a member rejoins (its generation is over or it is no member any more).
REJOIN_ERRORS = (errors.RebalanceInProgressError, errors.UnknownMemberIdError,
                 errors.IllegalGenerationError)


def _check_ms(name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise errors.ConfigError(f"{name}={value!r} must be an int in [{low}, {high}]")


class GroupMembership:
    """This process's member of ``group_id``, subscribed to ``topics`` (see module doc)."""

    def __init__(self, data_dir: str, group_id: str, topics: Iterable[str], client_id: str,
                 protocols: Iterable[str] = DEFAULT_PROTOCOLS,
                 session_timeout_ms: int = 45_000, rebalance_timeout_ms: int = 300_000,
                 heartbeat_interval_ms: int = 100):
        _check_ms("session_timeout_ms", session_timeout_ms, GROUP_SESSION_TIMEOUT_MS_MIN,
                  GROUP_SESSION_TIMEOUT_MS_MAX)
        _check_ms("max_poll_interval_ms", rebalance_timeout_ms, GROUP_REBALANCE_TIMEOUT_MS_MIN,
                  GROUP_REBALANCE_TIMEOUT_MS_MAX)
        _check_ms("heartbeat_interval_ms", heartbeat_interval_ms, GROUP_HEARTBEAT_INTERVAL_MS_MIN,
                  session_timeout_ms)
        self.group_id = group_id
        self.topics = sorted(set(topics))
        if not self.topics:
            raise errors.ConfigError(f"group {group_id!r}: subscribe to at least one topic")
        self.client_id = client_id
        self.protocols = list(protocols)
        self.session_timeout_ms = session_timeout_ms
        self.rebalance_timeout_ms = rebalance_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        #: Kafka's rule: a member keeps its partitions across a rebalance only when every
        #: assignor it offers is cooperative; otherwise it revokes them all before rejoining.
        self.cooperative = bool(self.protocols) and set(self.protocols) <= COOPERATIVE_PROTOCOLS
        self.member_id = ""
        self.generation_id = -1
        self.protocol: str | None = None
        #: True until the first join, and after the coordinator said to rejoin.
        self.rejoin_needed = True
        self._next_heartbeat = 0.0
        # Admin's request path is the one way a client talks to the coordinator (typed errors,
        # bounded waits); used as it is. A request not answered within ADMIN_REQUEST_TIMEOUT_MS
        # (30 s, Kafka's request.timeout.ms) is RequestTimeoutError (retriable), raised from
        # poll/commit; the timeout is raised only around a held join.
        self._admin = Admin(broker=data_dir, request_timeout_ms=ADMIN_REQUEST_TIMEOUT_MS)

    # -- membership -------------------------------------------------------------------------------

    def join(self) -> frozenset[TopicPartition]:
        """Join (or rejoin) and sync; returns this member's assignment in the new generation.

        Retries what the protocol says to retry (a newer rebalance began, the member id was
        forgotten) at most GROUP_JOIN_ATTEMPTS_MAX times; other errors are raised.
        """
        last: Exception | None = None
        for _ in range(GROUP_JOIN_ATTEMPTS_MAX):  # bounded
            try:
                return self._join_once()
            except errors.UnknownMemberIdError as e:
                self.member_id, self.generation_id, last = "", -1, e  # join as a new member
            except (errors.RebalanceInProgressError, errors.IllegalGenerationError) as e:
                last = e  # another rebalance started meanwhile: join it
        assert last is not None
        raise last

    def _join_once(self) -> frozenset[TopicPartition]:
        saved = self._admin.request_timeout_ms
        # The coordinator holds a join until the join phase ends: at most the rebalance timeout.
        self._admin.request_timeout_ms = self.rebalance_timeout_ms + GROUP_JOIN_REPLY_MARGIN_MS
        try:
            joined = self._admin._request(
                "join", group_id=self.group_id, member_id=self.member_id,
                client_id=self.client_id, pid=os.getpid(), host=socket.gethostname(),
                topics=self.topics, protocols=self.protocols,
                session_timeout_ms=self.session_timeout_ms,
                rebalance_timeout_ms=self.rebalance_timeout_ms)
        finally:
            self._admin.request_timeout_ms = saved
        self.member_id = joined["member_id"]
        self.generation_id = joined["generation_id"]
        self.protocol = joined["protocol"]
        synced = self._admin._request("sync", group_id=self.group_id, member_id=self.member_id,
                                      generation_id=self.generation_id)
        self.generation_id = synced["generation_id"]
        self.rejoin_needed = False
        self._next_heartbeat = time.monotonic() + self.heartbeat_interval_ms / 1000
        return frozenset(TopicPartition(t, p) for t, p in synced["assignment"])

    def heartbeat_if_due(self) -> bool:
        """Heartbeat when one is due. Returns False when the membership is over (the member
        id is unknown or the generation is stale: its partitions may be someone else's now);
        sets ``rejoin_needed`` when the group rebalances. Other errors are raised."""
        now = time.monotonic()
        if self.rejoin_needed or now < self._next_heartbeat:
            return True
        self._next_heartbeat = now + self.heartbeat_interval_ms / 1000
        try:
            self._admin._request("heartbeat", group_id=self.group_id, member_id=self.member_id,
                                 generation_id=self.generation_id)
        except errors.RebalanceInProgressError:
            self.rejoin_needed = True
        except (errors.UnknownMemberIdError, errors.IllegalGenerationError) as e:
            self.membership_lost(e)
            return False
        return True

    def membership_lost(self, error: Exception) -> None:
        """The coordinator no longer counts us in this generation: rejoin (as a new member
        if it forgot the member id)."""
        if isinstance(error, errors.UnknownMemberIdError):
            self.member_id = ""
        self.generation_id = -1
        self.rejoin_needed = True

    def ms_until_heartbeat(self) -> float:
        return max(0.0, (self._next_heartbeat - time.monotonic()) * 1000.0)

    def leave(self) -> None:
        """Leave the group (the others rebalance at once). Nothing to do if never joined; a
        member the coordinator already removed (UnknownMemberIdError) has left too."""
        if not self.member_id:
            return
        try:
            self._admin._request("leave", group_id=self.group_id, member_id=self.member_id)
        except errors.UnknownMemberIdError:
            pass  # already removed (session expired, coordinator restarted): the goal holds
        self.member_id, self.generation_id, self.rejoin_needed = "", -1, True

    # -- offsets ----------------------------------------------------------------------------------

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Store ``offsets`` (the next offset to read, per partition) for this generation.
        The rejoin errors also mark the membership for a rejoin, then are raised."""
        if not offsets:
            return
        by_topic: dict[str, list] = {}
        for tp, offset in sorted(offsets.items()):
            by_topic.setdefault(tp.topic, []).append([tp.partition, offset, ""])
        try:
            self._admin._request("offset_commit", group_id=self.group_id,
                                 member_id=self.member_id, generation_id=self.generation_id,
                                 offsets=by_topic)
        except errors.RebalanceInProgressError:
            self.rejoin_needed = True
            raise
        except (errors.UnknownMemberIdError, errors.IllegalGenerationError) as e:
            self.membership_lost(e)
            raise

    def committed(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        """The group's committed offset of each partition (None where nothing was committed)."""
        by_topic: dict[str, list[int]] = {}
        for tp in tps:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        if not by_topic:
            return {}
        reply = self._admin._request("offset_fetch", group_id=self.group_id, topics=by_topic)
        out: dict[TopicPartition, int | None] = {}
        for topic, entries in reply["offsets"].items():
            for entry in entries:
                out[TopicPartition(topic, entry[0])] = entry[1] if entry[1] >= 0 else None
        return out

    def close(self) -> None:
        self._admin.close()

    def __repr__(self) -> str:
        return (f"GroupMembership(group={self.group_id!r}, member={self.member_id!r}, "
                f"generation={self.generation_id})")
