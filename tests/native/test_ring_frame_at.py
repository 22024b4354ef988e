"""A consumer's read of committed ring frames (decision 0005 step 5): ``_native.ring_frame_at``
against its pure-Python reference on the same rings, and the partition's rule for a frame
(``shmb_frame_ok``, the one function drain.c's round calls too) on bad frames."""
from __future__ import annotations

import random
import time
import struct

import pytest
from test_ring_native_vs_reference import batches, new_control, new_ring, put, u64

from shmbroker import _native, records
from shmbroker.config import BATCH_RECORDS_MAX
from shmbroker.layout import record_batch as RB
from shmbroker.layout import shm as L
from shmbroker.shm import ring_reference as reference

S = L.FRAME_AT_STATUS
LIMIT = 1 << 20


def frame_at(impl, ring, control, offset, hint=0, limit=LIMIT):
    return impl.ring_frame_at(ring, control, offset, hint, limit, BATCH_RECORDS_MAX)


def filled(seed: int, start: int, capacity: int = 1 << 14, writes: int = 60):
    """A ring written through the C producer (offsets at the commit), released now and then as
    a partition would, so that frames wrap and padding appears; returns (ring, control, the
    (base, span) of every frame written, in order)."""
    rng = random.Random(seed)
    ring, control = new_ring(capacity), new_control(start)
    frames, position, sequence = [], 0, 0
    for i in range(writes):  # bounded
        payloads = [batches(rng, rng.choice([1, 2])) for _ in range(rng.choice([1, 3]))]
        status, _, written = _native.ring_write(ring, payloads, control)
        if written == 0:
            nxt, count, _ = _native.ring_read(ring, position, sequence, 1 << 30)
            position, sequence = nxt, sequence + count
            _native.ring_release(ring, position)
            continue
        for p in payloads[:written]:
            base = frames[-1][0] + frames[-1][1] if frames else start
            frames.append((base, reference.frame_offsets(p)))
        if rng.random() < 0.3 and i < writes - 5:  # the partition appends, releases some
            nxt, count, _ = _native.ring_read(ring, position, sequence, rng.choice([100, 1 << 30]))
            position, sequence = nxt, sequence + count
            _native.ring_release(ring, position)
    return ring, control, frames, position


@pytest.mark.parametrize("seed", range(8))
def test_every_offset_finds_the_same_frame_in_c_and_the_reference(seed):
    """For every offset around what the ring holds, from the start and from the hint a previous
    call gave: both give the same status, bytes, base, span and hint; a found frame is the one
    that holds the offset, not yet released, and decodes to records at its offsets."""
    start = random.Random(seed).choice([0, 5, 1 << 33])
    ring, control, frames, released = filled(seed, start)
    first_unreleased = None
    hint, hint_from = 0, 0  # a found frame's next_hint serves offsets from its end on
    end = u64(control, L.CONTROL["next_offset"])
    found = 0
    for offset in range(max(0, start - 2), end + 3):
        results = {}
        for impl in (_native, reference):
            for h in (0, hint if offset >= hint_from else 0):
                results.setdefault(impl, set()).add(frame_at(impl, ring, control, offset, h))
        assert results[_native] == results[reference], offset
        assert len(results[_native]) == 1, "the hint changes nothing but the walk's start"
        status, payload, base, span, next_hint = results[_native].pop()
        if status == S["FOUND"]:
            found += 1
            assert (base, span) in frames and base <= offset < base + span
            got = records.decode_records(payload)
            assert [r.offset for r in got] == list(range(base, base + span))
            first_unreleased = base if first_unreleased is None else first_unreleased
            hint, hint_from = next_hint, base + span
        else:
            assert status == S["NONE"] and payload is None
            assert first_unreleased is None or offset >= end, "after the first, all are found"
    assert found > 0 and first_unreleased is not None
    assert found == end - first_unreleased


def committed_one(start: int = 10, payload: bytes | None = None):
    ring, control = new_ring(), new_control(start)
    payload = payload if payload is not None else records.encode_batch([b"a", b"bb", b"ccc"])
    assert _native.ring_write(ring, [payload], control)[0] == L.RING_STATUS["OK"]
    return ring, control


def payload_at(ring) -> int:
    return L.RING_DATA_OFFSET + L.FRAME_HEADER_BYTES


def bad_crc(ring, control):
    ring[payload_at(ring) + RB.HEADER_SIZE + 2] ^= 0xFF


def control_batch(ring, control):
    # The attributes are under the CRC: write a valid control batch instead.
    at = payload_at(ring)
    good = records.encode_batch([b"a", b"bb", b"ccc"], attributes=RB.CONTROL_MASK)
    ring[at + 8:at + len(good)] = good[8:]


def beyond_next_offset(ring, control):
    put(control, "<Q", L.CONTROL["next_offset"], 10)  # the frame holds 10..12


@pytest.mark.parametrize("breaks", [bad_crc, control_batch, beyond_next_offset])
@pytest.mark.parametrize("impl", [_native, reference], ids=["native", "reference"])
def test_a_frame_the_partition_would_refuse_is_refused(impl, breaks):
    ring, control = committed_one()
    breaks(ring, control)
    status, payload, base, span, _ = frame_at(impl, ring, control, 11)
    assert (status, payload, base, span) == (S["REFUSED"], None, 10, 3)


@pytest.mark.parametrize("impl", [_native, reference], ids=["native", "reference"])
def test_a_frame_over_the_topics_limit_is_refused_and_one_within_it_found(impl):
    ring, control = committed_one(payload=records.encode_batch([b"x" * 500]))
    assert frame_at(impl, ring, control, 10, limit=200)[0] == S["REFUSED"]
    assert frame_at(impl, ring, control, 10, limit=600)[0] == S["FOUND"]


@pytest.mark.parametrize("impl", [_native, reference], ids=["native", "reference"])
def test_an_acks_all_ring_and_a_released_frame_are_not_read(impl):
    ring, control = committed_one()
    put(ring, "<I", L.RING["fsync_required"], 1)
    assert frame_at(impl, ring, control, 10)[0] == S["NONE"]
    put(ring, "<I", L.RING["fsync_required"], 0)
    assert frame_at(impl, ring, control, 10)[0] == S["FOUND"]
    nxt, _, _ = _native.ring_read(ring, 0, 0, 1 << 20)
    _native.ring_release(ring, nxt)
    assert frame_at(impl, ring, control, 10)[0] == S["NONE"]


def test_an_uncommitted_frame_is_not_read():
    """A frame whose offsets were reserved but whose length word is not stored yet (the
    producer between reserve and commit) is invisible."""
    ring, control = committed_one()
    struct.pack_into("<i", ring, L.RING_DATA_OFFSET, 0)  # un-commit it
    for impl in (_native, reference):
        assert frame_at(impl, ring, control, 10)[0] == S["NONE"]


@pytest.mark.parametrize("payload", [b"", b"\0" * 61, b"\xff" * 200])
def test_frame_ok_is_the_same_in_c_and_the_reference(payload):
    good = records.encode_batch([b"v"] * 3)
    for p in (payload, good, good + good, good[:-1]):
        assert _native.frame_ok(p, LIMIT, BATCH_RECORDS_MAX) == \
            reference.frame_ok(p, LIMIT, BATCH_RECORDS_MAX)
    assert _native.frame_ok(good, LIMIT, BATCH_RECORDS_MAX) is True
    assert _native.frame_ok(good, LIMIT, 2) is False


# -- ring_take: the checks, the read, the wait and the decode in one call ------------------------

def allow_ring_reads(control, limit=LIMIT):
    """What a partition process that allows ring reads publishes in its control region."""
    put(control, "<I", L.CONTROL["ring_reads"], 1)
    put(control, "<q", L.CONTROL["batch_bytes_max"], limit)


def registry_changes(control) -> int:
    return struct.unpack_from("<I", control, L.CONTROL["registry_changes"])[0]


def take(control, rings, offset, wait_ms=0, seen_hw=0, hints=None, froms=None):
    """ring_take as RingReads.take calls it (the registry as seen now)."""
    hints = hints if hints is not None else [0] * len(rings)
    froms = froms if froms is not None else [0] * len(rings)
    return _native.ring_take(control, rings, hints, froms, offset, registry_changes(control),
                             BATCH_RECORDS_MAX, "t", 3, wait_ms, 0, seen_hw)


def poll(control, rings, offset, wait_ms=0, seen_hw=0, hints=None):
    """ring_take with ring reads allowed, as (status, records, base, span, ring index, next
    hint, commit_seq seen, beyond): what the frames it read were."""
    allow_ring_reads(control)
    hints = list(hints) if hints is not None else [0] * len(rings)
    froms = [0] * len(rings)
    status, got, at, end, seen, beyond = take(control, rings, offset, wait_ms, seen_hw, hints,
                                              froms)
    if status != S["FOUND"]:
        assert (got, end) == (None, -1)
        return status, None, -1, 0, -1, 0, seen, beyond
    index = [i for i, f in enumerate(froms) if f == end]
    assert len(index) == 1, "the found ring's hint_from is the offset after its frames"
    base = got[0].offset
    assert got[at].offset == offset, "at: the record at the offset"
    return status, got, base, end - base, index[0], hints[index[0]], seen, beyond


def test_ring_take_returns_the_records_of_the_frame_any_ring_holds():
    """Two producers' rings on one partition: for every offset, the records ring_take
    returns are those of the frame ring_frame_at finds in whichever ring holds it, and of
    the frames after it in that ring that continue it."""
    rng = random.Random(3)
    control = new_control(0)
    rings = [new_ring(1 << 14), new_ring(1 << 14)]
    for _ in range(20):  # bounded
        ring = rng.choice(rings)
        assert _native.ring_write(ring, [batches(rng, rng.choice([1, 2]))], control)[0] == \
            L.RING_STATUS["OK"]
    end = u64(control, L.CONTROL["next_offset"])
    took_several = False
    for offset in range(end):
        status, got, base, span, index, next_hint, _, _ = poll(control, rings, offset)
        assert status == S["FOUND"]
        # The frame holding the offset, then the frames after it in that ring while they
        # continue it: all in one call.
        expected, at, hint = [], base, 0
        while at < base + span:  # bounded by the span
            want = frame_at(_native, rings[index], control, at, hint)
            assert want[0] == S["FOUND"] and want[2] == at
            expected += records.decode_records(want[1], topic="t", partition=3)
            at, hint = at + want[3], want[4]
        assert at == base + span and hint == next_hint
        assert base <= offset < base + span
        after = frame_at(_native, rings[index], control, at, hint)
        assert after[0] != S["FOUND"], "every continuing frame was taken"
        took_several |= len(expected) > len(records.decode_records(
            frame_at(_native, rings[index], control, base)[1]))
        assert [(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value, r.headers)
                for r in got] == [(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value,
                                   r.headers) for r in expected]
    assert took_several
    status, got, *_, beyond = poll(control, rings, end)
    assert (status, got, beyond) == (S["NONE"], None, 1)


def test_ring_take_sleeps_until_a_commit_and_returns_what_it_committed():
    """Offsets 7..8 were taken (next_offset 9) and nobody committed them yet: a poll at 7
    sleeps on the commit word (and the publish word) until another producer's commit wakes
    it, looks again, and returns; the committed records are there for the poll at 9."""
    import threading
    control, ring = new_control(9), new_ring()
    payload = records.encode_batch([b"late"])
    timer = threading.Timer(0.2, _native.ring_write, (ring, [payload], control))
    timer.start()
    try:
        started = time.monotonic()
        status, _, _, _, _, _, _, beyond = poll(control, [ring], 7, wait_ms=10_000)
        waited = time.monotonic() - started
    finally:
        timer.join()
    assert (status, beyond) == (S["NONE"], 0)
    assert 0.1 < waited < 5, "woken by the commit, not by its timeout"
    assert u64(control, L.CONTROL["commit_waiters"]) & 0xFFFFFFFF == 0
    status, got, base, *_ = poll(control, [ring], 9)
    assert (status, base, [r.value for r in got]) == (S["FOUND"], 9, [b"late"])


def test_ring_take_at_an_offset_nobody_took_sleeps_on_the_commit_word_at_most_a_while():
    """No producer took the offset: only a commit can bring it, so the publish word is not
    watched, and the sleep is cut to RING_POLL_COMMIT_ONLY_MS_MAX (a producer that took it
    and died would have its hole filled by a publish)."""
    control, ring = new_control(5), new_ring()
    started = time.monotonic()
    status, _, _, _, _, _, _, beyond = poll(control, [ring], 5, wait_ms=10_000)
    waited = time.monotonic() - started
    assert (status, beyond) == (S["NONE"], 1)
    assert waited < 5 and waited * 1000 >= _native.RING_POLL_COMMIT_ONLY_MS_MAX * 0.5


def test_ring_take_at_a_taken_offset_is_woken_by_a_publish():
    """Offset 5 was taken (next_offset 9) but no ring holds it (its producer has not
    committed, or died): a publish (the hole filled) wakes the sleep."""
    import threading

    from shmbroker.shm import wake
    control, ring = new_control(9), new_ring()
    seen_hw = 4
    put(control, "<I", L.CONTROL["hw_seq"], seen_hw)

    def publish():
        put(control, "<I", L.CONTROL["hw_seq"], seen_hw + 1)
        wake.wake(control, L.CONTROL["hw_seq"])

    timer = threading.Timer(0.2, publish)
    timer.start()
    try:
        started = time.monotonic()
        status, _, _, _, _, _, _, beyond = poll(control, [ring], 5, wait_ms=10_000,
                                                seen_hw=seen_hw)
        waited = time.monotonic() - started
    finally:
        timer.join()
    assert (status, beyond) == (S["NONE"], 0)
    assert 0.1 < waited < 5


@pytest.mark.parametrize("impl", [_native, reference], ids=["native", "reference"])
def test_a_frame_larger_than_the_copy_limit_is_left_to_the_log(impl):
    big = records.encode_batch([b"b" * L.RING_READ_COPY_BYTES_MAX])
    ring, control = new_ring(1 << 17), new_control(3)
    assert _native.ring_write(ring, [big], control)[0] == L.RING_STATUS["OK"]
    status, payload, base, span, _ = frame_at(impl, ring, control, 3)
    assert (status, payload, base, span) == (S["LARGE"], None, 3, 1)
    assert poll(control, [ring], 3)[0] == S["LARGE"]


def test_ring_take_declines_unless_the_partition_allows_ring_reads_and_the_registry_is_as_seen():
    """RingReads.take's checks, in C: ring reads off, a partition stopped cleanly (what is
    committed from then on is never appended), no limit published, or rings registered or
    gone since the caller looked (it must attach them first): DECLINED, nothing read."""
    control, ring = new_control(0), new_ring()
    assert _native.ring_write(ring, [records.encode_batch([b"a"])], control)[0] == \
        L.RING_STATUS["OK"]
    declined = _native.RING_TAKE_DECLINED
    assert take(control, [ring], 0)[0] == declined  # ring reads not allowed yet
    allow_ring_reads(control)
    assert take(control, [ring], 0)[0] == S["FOUND"]
    put(control, "<I", L.CONTROL["partition_status"], L.PARTITION_STATUS_STOPPED)
    assert take(control, [ring], 0)[0] == declined
    put(control, "<I", L.CONTROL["partition_status"], 0)
    allow_ring_reads(control, limit=0)
    assert take(control, [ring], 0)[0] == declined
    allow_ring_reads(control)
    seen = registry_changes(control)
    put(control, "<I", L.CONTROL["registry_changes"], seen + 1)
    got = _native.ring_take(control, [ring], [0], [0], 0, seen, BATCH_RECORDS_MAX, "t", 3, 0,
                            0, 0)
    assert got == (declined, None, 0, -1, 0, 0)
    assert _native.ring_take(control, [ring], [0], [0], 0, -1, BATCH_RECORDS_MAX, "t", 3, 0, 0,
                             0)[0] == declined  # never looked at the registry
    with pytest.raises(TypeError, match="lists of one length"):
        _native.ring_take(control, [ring], [0], [], 0, seen + 1, BATCH_RECORDS_MAX, "t", 3, 0,
                          0, 0)


def test_ring_take_keeps_each_rings_hint_for_the_offsets_after_what_it_read():
    """A found frame sets its ring's hint (where the next frame starts) and hint_from (the
    offset after it): the next take there starts at the hint; a take below hint_from ignores
    it (a hint only serves offsets from there on). Same records with or without hints."""
    rng = random.Random(11)
    control = new_control(0)
    allow_ring_reads(control)
    rings = [new_ring(1 << 14), new_ring(1 << 14)]
    for _ in range(16):  # bounded
        _native.ring_write(rng.choice(rings), [batches(rng, 1)], control)
    end = u64(control, L.CONTROL["next_offset"])
    hints, froms = [0, 0], [0, 0]
    offset = 0
    while offset < end:  # bounded: every take moves past at least one record
        status, got, at, after, _, _ = take(control, rings, offset, hints=hints, froms=froms)
        assert status == S["FOUND"] and got[at].offset == offset
        assert after in froms and after > offset
        fresh = take(control, rings, offset)  # no hints: the same records
        assert [(r.offset, r.value) for r in fresh[1]] == [(r.offset, r.value) for r in got]
        offset = got[-1].offset + 1
    # A stale hint (it points past the frames below its hint_from) is ignored for those.
    status, got, at, *_ = take(control, rings, 0, hints=hints, froms=froms)
    assert status == S["FOUND"] and got[at].offset == 0


def test_ring_take_does_not_sleep_on_an_offset_the_high_watermark_passed():
    """Offset 5 was taken (next_offset 9), no ring holds it, and the partition published a
    high watermark past it: its frame was released, the log has it. ring_take returns at
    once (no sleep, no count in hw_waiters, which would wake a dozing partition); with the
    high watermark at or below it, it sleeps as before (here: until its timeout)."""
    control, ring = new_control(9), new_ring()
    allow_ring_reads(control)
    seen_hw = 4
    put(control, "<I", L.CONTROL["hw_seq"], seen_hw)
    put(control, "<q", L.CONTROL["high_watermark"], 8)
    started = time.monotonic()
    status, got, _, _, _, beyond = take(control, [ring], 5, wait_ms=3_000, seen_hw=seen_hw)
    assert (status, got, beyond) == (S["NONE"], None, 0)
    assert time.monotonic() - started < 1.0
    put(control, "<q", L.CONTROL["high_watermark"], 5)
    started = time.monotonic()
    assert take(control, [ring], 5, wait_ms=300, seen_hw=seen_hw)[0] == S["NONE"]
    assert time.monotonic() - started >= 0.2
