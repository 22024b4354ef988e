"""The fsync of a rolled segment runs in the background (shmbroker/log/flusher.py): the roll
does not wait for it, the recovery point and checkpoint move only once it is done, flush()
and close() wait for it, retention of a segment still being fsynced is safe, and a failed
fsync surfaces. The seam: a SegmentFlusher with an injected fsync function (a gate that
holds the disk, or one that fails)."""
from __future__ import annotations

import errno
import os
import threading
import time

import pytest
from log_helpers import batch, values_of

from shmbroker import errors
from shmbroker.config import LogConfig
from shmbroker.log import PartitionLog
from shmbroker.log.flusher import SegmentFlusher

pytestmark = pytest.mark.timeout(60)

ONE = len(batch([b"x" * 300]))
CONFIG = LogConfig(segment_bytes=ONE * 2, index_interval_bytes=0)
WAIT_S = 30


class GatedDisk:
    """An fsync that blocks until :meth:`open`; records the thread and inode of each call."""

    def __init__(self):
        self.gate = threading.Event()
        self.calls: list[tuple[str, int, int]] = []  # (thread name, inode, link count)
        self.entered = threading.Event()

    def __call__(self, fd: int) -> None:
        st = os.fstat(fd)
        self.calls.append((threading.current_thread().name, st.st_ino, st.st_nlink))
        self.entered.set()
        assert self.gate.wait(WAIT_S), "test never opened the gate"
        os.fsync(fd)

    def open(self) -> None:
        self.gate.set()


@pytest.fixture
def gated(tmp_path, clock):
    """(log, disk): a log whose roll fsyncs wait for ``disk.open()``; closed at teardown."""
    disk = GatedDisk()
    log = PartitionLog.open(str(tmp_path / "p0"), CONFIG, clock=clock,
                            flusher=SegmentFlusher(fsync=disk))
    yield log, disk
    disk.open()
    log.close()


def _checkpoint(log: PartitionLog) -> int:
    with open(os.path.join(log.directory, "recovery-point-offset-checkpoint")) as f:
        return int(f.read().split("recovery_point ")[1].split()[0])


def _roll_once(log: PartitionLog) -> int:
    """Append until the log rolls; returns the new segment's base offset."""
    segments = len(log.segments)
    for _ in range(3):  # bounded: CONFIG holds two batches per segment
        log.append(batch([b"x" * 300]))
        if len(log.segments) > segments:
            return log.active_segment.base_offset
    raise AssertionError("no roll")


def test_roll_returns_before_the_old_segment_is_fsynced(gated):
    log, disk = gated
    base = _roll_once(log)
    # The append returned with the disk held: the fsync is on the flusher's thread.
    assert disk.entered.wait(WAIT_S)
    assert log._flusher.pending == 1
    assert {name for name, _, _ in disk.calls} == {"segment-flusher"}
    log.append(batch([b"after the roll"]))  # appends go on meanwhile
    # Nothing claims the old segment durable yet.
    assert log.recovery_point == 0 and _checkpoint(log) == 0
    assert not log.collect_flushes() and log.roll_flushes_pending
    disk.open()
    assert log._flusher.wait(WAIT_S)
    assert log.collect_flushes()
    assert log.recovery_point == base and _checkpoint(log) == base
    assert not log.roll_flushes_pending
    assert len(disk.calls) == 3  # .log, .index, .timeindex


def test_flush_waits_for_the_pending_fsync_of_earlier_segments(gated):
    log, disk = gated
    _roll_once(log)
    assert disk.entered.wait(WAIT_S)
    returned = threading.Event()
    failures: list[BaseException] = []

    def flush():
        try:
            log.flush()  # the main thread does nothing to the log meanwhile
        except BaseException as exc:
            failures.append(exc)
        returned.set()

    flusher_thread = threading.Thread(target=flush)
    flusher_thread.start()
    assert not returned.wait(0.3), "flush() returned while a sealed segment was unflushed"
    disk.open()
    assert returned.wait(WAIT_S)
    flusher_thread.join()
    assert not failures
    assert log.recovery_point == log.log_end_offset
    assert _checkpoint(log) == log.log_end_offset  # the roll's checkpoint, written once


def test_flush_messages_policy_waits_for_rolled_segments_too(tmp_path, clock):
    done: list[float] = []

    def slow(fd):
        time.sleep(0.2)
        os.fsync(fd)
        done.append(time.monotonic())

    log = PartitionLog.open(str(tmp_path / "p0"), LogConfig(segment_bytes=ONE * 2,
                            flush_messages=3), clock=clock, flusher=SegmentFlusher(fsync=slow))
    try:
        infos = [log.append(batch([b"x" * 300])) for _ in range(3)]  # rolls at the 3rd
        assert infos[-1].rolled and infos[-1].flushed
        assert len(done) == 3  # the policy's flush waited for the rolled segment's fsyncs
        assert log.recovery_point == log.log_end_offset
    finally:
        log.close()


def test_close_waits_for_pending_fsyncs_then_marks_a_clean_stop(tmp_path, clock):
    done: list[int] = []

    def slow(fd):
        time.sleep(0.1)
        os.fsync(fd)
        done.append(fd)

    directory = str(tmp_path / "p0")
    log = PartitionLog.open(directory, CONFIG, clock=clock, flusher=SegmentFlusher(fsync=slow))
    _roll_once(log)
    _roll_once(log)
    end = log.log_end_offset
    log.close()
    assert len(done) == 6
    assert os.path.exists(os.path.join(directory, ".clean-shutdown"))
    with PartitionLog.open(directory, CONFIG, clock=clock) as again:
        assert again.recovery_report.clean_shutdown
        assert again.recovery_point == end


def test_retention_of_a_segment_whose_fsync_is_pending_is_safe(tmp_path, clock):
    disk = GatedDisk()
    config = LogConfig(segment_bytes=ONE * 2, index_interval_bytes=0, retention_bytes=0)
    log = PartitionLog.open(str(tmp_path / "p0"), config, clock=clock,
                            flusher=SegmentFlusher(fsync=disk, pending_max=8))
    try:
        _roll_once(log)
        _roll_once(log)
        inodes = {os.stat(os.path.join(log.directory, name)).st_ino
                  for s in log.segments[:-1]
                  for name in (os.path.basename(s.path), os.path.basename(s.index_path),
                               os.path.basename(s.timeindex_path))}
        deleted = log.delete_old_segments()
        assert len(deleted) == 2 and len(log.segments) == 1
        # Their descriptors were closed by the deletion; new files may take the numbers.
        spare = [os.open(os.path.join(log.directory, f"spare{i}"), os.O_CREAT | os.O_WRONLY,
                         0o600) for i in range(6)]
        disk.open()
        assert log._flusher.wait(WAIT_S)
        for fd in spare:
            os.close(fd)
        # Only the deleted segments' own (unlinked) inodes were fsynced: never a reused fd.
        assert len(disk.calls) == 6
        assert {ino for _, ino, _ in disk.calls} == inodes
        assert all(links == 0 for _, _, links in disk.calls[3:])
        log.collect_flushes()
        assert log.recovery_point >= log.log_start_offset
        log.append(batch([b"still fine"]))
        assert values_of(log)[-1][1] == b"still fine"
    finally:
        disk.open()
        log.close()


def test_a_failed_background_fsync_surfaces_and_leaves_no_clean_marker(tmp_path, clock):
    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")

    directory = str(tmp_path / "p0")
    log = PartitionLog.open(directory, CONFIG, clock=clock, flusher=SegmentFlusher(fsync=broken))
    _roll_once(log)
    assert log._flusher.wait(WAIT_S)
    with pytest.raises(errors.LogError, match="background fsync of .*00000000000000000000.log"
                       ) as caught:
        log.collect_flushes()
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.EIO
    with pytest.raises(errors.LogError, match="Input/output error"):
        log.flush()  # acks=all cannot be acknowledged on a log whose disk failed
    with pytest.raises(errors.LogError):
        _roll_once(log)  # nor can it roll again
    with pytest.raises(errors.LogError, match="background fsync"):
        log.close()
    assert log.closed
    assert not os.path.exists(os.path.join(directory, ".clean-shutdown"))
    assert _checkpoint(log) == 0
    with PartitionLog.open(directory, CONFIG, clock=clock) as again:
        assert not again.recovery_report.clean_shutdown
        assert 0 in [s.base_offset for s in again.recovery_report.segments_checked]


def test_a_roll_waits_when_pending_max_fsyncs_are_queued(tmp_path, clock):
    disk = GatedDisk()
    log = PartitionLog.open(str(tmp_path / "p0"), CONFIG, clock=clock,
                            flusher=SegmentFlusher(fsync=disk, pending_max=1))
    try:
        _roll_once(log)
        assert disk.entered.wait(WAIT_S)
        timer = threading.Timer(0.3, disk.open)
        timer.start()
        started = time.monotonic()
        _roll_once(log)  # the second roll waits for the first one's fsync
        assert time.monotonic() - started >= 0.25
        timer.join()
    finally:
        disk.open()
        log.close()


def test_an_append_after_the_fsync_completed_moves_the_checkpoint(gated):
    """Owners without a loop calling collect_flushes (the offset store) still see the
    checkpoint follow the rolls."""
    log, disk = gated
    base = _roll_once(log)
    disk.open()
    assert log._flusher.wait(WAIT_S)
    assert _checkpoint(log) == 0
    log.append(batch([b"next"]))
    assert _checkpoint(log) == base and not log.roll_flushes_pending
