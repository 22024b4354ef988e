"""The ring routines of the C core against the pure-Python reference (ring_reference.py),
same cases through both: random interleavings of writes, reads and releases give equal results
and byte-identical rings; what one writes the other reads; corrupted headers and frames give
the same typed errors at the same positions; a payload that can never fit is
RecordTooLargeError and writes nothing."""
from __future__ import annotations

import mmap
import random
import struct

import pytest

from shmbroker import _native, errors
from shmbroker.layout import shm as L
from shmbroker.shm import ring_reference as reference
from shmbroker.shm.ring import init_ring_header

IMPLS = [_native, reference]
IDS = ["native", "reference"]
R = L.RING
OK, FULL = L.RING_STATUS["OK"], L.RING_STATUS["FULL"]


def new_ring(capacity: int = 4096) -> mmap.mmap:
    buf = mmap.mmap(-1, L.ring_region_bytes(capacity))
    init_ring_header(buf, capacity)
    return buf


def u64(buf, off):
    return struct.unpack_from("<Q", buf, off)[0]


def put(buf, fmt, off, *values):
    struct.pack_into(fmt, buf, off, *values)


def same_bytes(x, y) -> bool:
    """Equal rings, apart from the creation time in the header."""
    t = R["created_ns"]
    return x[:t] == y[:t] and x[t + 8:] == y[t + 8:]


class Model:
    """Drives one ring through one implementation the way a producer and a consumer would."""

    def __init__(self, impl, capacity):
        self.impl, self.buf = impl, new_ring(capacity)
        self.position, self.seq = 0, 0

    def write(self, payloads):
        return self.impl.ring_write(self.buf, payloads)

    def read(self, max_bytes):
        nxt, count, data = self.impl.ring_read(self.buf, self.position, self.seq, max_bytes)
        self.position, self.seq = nxt, self.seq + count
        return nxt, count, data

    def release(self):
        self.impl.ring_release(self.buf, self.position)


@pytest.mark.parametrize("seed", range(12))
def test_random_operations_give_identical_results_and_bytes(seed):
    rng = random.Random(seed)
    capacity = rng.choice([4096, 8192, 65536])
    limit = L.payload_bytes_max(capacity)
    a, b = Model(_native, capacity), Model(reference, capacity)
    for _ in range(300):
        op = rng.random()
        if op < 0.5:
            payloads = [rng.randbytes(rng.choice([0, 1, 7, 8, 9, 100, 500, limit // 3, limit]))
                        for _ in range(rng.choice([1, 1, 2, 5]))]
            assert a.write(payloads) == b.write(payloads)
        elif op < 0.8:
            max_bytes = rng.choice([0, 1, 100, 1000, 1 << 20])
            assert a.read(max_bytes) == b.read(max_bytes)
        else:
            a.release()
            b.release()
        assert same_bytes(a.buf, b.buf)
        assert _native.ring_fits(a.buf, 100) == reference.ring_fits(b.buf, 100)


@pytest.mark.parametrize("writer,reader", [(_native, reference), (reference, _native)],
                         ids=["native-to-reference", "reference-to-native"])
def test_what_one_writes_the_other_reads_in_order(writer, reader):
    rng = random.Random(7)
    buf = new_ring(8192)
    sent, got, position, seq = [], [], 0, 0
    for _ in range(400):
        payloads = [rng.randbytes(rng.randrange(0, 700)) for _ in range(rng.randrange(1, 4))]
        status, first, written = writer.ring_write(buf, payloads)
        assert first == len(sent)
        sent.extend(payloads[:written])
        if status == FULL or rng.random() < 0.3:
            position, spans = reader.ring_scan(buf, position, seq)
            got.extend(bytes(buf[o:o + n]) for o, n in spans)
            seq += len(spans)
            reader.ring_release(buf, position)
    position, spans = reader.ring_scan(buf, position, seq)
    got.extend(bytes(buf[o:o + n]) for o, n in spans)
    assert got == sent


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_read_stops_at_max_bytes_but_always_takes_one_frame(impl):
    buf = new_ring(8192)
    impl.ring_write(buf, [b"a" * 100, b"b" * 100, b"c" * 100])
    nxt, count, data = impl.ring_read(buf, 0, 0, 150)
    assert (count, data) == (1, b"a" * 100)
    nxt, count, data = impl.ring_read(buf, nxt, 1, 10)
    assert (count, data) == (1, b"b" * 100)
    nxt2, count, data = impl.ring_read(buf, nxt, 2, 1 << 20, frames_max=5)
    assert (count, data) == (1, b"c" * 100)
    assert impl.ring_read(buf, nxt2, 3) == (nxt2, 0, b"")


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_full_ring_writes_the_prefix_that_fits(impl):
    buf = new_ring(4096)
    status, first, written = impl.ring_write(buf, [b"x" * 1000] * 5)
    assert (status, first, written) == (FULL, 0, 4)  # 4 * 1016 + 8 <= 4096 < 5 * 1016 + 8
    assert impl.ring_write(buf, [b"x" * 1000]) == (FULL, 4, 0)
    assert not impl.ring_fits(buf, 1000)
    nxt, count, _ = impl.ring_read(buf, 0, 0)
    impl.ring_release(buf, nxt)
    assert impl.ring_fits(buf, 1000)
    assert impl.ring_write(buf, [b"y" * 1000]) == (OK, 4, 1)


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_payload_that_can_never_fit_is_record_too_large_and_writes_nothing(impl):
    buf = new_ring(4096)
    before = buf[:]
    limit = L.payload_bytes_max(4096)
    with pytest.raises(errors.RecordTooLargeError):
        impl.ring_write(buf, [b"ok", b"z" * (limit + 1)])
    assert buf[:] == before
    assert impl.ring_write(buf, [b"z" * limit])[0] == OK


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_largest_payload_fits_from_every_position(impl):
    capacity = 4096
    limit = L.payload_bytes_max(capacity)
    for start in range(0, capacity, 8):
        buf = new_ring(capacity)
        put(buf, "<QQQ", R["write_position"], start, 0, 0)
        put(buf, "<Q", R["read_position"], start)
        assert impl.ring_write(buf, [b"m" * limit]) == (OK, 0, 1), start
        nxt, count, data = impl.ring_read(buf, start, 0)
        assert (count, len(data)) == (1, limit)


def corrupt_cases():
    """(name, mutate(buf)) pairs: each leaves a ring both implementations must refuse."""
    return [
        ("bad magic", lambda b: put(b, "<Q", R["magic"], 0x1234)),
        ("bad version", lambda b: put(b, "<I", R["layout_version"], 99)),
        ("bad header bytes", lambda b: put(b, "<I", R["header_bytes"], 64)),
        ("capacity not a power of two", lambda b: put(b, "<Q", R["capacity"], 4095)),
        ("absurd capacity", lambda b: put(b, "<Q", R["capacity"], 1 << 62)),
        ("capacity above the mapping", lambda b: put(b, "<QQ", R["region_bytes"],
                                                     L.RING_DATA_OFFSET + 8192, 8192)),
        ("write position beyond capacity", lambda b: put(b, "<Q", R["write_position"], 8192)),
        ("read position after write", lambda b: put(b, "<Q", R["read_position"], 16)),
        ("misaligned write position", lambda b: put(b, "<Q", R["write_position"], 12)),
    ]


@pytest.mark.parametrize("name,mutate", corrupt_cases(), ids=[c[0] for c in corrupt_cases()])
def test_corrupted_header_is_a_typed_error_in_every_routine(name, mutate):
    results = []
    for impl in IMPLS:
        buf = new_ring(4096)
        mutate(buf)
        calls = [lambda: impl.ring_check(buf), lambda: impl.ring_write(buf, [b"x"]),
                 lambda: impl.ring_read(buf, 0, 0), lambda: impl.ring_scan(buf, 0, 0),
                 lambda: impl.ring_release(buf, 0), lambda: impl.ring_fits(buf, 1)]
        for call in calls:
            with pytest.raises(errors.RingCorruptError) as info:
                call()
            assert isinstance(info.value, errors.RegionHeaderError)
            results.append(info.value.position)
    assert results[:6] == results[6:]


def frame_cases():
    D = L.RING_DATA_OFFSET
    return [
        ("negative length", lambda b: put(b, "<i", D, -5)),
        ("length below header", lambda b: put(b, "<i", D, 8)),
        ("length past the end", lambda b: put(b, "<i", D, 5000)),
        ("unknown type", lambda b: put(b, "<i", D + 4, 7)),
        ("wrong sequence", lambda b: put(b, "<Q", D + 8, 5)),
        ("short padding", lambda b: put(b, "<ii", D, 64, L.FRAME_TYPE_PADDING)),
    ]


@pytest.mark.parametrize("name,mutate", frame_cases(), ids=[c[0] for c in frame_cases()])
def test_corrupted_frame_is_a_typed_error_with_its_position(name, mutate):
    positions = []
    for impl in IMPLS:
        buf = new_ring(4096)
        impl.ring_write(buf, [b"p" * 40, b"q" * 40])
        mutate(buf)
        with pytest.raises(errors.RingCorruptError) as info:
            impl.ring_read(buf, 0, 0)
        positions.append(info.value.position)
    assert positions[0] == positions[1] == 0


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_read_and_release_positions_are_checked(impl):
    buf = new_ring(4096)
    impl.ring_write(buf, [b"a" * 10])
    for bad in (3, 4096 * 4):
        with pytest.raises(errors.RingCorruptError):
            impl.ring_read(buf, bad, 0)
    with pytest.raises(errors.RingCorruptError):
        impl.ring_release(buf, 64)  # beyond write_position
    with pytest.raises(ValueError):
        impl.ring_read(buf, 0, 0, -1)


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_uncommitted_frame_is_invisible(impl):
    """A producer that wrote a frame body but not its length (killed) has published nothing."""
    buf = new_ring(4096)
    impl.ring_write(buf, [b"first"])
    nxt, count, _ = impl.ring_read(buf, 0, 0)
    impl.ring_release(buf, nxt)
    # What a producer killed after copying the payload leaves: body and sequence, length 0.
    at = L.RING_DATA_OFFSET + nxt
    put(buf, "<iiQ", at, 0, L.FRAME_TYPE_DATA, 1)
    buf[at + 16:at + 116] = b"h" * 100
    assert impl.ring_read(buf, nxt, 1) == (nxt, 0, b"")


def test_native_ring_rejects_unaligned_or_readonly_buffers():
    buf = new_ring(4096)
    with pytest.raises((TypeError, BufferError)):
        _native.ring_write(bytes(buf), [b"x"])
    with pytest.raises(ValueError):
        _native.ring_check(memoryview(buf)[8:])


# -- offsets at the commit (decision 0005) -----------------------------------------------------

def new_control(next_offset: int) -> mmap.mmap:
    """Just the control region's words ring_write touches: next_offset and the doorbell."""
    buf = mmap.mmap(-1, L.CONTROL_REGISTRY_OFFSET)
    put(buf, "<Q", L.CONTROL["next_offset"], next_offset)
    return buf


def batches(rng, n: int) -> bytes:
    """n record batches back to back, of random record counts (their base offsets 0)."""
    from shmbroker import records
    return b"".join(records.encode_batch([rng.randbytes(rng.choice([0, 5, 40]))
                                          for _ in range(rng.choice([1, 2, 7]))])
                    for _ in range(n))


def frame_base_offsets(data: bytes) -> list[tuple[int, int]]:
    """(base offset, last offset delta) of every batch in a read's payloads."""
    from shmbroker import records
    out = []
    pos = 0
    while pos < len(data):  # bounded by the data
        h = records.read_header(data, pos)
        out.append((h.base_offset, h.last_offset_delta))
        pos += 12 + h.batch_length
    return out


@pytest.mark.parametrize("seed", range(6))
def test_offsets_taken_at_the_commit_are_the_same_in_c_and_the_reference(seed):
    """Frames of one or more batches, written one or several per call through both: the same
    offsets go into every batch (consecutive across batches, frames and calls, from the
    control region's next_offset), next_offset moves by the same amount, the reservation is
    given back after the commit, and the rings are byte-identical."""
    rng = random.Random(seed)
    start = rng.choice([0, 7, 1 << 40])
    rings = {impl: (new_ring(1 << 16), new_control(start)) for impl in IMPLS}
    expect = start
    for _ in range(40):
        payloads = [batches(rng, rng.choice([1, 1, 3])) for _ in range(rng.choice([1, 2, 4]))]
        results = [impl.ring_write(ring, payloads, control) for impl, (ring, control)
                   in rings.items()]
        assert results[0] == results[1] and results[0][0] == OK
        expect += sum(reference.frame_offsets(p) for p in payloads)
        for ring, control in rings.values():
            assert u64(control, L.CONTROL["next_offset"]) == expect
            assert u64(ring, R["reserved_base"]) == L.RESERVED_NONE
    (ra, _), (rb, _) = rings.values()
    assert same_bytes(ra, rb)
    _, _, data = _native.ring_read(ra, 0, 0, 1 << 24)
    bases = frame_base_offsets(data)
    assert bases[0][0] == start
    for (base, delta), (nxt, _) in zip(bases, bases[1:]):
        assert nxt == base + delta + 1  # no gap, no overlap
    assert bases[-1][0] + bases[-1][1] + 1 == expect


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_a_write_waits_while_next_offset_is_unset_and_changes_nothing(impl):
    ring, control = new_ring(), new_control(L.NEXT_OFFSET_UNSET)
    before = bytes(ring)
    status, _, written = impl.ring_write(ring, [batches(random.Random(1), 1)], control)
    assert (status, written) == (L.RING_STATUS["OFFSETS_UNSET"], 0)
    assert bytes(ring) == before


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_a_payload_shorter_than_a_batch_header_is_refused_with_offsets(impl):
    ring, control = new_ring(), new_control(0)
    with pytest.raises(errors.CorruptRecordError):
        impl.ring_write(ring, [b"x" * 60], control)
    assert u64(control, L.CONTROL["next_offset"]) == 0


@pytest.mark.parametrize("payload", [b"", b"\0" * 61, b"\xff" * 200, b"x" * 70])
def test_frame_offsets_of_garbage_is_the_same_in_c_and_the_reference(payload):
    assert _native.frame_offsets(payload) == reference.frame_offsets(payload) >= 1
