"""A caught-up consumer reads in one C call (``_native.tail_read``); the Python read
(``LogReader.read`` + ``decode_records``) is the reference it must agree with, byte for byte,
and the path it must fall back to whenever anything is unusual (other segment, corrupt or
truncated bytes, a hint that does not match)."""
from __future__ import annotations

import os
import random

import pytest
from fake_partitions import FakePartitions

import shmbroker.client.consumer as consumer_module
from shmbroker import Consumer, errors, records
from shmbroker.coordinator.topics import partition_dir
from shmbroker.log.reader import LogReader
from shmbroker.native import _native


@pytest.fixture
def parts(data_dir):
    fake = FakePartitions(data_dir)
    yield fake
    fake.close()


def _fields(rs) -> list:
    return [(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value, r.headers) for r in rs]


def _mixed_batch(rng: random.Random, start: int) -> tuple[list, list, list]:
    n = rng.randint(1, 6)
    values = [None if rng.random() < 0.1 else os.urandom(rng.choice((0, 7, 100, 3000)))
              for _ in range(n)]
    keys = [None if rng.random() < 0.5 else f"k{start + i}".encode() for i in range(n)]
    headers = [None if rng.random() < 0.5 else [("h", b"%d" % (start + i)), ("n", None)]
               for i in range(n)]
    return values, keys, headers


class _CountingNative:
    """The real extension, with the statuses tail_read returned counted (an observer: every
    call goes to the C function unchanged)."""

    def __init__(self):
        self.tail_statuses: list[int] = []

    def tail_read(self, *args):
        result = _native.tail_read(*args)
        self.tail_statuses.append(result[0])
        return result

    def __getattr__(self, name):
        return getattr(_native, name)


def _tail(reader: LogReader, control, offset: int, max_bytes: int = 1 << 20):
    segment = reader.last_segment
    return _native.tail_read(control.buf, segment.map, segment.base_offset, offset,
                             segment.hint_position, segment.checked_end, segment.fd, max_bytes,
                             True, "t", 0)


@pytest.mark.parametrize("mode", ["tail", "python"])
def test_a_tailing_consumer_gets_the_same_records_either_way(parts, data_dir, monkeypatch,
                                                             mode):
    monkeypatch.setattr(consumer_module, "TAIL_READ", mode == "tail")
    counting = _CountingNative()
    monkeypatch.setattr(consumer_module, "_native", counting)
    parts.create_topic("t", 1, segment_bytes=8192)  # rolls every few batches
    rng = random.Random(7)
    consumer = Consumer("t", broker=data_dir, auto_offset_reset="earliest",
                        fetch_max_bytes=5000)
    expected, got = [], []
    try:
        for _ in range(150):  # bounded
            values, keys, headers = _mixed_batch(rng, len(expected))
            info = parts.append("t", 0, values, keys=keys, headers=headers)
            expected += [(info.base_offset + i, k, v, tuple(h or ()))
                         for i, (k, v, h) in enumerate(zip(keys, values, headers))]
            for _ in range(3):  # bounded: catch up, with small max_records sometimes
                got += consumer.poll(timeout_ms=0, max_records=rng.choice((1, 2, 500)))
        for _ in range(1000):  # bounded: one fetch of fetch_max_bytes per poll
            more = consumer.poll(timeout_ms=0)
            if not more:
                break
            got += more
    finally:
        consumer.close()
    assert len(parts.logs[("t", 0)].segments) > 10
    assert [(r.offset, r.key, r.value, tuple(r.headers)) for r in got] == expected
    assert all(r.topic == "t" and r.partition == 0 for r in got)
    if mode == "tail":  # most reads took the one-call path; rolls and the start did not
        assert counting.tail_statuses.count(_native.TAIL_RECORDS) > 50
        assert _native.TAIL_DECLINED in counting.tail_statuses
    else:
        assert counting.tail_statuses == []


def test_tail_read_agrees_with_the_python_read_and_declines_what_it_does_not_cover(parts):
    parts.create_topic("t", 1, segment_bytes=1 << 20)
    control = parts.controls[("t", 0)]
    directory = partition_dir(parts.data_dir, "t", 0)
    reader = LogReader(directory)
    rng = random.Random(3)
    try:
        parts.append("t", 0, [b"first"])
        state = control.read_state()
        piece = reader.read(0, 1 << 20, state)  # the Python read leaves the hint at offset 1
        assert reader.last_segment.hint_offset == 1
        position = 1
        reads = 0
        for _ in range(60):  # bounded
            assert _tail(reader, control, position)[0] == _native.TAIL_NOTHING
            values, keys, headers = _mixed_batch(rng, position)
            for _ in range(rng.randint(1, 3)):
                parts.append("t", 0, values, keys=keys, headers=headers)
            max_bytes = rng.choice((1, 200, 1 << 20))
            for _ in range(4):  # bounded: at least one batch per read, at most 3 appended
                status, hw_seq, hw, got, next_position, next_offset, checked_end, nbytes = \
                    _tail(reader, control, position, max_bytes)
                if position == parts.logs[("t", 0)].high_watermark:
                    assert status == _native.TAIL_NOTHING and hw == position
                    break
                assert status == _native.TAIL_RECORDS
                reads += 1
                assert hw == parts.logs[("t", 0)].high_watermark
                assert hw_seq == control.hw_seq
                with LogReader(directory) as fresh:  # the reference, from nothing cached
                    piece = fresh.read(position, max_bytes, control.read_state())
                    want = records.decode_records(piece.data, True, "t", 0)
                assert _fields(got) == _fields(want) and got[0].offset == position
                assert nbytes == piece.length
                assert next_position == piece.file_position + piece.length
                assert next_offset == piece.last_offset + 1 == got[-1].offset + 1
                segment = reader.last_segment
                segment.hint_position, segment.hint_offset = next_position, next_offset
                segment.checked_end = checked_end
                position = next_offset
        assert reads >= 60
        # A hint that does not point at ``offset``'s batch: declined, nothing touched.
        parts.append("t", 0, [b"x", b"y"])  # offset position + 1 is inside this batch
        assert _tail(reader, control, position + 1)[0] == _native.TAIL_DECLINED
        # Another segment is active (a roll): declined; the Python read follows the roll.
        for _ in range(2):  # 2 x 700 KB in 1 MiB segments: the second one rolls
            parts.append("t", 0, [b"z" * 700_000])
        assert len(parts.logs[("t", 0)].segments) == 2
        assert _tail(reader, control, position)[0] == _native.TAIL_DECLINED
    finally:
        reader.close()


@pytest.fixture(params=["tail", "python"])
def caught_up(request, parts, data_dir, monkeypatch):
    """A consumer that has read the one record of topic "t", with either read path."""
    monkeypatch.setattr(consumer_module, "TAIL_READ", request.param == "tail")
    parts.create_topic("t", 1)
    parts.append("t", 0, [b"a" * 50])
    consumer = Consumer("t", broker=data_dir, auto_offset_reset="earliest")
    assert [r.value for r in consumer.poll(timeout_ms=1000)] == [b"a" * 50]
    yield consumer, parts.logs[("t", 0)]
    consumer.close()


def test_a_corrupt_byte_after_catching_up_is_a_crc_error_either_way(parts, caught_up):
    consumer, log = caught_up
    end = log.active_segment.size
    parts.append("t", 0, [b"b" * 50])
    with open(log.active_segment.path, "r+b") as f:  # one value byte of the new batch
        f.seek(log.active_segment.size - 10)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert end < log.active_segment.size
    with pytest.raises(errors.CrcMismatchError):
        consumer.poll(timeout_ms=0)


def test_a_segment_shorter_than_published_is_an_error_not_a_sigbus(parts, caught_up):
    consumer, log = caught_up
    caught_up_at = log.active_segment.size
    parts.append("t", 0, [b"b" * 5000])
    # Someone else truncates the file below what the partition published: the mapping past
    # the file's end must never be touched (SIGBUS would kill the consumer).
    os.truncate(log.active_segment.path, caught_up_at + 100)
    with pytest.raises(errors.CorruptSegmentError, match="shorter than"):
        consumer.poll(timeout_ms=0)


class _WaitObserver(_CountingNative):
    """The real extension; records (argument count, wait_ms, status) of each tail_read."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, int, int]] = []

    def tail_read(self, *args):
        result = _native.tail_read(*args)
        self.calls.append((len(args), args[11] if len(args) > 11 else 0, result[0]))
        return result


@pytest.mark.parametrize("mode", ["tail", "python"])
def test_a_caught_up_poll_is_woken_by_the_publish_and_returns_its_records(
        parts, data_dir, monkeypatch, mode):
    """A blocking poll of one caught-up partition sleeps in the same C call that then reads
    (tail mode): the publish wakes it, not its timeout, and the records come back from that
    call. The Python sleep (python mode) is the reference."""
    import threading
    import time

    from shmbroker.layout import shm as L

    monkeypatch.setattr(consumer_module, "TAIL_READ", mode == "tail")
    observer = _WaitObserver()
    monkeypatch.setattr(consumer_module, "_native", observer)
    parts.create_topic("t", 1)
    parts.append("t", 0, [b"first"])
    control = parts.controls[("t", 0)]
    consumer = Consumer("t", broker=data_dir, auto_offset_reset="earliest")
    try:
        assert [r.value for r in consumer.poll(timeout_ms=1000)] == [b"first"]
        for round_ in range(3):  # bounded
            timer = threading.Timer(0.1, parts.append, ("t", 0, [b"late%d" % round_, b"x"]))
            timer.start()
            t0 = time.monotonic()
            try:
                got = consumer.poll(timeout_ms=20_000)
            finally:
                timer.join()
            assert 0.05 <= time.monotonic() - t0 < 10.0  # woken by the publish
            assert [r.value for r in got] == [b"late%d" % round_, b"x"]
            assert [r.offset for r in got] == [1 + 2 * round_, 2 + 2 * round_]
            assert _native.atomic_load_u32(control.buf, L.CONTROL["hw_waiters"]) == 0
        # Nothing comes: [] at the timeout, and the waiter count is back to 0.
        t0 = time.monotonic()
        assert consumer.poll(timeout_ms=150) == []
        assert 0.14 <= time.monotonic() - t0 < 5.0
        assert _native.atomic_load_u32(control.buf, L.CONTROL["hw_waiters"]) == 0
    finally:
        consumer.close()
    waited = [c for c in observer.calls if c[0] == 13 and c[1] > 0]
    if mode == "tail":  # each wake-up's records came back from the call that slept
        assert sum(1 for c in waited if c[2] == _native.TAIL_RECORDS) == 3
    else:
        assert observer.calls == []


def test_tail_read_does_not_hold_the_segment_mapping_while_it_waits(parts):
    """The wait releases the segment mapping: another thread may close the reader meanwhile
    (a held export would make that close raise BufferError); the woken call then declines
    (the mapping is gone) instead of touching it."""
    import threading
    import time

    from shmbroker.layout import shm as L

    parts.create_topic("t", 1)
    control = parts.controls[("t", 0)]
    reader = LogReader(partition_dir(parts.data_dir, "t", 0))
    parts.append("t", 0, [b"first"])
    reader.read(0, 1 << 20, control.read_state())
    segment = reader.last_segment
    out = []

    def wait():
        out.append(_native.tail_read(control.buf, segment.map, segment.base_offset, 1,
                                     segment.hint_position, segment.checked_end, segment.fd,
                                     1 << 20, True, "t", 0, 10_000, 0))

    waiter = threading.Thread(target=wait)
    waiter.start()
    try:
        deadline = time.monotonic() + 5
        while _native.atomic_load_u32(control.buf, L.CONTROL["hw_waiters"]) == 0 and time.monotonic() < deadline:
            time.sleep(0.005)  # bounded: until the waiter counts itself in hw_waiters
        reader.close()  # unmaps: would raise BufferError if the wait held the mapping
        parts.append("t", 0, [b"second"])
    finally:
        waiter.join(10)
    assert not waiter.is_alive()
    assert out and out[0][0] == _native.TAIL_DECLINED


def test_tail_read_waits_at_most_wait_ms_and_refuses_negative_waits(parts):
    import time

    parts.create_topic("t", 1)
    control = parts.controls[("t", 0)]
    with LogReader(partition_dir(parts.data_dir, "t", 0)) as reader:
        parts.append("t", 0, [b"first"])
        reader.read(0, 1 << 20, control.read_state())
        segment = reader.last_segment
        args = (control.buf, segment.map, segment.base_offset, 1, segment.hint_position,
                segment.checked_end, segment.fd, 1 << 20, True, "t", 0)
        t0 = time.monotonic()
        assert _native.tail_read(*args, 120, 0)[0] == _native.TAIL_NOTHING
        assert 0.11 <= time.monotonic() - t0 < 5.0
        with pytest.raises(ValueError, match="wait_ms"):
            _native.tail_read(*args, -1, 0)
        with pytest.raises(TypeError, match="11, 13 or 14"):
            _native.tail_read(*args, 5)


def test_a_spinning_tail_read_is_not_counted_as_a_sleeper_until_it_sleeps(parts):
    """While it spins, the waiter is not in hw_waiters (the publisher then skips the futex
    wake: a syscall on every publish for nobody asleep); once the spin runs out it counts
    itself and sleeps, and a publish still wakes it."""
    import threading
    import time

    from shmbroker.layout import shm as L

    parts.create_topic("t", 1)
    control = parts.controls[("t", 0)]
    waiters = L.CONTROL["hw_waiters"]
    with LogReader(partition_dir(parts.data_dir, "t", 0)) as reader:
        parts.append("t", 0, [b"first"])
        reader.read(0, 1 << 20, control.read_state())
        segment = reader.last_segment

        def tail(position: int, spin_ns: int, out: list) -> None:
            out.append(_native.tail_read(
                control.buf, segment.map, segment.base_offset, position,
                segment.hint_position, segment.checked_end, segment.fd, 1 << 20, True, "t", 0,
                10_000, spin_ns))

        # 1. A long spin: never counted; the publish during the spin ends it.
        out: list = []
        waiter = threading.Thread(target=tail, args=(1, 3_000_000_000, out))
        waiter.start()
        seen_counts = []
        try:
            for _ in range(20):  # bounded: 100 ms of looking while it spins
                seen_counts.append(_native.atomic_load_u32(control.buf, waiters))
                time.sleep(0.005)
            parts.append("t", 0, [b"second"])
        finally:
            waiter.join(10)
        assert seen_counts == [0] * 20
        assert out[0][0] == _native.TAIL_RECORDS
        assert [r.value for r in out[0][3]] == [b"second"]
        segment.hint_position, segment.hint_offset = out[0][4], out[0][5]
        segment.checked_end = out[0][6]
        # 2. A short spin, then the sleep: counted while asleep, woken by the publish.
        out = []
        waiter = threading.Thread(target=tail, args=(2, 1_000_000, out))
        waiter.start()
        try:
            deadline = time.monotonic() + 5
            while _native.atomic_load_u32(control.buf, waiters) == 0 \
                    and time.monotonic() < deadline:
                time.sleep(0.002)  # bounded: until it sleeps
            assert _native.atomic_load_u32(control.buf, waiters) == 1
            t0 = time.monotonic()
            parts.append("t", 0, [b"third"])
        finally:
            waiter.join(10)
        assert time.monotonic() - t0 < 5.0
        assert [r.value for r in out[0][3]] == [b"third"]
        assert _native.atomic_load_u32(control.buf, waiters) == 0


def test_tail_read_walks_on_from_a_hint_a_little_behind_the_offset(parts):
    """hint_offset below offset (a consumer that took the records in between from a ring):
    the C read walks batch headers from the hint to the batch holding offset and returns the
    records from offset on, as the Python read (the reference) does; a hint whose batch is
    not at hint_offset is declined, a hint_offset past offset refused."""
    parts.create_topic("t", 1, segment_bytes=1 << 20)
    control = parts.controls[("t", 0)]
    directory = partition_dir(parts.data_dir, "t", 0)
    rng = random.Random(5)
    for _ in range(30):  # bounded: batches of 1..6 records
        values, keys, headers = _mixed_batch(rng, 0)
        parts.append("t", 0, values, keys=keys, headers=headers)
    hw = parts.logs[("t", 0)].high_watermark
    reader = LogReader(directory)
    try:
        reader.read(0, 1, control.read_state())  # the first batch: the hint after it
        segment = reader.last_segment
        hint, hint_position = segment.hint_offset, segment.hint_position
        assert hint > 0
        walked = 0
        for offset in range(hint, min(hw, hint + 60)):
            for max_bytes in (1, 1 << 20):
                status, _, _, got, next_position, next_offset, _, nbytes = _native.tail_read(
                    control.buf, segment.map, segment.base_offset, offset, hint_position,
                    segment.checked_end, segment.fd, max_bytes, True, "t", 0, 0, 0, hint)
                assert status == _native.TAIL_RECORDS
                with LogReader(directory) as fresh:  # the reference, from nothing cached
                    piece = fresh.read(offset, max_bytes, control.read_state())
                    want = [r for r in records.decode_records(piece.data, True, "t", 0)
                            if r.offset >= offset]
                assert _fields(got) == _fields(want) and got[0].offset == offset
                assert (next_position, next_offset) == \
                    (piece.file_position + piece.length, piece.last_offset + 1)
                assert nbytes == piece.length
                walked += offset > hint
        assert walked > 50
        # The batch at the hint position does not start at hint_offset: declined.
        assert _native.tail_read(control.buf, segment.map, segment.base_offset, hint + 5,
                                 hint_position, segment.checked_end, segment.fd, 1 << 20, True,
                                 "t", 0, 0, 0, hint - 1)[0] == _native.TAIL_DECLINED
        with pytest.raises(ValueError, match="hint_offset"):
            _native.tail_read(control.buf, segment.map, segment.base_offset, hint,
                              hint_position, segment.checked_end, segment.fd, 1 << 20, True,
                              "t", 0, 0, 0, hint + 1)
    finally:
        reader.close()


def test_a_consumer_a_little_past_its_last_log_read_reads_in_one_c_call(parts, data_dir,
                                                                          monkeypatch):
    """After its position moved ahead of the log read's hint (here by seek; in a ping-pong by
    records taken from a ring), the consumer's next log read is still the one C call."""
    counting = _CountingNative()
    monkeypatch.setattr(consumer_module, "_native", counting)
    parts.create_topic("t", 1)
    for i in range(40):  # bounded
        parts.append("t", 0, [b"%d" % i, b"%d'" % i])  # offsets 2i, 2i + 1
    # fetch_max_bytes=1: every log read takes one batch, so its hint ends right after it.
    with Consumer(broker=data_dir, auto_offset_reset="earliest", fetch_max_bytes=1) as consumer:
        consumer.assign([("t", 0)])
        assert [r.offset for r in consumer.poll(timeout_ms=1000, max_records=2)] == [0, 1]
        for target in (7, 20, 33, 60):  # each ahead of where the last read ended
            consumer.seek(("t", 0), target)
            counting.tail_statuses.clear()
            got = consumer.poll(timeout_ms=1000, max_records=1)
            assert [(r.offset, r.value) for r in got] == \
                [(target, b"%d" % (target // 2) + (b"'" if target % 2 else b""))]
            assert counting.tail_statuses == [_native.TAIL_RECORDS]
