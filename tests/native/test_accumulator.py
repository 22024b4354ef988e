"""The producer's record accumulator (C, ``_native.RecordAccumulator``) against the pure-Python
encoder (records/reference.py): records appended one by one and encoded give byte for byte
the batch the reference encodes from the same records and timestamps; the size limit is exact
(a record that does not fit leaves the batch unchanged); bad arguments raise typed errors and
change nothing; a batch written into a ring is the same bytes, published as one frame."""
from __future__ import annotations

import mmap
import random
import time

import pytest

from shmbroker import _native, errors
from shmbroker.layout import record_batch as RB
from shmbroker.layout import shm as L
from shmbroker.records import reference
from shmbroker.shm.ring import init_ring_header

OK, FULL = L.RING_STATUS["OK"], L.RING_STATUS["FULL"]


def random_record(rng: random.Random):
    value = rng.choice([None, b"", rng.randbytes(rng.randrange(1, 300)),
                        bytearray(rng.randbytes(rng.randrange(1, 40))),
                        memoryview(rng.randbytes(rng.randrange(200, 2000)))])
    key = rng.choice([None, b"", rng.randbytes(rng.randrange(1, 20)),
                      bytearray(rng.randbytes(5))])
    headers = rng.choice([None, [], [(f"h{j}", rng.choice([None, rng.randbytes(rng.randrange(0, 9))]))
                                     for j in range(rng.randrange(1, 4))]])
    timestamp = rng.choice([rng.randrange(-10**6, 10**13), 1_700_000_000_000 + rng.randrange(-5, 5)])
    return value, key, headers, timestamp


def as_bytes(x):
    return None if x is None else bytes(x)


@pytest.mark.parametrize("seed", range(40))
def test_records_appended_one_by_one_encode_as_the_reference_encodes_them(seed):
    rng = random.Random(seed)
    acc = _native.RecordAccumulator(1 << 22)
    recs = [random_record(rng) for _ in range(rng.randrange(1, 60))]
    for i, (value, key, headers, ts) in enumerate(recs):
        assert acc.append(value, key, headers, ts) == i
    assert acc.count == len(recs)
    producer_id, base_sequence = rng.randrange(0, 2**40), rng.randrange(0, 2**31)
    got = acc.encode(producer_id, 0, base_sequence)
    want = reference.encode_batch([as_bytes(v) for v, _, _, _ in recs],
                                  [as_bytes(k) for _, k, _, _ in recs],
                                  [h or [] for _, _, h, _ in recs], [t for *_, t in recs],
                                  producer_id=producer_id, producer_epoch=0,
                                  base_sequence=base_sequence)
    assert got == want
    assert acc.nbytes == 0 and acc.count == 0  # encode empties it
    # and what was encoded scans as one valid batch with every record
    valid_bytes, status, _, batches = _native.scan_batches(got, verify_crc=True,
                                                           verify_records=True)
    assert (valid_bytes, status, len(batches)) == (len(got), 0, 1)
    assert batches[0][4] == len(recs)


def test_records_without_a_timestamp_get_the_time_of_the_append():
    acc = _native.RecordAccumulator(1 << 16)
    before = time.time_ns() // 1_000_000
    acc.append(b"a")
    acc.append(b"b", b"k")
    after = time.time_ns() // 1_000_000
    records = _native.decode_records(acc.encode(-1, -1, -1))
    assert [r.value for r in records] == [b"a", b"b"] and records[1].key == b"k"
    assert all(before <= r.timestamp <= after for r in records)


def test_the_size_limit_is_exact_and_a_refused_record_changes_nothing():
    value = b"v" * 100
    probe = _native.RecordAccumulator(1 << 16)
    probe.append(value, None, None, 0)
    one = probe.last_record_bytes
    assert one == probe.nbytes
    acc = _native.RecordAccumulator(3 * one)
    assert [acc.append(value, None, None, 0) for _ in range(3)] == [0, 1, 2]
    assert acc.nbytes == 3 * one
    before = acc.encode(1, 0, 0)
    for _ in range(3):
        acc.append(value, None, None, 0)
    assert acc.append(value, None, None, 0) == -1  # full: write these first
    assert acc.count == 3 and acc.encode(1, 0, 0) == before
    assert acc.append(b"x" * (3 * one), None, None, 0) == -2  # fits in no batch
    assert acc.last_record_bytes > 3 * one and acc.count == 0


def test_a_batch_is_full_at_its_target_and_a_larger_record_goes_alone_up_to_the_max():
    value = b"v" * 100
    probe = _native.RecordAccumulator(1 << 16)
    probe.append(value, None, None, 0)
    one = probe.last_record_bytes
    acc = _native.RecordAccumulator(10 * one, records_bytes_target=2 * one)
    assert (acc.records_bytes_target, acc.records_bytes_max) == (2 * one, 10 * one)
    assert [acc.append(value, None, None, 0) for _ in range(3)] == [0, 1, -1]  # full at 2
    acc.clear()
    big = b"b" * (5 * one)
    assert acc.append(big, None, None, 0) == 0  # past the target, alone in an empty batch
    assert acc.append(value, None, None, 0) == -1  # and nothing joins it
    assert [r.value for r in _native.decode_records(acc.encode(1, 0, 0))] == [big]
    assert acc.append(value, None, None, 0) == 0
    assert acc.append(big, None, None, 0) == -1  # beside a record: write that one first
    assert acc.append(b"x" * (10 * one), None, None, 0) == -2  # past the max: no batch
    assert acc.count == 1


def test_the_target_defaults_to_the_max_and_may_not_exceed_it():
    assert _native.RecordAccumulator(4096).records_bytes_target == 4096
    with pytest.raises(ValueError, match="records_bytes_target"):
        _native.RecordAccumulator(4096, records_bytes_target=4097)
    with pytest.raises(ValueError, match="records_bytes_target"):
        _native.RecordAccumulator(4096, records_bytes_target=-1)


@pytest.mark.parametrize("args, error, words", [
    ((7,), TypeError, "value must be bytes-like or None, got int"),
    ((b"v", "key"), TypeError, "key must be bytes-like or None, got str"),
    ((b"v", None, [("h", 3)]), TypeError, "header value must be bytes-like"),
    ((b"v", None, [("h",)]), TypeError, "headers[0] must be a (key, value) pair"),
    ((b"v", None, 5), TypeError, "headers must be a sequence"),
    ((b"v", None, None, True), TypeError, "timestamp must be an int (ms), got True"),
    ((b"v", None, None, 1.5), TypeError, "timestamp must be an int (ms)"),
    ((b"v", None, None, 2**63), ValueError, "outside int64"),
    ((b"v", None, None, -2**63), ValueError, "must be >= 0"),
    ((b"v", None, None, -1), ValueError, "must be >= 0 (ms since the epoch) or None"),
])
def test_bad_arguments_raise_typed_errors_and_change_nothing(args, error, words):
    acc = _native.RecordAccumulator(1 << 16)
    acc.append(b"first", None, None, 2**62)
    with pytest.raises(error) as info:
        acc.append(*args)
    assert words in str(info.value)
    assert acc.count == 1
    assert _native.decode_records(acc.encode(-1, -1, -1))[0].value == b"first"


def test_a_batch_written_to_a_ring_is_one_frame_of_the_same_bytes_and_full_keeps_it():
    capacity = 4096
    ring = mmap.mmap(-1, L.ring_region_bytes(capacity))
    init_ring_header(ring, capacity)
    acc = _native.RecordAccumulator(1 << 16)
    twin = _native.RecordAccumulator(1 << 16)
    for i in range(5):
        acc.append(b"r%d" % i, None, None, 1000 + i)
        twin.append(b"r%d" % i, None, None, 1000 + i)
    status, seq, write_position = acc.write_ring(ring, None, 9, 0, 0)
    assert (status, seq) == (OK, 0) and acc.count == 0
    assert write_position == _native.atomic_load_u64(ring, L.RING["write_position"])
    nxt, count, data = _native.ring_read(ring, 0, 0, 1 << 20)
    assert count == 1 and data == twin.encode(9, 0, 0)
    assert nxt == write_position
    # fill the ring until a batch no longer fits: RING_FULL, the records stay
    big = b"x" * 1500
    statuses = []
    for _ in range(4):  # bounded: the ring holds at most two of these
        acc.append(big, None, None, 0)
        statuses.append(acc.write_ring(ring, None, 9, 0, 1)[0])
        if statuses[-1] == FULL:
            break
    assert statuses[-1] == FULL and acc.count == 1
    assert RB.HEADER_SIZE + acc.nbytes > len(big)


def test_writing_an_empty_accumulator_or_to_a_corrupt_ring_is_an_error():
    ring = mmap.mmap(-1, L.ring_region_bytes(4096))
    init_ring_header(ring, 4096)
    acc = _native.RecordAccumulator(1 << 16)
    with pytest.raises(ValueError, match="no records"):
        acc.write_ring(ring, None, 1, 0, 0)
    acc.append(b"v")
    ring[0:8] = b"\0" * 8  # the magic
    with pytest.raises(errors.RingCorruptError):
        acc.write_ring(ring, None, 1, 0, 0)
    assert acc.count == 1


class Future(_native.FutureBase):
    __slots__ = ()


def test_with_a_future_type_append_makes_futures_of_the_current_batch_and_none_when_full():
    acc = _native.RecordAccumulator(300, Future)
    first, second = object(), object()
    acc.batch = first
    f0, f1 = acc.append(b"a" * 100), acc.append(b"b" * 100)
    assert type(f0) is Future and (f0._batch, f0._index, f1._batch, f1._index) == (first, 0, first, 1)
    assert acc.append(b"c" * 100) is None and acc.count == 2  # full: nothing changed
    assert acc.append(b"d" * 400) is None and acc.last_record_bytes > 300  # too large
    acc.encode(-1, -1, -1)
    acc.batch = second
    assert acc.append(b"e")._batch is second
    with pytest.raises(TypeError, match="FutureBase"):
        _native.RecordAccumulator(300, int)


def test_write_due_says_whether_the_bound_ring_is_idle_linger_and_records_max_permitting():
    capacity = 1 << 16
    ring = mmap.mmap(-1, L.ring_region_bytes(capacity))
    init_ring_header(ring, capacity)
    acc = _native.RecordAccumulator(1 << 14, Future, 0, 1000)
    acc.append(b"x")
    assert not acc.write_due  # not bound: only records_max decides
    acc.bind(ring)
    acc.append(b"x")
    assert acc.write_due  # idle ring
    assert acc.write_ring(ring, None, 1, 0, 0)[0] == OK and not acc.write_due
    acc.append(b"y")
    assert not acc.write_due  # the frame written is not taken yet: the ring is busy
    _native.ring_release(ring, _native.atomic_load_u64(ring, L.RING["write_position"]))
    acc.append(b"z")
    assert acc.write_due  # taken: idle again
    acc.clear()
    lingering = _native.RecordAccumulator(1 << 14, Future, 200, 3)
    lingering.bind(ring)
    lingering.append(b"1")
    assert not lingering.write_due  # idle, but linger_ms has not passed
    assert abs(lingering.first_ms - time.monotonic() * 1000) < 100
    lingering.append(b"2")
    assert not lingering.write_due
    lingering.append(b"3")
    assert lingering.write_due  # records_max reached
    lingering.clear()
    lingering.append(b"4")
    time.sleep(0.25)
    lingering.append(b"5")
    assert lingering.write_due  # linger_ms passed since the first record


def test_a_sparse_batch_is_due_beside_frames_in_flight_up_to_inflight_max():
    # Producer docs, "When a batch is written": a batch's first record, appended at least
    # sparse_gap_us after the record before it, is written at once though the partition has
    # not taken the frames before it, while fewer than inflight_max frames are
    # unacknowledged and the ring is less than a quarter full.
    import struct
    capacity = 1 << 16
    ring = mmap.mmap(-1, L.ring_region_bytes(capacity))
    init_ring_header(ring, capacity)

    def ack_all():
        struct.pack_into("<Q", ring, L.RING["acked_sequence"],
                         _native.atomic_load_u64(ring, L.RING["next_sequence"]))

    acc = _native.RecordAccumulator(1 << 15, Future, 0, 1000, 2000, 2)  # 2 ms, 2 in flight
    acc.bind(ring)
    acc.append(b"a")
    assert acc.write_due  # idle ring
    assert acc.write_ring(ring, None, 1, 0, 0)[0] == OK
    acc.append(b"b")
    assert not acc.write_due  # dense: the record before came less than 2 ms earlier
    time.sleep(0.005)
    acc.append(b"c")
    assert not acc.write_due  # sparse, but not the batch's first record: it batches
    acc.clear()
    time.sleep(0.005)
    acc.append(b"d")
    assert acc.write_due  # a first record, 5 ms after the one before, 1 frame in flight
    assert acc.write_ring(ring, None, 1, 0, 0)[0] == OK
    time.sleep(0.005)
    acc.append(b"e")
    assert not acc.write_due  # 2 frames unacknowledged: inflight_max
    acc.clear()
    ack_all()
    time.sleep(0.005)
    acc.append(b"f")
    assert acc.write_due  # acknowledged (the ring is still not idle: nothing released)
    acc.clear()
    acc.append(b"g" * (capacity // 4))
    assert not acc.write_due  # dense (right after f)
    assert acc.write_ring(ring, None, 1, 0, 0)[0] == OK
    ack_all()
    time.sleep(0.005)
    acc.append(b"h")
    assert not acc.write_due  # a quarter of the ring is still unread: batch behind it
    acc.clear()
    _native.ring_release(ring, _native.atomic_load_u64(ring, L.RING["write_position"]))
    plain = _native.RecordAccumulator(1 << 15, Future, 0, 1000)  # inflight_max 0: idle only
    plain.bind(ring)
    plain.append(b"i")
    assert plain.write_ring(ring, None, 1, 0, 0)[0] == OK
    time.sleep(0.005)
    plain.append(b"j")
    assert not plain.write_due
    plain.clear()
    for bad in ({"sparse_gap_us": -1}, {"inflight_max": -1}):
        with pytest.raises(ValueError, match="sparse_gap_us"):
            _native.RecordAccumulator(1 << 10, Future, **bad)


def test_a_bound_ring_cannot_be_unmapped_until_unbound():
    ring = mmap.mmap(-1, L.ring_region_bytes(4096))
    init_ring_header(ring, 4096)
    acc = _native.RecordAccumulator(1 << 10, Future)
    acc.bind(ring)
    with pytest.raises(BufferError):
        ring.close()  # a stale pointer into an unmapped ring would crash; this refuses
    acc.unbind()
    ring.close()
    with pytest.raises(ValueError):
        acc.bind(bytearray(16))
