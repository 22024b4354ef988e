"""The consumer group state machine with a fake clock: no processes, no sockets.

Each test drives a :class:`Group` the way the coordinator process will: requests in, join
results out of ``take_join_results``, time only through the clock it was given."""
from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
from fake_clock import FakeClock

from shmbroker import errors
from shmbroker.coordinator.group import (Group, GroupConfig, GroupState, HeartbeatResult,
                                         JoinFailed, JoinPending, JoinRequest, JoinResult)

SESSION_MS = 10_000
REBALANCE_MS = 5_000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def new_group(clock: FakeClock, partitions=None, config: GroupConfig = GroupConfig()) -> Group:
    ids = itertools.count(1)  # deterministic member ids: "<client>-1", "<client>-2", ...
    return Group("g", clock, config, {"t": 6} if partitions is None else partitions,
                 new_member_id=lambda client_id: f"{client_id}-{next(ids)}")


def req(member_id: str = "", client: str = "c", topics=("t",), protocols=("range",),
        instance: str | None = None, session_ms: int = SESSION_MS, pid: int = 4242,
        rebalance_ms: int = REBALANCE_MS, sync_on_join: bool = False) -> JoinRequest:
    return JoinRequest(member_id, client, "localhost", pid, frozenset(topics), tuple(protocols),
                       session_ms, rebalance_ms, instance, sync_on_join)


def stabilise(group: Group, requests: dict[str, JoinRequest], rounds_max: int = 10) -> None:
    """Act as well-behaved clients: rejoin while the group prepares, sync once it completes,
    until it is Stable (a cooperative follow-up rebalance takes another round)."""
    for _ in range(rounds_max):
        if group.state is GroupState.STABLE:
            group.take_join_results()
            return
        if group.state is GroupState.PREPARING_REBALANCE:
            for member_id in group.member_ids():
                if not group.member(member_id).awaiting_join:
                    group.join(dataclasses.replace(requests[member_id], member_id=member_id))
        if group.state is GroupState.COMPLETING_REBALANCE:
            for member_id in group.member_ids():
                group.sync(member_id, group.generation_id)
    raise AssertionError(f"group did not stabilise: {group.describe()}")


def join_new(group: Group, requests: dict[str, JoinRequest], request: JoinRequest) -> str:
    """A new member joins and the group settles; returns its member id."""
    member_id = group.join(request).member_id
    requests[member_id] = request
    stabilise(group, requests)
    return member_id


def assignments(group: Group) -> dict[str, tuple]:
    return {m: group.member(m).assignment for m in group.member_ids()}


def all_partitions(topic: str = "t", count: int = 6) -> list:
    return [(topic, p) for p in range(count)]


# --- joining ------------------------------------------------------------------------------------

def test_the_first_member_completes_the_join_at_once_and_gets_every_partition(clock):
    group = new_group(clock)
    result = group.join(req())
    assert result == JoinResult("c-1", 1, "c-1", "range")
    assert group.state is GroupState.COMPLETING_REBALANCE
    sync = group.sync("c-1", 1)
    assert sync.assignment == tuple(all_partitions()) and sync.revoked == ()
    assert group.state is GroupState.STABLE


def test_a_join_with_an_empty_member_id_gets_a_new_id_and_an_unknown_id_is_refused(clock):
    group = Group("g", clock, partitions_per_topic={"t": 1})  # the real uuid-based ids
    first = group.join(req(client="worker")).member_id
    second = group.join(req(client="worker")).member_id
    assert first.startswith("worker-") and second.startswith("worker-") and first != second
    with pytest.raises(errors.UnknownMemberIdError):
        group.join(req(member_id="worker-not-issued-here"))


def test_three_members_over_six_partitions_each_partition_owned_once(clock):
    group, requests = new_group(clock), {}
    members = [join_new(group, requests, req(client=f"w{i}")) for i in range(3)]
    owned = assignments(group)
    assert sorted(tp for mine in owned.values() for tp in mine) == all_partitions()
    assert all(len(owned[m]) == 2 for m in members)
    assert group.generation_id == 3  # one rebalance per join


def test_the_rebalance_completes_only_when_every_known_member_has_rejoined(clock):
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a"))
    b = join_new(group, requests, req(client="b"))
    generation = group.generation_id
    c = group.join(req(client="c"))
    assert c == JoinPending("c-3") and group.state is GroupState.PREPARING_REBALANCE
    # The others learn of it from their heartbeats, still in the old generation.
    assert group.heartbeat(a, generation) is HeartbeatResult.REBALANCE_IN_PROGRESS
    assert isinstance(group.join(dataclasses.replace(requests[a], member_id=a)), JoinPending)
    last = group.join(dataclasses.replace(requests[b], member_id=b))
    assert last == JoinResult(b, generation + 1, a, "range")  # the leader stays the first member
    assert sorted(r.member_id for r in group.take_join_results()) == [a, "c-3"]
    assert group.take_join_results() == []  # each result is handed out once


def test_a_member_that_does_not_rejoin_is_removed_when_the_rebalance_timeout_passes(clock):
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a"))
    b = join_new(group, requests, req(client="b"))
    group.leave(a)
    assert group.state is GroupState.PREPARING_REBALANCE
    clock.advance(REBALANCE_MS - 1)
    group.heartbeat(b, group.generation_id)  # alive, but it never rejoins
    assert group.tick() == [] and group.next_deadline_ms() == clock.now_ms + 1
    clock.advance(1)
    assert group.tick() == [b]
    assert group.state is GroupState.EMPTY and group.member_ids() == []


def test_a_member_held_in_a_join_is_not_expired_by_its_session_timeout(clock):
    # Kafka's rule: while its join is held the member cannot heartbeat; the rebalance timeout
    # (here longer than the session timeout) is what bounds the wait.
    group, requests = new_group(clock), {}
    slow = REBALANCE_MS + SESSION_MS
    a = join_new(group, requests, req(client="a", rebalance_ms=slow))
    b = join_new(group, requests, req(client="b", rebalance_ms=slow))
    group.join(req(client="c", rebalance_ms=slow))
    group.join(dataclasses.replace(requests[a], member_id=a))
    clock.advance(SESSION_MS - 1)
    group.heartbeat(b, group.generation_id)
    clock.advance(1)
    assert group.tick() == [] and a in group.member_ids()
    assert isinstance(group.join(dataclasses.replace(requests[b], member_id=b)), JoinResult)


def test_a_join_with_changed_topics_rebalances_and_an_unchanged_one_does_not(clock):
    group, requests = new_group(clock, {"t": 2, "u": 2}), {}
    a = join_new(group, requests, req(client="a"))
    generation = group.generation_id
    assert group.join(req(member_id=a, client="a")) == JoinResult(a, generation, a, "range")
    assert group.state is GroupState.STABLE
    result = group.join(req(member_id=a, client="a", topics=("t", "u")))
    assert result.generation_id == generation + 1
    assert group.sync(a, generation + 1).assignment == (("t", 0), ("t", 1), ("u", 0), ("u", 1))


def test_the_initial_rebalance_delay_waits_for_more_members_before_the_first_generation(clock):
    group = new_group(clock, config=GroupConfig(initial_rebalance_delay_ms=300))
    assert isinstance(group.join(req(client="a")), JoinPending)
    clock.advance(200)
    assert isinstance(group.join(req(client="b")), JoinPending)
    assert group.next_deadline_ms() == clock.now_ms + 100
    clock.advance(100)
    group.tick()
    results = group.take_join_results()
    assert [(r.member_id, r.generation_id) for r in results] == [("a-1", 1), ("b-2", 1)]


# --- members that go away -----------------------------------------------------------------------

def test_a_member_whose_session_expired_is_removed_and_the_group_rebalances(clock):
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a"))
    b = join_new(group, requests, req(client="b"))
    generation = group.generation_id
    clock.advance(SESSION_MS - 1)
    group.heartbeat(a, generation)
    assert group.tick() == [] and group.member_ids() == [a, b]
    clock.advance(1)  # b last heard SESSION_MS ago
    assert group.tick() == [b]
    assert group.state is GroupState.PREPARING_REBALANCE
    stabilise(group, requests)
    assert assignments(group) == {a: tuple(all_partitions())}
    with pytest.raises(errors.UnknownMemberIdError):
        group.heartbeat(b, generation)


def test_heartbeats_keep_a_member_in_the_group_past_its_session_timeout(clock):
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a"))
    for _ in range(5):
        clock.advance(SESSION_MS // 2)
        assert group.heartbeat(a, group.generation_id) is HeartbeatResult.OK
        assert group.next_deadline_ms() == clock.now_ms + SESSION_MS
    assert group.member_ids() == [a] and group.state is GroupState.STABLE


def test_a_dead_dynamic_member_is_removed_at_once_and_its_partitions_move(clock):
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a"))
    b = join_new(group, requests, req(client="b"))
    assert group.member_died(b) is True  # no clock advance: no session timeout waited out
    assert group.describe()["rebalance_reason"] == "1 member(s) removed: process died"
    stabilise(group, requests)
    assert assignments(group) == {a: tuple(all_partitions())}
    assert group.member_died(b) is False  # already gone: not an error


def test_a_dead_static_member_keeps_its_place_until_its_session_timeout(clock):
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a"))
    s = join_new(group, requests, req(client="s", instance="worker-1"))
    assert group.member_died(s) is False
    assert group.state is GroupState.STABLE and s in group.member_ids()
    clock.advance(SESSION_MS - 1)
    group.heartbeat(a, group.generation_id)
    assert group.tick() == [] and group.state is GroupState.STABLE
    clock.advance(1)
    assert group.tick() == [s] and group.state is GroupState.PREPARING_REBALANCE


def test_leave_rebalances_and_the_last_member_leaving_empties_the_group(clock):
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a"))
    b = join_new(group, requests, req(client="b"))
    group.leave(b)
    stabilise(group, requests)
    assert assignments(group) == {a: tuple(all_partitions())}
    generation = group.generation_id
    group.leave(a)
    assert group.state is GroupState.EMPTY and group.generation_id == generation + 1
    assert group.protocol is None and group.leader_id is None and group.next_deadline_ms() is None


def test_a_member_waiting_in_a_join_that_is_removed_gets_unknown_member_id(clock):
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a"))
    b = join_new(group, requests, req(client="b"))
    group.join(req(client="c"))  # rebalance: a and b must rejoin
    group.join(dataclasses.replace(requests[a], member_id=a))
    group.leave(a)
    failed = [r for r in group.take_join_results() if isinstance(r, JoinFailed)]
    assert [f.member_id for f in failed] == [a]
    assert isinstance(failed[0].error, errors.UnknownMemberIdError)
    assert b in group.member_ids()


def test_a_member_that_never_syncs_is_removed_after_the_rebalance_timeout(clock):
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a"))
    b = join_new(group, requests, req(client="b"))
    group.leave(a)
    group.join(dataclasses.replace(requests[b], member_id=b))
    assert group.state is GroupState.COMPLETING_REBALANCE
    clock.advance(REBALANCE_MS // 2)
    group.heartbeat(b, group.generation_id)  # heartbeats, but never fetches its assignment
    clock.advance(REBALANCE_MS // 2)
    assert group.tick() == [b]


# --- sync and commits ---------------------------------------------------------------------------

def test_sync_during_a_rebalance_says_rejoin_and_a_stale_generation_is_illegal(clock):
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a"))
    generation = group.generation_id
    group.join(req(client="b"))
    with pytest.raises(errors.RebalanceInProgressError) as info:
        group.sync(a, generation)
    assert info.value.code == 27 and info.value.retriable
    group.join(dataclasses.replace(requests[a], member_id=a))
    with pytest.raises(errors.IllegalGenerationError):
        group.sync(a, generation)


def test_a_commit_from_a_stale_generation_is_rejected(clock):
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a"))
    old = group.generation_id
    group.validate_commit(a, old)
    join_new(group, requests, req(client="b"))
    with pytest.raises(errors.IllegalGenerationError) as info:
        group.validate_commit(a, old)
    assert info.value.code == 22
    group.validate_commit(a, group.generation_id)


def test_a_commit_from_an_unknown_member_is_rejected(clock):
    group, requests = new_group(clock), {}
    join_new(group, requests, req(client="a"))
    with pytest.raises(errors.UnknownMemberIdError) as info:
        group.validate_commit("someone-else", group.generation_id)
    assert info.value.code == 25
    with pytest.raises(errors.UnknownMemberIdError):
        group.validate_commit("", -1)  # only an empty group takes commits from no member


def test_a_commit_during_a_rebalance_is_accepted_until_the_new_generation_begins(clock):
    # Kafka's rule: a member commits what it processed before it rejoins (eager revocation).
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a"))
    generation = group.generation_id
    group.join(req(client="b"))
    assert group.state is GroupState.PREPARING_REBALANCE
    group.validate_commit(a, generation)


def test_a_commit_before_fetching_the_new_assignment_is_told_to_wait(clock):
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a"))
    group.join(req(client="b"))
    group.join(dataclasses.replace(requests[a], member_id=a))
    assert group.state is GroupState.COMPLETING_REBALANCE
    with pytest.raises(errors.RebalanceInProgressError):
        group.validate_commit(a, group.generation_id)
    group.sync(a, group.generation_id)
    group.validate_commit(a, group.generation_id)  # a knows its partitions now; b has not synced


def test_an_empty_group_takes_commits_from_consumers_that_assign_partitions_themselves(clock):
    group = new_group(clock)
    group.validate_commit("", -1)
    with pytest.raises(errors.UnknownMemberIdError):
        group.validate_commit("c-1", 0)


# --- static membership --------------------------------------------------------------------------

def test_static_member_rejoining_within_session_timeout_keeps_its_assignment_without_rebalance(clock):
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a", instance="worker-a"))
    s = join_new(group, requests, req(client="s", instance="worker-s"))
    before, generation = group.member(s).assignment, group.generation_id
    group.member_died(s)  # kill -9; the worker restarts
    clock.advance(SESSION_MS - 1)
    group.heartbeat(a, generation)
    result = group.join(req(client="s", instance="worker-s", pid=4343))
    assert isinstance(result, JoinResult) and result.member_id != s
    assert result.generation_id == generation and group.state is GroupState.STABLE
    assert group.sync(result.member_id, generation).assignment == before
    assert group.member(result.member_id).pid == 4343


def test_static_member_returning_after_its_session_timeout_causes_a_rebalance(clock):
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a", instance="worker-a"))
    join_new(group, requests, req(client="s", instance="worker-s"))
    generation = group.generation_id
    clock.advance(SESSION_MS - 1)
    group.heartbeat(a, generation)
    clock.advance(1)  # the static member's session has expired
    result = group.join(req(client="s", instance="worker-s"))
    assert isinstance(result, JoinPending) and group.state is GroupState.PREPARING_REBALANCE


def test_a_second_process_with_the_same_instance_id_fences_the_first(clock):
    group, requests = new_group(clock), {}
    old = join_new(group, requests, req(client="s", instance="worker-s"))
    generation = group.generation_id
    new = group.join(req(client="s", instance="worker-s")).member_id
    assert new != old and group.member_ids() == [new]
    for call in (lambda: group.heartbeat(old, generation, "worker-s"),
                 lambda: group.sync(old, generation, "worker-s"),
                 lambda: group.validate_commit(old, generation, "worker-s"),
                 lambda: group.join(req(member_id=old, client="s", instance="worker-s"))):
        with pytest.raises(errors.FencedInstanceIdError) as info:
            call()
        assert info.value.code == 82
    group.validate_commit(new, generation, "worker-s")


def test_a_fenced_static_member_waiting_in_a_join_is_answered_with_fenced_instance_id(clock):
    group, requests = new_group(clock), {}
    join_new(group, requests, req(client="a"))
    old = join_new(group, requests, req(client="s", instance="worker-s"))
    group.join(req(client="b"))
    group.join(dataclasses.replace(requests[old], member_id=old))  # held: a has not rejoined
    new = group.join(req(client="s", instance="worker-s")).member_id
    failed = [r for r in group.take_join_results() if isinstance(r, JoinFailed)]
    assert [(f.member_id, type(f.error)) for f in failed] == [(old, errors.FencedInstanceIdError)]
    assert new in group.member_ids() and old not in group.member_ids()


def test_a_static_member_that_did_not_rejoin_stays_through_a_rebalance(clock):
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a"))
    s = join_new(group, requests, req(client="s", instance="worker-s"))
    group.leave(a)
    clock.advance(REBALANCE_MS)
    group.tick()  # the join phase ends without s: s may be restarting, its session decides
    assert group.member_ids() == [s] and group.state is GroupState.COMPLETING_REBALANCE
    assert group.member(s).assignment == tuple(all_partitions())


# --- assignors through the group ----------------------------------------------------------------

def test_cooperative_sticky_moves_only_what_must_move_when_a_member_joins(clock):
    group, requests = new_group(clock, {"t": 4}), {}
    coop = ("cooperative-sticky",)
    a = join_new(group, requests, req(client="a", protocols=coop))
    assert group.member(a).assignment == tuple(all_partitions(count=4))
    b = group.join(req(client="b", protocols=coop)).member_id
    requests[b] = req(client="b", protocols=coop)
    first = group.join(dataclasses.replace(requests[a], member_id=a))  # a keeps consuming
    assert first.protocol == "cooperative-sticky"
    sync_a = group.sync(a, first.generation_id)
    sync_b = group.sync(b, first.generation_id)
    assert sync_a.assignment == (("t", 0), ("t", 1)) and sync_a.revoked == (("t", 2), ("t", 3))
    assert sync_b.assignment == ()  # t2, t3 wait until a has revoked them
    # Everyone has synced: the group starts the follow-up generation by itself.
    assert group.state is GroupState.PREPARING_REBALANCE
    stabilise(group, requests)
    assert group.generation_id == first.generation_id + 1
    assert assignments(group) == {a: (("t", 0), ("t", 1)), b: (("t", 2), ("t", 3))}
    assert group.member(a).revoked == () and group.member(b).revoked == ()


def test_a_join_with_sync_on_join_carries_the_share_and_the_group_needs_no_sync(clock):
    group = new_group(clock, {"t": 4})
    a = group.join(req(client="a", sync_on_join=True))
    assert a.sync is not None and a.sync.assignment == tuple(all_partitions(count=4))
    assert group.state is GroupState.STABLE  # no SyncGroup was sent
    group.validate_commit(a.member_id, a.generation_id)  # it knows what it owns: may commit
    b = group.join(req(client="b", sync_on_join=True))
    assert isinstance(b, JoinPending)
    assert group.heartbeat(a.member_id, 1) is HeartbeatResult.REBALANCE_IN_PROGRESS
    a2 = group.join(req(a.member_id, client="a", sync_on_join=True))
    [b2] = group.take_join_results()
    assert a2.generation_id == b2.generation_id == 2 and group.state is GroupState.STABLE
    assert sorted(a2.sync.assignment + b2.sync.assignment) == all_partitions(count=4)
    assert not set(a2.sync.assignment) & set(b2.sync.assignment)
    with pytest.raises(errors.IllegalGenerationError):  # the old generation's commits stay out
        group.validate_commit(a.member_id, 1)


def test_a_member_without_sync_on_join_still_holds_the_group_in_completing_rebalance(clock):
    group = new_group(clock, {"t": 4})
    a = group.join(req(client="a", sync_on_join=True))
    b = group.join(req(client="b"))  # an old client, or a Kafka client through the listener
    a2 = group.join(req(a.member_id, client="a", sync_on_join=True))
    [b2] = group.take_join_results()
    assert a2.sync is not None and b2.sync is None
    assert group.state is GroupState.COMPLETING_REBALANCE
    with pytest.raises(errors.RebalanceInProgressError):  # b cannot know what it owns yet
        group.validate_commit(b.member_id, b2.generation_id)
    assert group.sync(b.member_id, b2.generation_id).assignment
    assert group.state is GroupState.STABLE


def test_cooperative_sync_on_join_starts_the_follow_up_at_once_and_grants_moves_only_there(clock):
    group = new_group(clock, {"t": 4})
    coop = ("cooperative-sticky",)
    a = group.join(req(client="a", protocols=coop, sync_on_join=True))
    b = group.join(req(client="b", protocols=coop, sync_on_join=True))
    a2 = group.join(req(a.member_id, client="a", protocols=coop, sync_on_join=True))
    [b2] = group.take_join_results()
    assert a2.sync.assignment == (("t", 0), ("t", 1)) and a2.sync.revoked == (("t", 2), ("t", 3))
    assert b2.sync.assignment == ()  # not while a may still consume them
    # Both answers went out with their shares: the follow-up begins without a sync round.
    assert group.state is GroupState.PREPARING_REBALANCE
    assert isinstance(group.join(req(b.member_id, client="b", protocols=coop,
                                     sync_on_join=True)), JoinPending)
    a3 = group.join(req(a.member_id, client="a", protocols=coop, sync_on_join=True))
    [b3] = group.take_join_results()
    assert a3.generation_id == 3 and group.state is GroupState.STABLE
    assert a3.sync.assignment == (("t", 0), ("t", 1)) and b3.sync.assignment == (("t", 2), ("t", 3))


def test_eager_members_revoke_before_rejoining_so_nothing_is_held_back(clock):
    group, requests = new_group(clock, {"t": 4}), {}
    a = join_new(group, requests, req(client="a", protocols=("roundrobin",)))
    b = join_new(group, requests, req(client="b", protocols=("roundrobin",)))
    assert group.generation_id == 2  # no follow-up generation
    assert sorted(assignments(group)[a] + assignments(group)[b]) == all_partitions(count=4)


def test_the_protocol_is_the_one_most_members_prefer_among_those_all_offer(clock):
    group, requests = new_group(clock), {}
    join_new(group, requests, req(client="a", protocols=("range", "roundrobin")))
    join_new(group, requests, req(client="b", protocols=("roundrobin", "range")))
    assert group.protocol == "range"  # one vote each: the tie goes to the first name
    join_new(group, requests, req(client="c", protocols=("roundrobin", "cooperative-sticky")))
    assert group.protocol == "roundrobin"  # the only one all three offer


def test_a_member_with_no_assignor_in_common_or_an_unknown_one_is_refused(clock):
    group, requests = new_group(clock), {}
    join_new(group, requests, req(client="a", protocols=("range",)))
    with pytest.raises(errors.InconsistentGroupProtocolError) as info:
        group.join(req(client="b", protocols=("roundrobin",)))
    assert info.value.code == 23
    with pytest.raises(errors.ConfigError, match="unknown assignor"):
        group.join(req(client="b", protocols=("range", "sticky")))
    assert len(group.member_ids()) == 1 and group.state is GroupState.STABLE


def test_more_partitions_in_a_subscribed_topic_rebalance_the_group_and_others_do_not(clock):
    group, requests = new_group(clock, {"t": 2, "other": 1}), {}
    a = join_new(group, requests, req(client="a"))
    group.update_partitions({"t": 2, "other": 5})
    assert group.state is GroupState.STABLE
    group.update_partitions({"t": 3, "other": 5})
    assert group.state is GroupState.PREPARING_REBALANCE
    stabilise(group, requests)
    assert assignments(group) == {a: (("t", 0), ("t", 1), ("t", 2))}


# --- limits and bad requests --------------------------------------------------------------------

def test_the_group_refuses_a_member_beyond_its_size_limit(clock):
    group, requests = new_group(clock, config=GroupConfig(members_max=2)), {}
    join_new(group, requests, req(client="a"))
    join_new(group, requests, req(client="b"))
    with pytest.raises(errors.GroupMaxSizeReachedError) as info:
        group.join(req(client="c"))
    assert info.value.code == 81 and len(group.member_ids()) == 2


@pytest.mark.parametrize("session_ms", [99, 30 * 60 * 1000 + 1])
def test_a_session_timeout_outside_the_limits_is_refused(clock, session_ms):
    group = new_group(clock)
    with pytest.raises(errors.InvalidSessionTimeoutError):
        group.join(req(session_ms=session_ms))
    group.join(req(session_ms=100))  # on one host far below Kafka's 6 s minimum is fine


@pytest.mark.parametrize("change", [{"pid": 0}, {"pid": True}, {"client_id": None},
                                    {"group_instance_id": ""}, {"rebalance_timeout_ms": 0},
                                    {"protocols": ()}, {"protocols": ("range", "range")},
                                    {"group_instance_id": "x" * 250}])
def test_malformed_join_requests_get_typed_errors(clock, change):
    group = new_group(clock)
    with pytest.raises(errors.InvalidRequestError):
        group.join(dataclasses.replace(req(), **change))
    assert group.state is GroupState.EMPTY


def test_group_limits_outside_their_bounds_are_config_errors():
    for bad in ({"members_max": 0}, {"members_max": 1025}, {"session_timeout_ms_min": 0},
                {"session_timeout_ms_min": 2, "session_timeout_ms_max": 1},
                {"initial_rebalance_delay_ms": -1}):
        with pytest.raises(errors.ConfigError):
            GroupConfig(**bad)


def test_group_errors_carry_kafkas_codes_and_are_found_by_code():
    expected = {errors.CoordinatorNotAvailableError: 15, errors.IllegalGenerationError: 22,
                errors.InconsistentGroupProtocolError: 23, errors.InvalidGroupIdError: 24,
                errors.UnknownMemberIdError: 25, errors.InvalidSessionTimeoutError: 26,
                errors.RebalanceInProgressError: 27, errors.NonEmptyGroupError: 68,
                errors.GroupIdNotFoundError: 69, errors.GroupMaxSizeReachedError: 81,
                errors.FencedInstanceIdError: 82}
    for cls, code in expected.items():
        assert cls.code == code and errors.ERRORS_BY_CODE[code] is cls
    retriable = {cls for cls in expected if cls.retriable}
    assert retriable == {errors.CoordinatorNotAvailableError, errors.RebalanceInProgressError}


def test_a_group_id_must_be_a_short_non_empty_string(clock):
    for bad in ("", "g" * 250, None):
        with pytest.raises(errors.InvalidGroupIdError):
            Group(bad, clock)


def test_only_an_empty_group_can_be_deleted_and_then_it_refuses_requests(clock):
    group, requests = new_group(clock), {}
    a = join_new(group, requests, req(client="a"))
    with pytest.raises(errors.NonEmptyGroupError):
        group.delete()
    group.leave(a)
    group.delete()
    assert group.state is GroupState.DEAD
    with pytest.raises(errors.CoordinatorNotAvailableError) as info:
        group.join(req())
    assert info.value.retriable


# --- a seeded simulation of clients that follow the protocol -------------------------------------

class SimClient:
    """A consumer as the protocol expects it to behave: eager clients stop consuming
    everything before they rejoin; cooperative ones stop only what a sync revokes."""

    def __init__(self, name: str, topics: tuple, protocols: tuple, instance: str | None,
                 sync_on_join: bool = False):
        self.name, self.topics, self.protocols, self.instance = name, topics, protocols, instance
        self.sync_on_join = sync_on_join
        self.member_id = ""
        self.generation = -1
        self.waiting = False  # its join is held: a real client blocks in join, sends nothing
        self.joined = False  # holds a join result it has not synced yet
        self.consuming: set = set()

    def request(self) -> JoinRequest:
        return req(self.member_id, self.name, self.topics, self.protocols, self.instance,
                   sync_on_join=self.sync_on_join)

    def reset(self) -> None:
        self.member_id, self.generation, self.waiting, self.joined = "", -1, False, False
        self.consuming.clear()

    def deliver(self, result) -> None:
        if isinstance(result, JoinFailed):
            self.reset()
        elif isinstance(result, JoinResult):
            self.member_id, self.generation = result.member_id, result.generation_id
            self.waiting, self.joined = False, result.sync is None
            if result.sync is not None:  # its share came with the answer: consume it now
                assert not set(result.sync.assignment) & set(result.sync.revoked)
                self.consuming = set(result.sync.assignment)
        else:
            self.member_id, self.waiting = result.member_id, True

    def rejoin(self, group: Group) -> None:
        if "cooperative-sticky" not in self.protocols:
            self.consuming.clear()
        self.deliver(group.join(self.request()))

    def step(self, group: Group) -> None:
        """One turn of the client's poll loop."""
        if self.waiting:
            return
        try:
            if not self.member_id:
                self.deliver(group.join(self.request()))
            elif self.joined:
                sync = group.sync(self.member_id, self.generation, self.instance)
                assert not set(sync.assignment) & set(sync.revoked)
                self.consuming = set(sync.assignment)
                self.joined = False
            elif group.heartbeat(self.member_id, self.generation, self.instance) \
                    is HeartbeatResult.REBALANCE_IN_PROGRESS:
                self.rejoin(group)
        except errors.RebalanceInProgressError:
            self.joined = False
            self.rejoin(group)
        except (errors.UnknownMemberIdError, errors.IllegalGenerationError,
                errors.FencedInstanceIdError):
            self.reset()


@pytest.mark.parametrize("sync_on_join", [False, True], ids=["sync", "sync_on_join"])
def test_simulated_clients_never_consume_one_partition_twice_and_settle_on_all_partitions(
        sync_on_join):
    for seed in range(30):
        rng = random.Random(seed)
        clock = FakeClock()
        partitions = {"t": rng.randint(1, 12), "u": rng.randint(0, 5)}
        group = new_group(clock, partitions)
        protocols = rng.choice([("range",), ("roundrobin",), ("cooperative-sticky",)])
        clients: dict[str, SimClient] = {}
        for step in range(300):
            _simulate_one_step(rng, clock, group, clients, protocols, step, sync_on_join)
            _route_join_results(group, clients)
            _check_no_partition_consumed_twice(clients, seed, step)
        _settle(group, clients, clock)
        consumed = sorted(tp for c in clients.values() for tp in c.consuming)
        topics = sorted({t for c in clients.values() for t in c.topics})
        expected = [tp for t in topics for tp in all_partitions(t, partitions[t])]
        assert group.state is (GroupState.STABLE if clients else GroupState.EMPTY), seed
        assert consumed == (expected if clients else []), seed


def _simulate_one_step(rng, clock, group, clients, protocols, step, sync_on_join) -> None:
    action = rng.random()
    live = sorted(clients)
    if action < 0.08 and len(clients) < 6:
        instance = f"w{step}" if rng.random() < 0.3 else None
        topics = rng.choice([("t",), ("t", "u"), ("u",)])
        clients[f"c{step}"] = SimClient(f"c{step}", topics, protocols, instance, sync_on_join)
    elif action < 0.12 and live:
        client = clients.pop(rng.choice(live))  # graceful: stop consuming, then leave
        if client.member_id:
            group.leave(client.member_id, client.instance)
    elif action < 0.16 and live:
        client = clients.pop(rng.choice(live))  # kill -9: its partitions stop with it
        if client.member_id:
            group.member_died(client.member_id)
        if client.instance is not None and rng.random() < 0.5:  # restarted under the same id
            clients[client.name] = SimClient(client.name, client.topics, protocols, client.instance,
                                             sync_on_join)
    elif action < 0.3:
        clock.advance(rng.randint(1, 50))
        group.tick()
    elif live:
        clients[rng.choice(live)].step(group)


def _route_join_results(group: Group, clients: dict[str, SimClient]) -> None:
    by_member = {c.member_id: c for c in clients.values() if c.member_id}
    for result in group.take_join_results():
        if result.member_id in by_member:
            by_member[result.member_id].deliver(result)


def _check_no_partition_consumed_twice(clients, seed, step) -> None:
    seen: dict = {}
    for client in clients.values():
        for tp in client.consuming:
            assert tp not in seen, f"seed {seed} step {step}: {tp} consumed by {seen[tp]} and {client.name}"
            seen[tp] = client.name


def _settle(group: Group, clients: dict[str, SimClient], clock: FakeClock) -> None:
    """Let the dead static members' sessions run out, then let every client catch up."""
    for _ in range(3):
        clock.advance(SESSION_MS // 2)
        group.tick()
        _route_join_results(group, clients)
        for _ in range(20):
            for name in sorted(clients):
                clients[name].step(group)
                _route_join_results(group, clients)
            _check_no_partition_consumed_twice(clients, "settle", 0)
