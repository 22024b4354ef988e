"""PartitionLog: offsets, roll, retention, lookups, reopen, record shapes, flush policy."""
from __future__ import annotations

import os
import threading

import pytest
from log_helpers import batch, values_of

from shmbroker import errors, records
from shmbroker.config import MiB, LogConfig
from shmbroker.layout import record_batch as layout
from shmbroker.log import AppendInfo, LogSlice, PartitionLog

T0 = 1_700_000_000_000


def test_append_assigns_consecutive_offsets_and_reads_them_back(open_log):
    log = open_log()
    first = log.append(batch([b"a", b"b", b"c"]))
    second = log.append(batch([b"d"]))
    assert isinstance(first, AppendInfo)
    assert (first.base_offset, first.last_offset, first.records_count) == (0, 2, 3)
    assert (second.base_offset, second.last_offset, second.position) == (3, 3, first.size_bytes)
    assert log.log_end_offset == log.high_watermark == 4
    assert values_of(log) == [(0, b"a"), (1, b"b"), (2, b"c"), (3, b"d")]


def test_append_patches_base_offset_and_leader_epoch_but_keeps_the_crc(open_log):
    log = open_log(leader_epoch=7)
    log.append(batch([b"first"]))
    data = batch([b"x", b"y"], base_offset=999, partition_leader_epoch=-1)
    log.append(data)
    piece = log.read(1, 1 << 20)
    header = records.read_header(piece.data, 0)
    assert (header.base_offset, header.partition_leader_epoch) == (1, 7)
    # Everything from the magic byte on is the producer's bytes, CRC included.
    assert bytes(piece.data[16:]) == data[16:]
    assert records.scan_batches(piece.data, verify_crc=True, verify_records=True).status == 0


def test_append_of_several_batches_at_once(open_log):
    log = open_log()
    data = b"".join(batch([b"%d-%d" % (i, j) for j in range(i + 1)]) for i in range(5))
    info = log.append(bytearray(data))
    assert (info.base_offset, info.last_offset, info.batches_count, info.records_count) == (0, 14, 5, 15)
    assert [v for _, v in values_of(log)][:4] == [b"0-0", b"1-0", b"1-1", b"2-0"]
    assert log.active_segment.size == len(data)


def test_append_of_more_batches_than_iov_max_allows_in_one_writev(open_log):
    log = open_log()
    data = b"".join(batch([b"v%05d" % i]) for i in range(1500))  # 3000 iovecs > IOV_MAX
    info = log.append(data)
    assert info.last_offset == 1499
    assert values_of(log)[-1] == (1499, b"v01499")


def test_append_accepts_numpy_and_memoryview_buffers(open_log):
    np = pytest.importorskip("numpy")
    log = open_log()
    data = batch([b"np"])
    log.append(np.frombuffer(data, dtype=np.uint8))
    log.append(memoryview(bytearray(data)))
    assert values_of(log) == [(0, b"np"), (1, b"np")]


def test_null_and_empty_keys_and_values_survive(open_log):
    log = open_log()
    log.append(records.encode_batch([None, b"", b"v", None], keys=[None, b"", None, b"k"], timestamp=T0))
    got = records.decode_records(log.read(0, 1 << 20).data)
    assert [(r.key, r.value) for r in got] == [(None, None), (b"", b""), (None, b"v"), (b"k", None)]


def test_headers_survive(open_log):
    log = open_log()
    hdrs = [[("trace", b"abc"), ("empty", b""), ("null", None)], None]
    log.append(records.encode_batch([b"a", b"b"], headers=hdrs, timestamp=T0))
    got = records.decode_records(log.read(0, 1 << 20).data)
    assert got[0].headers == (("trace", b"abc"), ("empty", b""), ("null", None))
    assert got[1].headers == ()


def test_8_mib_values_when_batch_bytes_max_allows_them(open_log):
    log = open_log(batch_bytes_max=9 * MiB)
    value = os.urandom(8 * MiB)
    log.append(batch([value]))
    log.append(batch([b"small"]))
    piece = log.read(0, 1024)  # max_bytes far below the batch: still one whole batch
    assert piece.last_offset == 0 and piece.length > 8 * MiB
    assert records.decode_records(piece.data)[0].value == value


def test_read_returns_at_least_one_batch_and_whole_batches_only(open_log):
    log = open_log()
    sizes = [len(batch([b"x" * 300]))] * 10
    for _ in sizes:
        log.append(batch([b"x" * 300]))
    piece = log.read(0, 1)
    assert (piece.first_offset, piece.last_offset, piece.length) == (0, 0, sizes[0])
    piece = log.read(3, sizes[0] * 3 + 5)
    assert (piece.first_offset, piece.last_offset, piece.length) == (3, 5, sizes[0] * 3)
    assert piece.file_position == sizes[0] * 3


def test_read_starts_at_the_batch_containing_the_offset(open_log):
    log = open_log()
    log.append(batch([b"a", b"b", b"c"]))
    piece = log.read(2, 1 << 20)
    assert (piece.first_offset, piece.last_offset) == (0, 2)


def test_read_at_log_end_is_empty_and_beyond_is_out_of_range(open_log):
    log = open_log()
    assert log.read(0, 100).length == 0  # empty log
    log.append(batch([b"a"]))
    end = log.read(1, 100)
    assert isinstance(end, LogSlice) and end.length == 0 and end.first_offset == 1
    with pytest.raises(errors.OffsetOutOfRangeError, match="offset 2"):
        log.read(2, 100)
    with pytest.raises(errors.OffsetOutOfRangeError):
        log.read(-1, 100)


def test_slice_is_a_read_only_zero_copy_view_of_the_file_range(open_log):
    log = open_log()
    for i in range(5):
        log.append(batch([b"v%d" % i]))
    piece = log.read(2, 1 << 20)
    assert piece.data.readonly
    with open(piece.path, "rb") as f:
        f.seek(piece.file_position)
        assert f.read(piece.length) == bytes(piece.data)  # what os.sendfile would send


def test_views_stay_valid_while_the_segment_grows_and_is_remapped(open_log):
    log = open_log()
    log.append(batch([b"first"]))
    held = log.read(0, 1 << 20)
    for i in range(50):
        log.append(batch([b"more-%d" % i]))  # forces remaps of the growing file
        log.read(i + 1, 1 << 20)
    assert records.decode_records(held.data)[0].value == b"first"
    assert values_of(log)[-1] == (50, b"more-49")


def test_roll_by_size_keeps_segments_under_segment_bytes(open_log):
    one = len(batch([b"x" * 300]))
    log = open_log(segment_bytes=one * 4 + 10)
    for _ in range(10):
        log.append(batch([b"x" * 300]))
    assert [s.base_offset for s in log.segments] == [0, 4, 8]
    assert all(s.size <= one * 4 + 10 for s in log.segments)
    assert [s.sealed for s in log.segments] == [True, True, False]
    assert len(values_of(log)) == 10


def test_an_append_larger_than_the_room_left_is_split_across_segments(open_log):
    one = len(batch([b"x" * 300]))
    log = open_log(segment_bytes=one * 3)
    info = log.append(b"".join(batch([b"x" * 300]) for _ in range(7)))
    assert info.rolled == 2 and info.segment_base_offset == 0
    assert [s.base_offset for s in log.segments] == [0, 3, 6]
    assert len(values_of(log)) == 7


def test_roll_by_time_compares_record_timestamps_like_kafka(open_log, clock):
    log = open_log(segment_ms=1000)
    log.append(batch([b"a"], timestamp=T0))
    log.append(batch([b"b"], timestamp=T0 + 1000))
    assert len(log.segments) == 1  # exactly segment_ms is not past it (Kafka's ">")
    info = log.append(batch([b"c"], timestamp=T0 + 1001))
    assert info.rolled == 1 and [s.base_offset for s in log.segments] == [0, 2]


def test_old_timestamps_do_not_roll_a_segment_per_append(open_log, clock):
    log = open_log(segment_ms=1000)
    clock.advance(10**9)  # records far older than the clock: a replay
    for i in range(20):
        log.append(batch([b"old"], timestamp=T0 + i))
    assert len(log.segments) == 1


def test_roll_by_time_without_timestamps_uses_the_injected_clock(open_log, clock):
    log = open_log(segment_ms=1000)
    log.append(batch([b"a"], timestamp=-1))
    clock.advance(1000)
    assert log.append(batch([b"b"], timestamp=-1)).rolled == 0
    clock.advance(1)
    assert log.append(batch([b"c"], timestamp=-1)).rolled == 1


def test_roll_when_the_offset_index_is_full(open_log):
    log = open_log(index_interval_bytes=0, index_bytes_max=64)  # 8 offset entries
    for i in range(30):
        log.append(batch([b"v%d" % i], timestamp=T0 + i))
    assert len(log.segments) > 2
    assert all(len(s.offset_index) <= 8 for s in log.segments)
    assert len(values_of(log)) == 30


def test_offset_lookup_across_segments(open_log):
    log = open_log(segment_bytes=1024, index_interval_bytes=100)
    for i in range(200):
        log.append(batch([b"v%03d" % i, b"w%03d" % i]))
    assert len(log.segments) > 10
    for offset in (0, 1, 57, 58, 199, 200, 301, 398, 399):
        piece = log.read(offset, 1)
        got = {r.offset: r.value for r in records.decode_records(piece.data)}
        expected = (b"v%03d" if offset % 2 == 0 else b"w%03d") % (offset // 2)
        assert got[offset] == expected, offset


def test_offset_for_timestamp_finds_first_offset_at_or_after(open_log):
    log = open_log(segment_bytes=1024, index_interval_bytes=100)
    for i in range(100):
        log.append(records.encode_batch([b"a", b"b"], timestamps=[T0 + 10 * i, T0 + 10 * i + 5]))
    assert log.offset_for_timestamp(T0) == 0
    assert log.offset_for_timestamp(T0 - 1) == 0
    assert log.offset_for_timestamp(T0 + 5) == 1
    assert log.offset_for_timestamp(T0 + 6) == 2
    assert log.offset_for_timestamp(T0 + 500) == 100
    assert log.offset_for_timestamp(T0 + 995) == 199
    assert log.offset_for_timestamp(T0 + 996) is None


def test_offset_for_timestamp_with_out_of_order_timestamps(open_log):
    log = open_log(index_interval_bytes=0)
    stamps = [50, 10, 70, 20, 90, 30]
    for ts in stamps:
        log.append(batch([b"x"], timestamp=T0 + ts))
    assert log.offset_for_timestamp(T0 + 60) == 2
    assert log.offset_for_timestamp(T0 + 15) == 0
    assert log.offset_for_timestamp(T0 + 80) == 4
    log.close()


def test_retention_by_size_deletes_whole_old_segments_only(open_log):
    one = len(batch([b"x" * 300]))
    log = open_log(segment_bytes=one * 2, retention_bytes=one * 3, retention_ms=-1)
    for _ in range(9):
        log.append(batch([b"x" * 300]))
    assert [s.base_offset for s in log.segments] == [0, 2, 4, 6, 8]
    deleted = log.delete_old_segments()
    # 9 batches; dropping 0 and 2 leaves 5 >= 3; dropping 4 too would leave 3 >= 3; then 6: 1 < 3.
    assert deleted == [0, 2, 4]
    assert log.log_start_offset == 6
    assert not os.path.exists(os.path.join(log.directory, "00000000000000000000.log"))
    with pytest.raises(errors.OffsetOutOfRangeError):
        log.read(5, 100)
    assert [o for o, _ in values_of(log)] == [6, 7, 8]


def test_retention_by_time_uses_the_segment_largest_timestamp_and_injected_clock(open_log, clock):
    log = open_log(segment_ms=1000, retention_ms=10_000, retention_bytes=-1)
    for i in range(4):
        log.append(batch([b"x"], timestamp=clock()))
        clock.advance(1001)  # each append goes to a new segment
    assert len(log.segments) == 4
    now = clock()
    assert log.delete_old_segments() == []
    clock.now_ms = T0 + 10_000  # segment 0 (ts T0) is exactly retention_ms old: kept
    assert log.delete_old_segments() == []
    clock.now_ms = T0 + 1001 + 10_001
    assert log.delete_old_segments() == [0, 1]
    clock.now_ms = now + 10**9
    assert log.delete_old_segments() == [2]  # never the active segment
    assert len(log.segments) == 1 and log.log_start_offset == 3


def test_a_reader_holding_a_view_of_a_deleted_segment_still_reads_it(open_log):
    one = len(batch([b"x" * 300]))
    log = open_log(segment_bytes=one * 2, retention_bytes=0, retention_ms=-1)
    for i in range(5):
        log.append(batch([b"%03d" % i + b"x" * 297]))
    held = log.read(0, 1 << 20)
    assert log.delete_old_segments() == [0, 2]
    assert not os.path.exists(held.path)
    assert [r.value[:3] for r in records.decode_records(held.data)] == [b"000", b"001"]


def test_offsets_continue_after_reopen(tmp_path, clock):
    config = LogConfig(segment_bytes=600)
    with PartitionLog.open(str(tmp_path / "p"), config, clock=clock) as log:
        for i in range(20):
            log.append(batch([b"v%d" % i]))
    with PartitionLog.open(str(tmp_path / "p"), config, clock=clock) as log:
        assert log.recovery_report.clean_shutdown and not log.recovery_report.segments_checked
        assert (log.log_start_offset, log.log_end_offset) == (0, 20)
        assert log.append(batch([b"after"])).base_offset == 20
        assert values_of(log)[-2:] == [(19, b"v19"), (20, b"after")]
    with PartitionLog.open(str(tmp_path / "p"), config, clock=clock) as log:
        assert log.log_end_offset == 21


def test_max_timestamp_of_sealed_segments_is_known_after_reopen(tmp_path, clock):
    config = LogConfig(segment_bytes=600, index_interval_bytes=10**6)
    with PartitionLog.open(str(tmp_path / "p"), config, clock=clock) as log:
        for i in range(20):
            log.append(batch([b"v%d" % i], timestamp=T0 + 100 - i))  # decreasing
        expected = [(s.base_offset, s.max_timestamp) for s in log.segments]
    with PartitionLog.open(str(tmp_path / "p"), config, clock=clock) as log:
        assert [(s.base_offset, s.max_timestamp) for s in log.segments] == expected
        assert log.offset_for_timestamp(T0 + 90) == 0


def test_reopen_with_a_lower_leader_epoch_is_refused(tmp_path, clock):
    with PartitionLog.open(str(tmp_path / "p"), clock=clock, leader_epoch=5) as log:
        log.append(batch([b"a"]))
    with pytest.raises(errors.LogError, match="leader_epoch 4"):
        PartitionLog.open(str(tmp_path / "p"), clock=clock, leader_epoch=4)


def test_closed_log_refuses_work(open_log):
    log = open_log()
    log.close()
    with pytest.raises(errors.LogClosedError):
        log.append(batch([b"a"]))
    with pytest.raises(errors.LogClosedError):
        log.read(0, 10)


# -- flush policy -------------------------------------------------------------------------------

@pytest.fixture
def fsyncs(monkeypatch):
    """Counts os.fsync calls on regular files, by path suffix (``.on_main``: those made by
    the calling thread, not the segment flusher's)."""
    counts = _Fsyncs()
    real_fsync = os.fsync

    def counting(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        kind = os.path.splitext(target)[1] or target
        counts.append(kind)
        if threading.current_thread() is threading.main_thread():
            counts.on_main.append(kind)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return counts


class _Fsyncs(list):
    def __init__(self):
        super().__init__()
        self.on_main: list[str] = []

    def clear(self):
        super().clear()
        self.on_main.clear()


def test_no_flush_policy_leaves_fsync_to_the_os(open_log, fsyncs):
    log = open_log()
    fsyncs.clear()
    for i in range(50):
        log.append(batch([b"x"]))
    assert ".log" not in fsyncs


def test_flush_messages_fsyncs_every_n_records(open_log, fsyncs):
    log = open_log(flush_messages=3)
    fsyncs.clear()
    flushed = [log.append(batch([b"x"])).flushed for _ in range(7)]
    assert flushed == [False, False, True, False, False, True, False]
    assert fsyncs.count(".log") == 2
    assert log.recovery_point == 6


def test_flush_ms_fsyncs_on_append_and_maybe_flush(open_log, clock, fsyncs):
    log = open_log(flush_ms=100)
    fsyncs.clear()
    assert not log.append(batch([b"x"])).flushed
    clock.advance(99)
    assert not log.maybe_flush()
    clock.advance(1)
    assert log.maybe_flush()
    assert fsyncs.count(".log") == 1
    assert not log.maybe_flush()  # nothing new to flush
    clock.advance(500)
    assert log.append(batch([b"y"])).flushed
    assert fsyncs.count(".log") == 2


def test_explicit_flush_and_roll_fsync_log_indexes_and_directory(open_log, fsyncs):
    one = len(batch([b"x" * 300]))
    log = open_log(segment_bytes=one * 2, index_interval_bytes=0)
    log.append(batch([b"x" * 300]))
    fsyncs.clear()
    log.flush()
    assert fsyncs == [".log"]
    fsyncs.clear()
    log.append(batch([b"x" * 300]))
    log.append(batch([b"x" * 300]))  # rolls
    # The roll itself fsyncs only the directory (new files); the old segment's files are
    # fsynced by the flusher's thread, and the checkpoint is written once that is done: by
    # the second append itself when the flusher was that quick (its .tmp and a directory
    # fsync on this thread then; seen once in a full run).
    checkpointed = ".tmp" in fsyncs.on_main
    assert [f for f in fsyncs.on_main if f.startswith(".") and f != ".tmp"] == []
    assert sum(1 for f in fsyncs.on_main if not f.startswith(".")) == 1 + checkpointed
    log.flush()  # waits for the roll's fsync
    background = list(fsyncs)
    for kind in fsyncs.on_main:
        background.remove(kind)
    assert sorted(background) == [".index", ".log", ".timeindex"]
    assert fsyncs.on_main.count(".log") == 1  # the active segment
    assert ".tmp" in fsyncs.on_main  # the checkpoint, written atomically after the roll's fsync


# -- bad input ----------------------------------------------------------------------------------

def _corrupted(data: bytes, at: int, value: int) -> bytes:
    out = bytearray(data)
    out[at] = value
    return bytes(out)


GOOD = batch([b"good", b"data"])

BAD_INPUTS = [
    ("wrong magic", _corrupted(GOOD, 16, 1), errors.InvalidMagicError, "magic 1"),
    ("crc mismatch", _corrupted(GOOD, len(GOOD) - 1, GOOD[-1] ^ 0xFF), errors.CrcMismatchError, "CRC"),
    ("length past end", GOOD[:-3], errors.TruncatedBatchError, "truncated"),
    ("short header", GOOD[:30], errors.TruncatedBatchError, "truncated"),
    ("length too small", GOOD[:8] + (10).to_bytes(4, "big") + GOOD[12:], errors.CorruptRecordError,
     "below the minimum"),
    ("good then bad", GOOD + _corrupted(GOOD, 16, 0), errors.InvalidMagicError,
     f"position {len(GOOD)}"),
    ("empty", b"", errors.CorruptRecordError, "no batch"),
]


@pytest.mark.parametrize("name,data,exc,words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_a_typed_error_and_leaves_the_log_unchanged(open_log, name, data, exc, words):
    log = open_log()
    log.append(GOOD)
    before = (log.log_end_offset, log.active_segment.size, os.path.getsize(log.active_segment.path))
    with pytest.raises(exc, match=words) as caught:
        log.append(data)
    assert isinstance(caught.value, errors.ShmbrokerError)
    assert "append" in str(caught.value)
    if name == "good then bad":
        assert caught.value.position == len(GOOD)
    assert (log.log_end_offset, log.active_segment.size, os.path.getsize(log.active_segment.path)) == before
    assert log.append(GOOD).base_offset == 2


def test_oversize_batch_is_record_too_large(open_log):
    log = open_log(batch_bytes_max=1000)
    with pytest.raises(errors.RecordTooLargeError, match="larger than batch_bytes_max=1000"):
        log.append(GOOD + batch([b"x" * 2000]))
    assert log.log_end_offset == 0 and log.active_segment.size == 0


def test_unknown_compression_codecs_are_refused(open_log):
    """Codecs 1-4 are stored as sent (their records stay compressed); 5-7 are not Kafka's."""
    data = bytearray(GOOD)
    data[22] |= 5  # attributes low byte: codec 5; fix the CRC so only the codec is wrong
    data[17:21] = records.crc32c(bytes(data[21:])).to_bytes(4, "big")
    with pytest.raises(errors.UnsupportedCompressionError):
        open_log().append(bytes(data))


def test_malformed_record_inside_a_valid_crc_is_refused(open_log):
    data = bytearray(GOOD)
    data[layout.HEADER_SIZE] = 0x7E  # first record's length varint: 63, far past the batch
    data[17:21] = records.crc32c(bytes(data[21:])).to_bytes(4, "big")
    with pytest.raises(errors.InvalidRecordError, match="malformed record"):
        open_log().append(bytes(data))


def test_control_batches_from_producers_are_refused(open_log):
    data = batch([b"x"], attributes=layout.CONTROL_MASK)
    with pytest.raises(errors.InvalidRecordError, match="control batch"):
        open_log().append(data)


def test_views_stay_valid_after_the_log_is_closed(open_log):
    log = open_log()
    log.append(batch([b"kept"]))
    held = log.read(0, 1 << 20)
    log.close()
    assert records.decode_records(held.data)[0].value == b"kept"


def test_unclean_stop_validates_only_segments_from_the_recovery_point(tmp_path, clock):
    config = LogConfig(segment_bytes=600)
    directory = str(tmp_path / "p")
    with PartitionLog.open(directory, config, clock=clock) as log:
        for i in range(30):
            log.append(batch([b"v%02d" % i + b"x" * 100]))
        assert len(log.segments) >= 4
    with PartitionLog.open(directory, config, clock=clock) as log:
        log.append(batch([b"unflushed"]))
        active_base = log.active_segment.base_offset
        log.abandon()  # no flush, no checkpoint, no marker: what kill -9 leaves
    with PartitionLog.open(directory, config, clock=clock) as log:
        report = log.recovery_report
        assert not report.clean_shutdown and report.recovery_point == 30
        assert [s.base_offset for s in report.segments_checked] == [active_base]
        assert values_of(log)[-1] == (30, b"unflushed")


@pytest.mark.parametrize("stop", ["clean", "kill"])
def test_an_empty_batch_survives_a_restart_and_reads_skip_its_offsets(tmp_path, clock, stop):
    """An empty batch (no records; the partition writes one over offsets a producer reserved
    and never committed, decision 0005) is a valid batch for recovery: a restart, clean or
    after kill -9, keeps it and everything after it (recovery used to cut the log there)."""
    directory = str(tmp_path / "p")
    log = PartitionLog.open(directory, LogConfig(), clock=clock)
    log.append(batch([b"a"]))
    with pytest.raises(errors.InvalidRecordError):
        log.append(records.empty_batch(1, 5))  # only the partition's own gap may be empty
    log.append(records.empty_batch(1, 5), gap=True)
    log.append(batch([b"b", b"c"]))
    if stop == "clean":
        log.close()
    else:
        log.abandon()
    with PartitionLog.open(directory, LogConfig(), clock=clock) as log:
        report = log.recovery_report
        assert report is None or not report.bytes_dropped, report.summary()
        assert log.log_end_offset == 8
        assert values_of(log) == [(0, b"a"), (6, b"b"), (7, b"c")]
        piece = log.read(3, 1 << 20)  # inside the empty batch: it comes first
        assert (piece.first_offset, piece.last_offset) == (1, 7)
