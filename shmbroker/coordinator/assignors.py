"""Kafka's partition assignment strategies, as pure functions.

Plain functions of their arguments: no state, no clock, no I/O; any thread may call them. The
group state machine (``group.py``) calls one per generation, inside the coordinator process:
we assign on the server, not in a leader client (docs/design/groups.md says why).

Every assignor takes

* ``partitions_per_topic``: ``{topic: partition count}``, from the topic registry. A topic a
  member subscribes to but that is missing here gets nothing, as Kafka ignores topics absent
  from metadata;
* ``subscriptions``: ``{member id: Subscription}``: the topics, the partitions the member owns
  now (cooperative members keep consuming them during a rebalance) and its static instance id;

and returns a :class:`GroupAssignment`: each member's ``target``, what it must ``revoke``, and
what of its target another member still owns (``pending``: it gets those one generation later,
after the owner has let them go). Worked example, cooperative-sticky, 4 partitions of ``t``,
A owned all four, B joins::

    target  = {A: (t,0) (t,1)    B: (t,2) (t,3)}
    revoked = {A: (t,2) (t,3)    B: -}
    pending = {A: -              B: (t,2) (t,3)}     -> granted now: A: (t,0) (t,1), B: nothing
    next generation (A no longer owns t/2, t/3):  B is granted (t,2) (t,3)

Partitions are plain ``(topic, partition)`` tuples; ``shmbroker.TopicPartition`` is a
NamedTuple and compares equal to them, but the coordinator does not import the client package.

Determinism: the same arguments give the same result, whatever the order of the mappings.
Members are ordered by Kafka's rule (``AbstractPartitionAssignor.MemberInfo``): static members
first, by instance id, then dynamic members by member id, so that a static member restarted
under a new member id keeps its place. Topics are taken by name, partitions by number.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from .. import errors

TopicPartition = tuple[str, int]
Target = dict[str, list[TopicPartition]]


@dataclass(frozen=True)
class Subscription:
    """What one member brings to an assignment (Kafka's ``ConsumerPartitionAssignor.Subscription``)."""

    topics: frozenset[str]
    #: Partitions the member consumes now and keeps consuming until told to revoke them.
    #: Empty for members of an eager protocol (they revoke everything before they rejoin).
    owned: tuple[TopicPartition, ...] = ()
    group_instance_id: str | None = None

    def __post_init__(self) -> None:
        # Normalised here so that equal subscriptions compare equal however they were built.
        object.__setattr__(self, "topics", frozenset(self.topics))
        object.__setattr__(self, "owned", tuple(sorted(set(self.owned))))


@dataclass(frozen=True)
class GroupAssignment:
    """The result of one assignment. Every member of the input is a key of every mapping."""

    target: Mapping[str, tuple[TopicPartition, ...]]
    revoked: Mapping[str, tuple[TopicPartition, ...]]
    pending: Mapping[str, tuple[TopicPartition, ...]] = field(default_factory=dict)

    def granted(self, member_id: str) -> tuple[TopicPartition, ...]:
        """What the member may consume in this generation: its target less what is pending."""
        pending = set(self.pending.get(member_id, ()))
        return tuple(tp for tp in self.target[member_id] if tp not in pending)

    def has_pending(self) -> bool:
        return any(self.pending.values())


Assignor = Callable[[Mapping[str, int], Mapping[str, Subscription]], GroupAssignment]


def member_order(subscriptions: Mapping[str, Subscription]) -> list[str]:
    """Member ids in Kafka's order: static (by instance id) first, then dynamic (by member id)."""
    def key(member_id: str) -> tuple[int, str]:
        instance_id = subscriptions[member_id].group_instance_id
        return (0, instance_id) if instance_id is not None else (1, member_id)
    return sorted(subscriptions, key=key)


def subscribed_partitions(partitions_per_topic: Mapping[str, int],
                          subscriptions: Mapping[str, Subscription]) -> list[TopicPartition]:
    """Every existing partition of a topic someone subscribes to, sorted."""
    return [(topic, p) for topic in _subscribed_topics(partitions_per_topic, subscriptions)
            for p in range(partitions_per_topic[topic])]


def _subscribed_topics(partitions_per_topic: Mapping[str, int],
                       subscriptions: Mapping[str, Subscription]) -> list[str]:
    wanted = set().union(*(s.topics for s in subscriptions.values())) if subscriptions else set()
    for topic in wanted & partitions_per_topic.keys():
        count = partitions_per_topic[topic]
        assert isinstance(count, int) and count >= 0, (topic, count)
    return sorted(t for t in wanted if partitions_per_topic.get(t, 0) > 0)


def _plan(target: Target, subscriptions: Mapping[str, Subscription]) -> GroupAssignment:
    """Revocations and pending partitions follow from the target and who owns what now."""
    owners: dict[TopicPartition, set[str]] = {}
    for member_id, subscription in subscriptions.items():
        for tp in subscription.owned:
            owners.setdefault(tp, set()).add(member_id)
    result_target, revoked, pending = {}, {}, {}
    for member_id in member_order(subscriptions):
        mine = tuple(sorted(target[member_id]))
        kept = set(mine)
        result_target[member_id] = mine
        revoked[member_id] = tuple(tp for tp in subscriptions[member_id].owned if tp not in kept)
        # Another member still owns it: granting it now would let two members consume it.
        pending[member_id] = tuple(tp for tp in mine if owners.get(tp, set()) - {member_id})
    return GroupAssignment(result_target, revoked, pending)


# --- range ------------------------------------------------------------------------------------

def range_assign(partitions_per_topic: Mapping[str, int],
                 subscriptions: Mapping[str, Subscription]) -> GroupAssignment:
    """Kafka's RangeAssignor: per topic, its subscribers in member order each take a run of
    consecutive partitions; the first ``n % m`` of them take one more. 7 partitions over 3
    members: 0-2, 3-4, 5-6. Balanced per topic only: over several topics the first members
    get the extra partition of every topic (Kafka's known behaviour)."""
    order = member_order(subscriptions)
    target: Target = {member_id: [] for member_id in order}
    for topic in _subscribed_topics(partitions_per_topic, subscriptions):
        members = [m for m in order if topic in subscriptions[m].topics]
        count = partitions_per_topic[topic]
        share, extra = divmod(count, len(members))
        start = 0
        for index, member_id in enumerate(members):
            length = share + (1 if index < extra else 0)
            target[member_id].extend((topic, p) for p in range(start, start + length))
            start += length
        assert start == count, (topic, start, count)
    return _plan(target, subscriptions)


# --- round robin ------------------------------------------------------------------------------

def roundrobin_assign(partitions_per_topic: Mapping[str, int],
                      subscriptions: Mapping[str, Subscription]) -> GroupAssignment:
    """Kafka's RoundRobinAssignor: all partitions sorted by (topic, partition) are dealt to the
    members in member order, skipping a member not subscribed to the partition's topic.
    Balanced (counts differ by at most one) when every member subscribes to the same topics."""
    order = member_order(subscriptions)
    target: Target = {member_id: [] for member_id in order}
    position = 0
    for topic, partition in subscribed_partitions(partitions_per_topic, subscriptions):
        # At most one lap: the topic came from some member's subscription.
        for _ in range(len(order)):
            if topic in subscriptions[order[position % len(order)]].topics:
                break
            position += 1
        else:
            raise AssertionError(f"no subscriber for {topic!r}")
        target[order[position % len(order)]].append((topic, partition))
        position += 1
    return _plan(target, subscriptions)


# --- cooperative sticky -----------------------------------------------------------------------

def cooperative_sticky_assign(partitions_per_topic: Mapping[str, int],
                              subscriptions: Mapping[str, Subscription]) -> GroupAssignment:
    """Kafka's CooperativeStickyAssignor: balanced, and every member keeps as much of what it
    owns as balance allows, so only the partitions that must move pause.

    Balanced means: no partition could move to another subscriber of its topic that has two or
    more partitions fewer than its owner. With equal subscriptions that is "counts differ by
    at most one", and the members that own the most keep the larger shares, so the number of
    revoked partitions is the least possible. With unequal subscriptions a greedy fill and
    then moves from the fullest members reach the balance; stickiness is then a heuristic (as
    in Kafka's general case), and the follow-up generation may move a few partitions again.

    Cost: O(partitions log partitions) with equal subscriptions; with unequal ones
    O(partitions x subscribers) for the fill plus about one move per member (about a second
    at the limits, 4096 partitions and 1024 members, all owned by one member).
    """
    order = member_order(subscriptions)
    topics = _subscribed_topics(partitions_per_topic, subscriptions)
    kept = _valid_ownership(order, subscriptions, partitions_per_topic)
    existing = set(topics)
    if all(subscriptions[m].topics & existing == existing for m in order):
        target = _sticky_even(order, kept, subscribed_partitions(partitions_per_topic, subscriptions))
    else:
        subscribers = {t: [m for m in order if t in subscriptions[m].topics] for t in topics}
        target = _sticky_uneven(order, kept, subscribers, partitions_per_topic)
    return _plan(target, subscriptions)


def _valid_ownership(order: list[str], subscriptions: Mapping[str, Subscription],
                     partitions_per_topic: Mapping[str, int]) -> Target:
    """What each member owns and may keep: the partition exists, the member still subscribes
    to its topic, and no member earlier in member order claims it too (a claim that cannot
    come from our own coordinator's records, but a tie must still have one winner)."""
    claimed: set[TopicPartition] = set()
    kept: Target = {}
    for member_id in order:
        subscription = subscriptions[member_id]
        kept[member_id] = []
        for tp in subscription.owned:
            topic, partition = tp
            if (topic in subscription.topics and 0 <= partition < partitions_per_topic.get(topic, 0)
                    and tp not in claimed):
                claimed.add(tp)
                kept[member_id].append(tp)
    return kept


def _sticky_even(order: list[str], kept: Target, partitions: list[TopicPartition]) -> Target:
    """Every member subscribes to every topic: quotas are known up front."""
    if not order:
        return {}
    share, extra = divmod(len(partitions), len(order))
    rank = {member_id: index for index, member_id in enumerate(order)}
    # The members that own the most get the ``extra`` larger quotas: fewest revocations.
    by_owned = sorted(order, key=lambda m: (-len(kept[m]), rank[m]))
    quota = {m: share + (1 if index < extra else 0) for index, m in enumerate(by_owned)}
    target = {m: kept[m][:quota[m]] for m in order}
    taken = {tp for mine in target.values() for tp in mine}
    free = iter(tp for tp in partitions if tp not in taken)
    for member_id in order:
        for _ in range(quota[member_id] - len(target[member_id])):
            target[member_id].append(next(free))
    assert next(free, None) is None, "a partition was left unassigned"
    return target


def _sticky_uneven(order: list[str], kept: Target, subscribers: dict[str, list[str]],
                   partitions_per_topic: Mapping[str, int]) -> Target:
    """Unequal subscriptions: keep what is valid, give each free partition to its least loaded
    subscriber (partitions with the fewest subscribers first), then move partitions from the
    fullest members until no move can improve the balance."""
    rank = {member_id: index for index, member_id in enumerate(order)}
    # Among equally loaded members, the one with fewer partitions to choose from goes first:
    # the others can still be balanced with partitions it cannot take.
    choice = dict.fromkeys(order, 0)
    for topic, members in subscribers.items():
        for member_id in members:
            choice[member_id] += partitions_per_topic[topic]
    target = {m: list(kept[m]) for m in order}
    taken = {tp for mine in target.values() for tp in mine}
    free = [(t, p) for t in subscribers for p in range(partitions_per_topic[t]) if (t, p) not in taken]
    free.sort(key=lambda tp: (len(subscribers[tp[0]]), tp))
    for tp in free:
        member_id = min(subscribers[tp[0]], key=lambda m: (len(target[m]), choice[m], rank[m]))
        target[member_id].append(tp)
    _balance(target, kept, subscribers, rank)
    return target


def _balance(target: Target, kept: Target, subscribers: dict[str, list[str]],
             rank: dict[str, int]) -> None:
    """Move partitions from a member to a subscriber of their topic that has at least two
    fewer, half the difference at a time. Each single partition moved lowers the sum of squared
    counts by at least 2, so fewer than (partitions ** 2) / 2 moves can happen: the loop is
    bounded by that (in practice a few per member)."""
    owned = {m: set(kept[m]) for m in target}
    topics_of: dict[str, set[str]] = {m: set() for m in target}
    for topic, members in subscribers.items():
        for member_id in members:
            topics_of[member_id].add(topic)
    total = sum(len(mine) for mine in target.values())
    for _ in range(total * total // 2 + 1):
        move = _find_move(target, owned, subscribers, topics_of, rank)
        if move is None:
            return
        giver, taker, moved = move
        gone = set(moved)
        target[giver] = [tp for tp in target[giver] if tp not in gone]
        target[taker].extend(moved)
    raise AssertionError("balancing did not converge within its bound")


def _find_move(target: Target, owned: dict[str, set[TopicPartition]],
               subscribers: dict[str, list[str]], topics_of: dict[str, set[str]],
               rank: dict[str, int]) -> tuple[str, str, list[TopicPartition]] | None:
    lightest: dict[str, str] = {}  # per topic, computed only for the topics looked at
    fewest = min(len(mine) for mine in target.values())
    for _, _, giver in sorted((-len(mine), rank[m], m) for m, mine in target.items()):
        count = len(target[giver])
        if count - 2 < fewest:
            return None  # sorted by count: no member further down can give either
        # What the giver did not own before costs nothing to move; give that away first.
        preferred = sorted(target[giver], key=lambda tp: (tp in owned[giver], tp))
        for topic in dict.fromkeys(tp[0] for tp in preferred):
            if topic not in lightest:
                lightest[topic] = min(subscribers[topic], key=lambda m: (len(target[m]), rank[m]))
            taker = lightest[topic]
            gap = count - len(target[taker])
            if gap >= 2:
                movable = [tp for tp in preferred if tp[0] in topics_of[taker]]
                return giver, taker, movable[:gap // 2]
    return None


# --- the registry -----------------------------------------------------------------------------

#: Protocol name (Kafka's ``partition.assignment.strategy`` names) -> assignor.
ASSIGNORS: Mapping[str, Assignor] = MappingProxyType({
    "range": range_assign,
    "roundrobin": roundrobin_assign,
    "cooperative-sticky": cooperative_sticky_assign,
})
#: Assignors whose members keep consuming what they own while the group rebalances (Kafka's
#: COOPERATIVE rebalance protocol); the others are EAGER: a member revokes all before it rejoins.
COOPERATIVE_ASSIGNORS = frozenset({"cooperative-sticky"})


def get_assignor(name: str) -> Assignor:
    """The assignor of that protocol name; ConfigError naming the known ones otherwise."""
    try:
        return ASSIGNORS[name]
    except (KeyError, TypeError):
        raise errors.ConfigError(
            f"unknown assignor {name!r}; known: {', '.join(sorted(ASSIGNORS))}") from None


def is_cooperative(protocols: Iterable[str]) -> bool:
    """Whether a member offering these assignors follows the cooperative protocol. Kafka's
    rule: only if every assignor it offers is cooperative, since it cannot know in advance
    which one the group will choose."""
    protocols = list(protocols)
    return bool(protocols) and all(name in COOPERATIVE_ASSIGNORS for name in protocols)
