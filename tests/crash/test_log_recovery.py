"""Crash recovery of the partition log: torn tails, flipped bytes, corrupt sealed segments.

Every case starts from a pristine log on disk, damages a copy the way a crash (or a bad disk)
would, reopens it and checks the same invariants:

* every batch before the damage is intact and readable, byte for byte;
* nothing damaged is ever served (reads of it raise CorruptSegmentError, or it is gone);
* the recovery report counts what was dropped and says where and why;
* appends continue at the right offset, and what they write reads back.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from shmbroker import errors, records
from shmbroker.config import LogConfig
from shmbroker.layout import record_batch as layout
from shmbroker.log import PartitionLog
from shmbroker.log.recovery import recover_segment

T0 = 1_700_000_000_000
CONFIG = LogConfig(segment_bytes=2048, index_interval_bytes=256)
MARKER = ".clean-shutdown"


class Clock:
    def __init__(self):
        self.now_ms = T0 + 10**6

    def __call__(self) -> int:
        return self.now_ms


def _batch(i: int) -> bytes:
    values = [b"rec-%04d-%d" % (i, j) + b"." * (i % 5) for j in range(1 + i % 3)]
    keys = [None if j % 2 else b"k%d" % j for j in range(len(values))]
    return records.encode_batch(values, keys=keys, headers=[[("h", b"%d" % i)]] * len(values),
                                timestamp=T0 + i)


def _build(directory: str, count: int = 60) -> list[tuple[int, int, bytes]]:
    """A multi-segment log; returns [(base offset, last offset, batch bytes as stored)]."""
    stored = []
    with PartitionLog.open(directory, CONFIG, clock=Clock()) as log:
        for i in range(count):
            info = log.append(_batch(i))
            piece = log.read(info.base_offset, 1)
            stored.append((info.base_offset, info.last_offset, bytes(piece.data)))
        assert len(log.segments) >= 3
    return stored


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("pristine") / "p0")
    return directory, _build(directory)


def _copy(pristine_dir: str, tmp_path, name: str = "copy") -> str:
    target = str(tmp_path / name)
    if os.path.exists(target):
        shutil.rmtree(target)
    shutil.copytree(pristine_dir, target)
    return target


def _last_segment_path(directory: str) -> str:
    return os.path.join(directory, sorted(n for n in os.listdir(directory) if n.endswith(".log"))[-1])


def _assert_served_intact(log: PartitionLog, stored, upto: int) -> None:
    """Batches [0, upto) read back byte for byte, and nothing at or after them is served."""
    for base, last, data in stored[:upto]:
        piece = log.read(base, 1)
        assert (piece.first_offset, piece.last_offset) == (base, last)
        assert bytes(piece.data) == data
    assert log.log_end_offset == (stored[upto][0] if upto < len(stored) else stored[-1][1] + 1)
    assert log.read(log.log_end_offset, 1 << 20).length == 0


def _assert_appends_continue(log: PartitionLog) -> None:
    end = log.log_end_offset
    info = log.append(records.encode_batch([b"after-crash"], timestamp=T0))
    assert info.base_offset == end
    assert records.decode_records(log.read(end, 1 << 20).data)[0].value == b"after-crash"


@pytest.mark.parametrize("keep_marker", [False, True], ids=["unclean", "stale-marker"])
def test_recovery_truncates_a_torn_last_batch_at_every_byte(pristine, tmp_path, keep_marker):
    pristine_dir, stored = pristine
    last_base, last_last, last_bytes = stored[-1]
    log_path_name = os.path.basename(_last_segment_path(pristine_dir))
    end = os.path.getsize(os.path.join(pristine_dir, log_path_name))
    start = end - len(last_bytes)
    count = last_last - last_base + 1
    for cut in range(1, len(last_bytes)):
        directory = _copy(pristine_dir, tmp_path)
        os.truncate(os.path.join(directory, log_path_name), start + cut)
        if not keep_marker:
            os.unlink(os.path.join(directory, MARKER))
        log = PartitionLog.open(directory, CONFIG, clock=Clock())
        try:
            report = log.recovery_report
            assert not report.clean_shutdown
            assert report.bytes_dropped == cut, cut
            assert report.batches_dropped == 1
            assert report.records_dropped == (count if cut >= layout.HEADER_SIZE else 0)
            assert report.position == start and report.path.endswith(log_path_name)
            assert "truncated" in report.reason
            assert os.path.getsize(os.path.join(directory, log_path_name)) == start
            _assert_served_intact(log, stored, len(stored) - 1)
            _assert_appends_continue(log)
        finally:
            log.close()


def test_recovery_drops_a_last_batch_with_flipped_bytes(pristine, tmp_path):
    pristine_dir, stored = pristine
    _, _, last_bytes = stored[-1]
    log_path_name = os.path.basename(_last_segment_path(pristine_dir))
    start = os.path.getsize(os.path.join(pristine_dir, log_path_name)) - len(last_bytes)
    rng = random.Random(20240601)
    cases = 300
    for case in range(cases):
        directory = _copy(pristine_dir, tmp_path)
        path = os.path.join(directory, log_path_name)
        damaged = bytearray(last_bytes)
        # Every header byte gets hit at least once (fields outside the CRC included), then
        # random positions, 1 to 3 bytes per case.
        where = [case] if case < layout.HEADER_SIZE else rng.sample(range(len(damaged)), rng.randint(1, 3))
        for at in where:
            damaged[at] ^= rng.randint(1, 255)
        with open(path, "r+b") as f:
            f.seek(start)
            f.write(damaged)
        if case % 2:
            os.unlink(os.path.join(directory, MARKER))  # half unclean, half with a (size-matching) marker
        log = PartitionLog.open(directory, CONFIG, clock=Clock())
        try:
            report = log.recovery_report
            assert report.bytes_dropped == len(last_bytes), (case, where, report.summary())
            assert report.position == start and report.batches_dropped >= 1
            assert report.records_dropped in (0, stored[-1][1] - stored[-1][0] + 1)
            _assert_served_intact(log, stored, len(stored) - 1)
            _assert_appends_continue(log)
        finally:
            log.close()


def _sealed_victim(stored, directory: str) -> tuple[str, int, int]:
    """(path of the 2nd segment, file position and index in ``stored`` of its 3rd batch)."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(".log"))
    base = int(names[1][:20])
    first = next(i for i, (b, _, _) in enumerate(stored) if b == base)
    victim = first + 2
    position = sum(len(d) for _, _, d in stored[first:victim])
    return os.path.join(directory, names[1]), position, victim


@pytest.mark.parametrize("damage", ["value", "length", "base_offset", "epoch"])
@pytest.mark.parametrize("how", ["clean", "unclean"])
def test_corrupt_sealed_segment_is_reported_and_never_served(pristine, tmp_path, how, damage):
    pristine_dir, stored = pristine
    directory = _copy(pristine_dir, tmp_path)
    path, position, victim = _sealed_victim(stored, directory)
    size = os.path.getsize(path)
    # A byte of a record value (the CRC catches it), of batch_length (the walk and the CRC
    # do), or of a field outside the CRC (the offset chain and the epoch bounds do).
    at = position + {"value": len(stored[victim][2]) - 2, "length": 11, "base_offset": 7,
                     "epoch": 15}[damage]
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))
    if how == "unclean":
        os.unlink(os.path.join(directory, MARKER))
        os.unlink(os.path.join(directory, "recovery-point-offset-checkpoint"))
    with PartitionLog.open(directory, CONFIG, clock=Clock()) as log:
        if how == "unclean":
            [error] = log.recovery_report.corrupt_segments
            assert (error.path, error.position) == (path, position)
            assert log.recovery_report.bytes_dropped == 0
        # A read starting before the corrupt batch stops in front of it (before any read has
        # run into it, so nothing is fenced yet on a clean open).
        previous = log.read(stored[victim - 1][0], 1 << 20)
        assert previous.last_offset == stored[victim - 1][1]
        base, last, _ = stored[victim]
        for offset in (base, last):
            with pytest.raises(errors.CorruptSegmentError) as caught:
                log.read(offset, 1 << 20)
            assert caught.value.path == path and caught.value.position == position
            assert path in str(caught.value) and f"position {position}" in str(caught.value)
        for b, _, data in stored[:victim]:
            assert bytes(log.read(b, 1).data) == data
        # Nothing after the bad batch in that segment is served either.
        for b, _, _ in stored[victim + 1:]:
            if b >= log.segments[2].base_offset:
                break
            with pytest.raises(errors.CorruptSegmentError):
                log.read(b, 1 << 20)
        # Later segments are kept and served; the corrupt file is neither cut nor deleted.
        later = [s for s in stored if s[0] >= log.segments[2].base_offset]
        assert later and all(bytes(log.read(b, 1).data) == d for b, _, d in later)
        assert os.path.getsize(path) == size
        assert log.log_end_offset == stored[-1][1] + 1
        _assert_appends_continue(log)


def test_recover_segment_is_a_plain_function_over_files(pristine, tmp_path):
    pristine_dir, stored = pristine
    directory = _copy(pristine_dir, tmp_path)
    path = _last_segment_path(directory)
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b"\x00" * 30)  # garbage after the last batch
    result = recover_segment(path, int(os.path.basename(path)[:20]), CONFIG, sealed=False, epoch_max=0)
    assert (result.bytes_dropped, result.valid_bytes, result.batches_dropped) == (30, size, 1)
    assert result.next_offset == stored[-1][1] + 1
    assert os.path.getsize(path) == size
    sealed = recover_segment(path, int(os.path.basename(path)[:20]), CONFIG, sealed=True)
    assert sealed.error is None and sealed.reason is None


def test_a_torn_index_entry_is_repaired(pristine, tmp_path):
    pristine_dir, stored = pristine
    directory = _copy(pristine_dir, tmp_path)
    indexes = sorted(n for n in os.listdir(directory) if n.endswith(".index"))
    originals = {n: open(os.path.join(directory, n), "rb").read() for n in indexes}
    for name in (indexes[0], indexes[-1]):  # a sealed segment's and the active one's
        assert len(originals[name]) >= 8
        os.truncate(os.path.join(directory, name), len(originals[name]) - 5)
    with PartitionLog.open(directory, CONFIG, clock=Clock()) as log:
        rebuilt = [os.path.basename(p) for p, _ in log.recovery_report.indexes_rebuilt]
        assert indexes[-1] in rebuilt
        for base, last, data in stored:
            assert bytes(log.read(base, 1).data) == data
        assert log.segments[0].index_rebuild_reason and "torn" in log.segments[0].index_rebuild_reason
    for name in indexes:
        assert open(os.path.join(directory, name), "rb").read() == originals[name]


def test_a_torn_index_entry_after_an_unclean_stop_is_repaired(pristine, tmp_path):
    pristine_dir, stored = pristine
    directory = _copy(pristine_dir, tmp_path)
    name = sorted(n for n in os.listdir(directory) if n.endswith(".index"))[-1]
    original = open(os.path.join(directory, name), "rb").read()
    with open(os.path.join(directory, name), "ab") as f:
        f.write(b"\x7f\x00\x00")  # half an entry appended by a crashing writer
    os.unlink(os.path.join(directory, MARKER))
    with PartitionLog.open(directory, CONFIG, clock=Clock()) as log:
        assert all(bytes(log.read(b, 1).data) == d for b, _, d in stored)
    assert open(os.path.join(directory, name), "rb").read() == original


_CHILD = textwrap.dedent("""
    import sys
    from shmbroker import records
    from shmbroker.config import LogConfig
    from shmbroker.log import PartitionLog
    log = PartitionLog.open(sys.argv[1], LogConfig(segment_bytes=4096))
    i = 0
    while True:  # runs until the parent kills it
        info = log.append(records.encode_batch([b"kill-%06d" % i], timestamp=0))
        print(info.last_offset, flush=True)
        i += 1
""")


def test_kill_9_during_appends_loses_no_acknowledged_record(tmp_path):
    directory = str(tmp_path / "p")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, directory], stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        acked = -1
        for _ in range(300):
            line = child.stdout.readline()
            assert line, "child died"
            acked = int(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    # SIGKILL keeps the page cache, so everything acknowledged is there; nothing torn is served.
    with PartitionLog.open(directory, LogConfig(segment_bytes=4096)) as log:
        assert not log.recovery_report.clean_shutdown
        assert log.log_end_offset > acked
        for offset in range(0, log.log_end_offset):
            value = records.decode_records(log.read(offset, 1).data)[0].value
            assert value == b"kill-%06d" % offset
        _assert_appends_continue(log)


def test_bit_rot_in_the_open_active_segment_is_not_served_and_appends_continue(tmp_path):
    with PartitionLog.open(str(tmp_path / "p"), CONFIG, clock=Clock()) as log:
        sizes = [len(_batch(i)) for i in range(3)]
        for i in range(3):
            log.append(_batch(i))
        path = log.active_segment.path
        with open(path, "r+b") as f:  # under the running log, as a failing disk would
            f.seek(sizes[0] + sizes[1] - 1)
            last = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([last[0] ^ 0x10]))
        first = log.read(0, 1 << 20)
        assert first.last_offset == stored_last(0)
        with pytest.raises(errors.CorruptSegmentError) as caught:
            log.read(stored_last(0) + 1, 1 << 20)
        assert caught.value.position == sizes[0]
        end = log.log_end_offset
        log.append(_batch(3))
        after = log.read(end, 1 << 20)  # the active segment is not fenced
        assert after.first_offset == end


def stored_last(i: int) -> int:
    """Last offset of batch ``i`` in a log built from _batch(0), _batch(1), ..."""
    return sum(1 + j % 3 for j in range(i + 1)) - 1


# -- the background fsync of rolled segments (shmbroker/log/flusher.py) --------------------------

_CHILD_ROLL = textwrap.dedent("""
    import sys, threading
    from shmbroker import records
    from shmbroker.config import LogConfig
    from shmbroker.log import PartitionLog
    from shmbroker.log.flusher import SegmentFlusher
    held = threading.Event()  # never set: the disk never finishes the roll's fsync
    log = PartitionLog.open(sys.argv[1], LogConfig(segment_bytes=4096),
                            flusher=SegmentFlusher(fsync=lambda fd: held.wait()))
    i = 0
    while len(log.segments) < 3:  # bounded: 4 KiB segments, ~80-byte batches
        log.append(records.encode_batch([b"roll-%06d" % i], timestamp=0))
        i += 1
    print(log.log_end_offset, log.segments[1].base_offset, log.recovery_point, flush=True)
    held.wait()  # until the parent kills it
""")


def test_kill_9_right_after_a_roll_recovers_the_segment_whose_fsync_never_ran(tmp_path):
    directory = str(tmp_path / "p")
    child = subprocess.Popen([sys.executable, "-c", _CHILD_ROLL, directory],
                             stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        line = child.stdout.readline()
        assert line, "child died"
        end, second_base, recovery_point = map(int, line.split())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    # The rolls returned, but nothing claimed the rolled segments durable.
    assert recovery_point == 0
    with open(os.path.join(directory, "recovery-point-offset-checkpoint")) as f:
        assert "recovery_point 0\n" in f.read()
    with PartitionLog.open(directory, LogConfig(segment_bytes=4096)) as log:
        report = log.recovery_report
        assert not report.clean_shutdown and report.recovery_point == 0
        # Both rolled segments and the active one were validated, none found corrupt.
        assert [s.base_offset for s in report.segments_checked] == \
            [s.base_offset for s in log.segments]
        assert log.segments[1].base_offset == second_base and not report.corrupt_segments
        # SIGKILL keeps the page cache: every appended record is there.
        assert log.log_end_offset == end
        for offset in range(end):
            assert records.decode_records(log.read(offset, 1).data)[0].value == b"roll-%06d" % offset
        assert log.recovery_point == end  # recovery fsynced what it validated
        _assert_appends_continue(log)


@pytest.mark.parametrize("cut", ["mid-batch", "batch-boundary"])
def test_a_torn_tail_in_a_sealed_segment_above_the_recovery_point_is_fenced(pristine, tmp_path,
                                                                            cut):
    """A power loss before a rolled segment's background fsync ran can leave its tail torn
    while the next segment exists. Recovery reports it, serves what is before it and the
    later segments, never what is missing, and appends continue."""
    pristine_dir, stored = pristine
    directory = _copy(pristine_dir, tmp_path)
    path, position, victim = _sealed_victim(stored, directory)
    os.truncate(path, position + (len(stored[victim][2]) // 2 if cut == "mid-batch" else 0))
    os.unlink(os.path.join(directory, MARKER))
    with open(os.path.join(directory, "recovery-point-offset-checkpoint"), "w") as f:
        f.write(f"shmbroker-recovery-point 1\nrecovery_point {stored[0][0]}\nleader_epoch 0\n")
    with PartitionLog.open(directory, CONFIG, clock=Clock()) as log:
        report = log.recovery_report
        assert path in [s.path for s in report.segments_checked]
        [error] = report.corrupt_segments
        assert (error.path, error.position) == (path, position)
        if cut == "batch-boundary":
            assert "tail is missing" in str(error)
        for b, _, data in stored[:victim]:
            assert bytes(log.read(b, 1).data) == data
        # The lost batches are never served (an error, not other bytes or an empty read).
        segment_end = log.segments[2].base_offset
        for b, _, _ in stored[victim:]:
            if b >= segment_end:
                break
            with pytest.raises(errors.LogError):
                log.read(b, 1 << 20)
        later = [s for s in stored if s[0] >= segment_end]
        assert later and all(bytes(log.read(b, 1).data) == d for b, _, d in later)
        assert log.log_end_offset == stored[-1][1] + 1
        _assert_appends_continue(log)
