"""The consumer groups as the coordinator process runs them (docs/design/groups.md, "Served
by the coordinator").

:class:`GroupService` owns one :class:`~.group.Group` per group id (created on the first
request that needs it, dropped again once it is empty: its committed offsets stay in the
store) and the :class:`~.offsets.OffsetStore`. It turns protocol.py requests into calls on
them and answers with reply bodies. Three things the plain classes leave to the process:

* **Held joins.** ``Group.join`` answers ``JoinPending`` while the join phase goes on; the
  request's envelope is kept here and answered when ``Group.take_join_results`` hands out its
  result, which may come from another member's request or from time. The server sends those
  replies (:meth:`GroupService.take_replies`); other requests are served meanwhile.
* **Timers.** :meth:`next_deadline_ms` is the server's poll timeout; :meth:`tick` applies what
  is due: group timers, pid checks, offsets compaction.
* **Dead local members.** Every join names the member's pid and host. For a member on this host
  a pidfd is opened (``os.pidfd_open``: it names that process, never a later one under a
  recycled pid, and becomes readable when the process exits, zombie included); all pidfds sit
  in one epoll set, whose fd the server polls beside its socket (:meth:`pid_wait_fd`), so a
  death wakes the loop at once and :meth:`tick` calls ``Group.member_died`` once for it.
  Where a pidfd cannot be had (no pidfd_open, fds exhausted), the pid is polled every
  ``GROUP_PID_CHECK_INTERVAL_MS`` with ``psutil`` instead (it compares the start time; a
  zombie counts as dead).

Owned by the coordinator process (``CoordinatorServer``); single-threaded, not thread-safe.
"""
from __future__ import annotations

import logging
import os
import select
import socket
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import psutil

from .. import errors
from ..config import (COORDINATOR_GROUPS_MAX, GROUP_PID_CHECK_INTERVAL_MS,
                      GROUP_REBALANCE_TIMEOUT_MS_DEFAULT, GROUP_SESSION_TIMEOUT_MS_DEFAULT)
from . import protocol
from .group import (Group, GroupConfig, GroupState, HeartbeatResult, JoinFailed, JoinRequest,
                    JoinResult, SyncResult)
from .offsets import CommittedOffset, OffsetStore
from ..layout.counters import GROUP_WAKE_WORDS
from ..shm.group_wake import WakeSlots

log = logging.getLogger("shmbroker.coordinator")

ClockMs = Callable[[], int]
#: (group id, member id)
MemberKey = tuple[str, str]


@dataclass
class _HeldJoin:
    """A join request answered later, when its group's join phase ends."""

    envelope: list[bytes]
    request_id: int
    #: The outcome of the commit the join carried (``_commit_with_join``), for its answer.
    commit: dict | None = None


@dataclass
class _PidWatch:
    """A member's process. Both None: not on this host, so only its session timeout applies.
    ``pidfd``: open, in the service's epoll set until the death is reported (then closed);
    ``process``: the psutil fallback, polled, where no pidfd could be opened."""

    pid: int
    pidfd: int | None = None
    process: psutil.Process | None = None
    #: member_died was called; a static member stays until its session runs out, and calling
    #: again would move its recorded time of death.
    reported: bool = False

    @property
    def polled(self) -> bool:
        return self.process is not None and not self.reported


def _alive(process: psutil.Process) -> bool:
    try:
        # is_running() compares the start time it saw first: a recycled pid is not alive.
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class GroupService:
    """Every group and every committed offset of one coordinator. See the module docstring.

    Build it at coordinator start (it opens, and so recovers, the offsets log in ``data_dir``)
    and :meth:`close` it at stop. Owned by the coordinator process; not thread-safe.
    """

    def __init__(self, data_dir: str, partitions_per_topic: Mapping[str, int], clock_ms: ClockMs,
                 config: GroupConfig = GroupConfig(), hostname: str | None = None,
                 pid_check_interval_ms: int = GROUP_PID_CHECK_INTERVAL_MS,
                 wake_group: Callable[[int], None] = lambda slot: None,
                 wake_value: Callable[[int], int] = lambda slot: 0,
                 wake_slots: int = GROUP_WAKE_WORDS, pidfds: bool = True):
        assert pid_check_interval_ms > 0, pid_check_interval_ms
        self.clock_ms = clock_ms
        self.config = config
        self.hostname = hostname if hostname is not None else socket.gethostname()
        self.pid_check_interval_ms = pid_check_interval_ms
        #: Called with a group's wake slot once each time that group starts a rebalance,
        #: after the request or tick that started it (the server bumps the slot's futex word);
        #: ``wake_value(slot)``: the word now, for join answers (shm/group_wake.py).
        self.wake_group, self.wake_value = wake_group, wake_value
        self._wake_slots = WakeSlots(wake_slots)
        self._woken: dict[str, int] = {}  # group id -> rebalances_started already woken
        self.offsets = OffsetStore.open(data_dir)
        self._partitions = dict(partitions_per_topic)
        self._groups: dict[str, Group] = {}
        self._held: dict[MemberKey, _HeldJoin] = {}
        self._pids: dict[MemberKey, _PidWatch] = {}
        self._pid_check_at_ms = 0
        #: Every open pidfd, readable when its process ended (None: psutil polling only, as
        #: on a kernel before 5.3 or when asked, ``pidfds=False``).
        self._epoll: select.epoll | None = \
            select.epoll() if pidfds and hasattr(os, "pidfd_open") else None
        self._pidfd_keys: dict[int, MemberKey] = {}
        self._ready: list[tuple[list[bytes], bytes]] = []
        #: For the counters region: join phases completed, commits and offsets accepted.
        self.rebalances = 0
        self.commits = 0
        self.offsets_committed = 0
        self._generation_counted: dict[str, int] = {}

    # -- the loop's side ------------------------------------------------------------------------

    def handle(self, envelope: list[bytes], request_id: int, request_type: str,
               fields: dict[str, Any]) -> bytes | None:
        """The reply to one group request, or None for a held join. Raises ShmbrokerError
        (the server turns it into an error reply)."""
        assert request_type in protocol.GROUP_REQUEST_TYPES, request_type
        try:
            return getattr(self, "_on_" + request_type)(envelope, request_id, **fields)
        finally:
            # Whatever the outcome, the call may have ended a join phase (or the timers inside
            # it did): other members' held joins are ready now.
            self._collect_join_results()

    def take_replies(self) -> list[tuple[list[bytes], bytes]]:
        """``(envelope, body)`` of held joins answered since the last call (each once)."""
        ready, self._ready = self._ready, []
        return ready

    def next_deadline_ms(self) -> int | None:
        """When :meth:`tick` has something to do next (None: nothing timed)."""
        deadlines = [d for d in (g.next_deadline_ms() for g in self._groups.values()) if d is not None]
        if any(watch.polled for watch in self._pids.values()):
            deadlines.append(self._pid_check_at_ms)
        return min(deadlines) if deadlines else None

    def tick(self) -> None:
        """Apply what is due: pid checks, group timers, compaction of the offsets log."""
        now = self.clock_ms()
        self._read_pidfds()
        if now >= self._pid_check_at_ms:
            self._pid_check_at_ms = now + self.pid_check_interval_ms
            self._check_pids()
        for group in list(self._groups.values()):
            deadline = group.next_deadline_ms()
            if deadline is not None and deadline <= now:
                removed = group.tick()
                if removed:
                    log.info("group %s: removed %s (%s)", group.group_id, removed, group.rebalance_reason)
        self._collect_join_results()
        self._drop_empty_groups()
        if self.offsets.compaction_due():
            result = self.offsets.compact()
            log.info("offsets log compacted: %s", result)

    def update_partitions(self, partitions_per_topic: Mapping[str, int]) -> None:
        """The topic registry changed: groups subscribed to a changed topic rebalance."""
        self._partitions = dict(partitions_per_topic)
        for group in self._groups.values():
            group.update_partitions(self._partitions)
        self._collect_join_results()

    def pid_wait_fd(self) -> int | None:
        """An fd that becomes readable when a watched local member's process ends (the
        server polls it; :meth:`tick` then reports the death). None: no pidfds here."""
        return None if self._epoll is None else self._epoll.fileno()

    def close(self) -> None:
        for key in list(self._pids):
            self._drop_watch(key)
        if self._epoll is not None:
            self._epoll.close()
        self.offsets.close()

    # -- membership requests --------------------------------------------------------------------

    def _on_join(self, envelope: list[bytes], request_id: int, group_id: str, member_id: str,
                 client_id: str, pid: int, host: str, topics: list, protocols: list,
                 group_instance_id: str | None = None,
                 session_timeout_ms: int = GROUP_SESSION_TIMEOUT_MS_DEFAULT,
                 rebalance_timeout_ms: int = GROUP_REBALANCE_TIMEOUT_MS_DEFAULT,
                 sync: bool = False, commit: dict | None = None) -> bytes | None:
        for what, names in (("topics", topics), ("protocols", protocols)):
            if not all(isinstance(name, str) for name in names):
                raise errors.InvalidRequestError(f"join: {what} must be an array of strings")
        # First the commit the join carries, exactly as if it had come alone just before.
        committed = None if commit is None else \
            self._commit_with_join(group_id, member_id, group_instance_id, commit)
        # A rejoin from the same process keeps its watch (no pidfd_open, no /proc read).
        asked_key = (group_id, member_id)
        watch = self._pids.get(asked_key)
        reused = watch is not None and watch.pid == pid and not watch.reported \
            and host == self.hostname
        if not reused:
            watch = self._local_watch(pid, host)  # refuses a local pid that does not run
        group = self._group(group_id, create=True)
        try:
            result = group.join(JoinRequest(member_id, client_id, host, pid, topics, protocols,
                                            session_timeout_ms, rebalance_timeout_ms,
                                            group_instance_id, sync_on_join=sync))
        except BaseException:
            if not reused:
                self._close_watch(watch)
            raise
        key = (group_id, result.member_id)
        if reused and key != asked_key:
            del self._pids[asked_key]  # the watch moves to the member id the join gave
        if self._pids.get(key) is not watch:
            self._drop_watch(key)
            self._pids[key] = watch
            if watch.pidfd is not None:
                self._pidfd_keys[watch.pidfd] = key
        if isinstance(result, JoinResult):
            return protocol.ok_reply(request_id, self._join_reply(result, group, committed))
        previous = self._held.pop(key, None)
        if previous is not None:  # the client gave up on its earlier join and asked again
            self._ready.append((previous.envelope, protocol.error_reply(
                previous.request_id, errors.RebalanceInProgressError("superseded by a newer join"))))
        self._held[key] = _HeldJoin(envelope, request_id, committed)
        return None

    def _on_sync(self, envelope, request_id: int, group_id: str, member_id: str, generation_id: int,
                 group_instance_id: str | None = None) -> bytes:
        result = self._existing(group_id, member_id).sync(member_id, generation_id, group_instance_id)
        return protocol.ok_reply(request_id, _sync_reply(result))

    def _on_heartbeat(self, envelope, request_id: int, group_id: str, member_id: str,
                      generation_id: int, group_instance_id: str | None = None) -> bytes:
        group = self._existing(group_id, member_id)
        if group.heartbeat(member_id, generation_id, group_instance_id) is HeartbeatResult.REBALANCE_IN_PROGRESS:
            # Kafka answers a heartbeat during a rebalance with this error: the member rejoins.
            raise errors.RebalanceInProgressError(f"group {group_id!r} is rebalancing; rejoin")
        return protocol.ok_reply(request_id, {})

    def _on_leave(self, envelope, request_id: int, group_id: str, member_id: str,
                  group_instance_id: str | None = None) -> bytes:
        self._existing(group_id, member_id).leave(member_id, group_instance_id)
        self._drop_watch((group_id, member_id))
        return protocol.ok_reply(request_id, {})

    # -- offsets ----------------------------------------------------------------------------------

    def _on_offset_commit(self, envelope, request_id: int, group_id: str, member_id: str,
                          generation_id: int, offsets: dict,
                          group_instance_id: str | None = None) -> bytes:
        stored = self._commit(group_id, member_id, generation_id, offsets, group_instance_id)
        return protocol.ok_reply(request_id, {"partitions": stored})

    def _commit(self, group_id: str, member_id: str, generation_id: int, offsets: dict,
                group_instance_id: str | None) -> int:
        entries = self._commit_entries(offsets)
        group = self._group(group_id, create=True)
        group.validate_commit(member_id, generation_id, group_instance_id)
        stored = self.offsets.commit(group_id, entries)
        self.commits += 1
        self.offsets_committed += len(stored)
        return len(stored)

    def _commit_with_join(self, group_id: str, member_id: str, group_instance_id: str | None,
                          commit: dict) -> dict:
        """The commit an eager member's join carries (the positions it revokes), stored
        before the join is served, as an ``offset_commit`` sent just before it on the same
        connection would be (docs/design/groups.md, "Decision: the revocation commit rides
        on the join"). Its outcome goes into the join's answer: ``{"partitions": n}`` or
        ``{"error": {...}}`` (an error reply's ``error``). A malformed ``commit`` fails the
        whole request, as any malformed field does."""
        generation_id, offsets = commit.get("generation_id"), commit.get("offsets")
        if set(commit) != {"generation_id", "offsets"} or not isinstance(generation_id, int) \
                or isinstance(generation_id, bool) or not isinstance(offsets, dict):
            raise errors.InvalidRequestError(
                "join: commit must be {generation_id: int, offsets: {topic: [[partition, "
                "offset, metadata], ...]}}")
        try:
            return {"partitions": self._commit(group_id, member_id, generation_id, offsets,
                                               group_instance_id)}
        except errors.ShmbrokerError as exc:
            return {"error": protocol.error_fields(exc)}

    def _commit_entries(self, offsets: dict) -> dict[tuple[str, int], tuple[int, str]]:
        """``{topic: [[partition, offset, metadata], ...]}`` -> the store's form. The store
        checks the values; here the shape, and that each partition exists now."""
        entries: dict[tuple[str, int], tuple[int, str]] = {}
        for topic, items in offsets.items():
            if not isinstance(items, list):
                raise errors.InvalidRequestError(f"offsets of topic {topic!r} must be an array")
            for item in items:
                if not (isinstance(item, list) and len(item) == 3):
                    raise errors.InvalidRequestError(
                        f"an offset entry is [partition, offset, metadata], got {item!r:.100}")
                partition, offset, metadata = item
                self._check_partition(topic, partition)
                if (topic, partition) in entries:
                    raise errors.InvalidRequestError(f"{topic}/{partition} appears twice in one commit")
                entries[(topic, partition)] = (offset, metadata)
        return entries

    def _check_partition(self, topic: Any, partition: Any) -> None:
        count = self._partitions.get(topic) if isinstance(topic, str) else None
        if not isinstance(partition, int) or isinstance(partition, bool) or count is None \
                or not 0 <= partition < count:
            raise errors.UnknownTopicOrPartitionError(f"no partition {topic!r}/{partition!r}")

    def _on_offset_fetch(self, envelope, request_id: int, group_id: str,
                         topics: dict | None = None) -> bytes:
        """``topics``: ``{topic: [partition, ...] or nil (every committed one)}``; nil: all.
        A partition asked for by number with nothing committed comes back with offset -1."""
        committed = self.offsets.group_offsets(group_id)
        out: dict[str, list] = {}
        for (topic, partition), value in sorted(committed.items()):
            if topics is None or (topic in topics and topics[topic] is None):
                out.setdefault(topic, []).append(_offset_entry(partition, value))
        for topic, partitions in (topics or {}).items():
            if partitions is None:
                continue
            if not isinstance(partitions, list) or not all(
                    isinstance(p, int) and not isinstance(p, bool) for p in partitions):
                raise errors.InvalidRequestError(f"partitions of topic {topic!r} must be an array of integers")
            out[topic] = [_offset_entry(p, committed.get((topic, p))) for p in partitions]
        return protocol.ok_reply(request_id, {"group_id": group_id, "offsets": out})

    # -- administration ---------------------------------------------------------------------------

    def _on_groups_list(self, envelope, request_id: int) -> bytes:
        names = sorted(set(self._groups) | set(self.offsets.groups()))
        return protocol.ok_reply(request_id, {"groups": [self._summary(name) for name in names]})

    def _summary(self, group_id: str) -> dict[str, Any]:
        group = self._groups.get(group_id)
        if group is None:
            return {"group_id": group_id, "state": GroupState.EMPTY.value, "generation_id": 0,
                    "protocol": None, "members": 0}
        return {"group_id": group_id, "state": group.state.value, "generation_id": group.generation_id,
                "protocol": group.protocol, "members": len(group.member_ids())}

    def _on_group_describe(self, envelope, request_id: int, group_id: str) -> bytes:
        group = self._groups.get(group_id)
        committed = self.offsets.group_offsets(group_id)
        if group is None and not committed:
            raise errors.GroupIdNotFoundError(f"no group {group_id!r}")
        described = group.describe() if group is not None else {
            **self._summary(group_id), "leader_id": None, "rebalance_reason": None, "members": []}
        described["offsets"] = [{"topic": t, "partition": p, "offset": c.offset,
                                 "metadata": c.metadata, "commit_timestamp_ms": c.commit_timestamp_ms}
                                for (t, p), c in sorted(committed.items())]
        return protocol.ok_reply(request_id, described)

    def _on_group_delete(self, envelope, request_id: int, group_id: str) -> bytes:
        group = self._groups.get(group_id)
        if group is None and not self.offsets.group_offsets(group_id):
            raise errors.GroupIdNotFoundError(f"no group {group_id!r}")
        if group is not None:
            group.delete()  # NonEmptyGroupError while it has members
            del self._groups[group_id]
            self._forget(group_id)
        deleted = self.offsets.delete_group(group_id)
        log.info("group %s deleted (%d committed offsets)", group_id, deleted)
        return protocol.ok_reply(request_id, {"group_id": group_id, "offsets_deleted": deleted})

    # -- helpers ----------------------------------------------------------------------------------

    def _group(self, group_id: str, create: bool) -> Group:
        group = self._groups.get(group_id)
        if group is None and create:
            if len(self._groups) >= COORDINATOR_GROUPS_MAX:
                raise errors.InvalidRequestError(
                    f"the coordinator already serves {len(self._groups)} groups (the limit)")
            group = self._groups[group_id] = Group(group_id, self.clock_ms, self.config, self._partitions)
            self._wake_slots.slot(group_id)  # None when all are taken: heartbeats only
        if group is None:
            raise errors.GroupIdNotFoundError(f"no group {group_id!r}")
        return group

    def _existing(self, group_id: str, member_id: str) -> Group:
        """The group of a member that should be in it. An unknown group is an unknown member,
        as in Kafka: after a coordinator restart every member hears this and rejoins."""
        group = self._groups.get(group_id)
        if group is None:
            raise errors.UnknownMemberIdError(f"no member {member_id!r} in group {group_id!r} (no such group)")
        return group

    def _local_watch(self, pid: int, host: str) -> _PidWatch:
        """A watch of the member's process: a pidfd, else (no pidfd to be had) a psutil
        process, if it is on this host; neither otherwise (its session timeout is all we
        have). A local pid that does not run is refused: it could never heartbeat."""
        if host != self.hostname or not isinstance(pid, int) or pid <= 0:
            return _PidWatch(pid if isinstance(pid, int) else -1)  # a bad pid: the join's error
        refused = errors.InvalidRequestError(f"pid {pid} is not a running process on host {host!r}")
        if self._epoll is not None:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                raise refused from None
            except (OSError, OverflowError) as e:  # EMFILE, EINVAL (not a process), ENOSYS
                log.warning("no pidfd for member pid %d (%s): polling it instead", pid, e)
            else:
                exited = select.poll()
                exited.register(pidfd, select.POLLIN)
                if exited.poll(0):  # it has exited already (a zombie)
                    os.close(pidfd)
                    raise refused
                self._epoll.register(pidfd, select.EPOLLIN)
                return _PidWatch(pid, pidfd=pidfd)
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                return _PidWatch(pid, process=process)
        except (psutil.Error, ValueError, OverflowError):  # gone, or no pid at all
            pass
        raise refused

    def _close_watch(self, watch: _PidWatch) -> None:
        if watch.pidfd is not None:
            assert self._epoll is not None
            self._pidfd_keys.pop(watch.pidfd, None)
            self._epoll.unregister(watch.pidfd)
            os.close(watch.pidfd)
            watch.pidfd = None

    def _drop_watch(self, key: MemberKey) -> None:
        watch = self._pids.pop(key, None)
        if watch is not None:
            self._close_watch(watch)

    def _read_pidfds(self) -> None:
        """Report the members whose pidfd says their process ended. Bounded: one epoll read
        of at most the open pidfds, none blocking."""
        if self._epoll is None or not self._pidfd_keys:
            return
        for fd, _ in self._epoll.poll(0, len(self._pidfd_keys)):
            key = self._pidfd_keys.get(fd)
            if key is not None:
                self._member_gone(key, self._pids[key])

    def _check_pids(self) -> None:
        """Bounded: one look at each registered pid. Drops the watches of members no longer
        in their group; polls (psutil) the processes that have no pidfd."""
        for key, watch in list(self._pids.items()):
            group = self._groups.get(key[0])
            if group is None or not _has_member(group, key[1]):
                self._drop_watch(key)  # left, expired or removed: nothing to watch
                continue
            if watch.polled and not _alive(watch.process):
                self._member_gone(key, watch)

    def _member_gone(self, key: MemberKey, watch: _PidWatch) -> None:
        """The process of member ``key`` ended: tell its group, once."""
        watch.reported = True
        self._close_watch(watch)  # a static member stays; its pidfd would stay readable
        group = self._groups.get(key[0])
        if group is None or not _has_member(group, key[1]):
            self._pids.pop(key, None)
            return
        removed = group.member_died(key[1])
        if removed:
            del self._pids[key]
        log.info("group %s: process %d of member %s is gone; %s", key[0], watch.pid,
                 key[1], "removed, rebalancing" if removed else "static: kept until its session ends")

    def live_groups_and_members(self) -> tuple[int, int]:
        """Groups held in memory (they have or just had members) and their members."""
        return len(self._groups), sum(len(g.member_ids()) for g in self._groups.values())

    def _collect_join_results(self) -> None:
        for group_id, group in self._groups.items():
            # Every completed join phase is a new generation (a new Group starts at 0); the
            # generation may have moved by more than one since the last request.
            counted = self._generation_counted.get(group_id, 0)
            if group.generation_id > counted:
                self.rebalances += group.generation_id - counted
                self._generation_counted[group_id] = group.generation_id
            # Answers first, with the word as it is now; then the wake of a rebalance that
            # began after them (a cooperative follow-up, say): that wake moves the word past
            # the value the answers name, so their members rejoin at once.
            for result in group.take_join_results():
                held = self._held.pop((group_id, result.member_id), None)
                if held is None:
                    continue  # answered already by the member's own call
                if isinstance(result, JoinFailed):
                    body = protocol.error_reply(held.request_id, result.error)
                else:
                    body = protocol.ok_reply(held.request_id,
                                             self._join_reply(result, group, held.commit))
                self._ready.append((held.envelope, body))
            if group.rebalances_started != self._woken.get(group_id, 0):
                self._woken[group_id] = group.rebalances_started
                slot = self._wake_slots.held(group_id)
                if group.state is GroupState.PREPARING_REBALANCE and slot is not None:
                    self.wake_group(slot)  # members learn it now, not at their heartbeat

    def _join_reply(self, result: JoinResult, group: Group,
                    committed: dict | None = None) -> dict[str, Any]:
        """The join's reply; for a member that asked to sync with its join, also the sync's
        fields and ``offsets``: the group's committed offset of each partition it is assigned
        (``[topic, partition, offset, metadata]``, offset -1: none), read now. Now is late
        enough: every commit of a previous owner came before that owner's join (same
        connection, in order), so before this join phase ended; and any commit the coordinator
        accepts from here on is from this generation, whose only owner of a partition is the
        member this reply goes to. That saves the sync and the offset fetch, two round trips
        per member per rebalance (docs/design/groups.md, "Decision: sync and offsets with the
        join")."""
        reply = _join_fields(result, group)
        if committed is not None:
            reply["commit"] = committed
        slot = self._wake_slots.held(group.group_id)
        if slot is not None:
            # The group's wake word and its value now: the member rejoins when it moves.
            reply["wake_slot"], reply["wake_seq"] = slot, self.wake_value(slot)
        if result.sync is not None:
            reply.update(_sync_reply(result.sync))
            committed = self.offsets.group_offsets(group.group_id)
            entries = []
            for tp in result.sync.assignment:  # bounded by the group's partitions
                value = committed.get(tp)
                entries.append([tp[0], tp[1], *((value.offset, value.metadata) if value is not None
                                               else (-1, ""))])
            reply["offsets"] = entries
        return reply

    def _drop_empty_groups(self) -> None:
        """An empty group holds nothing its offsets do not: forget it (bounds memory)."""
        for group_id in [g for g, group in self._groups.items()
                         if group.state in (GroupState.EMPTY, GroupState.DEAD) and not group.member_ids()]:
            del self._groups[group_id]
            self._forget(group_id)

    def _forget(self, group_id: str) -> None:
        self._generation_counted.pop(group_id, None)
        self._woken.pop(group_id, None)
        self._wake_slots.release(group_id)


def _has_member(group: Group, member_id: str) -> bool:
    try:
        group.member(member_id)
        return True
    except errors.UnknownMemberIdError:
        return False


def _sync_reply(result: SyncResult) -> dict[str, Any]:
    return {"generation_id": result.generation_id, "protocol": result.protocol,
            "assignment": [list(tp) for tp in result.assignment],
            "revoked": [list(tp) for tp in result.revoked]}


def _join_fields(result: JoinResult, group: Group) -> dict[str, Any]:
    """The leader's reply also lists every member with its subscription, as Kafka's
    JoinGroup response does: a Kafka client is given the members' metadata when it leads
    (the kafka listener builds that metadata from these topics; docs/design/kafka.md,
    "Groups"). Native members ignore the field: the coordinator assigns."""
    reply = {"member_id": result.member_id, "generation_id": result.generation_id,
             "leader_id": result.leader_id, "protocol": result.protocol}
    if result.member_id == result.leader_id:
        members = []
        for member_id in group.member_ids():  # bounded by GROUP_MEMBERS_MAX
            m = group.member(member_id)
            members.append([member_id, m.group_instance_id, sorted(m.topics)])
        reply["members"] = members
    return reply


def _offset_entry(partition: int, value: CommittedOffset | None) -> list:
    """``[partition, offset, metadata, commit timestamp ms]``; offset -1 when none."""
    if value is None:
        return [partition, -1, "", -1]
    return [partition, value.offset, value.metadata, value.commit_timestamp_ms]
