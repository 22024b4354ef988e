"""Cold reads, the logic apart from sockets: the grant table (single use, expiry, bounds), the
hot/cold distance and the range a grant covers (whole committed batches of one segment)."""
from __future__ import annotations

import os

import pytest
from fake_clock import FakeClock

from shmbroker import records
from shmbroker.config import LogConfig
from shmbroker.log import PartitionLog
from shmbroker.log.reader import LogReader, ReadState
from shmbroker.router.cold_read import (COLD_TOKEN_BYTES, GRANT_ID_BYTES, Grant, GrantTable,
                                        bytes_behind, plan_grant)


class Clock:
    """Monotonic seconds, moved by hand."""

    def __init__(self):
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, ms: int) -> None:
        self.now += ms / 1000.0


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.fixture
def grant_fd(tmp_path):
    """``grant_fd()`` -> a fresh fd of a real file, as a grant holds one."""
    path = tmp_path / "seg.log"
    path.write_bytes(b"x" * 100)
    opened = []

    def make() -> int:
        fd = os.open(path, os.O_RDONLY)
        opened.append(fd)
        return fd

    yield make
    for fd in opened:
        if _fd_open(fd):
            os.close(fd)


def grant(fd: int) -> Grant:
    return Grant("t", 0, 0, 0, 100, 0, 9, fd)


def test_a_token_is_good_once_and_then_refused(grant_fd):
    table = GrantTable(clock=Clock())
    fd = grant_fd()
    token = table.issue(grant(fd))
    assert isinstance(token, bytes) and len(token) == COLD_TOKEN_BYTES
    taken = table.take(token)
    assert taken is not None and taken.fd == fd and len(table) == 0
    assert table.take(token) is None  # single use
    assert (table.issued, table.taken, table.rejected) == (1, 1, 1)
    assert _fd_open(fd), "the taker owns the fd now; the table must not have closed it"


def test_an_expired_token_is_refused_and_its_fd_closed():
    clock = Clock()
    table = GrantTable(ttl_ms=30_000, clock=clock)
    fd = os.open(os.devnull, os.O_RDONLY)
    token = table.issue(grant(fd))
    clock.advance_ms(30_000)
    assert table.take(token) is None
    assert not _fd_open(fd) and len(table) == 0 and table.expired == 1


def test_expired_grants_are_swept_and_make_room_in_a_full_table():
    clock = Clock()
    table = GrantTable(ttl_ms=1_000, grants_max=2, clock=clock)
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
    assert table.issue(grant(fds[0])) and table.issue(grant(fds[1]))
    assert table.issue(grant(fds[2])) is None, "full: the caller serves the fetch hot"
    clock.advance_ms(999)
    assert table.expire() == 0
    clock.advance_ms(1)
    assert table.expire() == 2 and not _fd_open(fds[0]) and not _fd_open(fds[1])
    assert table.issue(grant(fds[2])) is not None
    table.close()
    assert not _fd_open(fds[2]) and len(table) == 0


def test_a_wrong_secret_or_length_is_refused_and_the_real_grant_stays(grant_fd):
    table = GrantTable(clock=Clock())
    token = table.issue(grant(grant_fd()))
    wrong_secret = token[:GRANT_ID_BYTES] + bytes(b ^ 0xFF for b in token[GRANT_ID_BYTES:])
    wrong_id = bytes(b ^ 0xFF for b in token[:GRANT_ID_BYTES]) + token[GRANT_ID_BYTES:]
    for bad in (wrong_secret, wrong_id, token[:-1], token + b"\0", b"", bytes(32)):
        assert table.take(bad) is None
    assert table.rejected == 6 and len(table) == 1
    assert table.take(token) is not None


def test_tokens_are_random():
    table = GrantTable(clock=Clock())
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(50)]
    tokens = {table.issue(grant(fd)) for fd in fds}
    assert len(tokens) == 50
    table.close()


# -- the hot/cold distance ----------------------------------------------------------------------

def test_bytes_behind_counts_from_the_position_to_the_published_end():
    sizes = {0: 1_000, 100: 2_000, 250: 3_000}
    asked = []

    def size_of(base):
        asked.append(base)
        return sizes[base]

    bases = [0, 100, 250, 400]  # 400 is active, 500 bytes published
    assert bytes_behind(bases, 400, 500, 400, 120, size_of, 10**9) == 380
    assert bytes_behind(bases, 400, 500, 250, 1_000, size_of, 10**9) == 2_000 + 500
    assert bytes_behind(bases, 400, 500, 0, 0, size_of, 10**9) == 6_000 + 500
    asked.clear()
    # Past the limit it stops adding (a thousand segments cost a few stats, not a thousand).
    assert bytes_behind(bases, 400, 500, 0, 0, size_of, 2_500) > 2_500
    assert asked == [0, 100]


# -- the range a grant covers ---------------------------------------------------------------------

def _log(tmp_path, **config) -> PartitionLog:
    return PartitionLog.open(str(tmp_path / "p"), LogConfig(**config), clock=FakeClock())


def _state(log: PartitionLog, hw: int | None = None) -> ReadState:
    active = log.active_segment
    return ReadState(log.high_watermark if hw is None else hw, log.log_start_offset,
                     active.base_offset, active.size)


def _fill(log: PartitionLog, batches: int, per_batch: int = 5) -> None:
    for b in range(batches):
        log.append(records.encode_batch([b"%d-%d" % (b, i) * 20 for i in range(per_batch)],
                                        timestamp=1_700_000_000_000))


def _granted(g: Grant) -> bytes:
    return os.pread(g.fd, g.length, g.file_position)


def test_a_grant_is_whole_batches_from_the_one_holding_the_offset_up_to_the_bytes_asked(tmp_path):
    log = _log(tmp_path)
    _fill(log, 40)  # offsets 0..199, batches of 5 (~550 bytes each)
    state = _state(log)
    with LogReader(log.directory) as reader:
        g = plan_grant(reader, state, 37, 4_000, "t", 0)
        try:
            data = _granted(g)
            scan = records.scan_batches(data, verify_crc=True)
            assert scan.ok and scan.valid_bytes == len(data) == g.length <= 4_000
            assert g.first_offset == 35 and g.last_offset == 35 + 5 * len(scan.batches) - 1
            # Whole batches up to the limit: one more batch would not have fitted.
            assert g.length + len(data) // len(scan.batches) > 4_000
            assert [r.offset for r in records.decode_records(data)] == \
                list(range(35, g.last_offset + 1))
            assert g.segment_base_offset == 0 and g.file_position > 0
        finally:
            os.close(g.fd)
        # Fewer bytes asked than one batch: the batch comes whole anyway (never cut).
        g = plan_grant(reader, state, 0, 10, "t", 0)
        os.close(g.fd)
        assert (g.first_offset, g.last_offset, g.file_position) == (0, 4, 0) and g.length > 10
    log.close()


def test_a_grant_stops_at_the_high_watermark_and_at_its_segments_end(tmp_path):
    log = _log(tmp_path, segment_bytes=4_096)
    _fill(log, 30)
    assert len(log.segments) >= 3
    with LogReader(log.directory) as reader:
        g = plan_grant(reader, _state(log), 0, 1 << 20, "t", 0)
        os.close(g.fd)
        second = log.segments[1].base_offset
        assert g.segment_base_offset == 0 and g.last_offset == second - 1
        assert g.length == os.path.getsize(log.segments[0].path)
        # Uncommitted (>= hw) batches are never granted, though in the file.
        active = log.active_segment.base_offset
        g = plan_grant(reader, _state(log, hw=active + 5), active, 1 << 20, "t", 0)
        os.close(g.fd)
        assert (g.first_offset, g.last_offset) == (active, active + 4)
        # Nothing at the high watermark.
        assert plan_grant(reader, _state(log), log.high_watermark, 1 << 20, "t", 0) is None
    log.close()
