"""Partition assignors (range, roundrobin, cooperative-sticky): pure functions, no processes.

Worked examples from Kafka's documentation first, then seeded random configurations that
check what every assignment must satisfy."""
from __future__ import annotations

import random

import pytest

from shmbroker import errors
from shmbroker.coordinator.assignors import (ASSIGNORS, GroupAssignment, Subscription,
                                             cooperative_sticky_assign, get_assignor,
                                             is_cooperative, member_order, range_assign,
                                             roundrobin_assign, subscribed_partitions)


def subs(**members: tuple) -> dict[str, Subscription]:
    """``subs(a=("t0", "t1"))`` -> {"a": Subscription({"t0", "t1"})}."""
    return {name: Subscription(frozenset(topics)) for name, topics in members.items()}


def parts(topic: str, *numbers: int) -> tuple:
    return tuple((topic, n) for n in numbers)


# --- range --------------------------------------------------------------------------------------

def test_range_gives_the_first_members_one_extra_partition():
    result = range_assign({"t": 7}, subs(a=("t",), b=("t",), c=("t",)))
    assert result.target == {"a": parts("t", 0, 1, 2), "b": parts("t", 3, 4), "c": parts("t", 5, 6)}


def test_range_assigns_each_topic_on_its_own_so_the_first_member_gets_every_extra():
    # Kafka's RangeAssignor javadoc: C0, C1 on t0, t1 with 3 partitions each.
    result = range_assign({"t0": 3, "t1": 3}, subs(C0=("t0", "t1"), C1=("t0", "t1")))
    assert result.target == {"C0": parts("t0", 0, 1) + parts("t1", 0, 1),
                             "C1": parts("t0", 2) + parts("t1", 2)}


def test_range_shares_a_topic_only_among_its_subscribers():
    result = range_assign({"t0": 4, "t1": 2}, subs(a=("t0",), b=("t0", "t1"), c=("t1",)))
    assert result.target == {"a": parts("t0", 0, 1), "b": parts("t0", 2, 3) + parts("t1", 0),
                             "c": parts("t1", 1)}


# --- round robin --------------------------------------------------------------------------------

def test_roundrobin_deals_all_partitions_in_turn():
    # Kafka's RoundRobinAssignor javadoc, first example.
    result = roundrobin_assign({"t0": 3, "t1": 3}, subs(C0=("t0", "t1"), C1=("t0", "t1")))
    assert result.target == {"C0": parts("t0", 0, 2) + parts("t1", 1),
                             "C1": parts("t0", 1) + parts("t1", 0, 2)}


def test_roundrobin_skips_members_not_subscribed_to_the_topic():
    # Kafka's RoundRobinAssignor javadoc, second example.
    result = roundrobin_assign({"t0": 1, "t1": 2, "t2": 3},
                               subs(C0=("t0",), C1=("t0", "t1"), C2=("t0", "t1", "t2")))
    assert result.target == {"C0": parts("t0", 0), "C1": parts("t1", 0),
                             "C2": parts("t1", 1) + parts("t2", 0, 1, 2)}


# --- what every assignor shares -----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ASSIGNORS))
def test_more_members_than_partitions_leaves_the_extras_with_nothing(name):
    result = get_assignor(name)({"t": 2}, subs(a=("t",), b=("t",), c=("t",), d=("t",)))
    assert sorted(len(result.target[m]) for m in "abcd") == [0, 0, 1, 1]
    assert set(result.target) == {"a", "b", "c", "d"}


@pytest.mark.parametrize("name", sorted(ASSIGNORS))
def test_topics_missing_from_metadata_and_unsubscribed_topics_are_not_assigned(name):
    result = get_assignor(name)({"t": 2, "other": 3}, subs(a=("t", "nope"), b=("nope",)))
    assert result.target == {"a": parts("t", 0, 1), "b": ()}


@pytest.mark.parametrize("name", sorted(ASSIGNORS))
def test_no_members_gives_an_empty_assignment(name):
    assert get_assignor(name)({"t": 3}, {}).target == {}


def test_static_members_come_first_in_instance_id_order_then_dynamic_by_member_id():
    members = {"m-b": Subscription({"t"}), "m-a": Subscription({"t"}),
               "m-z": Subscription({"t"}, group_instance_id="i-2"),
               "m-y": Subscription({"t"}, group_instance_id="i-1")}
    assert member_order(members) == ["m-y", "m-z", "m-a", "m-b"]
    # So a restarted static member (new member id, same instance id) keeps its range.
    assert range_assign({"t": 4}, members).target["m-y"] == parts("t", 0)


def test_the_registry_knows_kafkas_names_and_refuses_others_with_a_config_error():
    assert set(ASSIGNORS) == {"range", "roundrobin", "cooperative-sticky"}
    assert get_assignor("range") is range_assign
    with pytest.raises(errors.ConfigError, match="unknown assignor 'sticky'.*cooperative-sticky"):
        get_assignor("sticky")
    assert is_cooperative(["cooperative-sticky"])
    assert not is_cooperative(["cooperative-sticky", "range"])  # Kafka's rule: all must be
    assert not is_cooperative([])


# --- cooperative sticky -------------------------------------------------------------------------

def owned(topic: str, *numbers: int, instance: str | None = None, topics=("t",)) -> Subscription:
    return Subscription(frozenset(topics), parts(topic, *numbers), instance)


def test_cooperative_sticky_moves_only_what_must_move_when_a_member_joins():
    result = cooperative_sticky_assign({"t": 6}, {"a": owned("t", 0, 1, 2), "b": owned("t", 3, 4, 5),
                                                  "c": owned("t")})
    assert set(result.target["a"]) < {("t", 0), ("t", 1), ("t", 2)}
    assert set(result.target["b"]) < {("t", 3), ("t", 4), ("t", 5)}
    assert len(result.target["c"]) == 2
    assert len(result.revoked["a"]) == len(result.revoked["b"]) == 1
    # c gets what a and b give up only once they have revoked it: one generation later.
    assert result.pending["c"] == result.target["c"] and result.granted("c") == ()
    assert result.granted("a") == result.target["a"] and result.pending["a"] == ()


def test_cooperative_sticky_gives_a_leavers_partitions_to_the_others_and_revokes_nothing():
    result = cooperative_sticky_assign({"t": 6}, {"a": owned("t", 0, 1), "b": owned("t", 2, 3)})
    assert all(not revoked for revoked in result.revoked.values())
    assert set(result.target["a"]) > {("t", 0), ("t", 1)} and len(result.target["a"]) == 3
    assert set(result.target["b"]) > {("t", 2), ("t", 3)} and len(result.target["b"]) == 3
    assert not result.has_pending()  # nobody owns the leaver's partitions: granted at once


def test_cooperative_sticky_revokes_partitions_of_topics_no_longer_subscribed_or_gone():
    result = cooperative_sticky_assign({"t": 2, "u": 1}, {
        "a": Subscription({"t"}, (("t", 0), ("u", 0), ("t", 7), ("gone", 0)))})
    assert result.target["a"] == parts("t", 0, 1)
    assert result.revoked["a"] == (("gone", 0), ("t", 7), ("u", 0))


def test_cooperative_sticky_settles_a_partition_claimed_twice_on_one_owner():
    result = cooperative_sticky_assign({"t": 2}, {"a": owned("t", 0), "b": owned("t", 0)})
    assert result.target == {"a": parts("t", 0), "b": parts("t", 1)}
    assert result.revoked["b"] == parts("t", 0)
    # "a" keeps it; "b" still consumes it until it revokes, so nobody else gets it yet.
    assert result.pending == {"a": parts("t", 0), "b": ()}


def test_the_members_that_own_the_most_keep_the_larger_shares():
    # 7 partitions over 3 members: shares 3, 2, 2. The one owning 4 keeps 3: one revocation,
    # not two (had it been cut to 2).
    result = cooperative_sticky_assign({"t": 7}, {"a": owned("t", 0), "b": owned("t", 1, 2, 3, 4),
                                                  "c": owned("t", 5, 6)})
    assert [len(result.target[m]) for m in "abc"] == [2, 3, 2]
    assert sum(len(r) for r in result.revoked.values()) == 1


# --- seeded random configurations ---------------------------------------------------------------

CASES = 400


def random_case(rng: random.Random, even: bool) -> tuple[dict[str, int], dict[str, Subscription]]:
    """1-4 topics of 0-9 partitions, 1-9 members, some static; a previous ownership in which
    each partition (and a few that no longer exist) has at most one owner, who may no longer
    subscribe to its topic."""
    partitions = {f"t{i}": rng.randint(0, 9) for i in range(rng.randint(1, 4))}
    names = list(partitions) + (["missing"] if rng.random() < 0.2 else [])
    members = [f"m{rng.randrange(1000):03d}-{i}" for i in range(rng.randint(1, 9))]
    previous: dict[str, list] = {m: [] for m in members}
    for topic, count in partitions.items():
        for partition in range(count + 1):
            if rng.random() < 0.6:
                previous[rng.choice(members)].append((topic, partition))
    subscriptions = {}
    for index, member_id in enumerate(members):
        topics = set(names) if even else set(rng.sample(names, rng.randint(0, len(names))))
        instance = f"i{rng.randrange(100)}-{index}" if rng.random() < 0.3 else None
        subscriptions[member_id] = Subscription(topics, previous[member_id], instance)
    return partitions, subscriptions


def check_partitions_owned_once_by_subscribers(partitions, subscriptions, result: GroupAssignment):
    assert set(result.target) == set(result.revoked) == set(result.pending) == set(subscriptions)
    expected = subscribed_partitions(partitions, subscriptions)
    seen = [tp for member_id in result.target for tp in result.target[member_id]]
    assert sorted(seen) == expected, "each subscribed partition exactly once, nothing else"
    for member_id, mine in result.target.items():
        assert list(mine) == sorted(mine)
        assert all(topic in subscriptions[member_id].topics for topic, _ in mine)


def check_revocations_and_pending_follow_from_ownership(subscriptions, result: GroupAssignment):
    for member_id, subscription in subscriptions.items():
        mine = set(result.target[member_id])
        assert result.revoked[member_id] == tuple(tp for tp in subscription.owned if tp not in mine)
        others = {tp for other, s in subscriptions.items() if other != member_id for tp in s.owned}
        assert result.pending[member_id] == tuple(tp for tp in result.target[member_id] if tp in others)
        # Safety: nothing granted now is still owned by another member.
        assert not set(result.granted(member_id)) & others


def check_sticky_balance(subscriptions, result: GroupAssignment):
    """No partition could move to a subscriber of its topic with two fewer partitions."""
    for member_id, mine in result.target.items():
        for topic, _ in mine:
            for other, subscription in subscriptions.items():
                if topic in subscription.topics:
                    assert len(result.target[other]) >= len(mine) - 1, (member_id, other)


def least_revocations(partitions, subscriptions) -> int:
    """With equal subscriptions: shares of n // m and n // m + 1, the larger ones to the
    members that own the most valid partitions; each keeps min(owned, share)."""
    total = len(subscribed_partitions(partitions, subscriptions))
    share, extra = divmod(total, len(subscriptions))
    valid = sorted((len([tp for tp in s.owned if tp[0] in s.topics and tp[1] < partitions.get(tp[0], 0)])
                    for s in subscriptions.values()), reverse=True)
    return sum(max(0, count - share - (1 if index < extra else 0)) for index, count in enumerate(valid))


@pytest.mark.parametrize("name", sorted(ASSIGNORS))
def test_every_assignor_assigns_every_subscribed_partition_once_to_a_subscriber(name):
    assign = get_assignor(name)
    for seed in range(CASES):
        rng = random.Random(seed)
        partitions, subscriptions = random_case(rng, even=rng.random() < 0.5)
        result = assign(partitions, subscriptions)
        check_partitions_owned_once_by_subscribers(partitions, subscriptions, result)
        check_revocations_and_pending_follow_from_ownership(subscriptions, result)
        # Deterministic: the same input in another order gives the same output.
        shuffled = list(subscriptions.items())
        rng.shuffle(shuffled)
        assert assign(dict(reversed(partitions.items())), dict(shuffled)) == result


def test_range_is_balanced_within_each_topic():
    for seed in range(CASES):
        partitions, subscriptions = random_case(random.Random(seed), even=seed % 2 == 0)
        result = range_assign(partitions, subscriptions)
        for topic in partitions:
            counts = [len([tp for tp in result.target[m] if tp[0] == topic])
                      for m, s in subscriptions.items() if topic in s.topics]
            assert not counts or max(counts) - min(counts) <= 1, (seed, topic, counts)


def test_roundrobin_is_balanced_when_members_subscribe_to_the_same_topics():
    for seed in range(CASES):
        partitions, subscriptions = random_case(random.Random(seed), even=True)
        counts = [len(mine) for mine in roundrobin_assign(partitions, subscriptions).target.values()]
        assert max(counts) - min(counts) <= 1, (seed, counts)


def test_cooperative_sticky_is_balanced_for_any_subscriptions():
    for seed in range(CASES):
        rng = random.Random(seed)
        partitions, subscriptions = random_case(rng, even=rng.random() < 0.3)
        check_sticky_balance(subscriptions, cooperative_sticky_assign(partitions, subscriptions))


def test_cooperative_sticky_revokes_no_more_than_balance_requires_with_equal_subscriptions():
    for seed in range(CASES):
        partitions, subscriptions = random_case(random.Random(seed), even=True)
        result = cooperative_sticky_assign(partitions, subscriptions)
        counts = [len(mine) for mine in result.target.values()]
        assert max(counts) - min(counts) <= 1, (seed, counts)
        valid_revoked = sum(1 for m, s in subscriptions.items() for tp in result.revoked[m]
                            if tp[0] in s.topics and tp[1] < partitions.get(tp[0], 0))
        assert valid_revoked == least_revocations(partitions, subscriptions), seed


def test_cooperative_sticky_keeps_everything_when_the_ownership_is_already_balanced():
    for seed in range(CASES):
        rng = random.Random(seed)
        partitions, subscriptions = random_case(rng, even=rng.random() < 0.5)
        first = cooperative_sticky_assign(partitions, subscriptions)
        again = {m: Subscription(s.topics, first.target[m], s.group_instance_id)
                 for m, s in subscriptions.items()}
        second = cooperative_sticky_assign(partitions, again)
        assert second.target == first.target, seed
        assert not any(second.revoked.values()) and not second.has_pending(), seed


def test_cooperative_sticky_grants_every_pending_partition_within_a_few_generations():
    # Each generation's members own what they were granted in the previous one, as the group
    # state machine records it. Equal subscriptions settle in exactly one more generation;
    # unequal ones are a heuristic, and these seeds settle within two more.
    for seed in range(CASES):
        rng = random.Random(seed)
        even = rng.random() < 0.5
        partitions, current = random_case(rng, even=even)
        for generation in range(1, 5):
            result = cooperative_sticky_assign(partitions, current)
            check_revocations_and_pending_follow_from_ownership(current, result)
            if generation > 1 and not result.has_pending() and not any(result.revoked.values()):
                break
            current = {m: Subscription(s.topics, result.granted(m), s.group_instance_id)
                       for m, s in current.items()}
        else:
            raise AssertionError(f"seed {seed}: still moving partitions after 4 generations")
        assert generation == 2 or not even, (seed, generation)
        assert generation <= 3, (seed, generation)
