"""RingProducer / RingConsumer in one process: frames arrive in order with their sequences;
completions tell the producer each frame's offset; a full ring raises RingFullTimeoutError
after its timeout and nothing is lost; an oversize payload is RecordTooLargeError; the
consumer can take views instead of copies; a consumer attached mid-stream picks up at the
first committed frame; close unlinks; a corrupted ring header is refused on attach."""
from __future__ import annotations

import os
import stat
import struct
import threading
import time

import pytest

from shmbroker import errors, records
from shmbroker.layout import shm as L
from shmbroker.native import _native
from shmbroker.shm import names
from shmbroker.shm.ring import RingConsumer, RingProducer


@pytest.fixture
def pair(prefix):
    name = names.ring_name(prefix, "orders", 0, 0, 1)
    prod = RingProducer.create(name, 8192, partition=0)
    cons = RingConsumer.attach(name)
    yield prod, cons
    cons.close()
    prod.close()


def test_frames_arrive_in_order_and_completions_carry_offsets(pair):
    prod, cons = pair
    batches = [records.encode_batch([f"v{i}".encode()] * (i + 1)) for i in range(5)]
    assert prod.send(batches[0]) == 0
    assert prod.send_many(batches[1:]) == 1
    rb = cons.poll()
    assert (rb.first_sequence, rb.count) == (0, 5) and rb.data == b"".join(batches)
    assert [r.value for r in records.decode_records(rb.data)][:3] == [b"v0", b"v1", b"v1"]
    cons.complete(rb.first_sequence, rb.last_sequence, 1000)
    cons.release(rb.next_position)
    assert prod.wait_acked(4, timeout_ms=10)
    assert prod.poll_completions() == [(0, 4, 1000, 0)]
    assert prod.poll_completions() == []
    assert prod.drained() and cons.poll() is None


def test_full_ring_times_out_with_a_clear_error_and_drops_nothing(pair):
    prod, cons = pair
    payload = b"x" * 1000
    sent = 0
    with pytest.raises(errors.RingFullTimeoutError) as info:
        for _ in range(100):
            prod.send(payload, timeout_ms=50)
            sent += 1
    assert info.value.retriable and "stayed full" in str(info.value)
    assert isinstance(info.value, TimeoutError)
    rb = cons.poll(max_bytes=1 << 20)
    assert rb.count == sent and rb.data == payload * sent


def test_blocked_send_resumes_when_space_is_released(pair):
    prod, cons = pair
    while prod.try_send_many([b"y" * 1000])[2]:
        pass

    def drain():
        time.sleep(0.1)
        rb = cons.poll()
        cons.release(rb.next_position)

    t = threading.Thread(target=drain)
    t.start()
    t0 = time.monotonic()
    prod.send(b"z" * 1000, timeout_ms=5000)
    assert 0.05 < time.monotonic() - t0 < 2.0
    t.join()


def test_oversize_payload_is_record_too_large(pair):
    prod, _ = pair
    with pytest.raises(errors.RecordTooLargeError):
        prod.send(b"o" * (L.payload_bytes_max(8192) + 1))


def test_views_instead_of_copies(pair):
    prod, cons = pair
    prod.send_many([b"abc", b"defg"])
    rb = cons.poll(copy=False)
    assert [bytes(v) for v in rb.data] == [b"abc", b"defg"]
    for v in rb.data:
        v.release()
    cons.release(rb.next_position)


def test_consumer_attached_mid_stream_starts_at_the_first_committed_frame(pair, prefix):
    prod, cons = pair
    for i in range(20):
        prod.send(bytes([i]) * 700)
        rb = cons.poll()
        cons.release(rb.next_position)
    prod.send_many([b"A" * 10, b"B" * 10])
    again = RingConsumer.attach(prod.name)  # e.g. a restarted partition process
    try:
        rb = again.poll()
        assert (rb.first_sequence, rb.data) == (20, b"A" * 10 + b"B" * 10)
    finally:
        again.close()


def test_completions_back_pressure_never_overwrites_unread_acks(pair):
    prod, cons = pair
    for i in range(L.COMPLETIONS_MAX):
        prod.try_send_many([b"c"])  # the raw write: no reaping on the way
        rb = cons.poll()
        cons.complete(rb.first_sequence, rb.last_sequence, i)
        cons.release(rb.next_position)
    prod.try_send_many([b"c"])
    assert cons.completions_full() and cons.poll() is None  # the producer must read acks
    assert [c.base_offset for c in prod.poll_completions()] == list(range(L.COMPLETIONS_MAX))
    assert cons.poll().count == 1


def test_producer_without_acks_never_holds_the_consumer_back(prefix):
    name = names.ring_name(prefix, "orders", 0, 1, 1)
    with RingProducer.create(name, 8192, acks=False) as prod, RingConsumer.attach(name) as cons:
        for i in range(3 * L.COMPLETIONS_MAX):
            prod.try_send_many([b"c"])
            rb = cons.poll()
            cons.complete(rb.first_sequence, rb.last_sequence, i)
            cons.release(rb.next_position)
        assert not cons.completions_full() and prod.poll_completions() == []


def test_blocked_producer_is_nudged_to_read_its_completions(pair):
    """Full ring and all completions unread: the consumer holds the ring back and nudges the
    sleeping producer, which reads them and goes on (no deadlock)."""
    prod, cons = pair
    for i in range(L.COMPLETIONS_MAX):
        prod.try_send_many([b"c"])
        rb = cons.poll()
        cons.complete(rb.first_sequence, rb.last_sequence, i)
        cons.release(rb.next_position)
    while prod.try_send_many([b"f" * 1000])[2]:
        pass
    stop = threading.Event()

    def partition():
        while not stop.is_set():
            rb = cons.poll()
            if rb is None:
                time.sleep(0.01)
                continue
            cons.complete(rb.first_sequence, rb.last_sequence, 0)
            cons.release(rb.next_position)

    t = threading.Thread(target=partition)
    t.start()
    try:
        prod.send_many([b"g" * 1000] * 20, timeout_ms=5000)
    finally:
        stop.set()
        t.join()
    assert len(prod.poll_completions()) >= L.COMPLETIONS_MAX


def test_ring_file_is_owner_only_and_close_unlinks(prefix):
    name = names.ring_name(prefix, "t", 1, 2, 3)
    prod = RingProducer.create(name, 4096)
    assert stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode) == 0o600
    assert prod.close() is True
    assert not os.path.exists(f"/dev/shm/{name}")


@pytest.mark.parametrize("field,fmt,value", [
    ("magic", "<Q", 0xDEAD), ("layout_version", "<I", L.RING_LAYOUT_VERSION + 1),
    ("capacity", "<Q", 1 << 50),
    ("capacity", "<Q", 5000), ("write_position", "<Q", 1 << 20),
])
def test_corrupted_ring_header_is_refused_on_attach(pair, field, fmt, value):
    prod, _ = pair
    struct.pack_into(fmt, prod.buf, L.RING[field], value)
    with pytest.raises(errors.RegionHeaderError):
        RingConsumer.attach(prod.name)
    with pytest.raises(errors.RegionHeaderError):
        prod.send(b"x")
    with pytest.raises(errors.RegionHeaderError):
        pair[1].poll()


# --- rings_wait_quiet: how the producer's background sender learns a ring is its to write ----

def _two_pairs(prefix):
    out = []
    for slot in (0, 1):
        name = names.ring_name(prefix, "quiet", 0, slot, 1)
        prod = RingProducer.create(name, 8192, partition=0, slot=slot)
        out.append((prod, RingConsumer.attach(name)))
    return out


def _drain(cons):
    rb = cons.poll()
    cons.release(rb.next_position)


def test_rings_wait_quiet_names_the_ring_that_went_idle_and_stayed_unwritten(prefix):
    (p0, c0), (p1, c1) = pairs = _two_pairs(prefix)
    try:
        p0.send(records.encode_batch([b"a"]))
        p1.send(records.encode_batch([b"b"]))
        poke = bytearray(1)
        # Both busy (frames not released): nothing is quiet, the wait times out.
        assert _native.rings_wait_quiet([p0.buf, p1.buf], 200, 30, poke) == -1
        _drain(c1)
        assert _native.rings_wait_quiet([p0.buf, p1.buf], 200, 1000, poke) == 1
    finally:
        for prod, cons in pairs:
            cons.close()
            prod.close()


def test_rings_wait_quiet_does_not_report_a_ring_that_keeps_being_written(pair):
    prod, cons = pair
    stop = threading.Event()

    def keep_writing():  # the application, still sending: writes, the consumer drains
        for _ in range(2000):  # bounded
            if stop.is_set():
                return
            prod.send(records.encode_batch([b"x"]))
            _drain(cons)
            time.sleep(0.0001)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        # 20 ms naps: every nap sees a new write, so the ring never counts as quiet.
        assert _native.rings_wait_quiet([prod.buf], 20_000, 150, bytearray(1)) == -1
    finally:
        stop.set()
        writer.join()
    assert _native.rings_wait_quiet([prod.buf], 1000, 1000, bytearray(1)) == 0


def test_rings_wait_quiet_ends_when_poked_and_refuses_a_corrupt_ring(pair):
    prod, _ = pair
    prod.send(records.encode_batch([b"busy"]))  # never drained: never quiet
    poke = bytearray(1)
    threading.Timer(0.05, lambda: poke.__setitem__(0, 1)).start()
    start = time.monotonic()
    assert _native.rings_wait_quiet([prod.buf], 500, 10_000, poke) == -2
    assert time.monotonic() - start < 5  # long before its 10 s timeout
    magic = struct.unpack_from("<Q", prod.buf, 0)[0]
    struct.pack_into("<Q", prod.buf, 0, 0xBAD)
    try:
        with pytest.raises(errors.RingCorruptError):
            _native.rings_wait_quiet([prod.buf], 500, 10, bytearray(1))
    finally:
        struct.pack_into("<Q", prod.buf, 0, magic)
    with pytest.raises(ValueError):
        _native.rings_wait_quiet([], 500, 10, bytearray(1))
