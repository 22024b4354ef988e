"""A producer's reap in C (``_native.resolve_inflight``, ``Producer._resolve``'s common case)
against the Python reference (``FAST_RESOLVE = False``): the same batches get the same offsets
or the same typed errors and the same batches stay in flight, for random acknowledgements that
include error codes, overwritten completions and batches not yet acknowledged; an in-flight
entry that is not a written batch is a TypeError, not a wrong offset."""
from __future__ import annotations

import collections
import random
from types import SimpleNamespace

import pytest

from shmbroker import _native, errors
from shmbroker.client import producer as producer_module
from shmbroker.client.producer import Producer, _Batch
from shmbroker.shm.ring import Completion

ERROR_CODES = sorted(errors.ERRORS_BY_CODE)


def scenario(seed: int):
    """Batches with consecutive sequences and random record counts, and completions covering
    a prefix of them in random chunks (some with error codes, some starting past their first
    batches: those completions were overwritten)."""
    rng = random.Random(seed)
    first_seq = rng.randrange(0, 10**6)
    counts = [rng.randrange(1, 300) for _ in range(rng.randrange(0, 600))]
    completions, seq, offset = [], first_seq, rng.randrange(0, 10**9)
    acked_through = first_seq + rng.randrange(0, len(counts) + 1)
    while seq < acked_through:  # bounded: seq grows each pass
        last = min(acked_through - 1, seq + rng.randrange(0, 200))
        first = seq + (rng.randrange(1, 3) if rng.random() < 0.05 else 0)  # overwritten
        first = min(first, last)
        code = rng.choice(ERROR_CODES) if rng.random() < 0.08 else 0
        completions.append(Completion(first, last, offset, code))
        offset += sum(counts[seq - first_seq:last + 1 - first_seq]) + rng.randrange(0, 5)
        seq = last + 1
    return first_seq, counts, completions


def build(first_seq: int, counts: list[int], expired: int = 0):
    """``expired``: the first that many batches failed by their delivery timeout already
    (Producer._expire leaves them in flight, failed)."""
    writer = SimpleNamespace(inflight=collections.deque(), topic="t", partition=3,
                             ring=SimpleNamespace(name="/shmb-test-ring"))
    batches = []
    for i, count in enumerate(counts):
        batch = _Batch(None, "t", 3)
        batch.count, batch.sequence, batch.writer = count, first_seq + i, writer
        if i < expired:
            batch.fail(errors.RequestTimeoutError(f"frame {batch.sequence} timed out"))
        writer.inflight.append(batch)
        batches.append(batch)
    return writer, batches


def outcome(writer, batches):
    return ([(b.done, b.base_offset, type(b.error).__name__ if b.error else None,
              str(b.error) if b.error else None) for b in batches],
            [b.sequence for b in writer.inflight])


@pytest.mark.parametrize("seed", range(60))
def test_c_resolve_gives_the_references_offsets_errors_and_leftovers(seed, monkeypatch):
    first_seq, counts, completions = scenario(seed)
    expired = random.Random(-seed).choice([0, 0, 1, len(counts) // 3])
    got = {}
    for fast in (False, True):
        monkeypatch.setattr(producer_module, "FAST_RESOLVE", fast)
        writer, batches = build(first_seq, counts, expired)
        Producer._resolve(None, writer, list(completions))
        got[fast] = outcome(writer, batches)
    assert got[True] == got[False]


def test_batches_that_timed_out_keep_their_error_and_count_towards_the_offsets_after_them(
        monkeypatch):
    monkeypatch.setattr(producer_module, "FAST_RESOLVE", False)  # _resolve: the reference
    for fast in (False, True):
        writer, batches = build(100, [2, 3, 4, 1], expired=2)
        if fast:
            assert _native.resolve_inflight(writer.inflight, [Completion(100, 102, 50, 0)],
                                            _Batch) == 1
        else:
            Producer._resolve(None, writer, [Completion(100, 102, 50, 0)])
        assert [(b.done, b.base_offset, type(b.error).__name__) for b in batches] == \
            [(True, -1, "RequestTimeoutError"), (True, -1, "RequestTimeoutError"),
             (True, 55, "NoneType"), (False, -1, "NoneType")], fast
        assert [b.sequence for b in writer.inflight] == [103]


def test_a_round_of_acknowledged_batches_gets_consecutive_offsets_per_completion():
    writer, batches = build(100, [1, 2, 3, 4, 5])
    handled = _native.resolve_inflight(writer.inflight, [Completion(100, 101, 50, 0),
                                                         Completion(102, 103, 70, 0)], _Batch)
    assert handled == 2
    assert [(b.done, b.base_offset) for b in batches] == \
        [(True, 50), (True, 51), (True, 70), (True, 73), (False, -1)]
    assert [b.sequence for b in writer.inflight] == [104]


def test_c_resolve_stops_at_an_error_code_and_leaves_it_to_the_reference():
    writer, batches = build(7, [2, 2, 2])
    completions = [Completion(7, 7, 0, 0), Completion(8, 9, 2, ERROR_CODES[0])]
    assert _native.resolve_inflight(writer.inflight, completions, _Batch) == 1
    assert batches[0].base_offset == 0 and not batches[1].done
    assert [b.sequence for b in writer.inflight] == [8, 9]


def test_c_resolve_stops_at_an_overwritten_completion():
    writer, batches = build(7, [1, 1, 1])
    assert _native.resolve_inflight(writer.inflight, [Completion(8, 9, 40, 0)], _Batch) == 0
    assert not any(b.done for b in batches) and len(writer.inflight) == 3


def test_an_in_flight_entry_that_is_not_a_written_batch_is_a_type_error():
    writer, batches = build(7, [1, 1])
    writer.inflight.append(object())
    with pytest.raises(TypeError, match="in-flight entry"):
        _native.resolve_inflight(writer.inflight, [Completion(7, 9, 0, 0)], _Batch)
    unwritten = _Batch(None, "t", 3)  # sequence -1: never written
    with pytest.raises(TypeError, match="in-flight entry"):
        _native.resolve_inflight(collections.deque([unwritten]), [Completion(0, 0, 0, 0)],
                                 _Batch)
    with pytest.raises(TypeError):
        _native.resolve_inflight(writer.inflight, (Completion(7, 7, 0, 0),), _Batch)


class _Ring:
    """The part of RingProducer that Producer._reap_some and _reap use: the unread
    completions (here a plain list, as RingProducer keeps them once read)."""

    def __init__(self, completions):
        self.completions = list(completions)
        self.name = "/shmb-test-ring"

    def pending_completions(self):
        return self.completions

    def poll_completions(self):
        out, self.completions = self.completions, []
        return out


@pytest.mark.parametrize("seed", range(60))
def test_resolving_a_few_batches_at_a_time_ends_as_resolving_all_at_once(seed, monkeypatch):
    """Producer._reap_some (at most _REAP_SOME_BATCHES per call, the rest of a completion put
    back in front) called until nothing is left gives the reference's outcome; no call but
    one that meets an error code or an overwritten completion resolves more than the budget."""
    first_seq, counts, completions = scenario(seed)
    monkeypatch.setattr(producer_module, "FAST_RESOLVE", False)
    writer, batches = build(first_seq, counts)
    Producer._resolve(None, writer, list(completions))
    expected = outcome(writer, batches)
    monkeypatch.setattr(producer_module, "FAST_RESOLVE", True)
    writer, batches = build(first_seq, counts)
    writer.ring = _Ring(completions)
    producer = object.__new__(Producer)  # _reap_some and _reap use no producer state
    budget = producer_module._REAP_SOME_BATCHES
    # The completions the reference takes over: an error code, or overwritten (it does not
    # start where the one before it ended). A put-back rest keeps its last_sequence.
    anomalous, expected_first = set(), first_seq
    for c in completions:
        if c.error_code or c.first_sequence != expected_first:
            anomalous.add(c.last_sequence)
        expected_first = c.last_sequence + 1
    calls = within_budget = 0
    for _ in range(len(counts) + len(completions) + 1):  # bounded: each call makes progress
        if not writer.ring.completions:
            break
        errors_ahead = any(c.last_sequence in anomalous for c in writer.ring.completions)
        before = sum(b.done for b in batches)
        producer._reap_some(writer)
        calls += 1
        if not errors_ahead:
            within_budget += 1
            assert sum(b.done for b in batches) - before <= budget
    assert not writer.ring.completions
    assert calls == 0 or within_budget or anomalous
    assert outcome(writer, batches) == expected


def test_a_budget_that_ends_inside_a_completion_says_where_its_rest_starts():
    writer, batches = build(10, [2, 3, 4, 5])
    assert _native.resolve_inflight(writer.inflight, [Completion(10, 13, 100, 0)], _Batch, 2) \
        == (0, 12, 105)
    assert [(b.done, b.base_offset) for b in batches[:3]] == [(True, 100), (True, 102), (False, -1)]
    assert _native.resolve_inflight(writer.inflight, [Completion(12, 13, 105, 0)], _Batch, 5) \
        == (1, -1, -1)
    assert [b.base_offset for b in batches] == [100, 102, 105, 109]
    with pytest.raises(ValueError):
        _native.resolve_inflight(writer.inflight, [], _Batch, 0)


def _twin_class():
    """A class with _Batch's exact __slots__ (what resolve_inflight accepts), made afresh."""
    return type("TwinBatch", (), {"__slots__": _Batch.__slots__})


def _twins(cls, counts):
    inflight = collections.deque()
    for i, count in enumerate(counts):
        batch = cls()
        for name in cls.__slots__:
            setattr(batch, name, None)
        batch.count, batch.sequence, batch.base_offset, batch.done = count, i, -1, False
        inflight.append(batch)
    return inflight


def test_slot_offsets_kept_between_calls_follow_the_class_and_its_changes():
    """resolve_inflight keeps a batch type's slot offsets between calls (batch_slots_cached):
    another type is looked at afresh, and so is the same class once an attribute of it
    changed (its version tag): a slot replaced by a plain class attribute is a TypeError,
    not a write at the old slot's offset."""
    writer, batches = build(0, [1, 1])
    assert _native.resolve_inflight(writer.inflight, [Completion(0, 0, 7, 0)], _Batch) == 1
    twin = _twin_class()
    inflight = _twins(twin, [2, 3])
    assert _native.resolve_inflight(inflight, [Completion(0, 0, 10, 0)], twin) == 1
    assert len(inflight) == 1 and inflight[0].base_offset == -1
    twin.base_offset = -1  # no longer a slot: the cached offsets must not be used
    with pytest.raises(TypeError, match="base_offset must be a __slots__ slot"):
        _native.resolve_inflight(inflight, [Completion(1, 1, 12, 0)], twin)
    assert len(inflight) == 1
    reordered = type("Reordered", (), {"__slots__": tuple(reversed(_Batch.__slots__))})
    with pytest.raises(TypeError, match="__slots__ must be the tuple"):
        _native.resolve_inflight(collections.deque(), [Completion(1, 1, 12, 0)], reordered)
    assert _native.resolve_inflight(writer.inflight, [Completion(1, 1, 8, 0)], _Batch) == 1
    assert [(b.done, b.base_offset) for b in batches] == [(True, 7), (True, 8)]
