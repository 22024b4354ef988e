"""LogSegment and index maintenance: writev, short writes, truncation, index rebuilds."""
from __future__ import annotations

import errno
import os

import pytest
from log_helpers import batch, file_bytes, values_of

from shmbroker import errors
from shmbroker.config import LogConfig
from shmbroker.log import PartitionLog, files
from shmbroker.log import segment as segment_module

T0 = 1_700_000_000_000
CONFIG = LogConfig(segment_bytes=4000, index_interval_bytes=200)


def _timestamp(i: int) -> int:
    return T0 + i * 3 - (i % 4)  # mostly growing, sometimes going back


def _fill(log: PartitionLog, count: int = 120) -> None:
    for i in range(count):
        log.append(batch([b"value-%04d" % i, b"w" * (i % 7)], timestamp=_timestamp(i)))


def _index_files(directory) -> dict[str, bytes]:
    return {n: file_bytes(os.path.join(directory, n)) for n in sorted(os.listdir(directory))
            if n.endswith((".index", ".timeindex"))}


def test_short_writes_are_resumed(open_log, monkeypatch):
    real_writev = os.writev

    def dribble(fd, buffers):  # at most 7 bytes per call, like a signal-interrupted write
        first = memoryview(buffers[0])[:7]
        return real_writev(fd, [first])

    log = open_log()
    monkeypatch.setattr(os, "writev", dribble)
    log.append(b"".join(batch([b"v%d" % i]) for i in range(5)))
    monkeypatch.undo()
    assert values_of(log) == [(i, b"v%d" % i) for i in range(5)]


def test_a_failed_write_leaves_no_torn_batch(open_log, monkeypatch):
    log = open_log()
    log.append(batch([b"before"]))
    size = log.active_segment.size
    real_writev = os.writev
    calls = []

    def fail_second(fd, buffers):
        calls.append(1)
        if len(calls) == 1:
            return real_writev(fd, [memoryview(buffers[0])[:10]])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", fail_second)
    with pytest.raises(errors.LogError, match="No space left"):
        log.append(batch([b"lost"]))
    monkeypatch.undo()
    assert os.path.getsize(log.active_segment.path) == size
    assert log.log_end_offset == 1
    assert log.append(batch([b"after"])).base_offset == 1
    assert values_of(log) == [(0, b"before"), (1, b"after")]


def test_iovecs_per_writev_never_exceed_iov_max(open_log, monkeypatch):
    real_writev = os.writev
    widths = []
    monkeypatch.setattr(os, "writev", lambda fd, b: (widths.append(len(b)), real_writev(fd, b))[1])
    open_log().append(b"".join(batch([b"x"]) for _ in range(segment_module.IOV_MAX)))
    assert max(widths) <= segment_module.IOV_MAX and len(widths) >= 2


@pytest.mark.parametrize("damage", ["deleted", "garbage", "torn"])
def test_indexes_are_rebuilt_from_the_log_when_missing_or_bad(tmp_path, clock, damage):
    directory = str(tmp_path / "p")
    with PartitionLog.open(directory, CONFIG, clock=clock) as log:
        _fill(log)
        expected = values_of(log)
        assert len(log.segments) >= 3
    originals = _index_files(directory)
    for name in originals:
        path = os.path.join(directory, name)
        if damage == "deleted":
            os.unlink(path)
        elif damage == "garbage":
            with open(path, "wb") as f:
                f.write(os.urandom(96))
        else:
            os.truncate(path, max(0, os.path.getsize(path) - 3))
    with PartitionLog.open(directory, CONFIG, clock=clock) as log:
        assert values_of(log) == expected
        for offset in range(0, 240, 7):
            piece = log.read(offset, 1)
            assert piece.first_offset <= offset <= piece.last_offset
        for segment in log.segments:  # force the lazy loads of sealed segments
            segment.offset_index
        for target in (T0, T0 + 150, T0 + 301):
            first_batch = next(i for i in range(120) if _timestamp(i) >= target)
            assert log.offset_for_timestamp(target) == 2 * first_batch
        assert all(s.index_rebuild_reason for s in log.segments[:-1])
        assert any(path.endswith(".index") for path, _ in log.recovery_report.indexes_rebuilt)
    # Rebuilt indexes are byte-identical to the ones the appends wrote.
    assert _index_files(directory) == originals


def test_indexes_rebuilt_after_an_unclean_stop_match_the_appended_ones(tmp_path, clock):
    directory = str(tmp_path / "p")
    with PartitionLog.open(directory, CONFIG, clock=clock) as log:
        _fill(log)
    originals = _index_files(directory)
    os.unlink(os.path.join(directory, ".clean-shutdown"))
    os.unlink(os.path.join(directory, "recovery-point-offset-checkpoint"))
    with PartitionLog.open(directory, CONFIG, clock=clock) as log:
        report = log.recovery_report
        assert not report.clean_shutdown
        assert len(report.segments_checked) == len(log.segments)
        assert report.bytes_dropped == 0 and report.reason is None
    assert _index_files(directory) == originals


def test_segment_truncate_to_cuts_at_the_batch_holding_the_offset(open_log):
    log = open_log(index_interval_bytes=0)
    for i in range(10):
        log.append(batch([b"a%d" % i, b"b%d" % i], timestamp=T0 + i))
    segment = log.active_segment
    sizes = segment.size // 10
    cut = segment.truncate_to(7)  # offset 7 lives in the batch 6..7
    assert cut == 7 * sizes and segment.size == 3 * sizes
    assert segment.next_offset == log.log_end_offset == 6
    assert segment.max_timestamp == T0 + 2
    assert all(o < 6 for o, _ in segment.offset_index.entries())
    assert log.append(batch([b"new"])).base_offset == 6
    assert values_of(log)[-2:] == [(5, b"b2"), (6, b"new")]


def test_segment_truncate_is_refused_while_a_reader_holds_a_view(open_log):
    log = open_log()
    for i in range(4):
        log.append(batch([b"v%d" % i]))
    held = log.read(0, 1 << 20)
    with pytest.raises(errors.LogError, match="readers hold views"):
        log.active_segment.truncate_to(2)
    del held
    assert log.active_segment.truncate_to(2) > 0


def test_unknown_and_leftover_files_on_open(tmp_path, clock):
    directory = tmp_path / "p"
    with PartitionLog.open(str(directory), CONFIG, clock=clock) as log:
        _fill(log, 10)
    (directory / "00000000000000000099.index").write_bytes(b"")  # orphan: no .log
    (directory / "recovery-point-offset-checkpoint.tmp").write_bytes(b"half")
    (directory / "README").write_text("not ours")
    with PartitionLog.open(str(directory), CONFIG, clock=clock) as log:
        removed = sorted(os.path.basename(p) for p in log.recovery_report.files_removed)
        assert removed == ["00000000000000000099.index", "recovery-point-offset-checkpoint.tmp"]
        assert log.log_end_offset == 20
    assert (directory / "README").exists()


def test_segment_files_are_named_by_base_offset(open_log):
    log = open_log(segment_bytes=600)
    for i in range(10):
        log.append(batch([b"x" * 200]))
    for segment in log.segments:
        assert files.parse_segment_name(segment.path) == (segment.base_offset, ".log")
        assert os.path.exists(segment.index_path) and os.path.exists(segment.timeindex_path)
