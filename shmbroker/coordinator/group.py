"""One consumer group's membership: Kafka's group coordinator state machine, as plain code.

No processes, sockets or shared memory: the coordinator process owns one :class:`Group` per
group id, feeds it requests and its own detection of dead pids, and calls :meth:`Group.tick`
when :meth:`Group.next_deadline_ms` comes. Time is the ``clock_ms`` it is given (monotonic
milliseconds), so tests drive it with a fake clock and every run is reproducible.

States (Kafka's ``GroupState``; the full diagram and reasons are in docs/design/groups.md)::

    Empty               --a member joins-->                      PreparingRebalance
    PreparingRebalance  --all rejoined, or rebalance timeout-->  CompletingRebalance
                        --the phase ends with no member left-->  Empty
    CompletingRebalance --every member synced-->                 Stable
    CompletingRebalance, Stable
                        --join, leave, death, expiry, new partitions, no sync in time,
                          cooperative follow-up-->               PreparingRebalance
    Empty               --delete-->                              Dead

**Server-side assignment.** Kafka's coordinator lets the leader client compute the assignment
and hand it over in its SyncGroup; ours computes it itself (``assignors.py``) the moment the
join phase completes, and every member's sync just fetches its share. Why: the coordinator
already knows every subscription and the partition counts (it owns the topic registry); no
client needs assignor code; a rebalance costs one join and one sync round, never a wait for a
slow leader; and an assignment is a pure function we test here. What we give up: custom
client-side assignors (none are planned). The "leader" is still chosen and reported, for
Kafka clients and for ``groups describe``, but has no duty.

**Join without waiting.** Kafka holds a JoinGroup request until the join phase completes.
Here :meth:`Group.join` answers at once: a :class:`JoinResult` if the phase completed during
the call (or no rebalance was needed), else :class:`JoinPending`; results for members whose
phase completed because of another call or of time are collected by
:meth:`Group.take_join_results`, which the coordinator calls after every request and tick.

**Cooperative rebalancing.** A member whose assignors are all cooperative keeps consuming what
it owns while the group rebalances. A partition that moves is revoked by its old owner in
generation N (its sync says so) and granted to its new owner only in generation N+1, which the
group starts by itself as soon as every member has synced generation N (so every old owner has
heard of its revocation; a client revokes before it rejoins).

Owned by the coordinator process; not thread-safe.
"""
from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from .. import errors
from ..config import (BROKER_TOPICS_MAX, GROUP_INITIAL_REBALANCE_DELAY_MS_DEFAULT,
                      GROUP_INITIAL_REBALANCE_DELAY_MS_MAX, GROUP_MEMBERS_MAX, GROUP_NAME_LENGTH_MAX,
                      GROUP_PROTOCOLS_MAX, GROUP_REBALANCE_TIMEOUT_MS_DEFAULT,
                      GROUP_REBALANCE_TIMEOUT_MS_MAX, GROUP_REBALANCE_TIMEOUT_MS_MIN,
                      GROUP_SESSION_TIMEOUT_MS_DEFAULT, GROUP_SESSION_TIMEOUT_MS_MAX,
                      GROUP_SESSION_TIMEOUT_MS_MIN)
from .assignors import GroupAssignment, Subscription, TopicPartition, get_assignor, is_cooperative

ClockMs = Callable[[], int]


class GroupState(enum.Enum):
    EMPTY = "Empty"
    PREPARING_REBALANCE = "PreparingRebalance"
    COMPLETING_REBALANCE = "CompletingRebalance"
    STABLE = "Stable"
    DEAD = "Dead"


#: state -> the states it may be entered from (Kafka's ``validPreviousStates``).
_VALID_PREVIOUS = {
    GroupState.EMPTY: {GroupState.PREPARING_REBALANCE},
    GroupState.PREPARING_REBALANCE: {GroupState.EMPTY, GroupState.STABLE,
                                     GroupState.COMPLETING_REBALANCE},
    GroupState.COMPLETING_REBALANCE: {GroupState.PREPARING_REBALANCE},
    GroupState.STABLE: {GroupState.COMPLETING_REBALANCE},
    GroupState.DEAD: {GroupState.EMPTY},
}


class HeartbeatResult(enum.Enum):
    OK = "ok"
    #: A rebalance has started: the member must rejoin (Kafka's REBALANCE_IN_PROGRESS, 27).
    REBALANCE_IN_PROGRESS = "rebalance_in_progress"


@dataclass(frozen=True)
class GroupConfig:
    """The coordinator's limits on every group (Kafka's ``group.*`` broker settings)."""

    session_timeout_ms_min: int = GROUP_SESSION_TIMEOUT_MS_MIN
    session_timeout_ms_max: int = GROUP_SESSION_TIMEOUT_MS_MAX
    members_max: int = GROUP_MEMBERS_MAX
    initial_rebalance_delay_ms: int = GROUP_INITIAL_REBALANCE_DELAY_MS_DEFAULT

    def __post_init__(self) -> None:
        if not 1 <= self.session_timeout_ms_min <= self.session_timeout_ms_max:
            raise errors.ConfigError("need 1 <= session_timeout_ms_min <= session_timeout_ms_max")
        if not 1 <= self.members_max <= GROUP_MEMBERS_MAX:
            raise errors.ConfigError(f"members_max={self.members_max} is outside [1, {GROUP_MEMBERS_MAX}]")
        if not 0 <= self.initial_rebalance_delay_ms <= GROUP_INITIAL_REBALANCE_DELAY_MS_MAX:
            raise errors.ConfigError(f"initial_rebalance_delay_ms={self.initial_rebalance_delay_ms} "
                                     f"is outside [0, {GROUP_INITIAL_REBALANCE_DELAY_MS_MAX}]")


@dataclass(frozen=True)
class JoinRequest:
    """A member's JoinGroup. ``member_id`` is "" for a process that has none yet."""

    member_id: str
    client_id: str
    host: str
    pid: int
    topics: frozenset[str]
    #: Assignor names in the member's order of preference (``assignors.ASSIGNORS``).
    protocols: tuple[str, ...]
    session_timeout_ms: int = GROUP_SESSION_TIMEOUT_MS_DEFAULT
    rebalance_timeout_ms: int = GROUP_REBALANCE_TIMEOUT_MS_DEFAULT
    group_instance_id: str | None = None
    #: Sync in the same round trip: the join's result carries the member's share
    #: (``JoinResult.sync``), as if it had sent SyncGroup the moment its join was answered.
    sync_on_join: bool = False

    def __post_init__(self) -> None:
        # Normalised so that "did the subscription change?" is a plain comparison.
        if isinstance(self.topics, (str, bytes)) or isinstance(self.protocols, (str, bytes)):
            raise errors.InvalidRequestError("topics and protocols must be lists of names, not one string")
        try:
            object.__setattr__(self, "topics", frozenset(self.topics))
            object.__setattr__(self, "protocols", tuple(self.protocols))
        except TypeError:
            raise errors.InvalidRequestError(
                f"topics and protocols must be lists of names, got {self.topics!r}, {self.protocols!r}") from None


@dataclass(frozen=True)
class SyncResult:
    generation_id: int
    protocol: str
    #: What the member may consume in this generation.
    assignment: tuple[TopicPartition, ...]
    #: What it owned and must stop consuming (commit first) before it rejoins.
    revoked: tuple[TopicPartition, ...]


@dataclass(frozen=True)
class JoinResult:
    member_id: str
    generation_id: int
    leader_id: str
    protocol: str
    #: The member's sync of this generation, done with the join (``sync_on_join``); None
    #: for a member that syncs by itself.
    sync: SyncResult | None = None


@dataclass(frozen=True)
class JoinPending:
    """The join phase goes on; the result will come out of :meth:`Group.take_join_results`."""

    member_id: str


@dataclass(frozen=True)
class JoinFailed:
    """A held join that can no longer succeed (the member left, died, or was fenced)."""

    member_id: str
    error: errors.ShmbrokerError


@dataclass(slots=True)
class Member:
    """One member as the coordinator sees it. ``owned`` is what the member consumes as far as
    the coordinator knows: its last synced assignment (nothing after an eager rejoin)."""

    member_id: str
    group_instance_id: str | None
    client_id: str
    host: str
    pid: int
    topics: frozenset[str]
    protocols: tuple[str, ...]
    session_timeout_ms: int
    rebalance_timeout_ms: int
    last_heard_ms: int
    awaiting_join: bool = False
    #: Its held join is answered with its sync (``JoinRequest.sync_on_join``).
    sync_on_join: bool = False
    synced: bool = False
    assignment: tuple[TopicPartition, ...] = ()
    revoked: tuple[TopicPartition, ...] = ()
    owned: tuple[TopicPartition, ...] = ()
    #: When the coordinator saw its pid die (a static member waits out its session timeout).
    process_gone_ms: int | None = None

    @property
    def cooperative(self) -> bool:
        return is_cooperative(self.protocols)


def _new_member_id(client_id: str) -> str:
    """Kafka's form, ``<client id>-<uuid>``: unique across coordinator restarts, so an id a
    client kept from before a restart is unknown, never someone else's."""
    return f"{client_id}-{uuid.uuid4()}"


class Group:
    """Membership, generations and assignment of one group. See the module docstring.

    Owned by the coordinator process; not thread-safe. Every public method first applies the
    timers that are due (sessions, rebalance and sync deadlines), so the answer always fits
    the clock even if the caller has not ticked.
    """

    def __init__(self, group_id: str, clock_ms: ClockMs, config: GroupConfig = GroupConfig(),
                 partitions_per_topic: Mapping[str, int] | None = None,
                 new_member_id: Callable[[str], str] = _new_member_id):
        self.group_id = _check_name("group id", group_id, errors.InvalidGroupIdError)
        self.clock_ms = clock_ms
        self.config = config
        self._partitions = dict(partitions_per_topic or {})
        self._new_member_id = new_member_id
        self.state = GroupState.EMPTY
        self.generation_id = 0
        self.protocol: str | None = None
        self.leader_id: str | None = None
        #: Why the last rebalance started (for the coordinator's log and ``groups describe``).
        self.rebalance_reason: str | None = None
        #: Rebalances started (entries into PreparingRebalance): the coordinator wakes the
        #: members' futex word when it moves (``shm/group_wake.py``).
        self.rebalances_started = 0
        self._members: dict[str, Member] = {}  # in join order: the first is the next leader
        self._static: dict[str, str] = {}  # group_instance_id -> member id
        self._assignment: GroupAssignment | None = None
        self._results: list[JoinResult | JoinFailed] = []
        self._rebalance_started_ms = 0
        self._join_not_before_ms = 0
        self._sync_deadline_ms = 0

    # --- reading ------------------------------------------------------------------------------

    def member_ids(self) -> list[str]:
        return list(self._members)

    def member(self, member_id: str) -> Member:
        """The member's record (read it, do not change it); UnknownMemberIdError if absent."""
        return self._known(member_id, None)

    def describe(self) -> dict[str, Any]:
        """What ``shmbroker groups describe`` shows (offsets come from the offset store)."""
        return {"group_id": self.group_id, "state": self.state.value,
                "generation_id": self.generation_id, "protocol": self.protocol,
                "leader_id": self.leader_id, "rebalance_reason": self.rebalance_reason,
                "members": [{"member_id": m.member_id, "group_instance_id": m.group_instance_id,
                             "client_id": m.client_id, "host": m.host, "pid": m.pid,
                             "topics": sorted(m.topics), "assignment": list(m.assignment),
                             "session_timeout_ms": m.session_timeout_ms,
                             "rebalance_timeout_ms": m.rebalance_timeout_ms,
                             "process_gone_ms": m.process_gone_ms}
                            for m in self._members.values()]}

    def take_join_results(self) -> list[JoinResult | JoinFailed]:
        """Answers for held joins that became ready since the last call (each once)."""
        results, self._results = self._results, []
        return results

    def next_deadline_ms(self) -> int | None:
        """The earliest time at which :meth:`tick` has something to do (None: nothing timed)."""
        deadlines = [m.last_heard_ms + m.session_timeout_ms
                     for m in self._members.values() if not m.awaiting_join]
        if self.state is GroupState.PREPARING_REBALANCE:
            everyone = all(m.awaiting_join for m in self._members.values())
            deadlines.append(self._join_not_before_ms if everyone else self._join_deadline_ms())
        if self.state is GroupState.COMPLETING_REBALANCE:
            deadlines.append(self._sync_deadline_ms)
        return min(deadlines) if deadlines else None

    # --- time -----------------------------------------------------------------------------------

    def tick(self) -> list[str]:
        """Apply the timers that are due; returns the ids of the members it removed.

        Kafka's rules: a member not heard from for its session timeout is removed, except while
        its join is held (the rebalance timeout governs then); a join phase ends at the
        rebalance timeout without the dynamic members that did not rejoin; members that have
        not synced by the rebalance timeout after the join phase are removed.
        """
        if self.state in (GroupState.EMPTY, GroupState.DEAD):
            return []
        now = self.clock_ms()
        expired = [m.member_id for m in self._members.values()
                   if not m.awaiting_join and now >= m.last_heard_ms + m.session_timeout_ms]
        self._remove_members(expired, "session timeout")
        removed = list(expired)
        if self.state is GroupState.PREPARING_REBALANCE:
            before = set(self._members)
            self._maybe_complete_join(now >= self._join_deadline_ms())
            removed += sorted(before - set(self._members))
        if self.state is GroupState.COMPLETING_REBALANCE and now >= self._sync_deadline_ms:
            late = [m.member_id for m in self._members.values() if not m.synced]
            self._remove_members(late, "no sync within the rebalance timeout")
            removed += late
        return removed

    # --- requests -------------------------------------------------------------------------------

    def join(self, request: JoinRequest) -> JoinResult | JoinPending:
        """JoinGroup. A new member (empty ``member_id``) gets an id; a static member coming
        back under its ``group_instance_id`` takes its old place; a known member rejoins."""
        self.tick()
        self._check_alive()
        _check_join_request(request, self.config)
        instance_id = request.group_instance_id
        if request.member_id:
            member = self._known(request.member_id, instance_id)
            self._check_protocols(request.protocols, exclude=member.member_id)
            member_id = self._rejoin(member, request)
        elif instance_id is not None and instance_id in self._static:
            old = self._static[instance_id]
            self._check_protocols(request.protocols, exclude=old)
            member_id = self._replace_static_member(self._members[old], request)
        else:
            self._check_protocols(request.protocols, exclude=None)
            member_id = self._add_member(request)
        return self._own_result(member_id)

    def sync(self, member_id: str, generation_id: int,
             group_instance_id: str | None = None) -> SyncResult:
        """SyncGroup: the member's share of the assignment the coordinator computed."""
        self.tick()
        self._check_alive()
        member = self._known(member_id, group_instance_id)
        self._check_generation(generation_id)
        if self.state is GroupState.PREPARING_REBALANCE:
            raise errors.RebalanceInProgressError(f"group {self.group_id!r} is rebalancing; rejoin")
        result = self._sync(member)
        self._maybe_stabilise()
        return result

    def _sync(self, member: Member) -> SyncResult:
        """The member has its share of this generation (by sync, or with its join result):
        from now on the group counts it as owning what it was assigned."""
        assert self.state in (GroupState.COMPLETING_REBALANCE, GroupState.STABLE), self.state
        assert self.protocol is not None
        member.last_heard_ms = self.clock_ms()
        member.owned = member.assignment
        member.synced = True
        return SyncResult(self.generation_id, self.protocol, member.assignment, member.revoked)

    def _maybe_stabilise(self) -> None:
        """CompletingRebalance ends when every member has its share; the cooperative follow-up
        starts then, since every old owner has been told what it must give up."""
        if self.state is GroupState.COMPLETING_REBALANCE and all(m.synced for m in self._members.values()):
            self._transition(GroupState.STABLE)
            if self._assignment is not None and self._assignment.has_pending():
                self._prepare_rebalance("partitions revoked for other members can now be granted")

    def heartbeat(self, member_id: str, generation_id: int,
                  group_instance_id: str | None = None) -> HeartbeatResult:
        """Keeps the member's session; says when it must rejoin."""
        self.tick()
        self._check_alive()
        member = self._known(member_id, group_instance_id)
        self._check_generation(generation_id)
        member.last_heard_ms = self.clock_ms()
        if self.state is GroupState.PREPARING_REBALANCE:
            return HeartbeatResult.REBALANCE_IN_PROGRESS
        return HeartbeatResult.OK

    def leave(self, member_id: str, group_instance_id: str | None = None) -> None:
        """LeaveGroup: the member has revoked (and committed) everything; the group rebalances."""
        self.tick()
        self._check_alive()
        self._known(member_id, group_instance_id)
        self._remove_members([member_id], "left the group")

    def member_died(self, member_id: str) -> bool:
        """The coordinator saw the member's process die (its registered pid is gone). A dynamic
        member is removed at once and the group rebalances: no session timeout to wait out. A
        static member keeps its place until its session timeout, so that a restart under the
        same instance id gets its partitions back without a rebalance (what static membership
        is for). Returns whether the member was removed; an unknown id is not an error, since
        the member may have left just before its process ended."""
        self.tick()
        member = self._members.get(member_id)
        if member is None:
            return False
        if member.group_instance_id is not None:
            member.process_gone_ms = self.clock_ms()
            return False
        self._remove_members([member_id], "process died")
        return True

    def validate_commit(self, member_id: str, generation_id: int,
                        group_instance_id: str | None = None) -> None:
        """Whether an offset commit may be stored (Kafka's ``validateOffsetCommit``); raises the
        typed error otherwise. Committed offsets themselves live in the offset store.

        A commit with no member id and a negative generation is accepted while the group has
        no members: a consumer that assigns partitions itself and only stores offsets. During
        CompletingRebalance a member that has not fetched its assignment yet is told to wait:
        it has joined the new generation but cannot know what it owns in it.
        """
        self.tick()
        self._check_alive()
        if generation_id < 0 and not member_id and self.state is GroupState.EMPTY:
            return
        member = self._known(member_id, group_instance_id)
        self._check_generation(generation_id)
        if self.state is GroupState.COMPLETING_REBALANCE and not member.synced:
            raise errors.RebalanceInProgressError(
                f"member {member_id!r} has not fetched its assignment of generation {generation_id}")
        member.last_heard_ms = self.clock_ms()

    def update_partitions(self, partitions_per_topic: Mapping[str, int]) -> None:
        """The topic registry changed. A change to a topic some member subscribes to needs a
        new assignment (in Kafka the leader notices and rejoins; here the coordinator knows)."""
        self.tick()
        new = dict(partitions_per_topic)
        subscribed = set().union(*(m.topics for m in self._members.values())) if self._members else set()
        changed = any(self._partitions.get(t) != new.get(t) for t in subscribed)
        self._partitions = new
        if changed and self.state in (GroupState.STABLE, GroupState.COMPLETING_REBALANCE):
            self._prepare_rebalance("partitions of a subscribed topic changed")

    def delete(self) -> None:
        """``groups delete``: only a group without members (Kafka's NON_EMPTY_GROUP otherwise)."""
        self.tick()
        self._check_alive()
        if self.state is not GroupState.EMPTY:
            raise errors.NonEmptyGroupError(
                f"group {self.group_id!r} has {len(self._members)} live members")
        self._transition(GroupState.DEAD)

    # --- joining --------------------------------------------------------------------------------

    def _add_member(self, request: JoinRequest) -> str:
        if len(self._members) >= self.config.members_max:
            raise errors.GroupMaxSizeReachedError(
                f"group {self.group_id!r} already has {len(self._members)} members (the limit)")
        member_id = self._new_member_id(request.client_id)
        assert member_id and member_id not in self._members, member_id
        member = _member_from(member_id, request, self.clock_ms())
        self._members[member_id] = member
        if member.group_instance_id is not None:
            self._static[member.group_instance_id] = member_id
        if self.state is not GroupState.PREPARING_REBALANCE:
            self._prepare_rebalance(f"member {member_id!r} joined")
        member.awaiting_join = True
        self._maybe_complete_join(False)
        return member_id

    def _rejoin(self, member: Member, request: JoinRequest) -> str:
        changed = member.topics != request.topics or member.protocols != request.protocols
        _update_member(member, request, self.clock_ms())
        if self.state is not GroupState.PREPARING_REBALANCE and not changed:
            # Nothing new: Kafka answers with the current generation at once.
            self._results.append(self._join_result(member.member_id))
            self._maybe_stabilise()
            return member.member_id
        if self.state is not GroupState.PREPARING_REBALANCE:
            self._prepare_rebalance(f"member {member.member_id!r} changed its subscription")
        member.awaiting_join = True
        self._maybe_complete_join(False)
        return member.member_id

    def _replace_static_member(self, old: Member, request: JoinRequest) -> str:
        """A process came back with the instance id of a live member (Kafka's
        ``updateStaticMemberAndRebalance``): it takes the old member's place and assignment
        under a new member id, and the old id is fenced from then on."""
        assert self.state not in (GroupState.EMPTY, GroupState.DEAD), self.state
        member_id = self._new_member_id(request.client_id)
        assert member_id and member_id not in self._members, member_id
        if old.awaiting_join:
            self._results.append(JoinFailed(old.member_id, errors.FencedInstanceIdError(
                f"instance {request.group_instance_id!r} joined again under another member id")))
        changed = old.topics != request.topics or self.protocol not in request.protocols
        new = _member_from(member_id, request, self.clock_ms())
        # The old process may still be consuming until it is fenced: keep what it owns owned.
        new.assignment, new.owned = old.assignment, old.owned
        self._members = {(member_id if k == old.member_id else k): (new if k == old.member_id else m)
                         for k, m in self._members.items()}
        self._static[old.group_instance_id] = member_id
        if self.leader_id == old.member_id:
            self.leader_id = member_id
        if self.state is GroupState.STABLE and not changed:
            self._results.append(self._join_result(member_id))  # no rebalance: the point
            self._maybe_stabilise()
            return member_id
        if self.state is not GroupState.PREPARING_REBALANCE:
            self._prepare_rebalance(f"static member {request.group_instance_id!r} came back "
                                    f"during a rebalance or with another subscription")
        new.awaiting_join = True
        self._maybe_complete_join(False)
        return member_id

    def _own_result(self, member_id: str) -> JoinResult | JoinPending:
        """The caller's own result, if this call produced it; others stay for take_join_results."""
        for index in range(len(self._results) - 1, -1, -1):
            result = self._results[index]
            if isinstance(result, JoinResult) and result.member_id == member_id:
                return self._results.pop(index)
        return JoinPending(member_id)

    # --- the rebalance --------------------------------------------------------------------------

    def _prepare_rebalance(self, reason: str) -> None:
        """Every member must rejoin."""
        started_empty = self.state is GroupState.EMPTY
        self._transition(GroupState.PREPARING_REBALANCE)
        self.rebalance_reason = reason
        self.rebalances_started += 1
        now = self.clock_ms()
        self._rebalance_started_ms = now
        self._join_not_before_ms = now + (self.config.initial_rebalance_delay_ms if started_empty else 0)
        for member in self._members.values():
            member.awaiting_join = False

    def _join_deadline_ms(self) -> int:
        timeout = max((m.rebalance_timeout_ms for m in self._members.values()), default=0)
        return self._rebalance_started_ms + timeout

    def _maybe_complete_join(self, deadline_passed: bool) -> None:
        """The join phase ends when every member has rejoined (and the initial delay of a
        group that was empty is over), or at the rebalance deadline."""
        if self.state is not GroupState.PREPARING_REBALANCE:
            return
        everyone = all(m.awaiting_join for m in self._members.values())
        if deadline_passed or (everyone and self.clock_ms() >= self._join_not_before_ms):
            self._complete_join()

    def _complete_join(self) -> None:
        # Kafka keeps static members that did not rejoin: they may be restarting, and their
        # session timeout decides. Dynamic ones are gone.
        late = [m.member_id for m in self._members.values()
                if not m.awaiting_join and m.group_instance_id is None]
        for member_id in late:
            self._forget(member_id)
        self.generation_id += 1
        if not self._members:
            self.protocol, self.leader_id, self._assignment = None, None, None
            self._transition(GroupState.EMPTY)
            return
        self.protocol = self._select_protocol()
        if self.leader_id not in self._members:
            self.leader_id = next(iter(self._members))
        self._assign()
        self._transition(GroupState.COMPLETING_REBALANCE)
        self._sync_deadline_ms = self.clock_ms() + max(m.rebalance_timeout_ms for m in self._members.values())
        joined = [m for m in self._members.values() if m.awaiting_join]
        for member in joined:
            member.awaiting_join = False
        # Results first, then the state they lead to: a sync done here may end the phase and
        # start the cooperative follow-up, which must not touch this generation's answers.
        for member in joined:
            self._results.append(self._join_result(member.member_id))
        self._maybe_stabilise()

    def _assign(self) -> None:
        assert self.protocol is not None
        subscriptions = {m.member_id: Subscription(m.topics, m.owned, m.group_instance_id)
                         for m in self._members.values()}
        plan = get_assignor(self.protocol)(self._partitions, subscriptions)
        self._assignment = plan
        for member in self._members.values():
            member.assignment = plan.granted(member.member_id)
            member.revoked = plan.revoked[member.member_id]
            member.synced = False

    def _select_protocol(self) -> str:
        """Kafka's rule: among the assignors every member offers, the one most members prefer
        (each votes for its first such choice); a tie goes to the name first in sort order."""
        members = list(self._members.values())
        candidates = set(members[0].protocols).intersection(*(m.protocols for m in members[1:]))
        assert candidates, "join admitted a member with no protocol in common"
        votes: dict[str, int] = {}
        for member in members:
            choice = next(p for p in member.protocols if p in candidates)
            votes[choice] = votes.get(choice, 0) + 1
        return min(votes, key=lambda name: (-votes[name], name))

    def _join_result(self, member_id: str) -> JoinResult:
        """The answer to a member's join; with its sync for a ``sync_on_join`` member (the
        caller then calls :meth:`_maybe_stabilise`, once every result is made)."""
        assert self.protocol is not None and self.leader_id is not None
        member = self._members[member_id]
        sync = self._sync(member) if member.sync_on_join else None
        return JoinResult(member_id, self.generation_id, self.leader_id, self.protocol, sync)

    # --- leaving --------------------------------------------------------------------------------

    def _remove_members(self, member_ids: Iterable[str], reason: str) -> None:
        """Remove and then rebalance once (not once per member)."""
        member_ids = list(member_ids)
        if not member_ids:
            return
        for member_id in member_ids:
            member = self._members[member_id]
            if member.awaiting_join:
                self._results.append(JoinFailed(member_id, errors.UnknownMemberIdError(
                    f"member {member_id!r} was removed from group {self.group_id!r}: {reason}")))
            self._forget(member_id)
        if self.state in (GroupState.STABLE, GroupState.COMPLETING_REBALANCE):
            self._prepare_rebalance(f"{len(member_ids)} member(s) removed: {reason}")
        self._maybe_complete_join(False)

    def _forget(self, member_id: str) -> None:
        member = self._members.pop(member_id)
        if member.group_instance_id is not None:
            assert self._static.get(member.group_instance_id) == member_id
            del self._static[member.group_instance_id]
        if self.leader_id == member_id:
            self.leader_id = None

    # --- checks ---------------------------------------------------------------------------------

    def _transition(self, state: GroupState) -> None:
        assert self.state in _VALID_PREVIOUS[state], f"{self.state.value} -> {state.value}"
        self.state = state

    def _check_alive(self) -> None:
        if self.state is GroupState.DEAD:
            raise errors.CoordinatorNotAvailableError(f"group {self.group_id!r} was deleted")

    def _known(self, member_id: str, group_instance_id: str | None) -> Member:
        """Kafka's order: a fenced static member first, then an unknown member id."""
        if group_instance_id is not None:
            current = self._static.get(group_instance_id)
            if current is not None and current != member_id:
                raise errors.FencedInstanceIdError(
                    f"instance {group_instance_id!r} of group {self.group_id!r} now belongs to "
                    f"member {current!r}, not {member_id!r}")
        member = self._members.get(member_id)
        if member is None:
            raise errors.UnknownMemberIdError(f"no member {member_id!r} in group {self.group_id!r}")
        return member

    def _check_generation(self, generation_id: int) -> None:
        if generation_id != self.generation_id:
            raise errors.IllegalGenerationError(
                f"generation {generation_id} of group {self.group_id!r} is not the current one "
                f"({self.generation_id})")

    def _check_protocols(self, protocols: tuple[str, ...], exclude: str | None) -> None:
        others = [m for m in self._members.values() if m.member_id != exclude]
        if others and not set(protocols).intersection(*(m.protocols for m in others)):
            raise errors.InconsistentGroupProtocolError(
                f"group {self.group_id!r}: none of {list(protocols)} is offered by every member")


def _member_from(member_id: str, request: JoinRequest, now_ms: int) -> Member:
    return Member(member_id, request.group_instance_id, request.client_id, request.host,
                  request.pid, frozenset(request.topics), tuple(request.protocols),
                  request.session_timeout_ms, request.rebalance_timeout_ms, now_ms,
                  sync_on_join=request.sync_on_join)


def _update_member(member: Member, request: JoinRequest, now_ms: int) -> None:
    member.client_id, member.host, member.pid = request.client_id, request.host, request.pid
    member.topics, member.protocols = frozenset(request.topics), tuple(request.protocols)
    member.session_timeout_ms = request.session_timeout_ms
    member.rebalance_timeout_ms = request.rebalance_timeout_ms
    member.last_heard_ms = now_ms
    member.process_gone_ms = None
    member.sync_on_join = request.sync_on_join
    if not member.cooperative:
        # Eager protocol: the client revoked everything before it sent this join.
        member.owned = ()


def _check_join_request(request: JoinRequest, config: GroupConfig) -> None:
    """Operating errors, typed: a join comes from a client, whatever it sends."""
    _check_name("client id", request.client_id, errors.InvalidRequestError, empty_ok=True)
    _check_name("host", request.host, errors.InvalidRequestError, empty_ok=True)
    if request.group_instance_id is not None:
        _check_name("group instance id", request.group_instance_id, errors.InvalidRequestError)
    if not isinstance(request.pid, int) or isinstance(request.pid, bool) or request.pid <= 0:
        raise errors.InvalidRequestError(f"pid must be a positive integer, got {request.pid!r}")
    if not config.session_timeout_ms_min <= _int(request.session_timeout_ms) <= config.session_timeout_ms_max:
        raise errors.InvalidSessionTimeoutError(
            f"session_timeout_ms={request.session_timeout_ms} is outside "
            f"[{config.session_timeout_ms_min}, {config.session_timeout_ms_max}]")
    if not GROUP_REBALANCE_TIMEOUT_MS_MIN <= _int(request.rebalance_timeout_ms) <= GROUP_REBALANCE_TIMEOUT_MS_MAX:
        raise errors.InvalidRequestError(
            f"rebalance_timeout_ms={request.rebalance_timeout_ms} is outside "
            f"[{GROUP_REBALANCE_TIMEOUT_MS_MIN}, {GROUP_REBALANCE_TIMEOUT_MS_MAX}]")
    topics = list(request.topics)
    if len(topics) > BROKER_TOPICS_MAX or not all(isinstance(t, str) for t in topics):
        raise errors.InvalidRequestError(f"topics must be at most {BROKER_TOPICS_MAX} names")
    protocols = list(request.protocols)
    if not 1 <= len(protocols) <= GROUP_PROTOCOLS_MAX or len(set(protocols)) != len(protocols):
        raise errors.InvalidRequestError(
            f"protocols must be 1 to {GROUP_PROTOCOLS_MAX} distinct assignor names, got {protocols!r}")
    for name in protocols:
        get_assignor(name)  # ConfigError naming the known ones


def _check_name(what: str, value: Any, error: type[errors.ShmbrokerError], empty_ok: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty_ok) or len(value) > GROUP_NAME_LENGTH_MAX:
        raise error(f"{what} must be a {'' if empty_ok else 'non-empty '}string of at most "
                    f"{GROUP_NAME_LENGTH_MAX} characters, got {value!r}")
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise errors.InvalidRequestError(f"expected an integer, got {value!r}")
    return value
