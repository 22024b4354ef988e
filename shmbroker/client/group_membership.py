"""One consumer's membership of its group: join, sync, heartbeat, leave, commit, fetch offsets.

The coordinator computes assignments (docs/design/groups.md, "Decision: the coordinator computes
the assignment"), so a member only asks and obeys::

    rejoin needed?  join with sync=True (held by the coordinator until the join phase ends)
                    -> member id, generation, protocol, this member's assignment and the
                       group's committed offsets of it: no sync, no offset fetch
    otherwise       heartbeat every heartbeat_interval_ms: from Consumer.poll while the
                    application polls, from a background thread (heartbeat.py) while it
                    processes between polls;
                    RebalanceInProgressError -> rejoin (keep the partitions: cooperative;
                    revoke them all first: eager, which the Consumer does)
                    UnknownMemberIdError / IllegalGenerationError -> the partitions are lost
                    (maybe someone else's already): rejoin, as a new member if unknown
    word moved      the group's wake word (shm/group_wake.py) moved past the value the last
                    join answer named: the group began a rebalance; rejoin at once, no
                    heartbeat first (a local member of a broker run by a supervisor)

This class knows nothing of partitions being read; :class:`~shmbroker.client.consumer.Consumer`
applies the assignments. Requests travel through :class:`~shmbroker.client.admin.Admin`'s
``_request`` (one DEALER socket on the coordinator, typed errors raised), used as it is;
``commit_async`` through ``_request_later`` on the same socket (replies come in the order the
requests were sent, and callbacks run on the owner's thread). Owned by one thread, except
what the heartbeat thread reads and posts under ``_lock``; not fork-safe: a forked child
makes a new membership (a new member).

Static membership (``group_instance_id``): the member leaves nothing behind on ``leave()``
(no LeaveGroup is sent, as Kafka's static members do not), so a process restarted under the
same instance id within the session timeout takes its old place and assignment without a
rebalance.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Iterable, Mapping

from .. import errors
from ..config import (ADMIN_REQUEST_TIMEOUT_MS, GROUP_HEARTBEAT_INTERVAL_MS_MIN,
                      GROUP_JOIN_ATTEMPTS_MAX, GROUP_JOIN_REPLY_MARGIN_MS,
                      GROUP_REBALANCE_TIMEOUT_MS_MAX, GROUP_REBALANCE_TIMEOUT_MS_MIN,
                      GROUP_SESSION_TIMEOUT_MS_MAX, GROUP_SESSION_TIMEOUT_MS_MIN)
from ..coordinator import protocol
from .admin import Admin
from ..shm.group_wake import GroupWakeWord
from .heartbeat import HEARTBEAT_REQUEST_TIMEOUT_MS, HeartbeatThread
from .types import OffsetAndMetadata, TopicPartition

#: Assignors offered by default, preferred first: cooperative sticky (only moved partitions
#: pause), else range (every member offers it, so a group with older members still forms).
DEFAULT_PROTOCOLS = ("cooperative-sticky", "range")
#: Assignors under which a member keeps its partitions while it rejoins (Kafka's rule: only
#: when every assignor it offers is cooperative).
COOPERATIVE_PROTOCOLS = frozenset({"cooperative-sticky"})
#: Errors after which a member rejoins (its generation is over or it is no member any more).
REJOIN_ERRORS = (errors.RebalanceInProgressError, errors.UnknownMemberIdError,
                 errors.IllegalGenerationError)

#: ``commit_async``'s callback: (the offsets asked for, None or the exception).
CommitCallback = Callable[[dict, Exception | None], None]

log = logging.getLogger("shmbroker.consumer")


def _carried_commit_outcome(outcome: Any) -> dict | Exception:
    """What a join's answer says of the commit the join carried: ``{}`` (stored) or the
    exception of its refusal, as a ``commit_async`` callback takes them."""
    if not isinstance(outcome, dict):
        return errors.ShmbrokerError(
            f"the join's answer says nothing of the commit it carried: {outcome!r:.100}")
    if "error" in outcome:
        return protocol.exception_from_error(outcome["error"])
    return {}


def _check_ms(name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise errors.ConfigError(f"{name}={value!r} must be an int in [{low}, {high}]")


class GroupMembership:
    """This process's member of ``group_id``, subscribed to ``topics`` (see module doc)."""

    def __init__(self, data_dir: str, group_id: str, topics: Iterable[str], client_id: str,
                 protocols: Iterable[str] = DEFAULT_PROTOCOLS,
                 session_timeout_ms: int = 45_000, rebalance_timeout_ms: int = 300_000,
                 heartbeat_interval_ms: int = 100, group_instance_id: str | None = None,
                 admin_kwargs: dict | None = None, wake_word: bool = False):
        _check_ms("session_timeout_ms", session_timeout_ms, GROUP_SESSION_TIMEOUT_MS_MIN,
                  GROUP_SESSION_TIMEOUT_MS_MAX)
        _check_ms("max_poll_interval_ms", rebalance_timeout_ms, GROUP_REBALANCE_TIMEOUT_MS_MIN,
                  GROUP_REBALANCE_TIMEOUT_MS_MAX)
        _check_ms("heartbeat_interval_ms", heartbeat_interval_ms, GROUP_HEARTBEAT_INTERVAL_MS_MIN,
                  session_timeout_ms)
        if group_instance_id is not None and (not isinstance(group_instance_id, str)
                                              or not group_instance_id):
            raise errors.ConfigError(f"group_instance_id={group_instance_id!r} must be a "
                                     f"non-empty string (or None: a dynamic member)")
        self.group_id = group_id
        self.topics = sorted(set(topics))
        if not self.topics:
            raise errors.ConfigError(f"group {group_id!r}: subscribe to at least one topic")
        self.data_dir = data_dir
        #: More arguments of every Admin this member makes (a remote member's CURVE keys).
        self.admin_kwargs = dict(admin_kwargs or {})
        self.client_id = client_id
        self.group_instance_id = group_instance_id
        self.protocols = list(protocols)
        self.session_timeout_ms = session_timeout_ms
        self.rebalance_timeout_ms = rebalance_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        #: Kafka's rule: a member keeps its partitions across a rebalance only when every
        #: assignor it offers is cooperative; otherwise it revokes them all before rejoining.
        self.cooperative = bool(self.protocols) and set(self.protocols) <= COOPERATIVE_PROTOCOLS
        #: Guards what the heartbeat thread reads (member id, generation, whether joined, the
        #: times of the last heartbeat and poll) and what it posts (``_news``).
        self._lock = threading.Lock()
        self.member_id = ""
        self.generation_id = -1
        self.protocol: str | None = None
        #: The group's committed offsets of the partitions the last join assigned (None: none
        #: committed), sent by the coordinator with the assignment.
        self.assigned_offsets: dict[TopicPartition, OffsetAndMetadata | None] = {}
        #: True until the first join, and after the coordinator said to rejoin.
        self.rejoin_needed = True
        self._last_heartbeat = 0.0  # time.monotonic() of the last heartbeat, by either thread
        self._last_poll = time.monotonic()
        #: What the heartbeat thread learnt, for the owner's next poll:
        #: (member id, generation, error) of the heartbeat that got the error.
        self._news: list[tuple[str, int, Exception]] = []
        self._heartbeater: HeartbeatThread | None = None
        # Admin's request path is the one way a client talks to the coordinator (typed errors,
        # bounded waits); used as it is. A request not answered within ADMIN_REQUEST_TIMEOUT_MS
        # (30 s, Kafka's request.timeout.ms) is RequestTimeoutError (retriable), raised from
        # poll/commit; the timeout is raised only around a held join.
        self._admin = Admin(broker=data_dir, request_timeout_ms=ADMIN_REQUEST_TIMEOUT_MS,
                            **self.admin_kwargs)
        #: The group's wake word in the coordinator's shared memory (a local broker run by a
        #: supervisor; else None), at the slot the last join answer named: it moves when the
        #: group starts a rebalance, and the owner's poll sleeps on it, so a member rejoins at
        #: once instead of at its next heartbeat (shm/group_wake.py). ``_wake_seen``: its value
        #: named by that answer (-1: no word followed).
        self.wake_word = GroupWakeWord.attach(data_dir) if wake_word else None
        self._wake_seen = -1
        #: A revocation commit to send inside the next join (``commit_with_join``): its
        #: request fields and the callback of its outcome; sent alone, first, if any other
        #: request of ours goes out before that join.
        self._join_commit: tuple[dict, Callable[[Any], None]] | None = None

    # -- membership -------------------------------------------------------------------------------

    def join(self) -> frozenset[TopicPartition]:
        """Join (or rejoin) and sync; returns this member's assignment in the new generation.
        The group's committed offsets of those partitions, as the coordinator sent them with
        the assignment, are in :attr:`assigned_offsets` until the next join.

        Retries what the protocol says to retry (a newer rebalance began, the member id was
        forgotten) at most GROUP_JOIN_ATTEMPTS_MAX times; other errors are raised.
        """
        with self._lock:
            self.rejoin_needed = True  # the heartbeat thread stays quiet until the sync
            self._news.clear()  # about a generation this join ends
        last: Exception | None = None
        for _ in range(GROUP_JOIN_ATTEMPTS_MAX):  # bounded
            try:
                return self._join_once()
            except errors.UnknownMemberIdError as e:
                self.member_id, self.generation_id, last = "", -1, e  # join as a new member
            except (errors.RebalanceInProgressError, errors.IllegalGenerationError) as e:
                last = e  # another rebalance started meanwhile: join it
            except errors.CoordinatorNotAvailableError as e:
                last = e  # it restarted under the join: ask the new one (a new member there)
                self.member_id, self.generation_id = "", -1
        assert last is not None
        raise last

    def _join_once(self) -> frozenset[TopicPartition]:
        # The coordinator holds a join until the join phase ends: at most the rebalance timeout.
        carried, self._join_commit = self._join_commit, None
        extra = self._instance()
        if carried is not None:
            extra["commit"] = {"generation_id": carried[0]["generation_id"],
                               "offsets": carried[0]["offsets"]}
        try:
            joined = self._admin._request(
                "join", self.rebalance_timeout_ms + GROUP_JOIN_REPLY_MARGIN_MS,
                group_id=self.group_id, member_id=self.member_id,
                client_id=self.client_id, pid=os.getpid(), host=socket.gethostname(),
                topics=self.topics, protocols=self.protocols,
                session_timeout_ms=self.session_timeout_ms,
                rebalance_timeout_ms=self.rebalance_timeout_ms, sync=True, **extra)
        except errors.ShmbrokerError as e:
            if carried is not None:
                # Whether the commit was stored is not known: reported as refused (its
                # records may be read again by the next owner, never lost).
                carried[1](e)
            raise
        self.member_id = joined["member_id"]
        self.generation_id = joined["generation_id"]
        self.protocol = joined["protocol"]
        # The join came back with the sync's answer and the committed offsets (one round trip
        # instead of three; docs/design/groups.md, "Decision: sync and offsets with the join").
        synced = joined
        self.assigned_offsets = {
            TopicPartition(t, p): OffsetAndMetadata(offset, metadata) if offset >= 0 else None
            for t, p, offset, metadata in joined["offsets"]}
        now = time.monotonic()
        self._follow_wake_word(joined)
        with self._lock:
            self.generation_id = synced["generation_id"]
            self.rejoin_needed = False
            self._last_heartbeat = self._last_poll = now
        if self._heartbeater is None:
            self._heartbeater = HeartbeatThread(self)
            self._heartbeater.start()
        if carried is not None:
            carried[1](_carried_commit_outcome(joined.get("commit")))
        return frozenset(TopicPartition(t, p) for t, p in synced["assignment"])

    def _instance(self) -> dict:
        """The ``group_instance_id`` field of a request, for a static member only."""
        return {} if self.group_instance_id is None else \
            {"group_instance_id": self.group_instance_id}

    def heartbeat_if_due(self) -> bool:
        """From the owner's poll: take what the heartbeat thread learnt, then heartbeat when
        one is due. Returns False when the membership is over (the member id is unknown or
        the generation is stale: its partitions may be someone else's now); sets
        ``rejoin_needed`` when the group rebalances. Other errors are raised."""
        now = time.monotonic()
        wake = self._wake_load()
        with self._lock:
            self._last_poll = now
            news, self._news = self._news, []
            if not self.rejoin_needed and wake != self._wake_seen:
                # The group's word moved: it began a rebalance since our last join answer.
                # Rejoin now; asking by heartbeat first would only cost a round trip.
                self.rejoin_needed = True
            due = not self.rejoin_needed and \
                now - self._last_heartbeat >= self.heartbeat_interval_ms / 1000
            if due:
                self._last_heartbeat = now
        for member_id, generation, error in news:
            if not self._apply_error(member_id, generation, error):
                return False
        if not due:
            return True
        self._send_join_commit_alone()
        try:
            self._admin._request("heartbeat", min(HEARTBEAT_REQUEST_TIMEOUT_MS,
                                                  self.session_timeout_ms),
                                 group_id=self.group_id, member_id=self.member_id,
                                 generation_id=self.generation_id, **self._instance())
        except REJOIN_ERRORS as e:
            return self._apply_error(self.member_id, self.generation_id, e)
        except (errors.CoordinatorNotAvailableError, errors.RequestTimeoutError) as e:
            # Restarted under the heartbeat (or the reply is late): the next one, an interval
            # on, meets the new coordinator, which says whether we are still a member. Kafka's
            # client too treats a failed heartbeat as "find the coordinator", not as an error.
            log.info("group %r: heartbeat: %s", self.group_id, e)
        return True

    def _apply_error(self, member_id: str, generation: int, error: Exception) -> bool:
        """What a rejoin error of a request made as ``member_id`` in ``generation`` means now:
        nothing if that membership is over (we rejoined since; the member id is compared too,
        since a restarted coordinator counts generations from 1 again); else rejoin, and False
        if the membership is lost (member unknown or generation stale). Owner's thread."""
        if member_id != self.member_id or generation != self.generation_id or generation < 0:
            return True
        if isinstance(error, errors.RebalanceInProgressError):
            with self._lock:
                self.rejoin_needed = True
            return True
        self.membership_lost(error)
        return False

    def post(self, member_id: str, generation: int, error: Exception) -> None:
        """From the heartbeat thread: tell the owner's next poll."""
        with self._lock:
            self._news.append((member_id, generation, error))

    def membership_lost(self, error: Exception) -> None:
        """The coordinator no longer counts us in this generation: rejoin (as a new member
        if it forgot the member id)."""
        with self._lock:
            if isinstance(error, errors.UnknownMemberIdError):
                self.member_id = ""
            self.generation_id = -1
            self.rejoin_needed = True

    def _wake_load(self) -> int:
        return -1 if self.wake_word is None else self.wake_word.load()

    def _follow_wake_word(self, joined: dict) -> None:
        """Sleep from now on on the word a join answer named, expecting the value it named
        (read by the coordinator after this generation began: a later rebalance of the group
        moves the word past it). No slot named: heartbeats only."""
        if self.wake_word is None:
            return
        seq = joined.get("wake_seq")
        self.wake_word.follow(joined.get("wake_slot") if isinstance(seq, int) else None)
        self._wake_seen = seq if self.wake_word.offset is not None else -1

    def wake_wait_word(self) -> tuple | None:
        """``(buf, offset, expected)`` of the group's wake word for the owner's futex_waitv
        sleep, or None (no word, or the owner must not sleep on it: a rejoin is pending)."""
        if self.wake_word is None or self.rejoin_needed:
            return None
        return self.wake_word.word(self._wake_seen)  # None while no slot is followed

    def ms_until_heartbeat(self) -> float:
        due = self._last_heartbeat + self.heartbeat_interval_ms / 1000
        return max(0.0, (due - time.monotonic()) * 1000.0)

    def snapshot(self) -> tuple[str, int, bool, float, float]:
        """For the heartbeat thread: (member id, generation, joined, last heartbeat, last poll)."""
        with self._lock:
            joined = bool(self.member_id) and not self.rejoin_needed
            return (self.member_id, self.generation_id, joined, self._last_heartbeat,
                    self._last_poll)

    def heartbeat_sent(self, when: float) -> None:
        with self._lock:
            self._last_heartbeat = max(self._last_heartbeat, when)

    def leave(self) -> None:
        """Leave the group (the others rebalance at once). Nothing to do if never joined; a
        member the coordinator already removed (UnknownMemberIdError) has left too. A static
        member sends nothing: its place waits for it until its session timeout."""
        self._stop_heartbeats()
        if not self.member_id:
            return
        self._send_join_commit_alone()
        try:
            if self.group_instance_id is None:
                self._admin._request("leave", group_id=self.group_id, member_id=self.member_id)
        except errors.UnknownMemberIdError:
            pass  # already removed (session expired, coordinator restarted): the goal holds
        with self._lock:
            self.member_id, self.generation_id, self.rejoin_needed = "", -1, True

    def _stop_heartbeats(self) -> None:
        heartbeater, self._heartbeater = self._heartbeater, None
        if heartbeater is not None:
            heartbeater.stop()

    # -- offsets ----------------------------------------------------------------------------------

    def _commit_fields(self, offsets: Mapping[TopicPartition, int | OffsetAndMetadata]) -> dict:
        by_topic: dict[str, list] = {}
        for tp, value in sorted(offsets.items()):
            offset, metadata = (value, "") if isinstance(value, int) else value
            by_topic.setdefault(tp.topic, []).append([tp.partition, offset, metadata])
        return dict(group_id=self.group_id, member_id=self.member_id,
                    generation_id=self.generation_id, offsets=by_topic, **self._instance())

    def commit(self, offsets: Mapping[TopicPartition, int | OffsetAndMetadata]) -> None:
        """Store ``offsets`` (the next offset to read, per partition, or OffsetAndMetadata)
        for this generation. The rejoin errors also mark the membership for a rejoin, then
        are raised. Callbacks of earlier ``commit_async`` calls run first (their replies come
        before this one's)."""
        if not offsets:
            self._send_join_commit_alone()
            self.dispatch_replies()
            return
        member_id, generation = self.member_id, self.generation_id
        self._send_join_commit_alone()
        try:
            self._admin._request("offset_commit", **self._commit_fields(offsets))
        except REJOIN_ERRORS as e:
            self.dispatch_replies()
            self._apply_error(member_id, generation, e)
            raise
        self.dispatch_replies()

    def commit_async(self, offsets: Mapping[TopicPartition, int | OffsetAndMetadata],
                     callback: CommitCallback | None = None) -> None:
        """Send a commit and return at once. ``callback(offsets, error_or_None)`` runs on
        this thread from a later poll, commit, commit_async or close (in the order the commits
        were sent); a rejoin error marks the membership as ``commit`` does, if the
        generation it was sent in is still ours."""
        offsets = dict(offsets)
        done = self._commit_done(offsets, callback)
        self._send_join_commit_alone()
        self.dispatch_replies()
        if not offsets:
            done({})
            return
        self._admin._request_later("offset_commit", done, **self._commit_fields(offsets))

    def commit_with_join(self, offsets: Mapping[TopicPartition, int | OffsetAndMetadata],
                         callback: CommitCallback | None = None) -> None:
        """``commit_async`` whose request travels inside the next join (an eager member's
        revocation commit: docs/design/groups.md, "Decision: the revocation commit rides on
        the join"): stored by the coordinator just before it serves the join, and its
        outcome comes back in the join's answer; ``callback`` runs when the join returns
        (or raises: then as refused with the join's error). If any other request of ours
        goes out first, the commit goes alone, just before it, so commits keep their order."""
        offsets = dict(offsets)
        done = self._commit_done(offsets, callback)
        self._send_join_commit_alone()
        if not offsets:
            done({})
            return
        self._join_commit = (self._commit_fields(offsets), done)

    def _send_join_commit_alone(self) -> None:
        carried, self._join_commit = self._join_commit, None
        if carried is not None:
            self._admin._request_later("offset_commit", carried[1], **carried[0])

    def _commit_done(self, offsets: dict, callback: CommitCallback | None
                     ) -> Callable[[Any], None]:
        member_id, generation = self.member_id, self.generation_id

        def done(result) -> None:
            error = result if isinstance(result, Exception) else None
            if error is not None and isinstance(error, REJOIN_ERRORS):
                self._apply_error(member_id, generation, error)
            if error is not None and callback is None:
                log.warning("group %r: commit_async of %d partition(s) failed: %s: %s",
                            self.group_id, len(offsets), type(error).__name__, error)
            if callback is not None:
                try:
                    callback(offsets, error)
                except Exception:  # the application's bug must not break the consumer
                    log.exception("group %r: commit_async callback raised", self.group_id)

        return done

    def dispatch_replies(self, wait_ms: float = 0) -> int:
        """Run the callbacks of ``commit_async`` replies that arrived (waiting up to
        ``wait_ms`` for all of them); returns how many commits are still unanswered."""
        return self._admin._dispatch_later(wait_ms)

    def committed(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        """The group's committed offset of each partition (None where nothing was committed)."""
        return {tp: None if value is None else value.offset
                for tp, value in self.committed_metadata(tps).items()}

    def committed_metadata(self, tps: Iterable[TopicPartition]
                           ) -> dict[TopicPartition, OffsetAndMetadata | None]:
        """The group's committed offset and metadata of each partition (None where nothing was
        committed)."""
        by_topic: dict[str, list[int]] = {}
        for tp in tps:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        if not by_topic:
            return {}
        self._send_join_commit_alone()
        reply = self._admin._request("offset_fetch", group_id=self.group_id, topics=by_topic)
        out: dict[TopicPartition, OffsetAndMetadata | None] = {}
        for topic, entries in reply["offsets"].items():
            for entry in entries:
                out[TopicPartition(topic, entry[0])] = \
                    OffsetAndMetadata(entry[1], entry[2]) if entry[1] >= 0 else None
        return out

    def close(self) -> None:
        self._stop_heartbeats()
        if self._join_commit is not None:
            try:
                self._send_join_commit_alone()
                self.dispatch_replies(ADMIN_REQUEST_TIMEOUT_MS)
            except errors.ShmbrokerError as e:
                log.warning("group %r: commit before closing failed: %s", self.group_id, e)
        self._admin.close()
        if self.wake_word is not None:
            self.wake_word.close()

    def __repr__(self) -> str:
        return (f"GroupMembership(group={self.group_id!r}, member={self.member_id!r}, "
                f"generation={self.generation_id})")
