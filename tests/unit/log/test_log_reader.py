"""LogReader: a second, read-only view of a partition log, bounded by the published state."""
from __future__ import annotations

import os
import struct

import pytest
from log_helpers import batch

from shmbroker import errors, records
from shmbroker.log import reader as reader_module
from shmbroker.log.reader import LogReader, ReadState


def state_of(log, hw=None, end=None) -> ReadState:
    """What the partition process publishes after an append (hw/end overridable)."""
    active = log.active_segment
    return ReadState(log.high_watermark if hw is None else hw, log.log_start_offset,
                     active.base_offset, active.size if end is None else end)


def read_all(reader: LogReader, state, start: int = 0, max_bytes: int = 1 << 20) -> list:
    out = []
    offset = start
    # Bounded: each read returns at least one batch until the high watermark.
    while offset < state.high_watermark:
        piece = reader.read(offset, max_bytes, state)
        assert piece.length > 0
        out.extend((r.offset, r.value) for r in records.decode_records(piece.data)
                   if r.offset >= offset)
        offset = piece.next_offset
    return out


def fill(log, batches: int, per_batch: int = 3, size: int = 10) -> list:
    expected = []
    for b in range(batches):
        values = [f"{b}:{i}:".encode().ljust(size, b"x") for i in range(per_batch)]
        info = log.append(batch(values))
        expected.extend(zip(range(info.base_offset, info.last_offset + 1), values))
    return expected


def test_reads_what_the_writer_appended_batch_by_batch(open_log, tmp_path):
    log = open_log()
    expected = fill(log, 20)
    with LogReader(tmp_path / "p0") as reader:
        assert read_all(reader, state_of(log)) == expected
        assert read_all(reader, state_of(log), max_bytes=1) == expected  # one batch per read
        assert read_all(reader, state_of(log), start=31) == expected[31:]


def test_never_returns_a_batch_at_or_above_the_high_watermark_even_if_in_the_file(open_log, tmp_path):
    log = open_log()
    fill(log, 4, per_batch=3)  # offsets 0..11 in batches of 3
    reader = LogReader(tmp_path / "p0")
    # Bytes of all four batches are in the file and the end position says so, but only
    # offsets below 6 are committed.
    state = state_of(log, hw=6)
    piece = reader.read(0, 1 << 20, state)
    assert (piece.first_offset, piece.last_offset) == (0, 5)
    assert [r.offset for r in records.decode_records(piece.data)] == list(range(6))
    assert reader.read(6, 1 << 20, state).length == 0  # at the hw: nothing yet
    with pytest.raises(errors.OffsetOutOfRangeError):
        reader.read(7, 1 << 20, state)
    # A hw in the middle of a batch (never published, but be strict): that batch is withheld.
    piece = reader.read(3, 1 << 20, state_of(log, hw=8))
    assert piece.last_offset == 5
    reader.close()


def test_the_published_end_position_bounds_the_active_segment(open_log, tmp_path):
    log = open_log()
    fill(log, 2, per_batch=2)
    first_end = log.active_segment.size
    published = state_of(log)
    fill(log, 2, per_batch=2)  # appended, not published yet
    reader = LogReader(tmp_path / "p0")
    piece = reader.read(0, 1 << 20, published)
    assert piece.length == first_end and piece.last_offset == 3
    piece = reader.read(4, 1 << 20, state_of(log))
    assert (piece.first_offset, piece.last_offset) == (4, 7)
    reader.close()


def test_reads_across_segment_rolls_and_remaps_a_growing_file(open_log, tmp_path):
    log = open_log(segment_bytes=600, index_interval_bytes=0)
    expected = []
    reader = LogReader(tmp_path / "p0")
    got = []
    offset = 0
    for _ in range(10):  # read while the writer appends and rolls
        expected += fill(log, 3)
        state = state_of(log)
        got += read_all(reader, state, start=offset)
        offset = state.high_watermark
    assert len(log.segments) > 3
    assert got == expected
    assert read_all(reader, state_of(log)) == expected  # again from 0, through every segment
    reader.close()


def test_below_the_log_start_after_retention_is_out_of_range(open_log, tmp_path, clock):
    log = open_log(segment_bytes=600, retention_bytes=700)
    expected = fill(log, 30)
    reader = LogReader(tmp_path / "p0")
    old = reader.read(0, 1 << 20, state_of(log))  # maps the first segment
    deleted = log.delete_old_segments()
    assert deleted and log.log_start_offset > 0
    state = state_of(log)
    with pytest.raises(errors.OffsetOutOfRangeError):
        reader.read(0, 1 << 20, state)
    # A stale state (published before retention ran) does not help: the file is gone.
    stale = state._replace(log_start_offset=0)
    with pytest.raises(errors.OffsetOutOfRangeError):
        reader.read(deleted[-1], 1 << 20, stale)
    start = log.log_start_offset
    assert read_all(reader, state, start=start) == [e for e in expected if e[0] >= start]
    # The view read before the deletion is still valid: the mapping outlives the unlink.
    assert [r.offset for r in records.decode_records(old.data)][0] == 0
    reader.close()


def test_index_lookup_finds_the_batch_and_a_bad_index_falls_back_to_a_scan(open_log, tmp_path):
    log = open_log(index_interval_bytes=0)  # an entry for (almost) every batch
    expected = fill(log, 50, per_batch=2)
    log.close()  # indexes written and fsynced
    directory = tmp_path / "p0"
    index = os.path.join(directory, "00000000000000000000.index")
    assert os.path.getsize(index) > 8 * 10
    state = ReadState(100, 0, 0, os.path.getsize(os.path.join(directory, "00000000000000000000.log")))
    reader = LogReader(directory)
    assert read_all(reader, state, start=77, max_bytes=1) == expected[77:]
    reader.close()
    # Garbage in the index (entries pointing at wrong batches): the log is the truth.
    with open(index, "r+b") as f:
        f.seek(8 * 5)
        f.write(b"\x00\x00\x00\x30\x00\x00\x00\x05" * 3)
    reader = LogReader(directory)
    assert read_all(reader, state, start=61, max_bytes=1) == expected[61:]
    reader.close()
    os.remove(index)  # missing index: walk from position 0
    reader = LogReader(directory)
    assert read_all(reader, state, start=99) == expected[99:]
    reader.close()


def test_a_read_a_little_past_the_last_one_walks_on_without_the_index(open_log, tmp_path,
                                                                        monkeypatch):
    """A consumer that took records from a ring reads the log a few offsets past where its
    last read ended: the reader walks on from there (no index file opened); far past it, or
    behind it, the index is used as before."""
    log = open_log(index_interval_bytes=0)
    expected = fill(log, 40, per_batch=2)
    state = state_of(log)
    with LogReader(tmp_path / "p0") as reader:
        first = reader.read(0, 1, state)  # one batch: offsets 0..1, the hint is now 2
        assert first.next_offset == 2
        lookups = []
        original = reader_module._SegmentFile.lookup
        monkeypatch.setattr(reader_module._SegmentFile, "lookup",
                            lambda self, *a: lookups.append(a) or original(self, *a))
        for offset in (7, 8, 13):  # each a little past the last read's end
            piece = reader.read(offset, 1, state)
            got = [(r.offset, r.value) for r in records.decode_records(piece.data)]
            assert got[0][0] <= offset and dict(got)[offset] == dict(expected)[offset]
        assert lookups == []
        assert read_all(reader, state, start=5) == expected[5:]  # behind: the index
        assert lookups


def test_a_read_far_past_the_last_one_walks_from_it_when_the_index_entry_lies_behind_it(
        open_log, tmp_path):
    """The index can lag the log (a partition writes its entries when Python settles its C
    rounds): a read far past the last one (more than HINT_WALK_OFFSETS_MAX) walks from the
    last read's end where that lies between the index entry and the offset, not from the
    entry. Shown with no index at all (entry: position 0) and a broken header between
    position 0 and the last read's end: a walk from the entry would meet it. A read behind
    the last one still walks from the entry, and meets it."""
    batches = reader_module.HINT_WALK_OFFSETS_MAX * 2 + 100
    log = open_log()
    expected = fill(log, batches, per_batch=1)
    log.close()
    directory = tmp_path / "p0"
    os.remove(os.path.join(directory, "00000000000000000000.index"))
    path = os.path.join(directory, "00000000000000000000.log")
    size = os.path.getsize(path)
    assert size % batches == 0  # equal batches: batch k starts at k * (size // batches)
    state = ReadState(batches, 0, 0, size)
    with LogReader(directory) as reader:
        hint = reader_module.HINT_WALK_OFFSETS_MAX // 2
        assert reader.read(hint - 1, 1, state).next_offset == hint
        with open(path, "r+b") as f:  # the magic byte of a batch before the hint
            f.seek((hint // 2) * (size // batches) + 16)
            f.write(b"\x07")
        far = batches - 1
        assert not reader_module.walks_on(hint, far)
        piece = reader.read(far, 1, state)
        assert [(r.offset, r.value) for r in records.decode_records(piece.data)] == \
            [expected[far]]
        with pytest.raises(errors.CorruptSegmentError):
            reader.read(hint // 2 + 1, 1, state)


def test_a_file_shorter_than_the_published_end_is_an_error_not_a_sigbus(open_log, tmp_path):
    log = open_log()
    fill(log, 3)
    state = state_of(log)
    path = log.active_segment.path
    reader = LogReader(tmp_path / "p0")
    assert reader.read(0, 1 << 20, state).last_offset == 8
    log.abandon()
    os.truncate(path, 40)  # someone cut committed bytes: must not crash the reader
    fresh = LogReader(tmp_path / "p0")
    with pytest.raises(errors.CorruptSegmentError, match="shorter"):
        fresh.read(0, 1 << 20, state)
    fresh.close()
    reader.close()


def test_a_view_outlives_the_reader_and_the_segment_file(open_log, tmp_path):
    log = open_log()
    fill(log, 3)
    reader = LogReader(tmp_path / "p0")
    piece = reader.read(0, 1 << 20, state_of(log))
    reader.close()
    log.close()
    for name in os.listdir(tmp_path / "p0"):
        os.remove(tmp_path / "p0" / name)
    assert len(records.decode_records(piece.data)) == 9


def test_a_pinned_descriptor_sends_the_slice_after_the_reader_closed_and_the_file_went(
        open_log, tmp_path):
    log = open_log()
    fill(log, 3)
    reader = LogReader(tmp_path / "p0")
    piece = reader.read(3, 1 << 20, state_of(log))
    expected = bytes(piece.data)
    fd = reader.pin(piece)
    assert fd is not None and not os.get_inheritable(fd)
    try:
        reader.close()
        log.close()
        for name in os.listdir(tmp_path / "p0"):
            os.remove(tmp_path / "p0" / name)
        assert os.pread(fd, piece.length, piece.file_position) == expected
    finally:
        os.close(fd)


def test_pin_is_none_once_the_reader_closed_the_slices_segment(open_log, tmp_path):
    log = open_log(segment_bytes=600)
    fill(log, 40)
    reader = LogReader(tmp_path / "p0")
    state = state_of(log)
    first = reader.read(0, 1 << 20, state)
    read_all(reader, state, start=first.next_offset)  # maps later segments, closes the first
    assert len(log.segments) > reader_module.MAPPED_SEGMENTS_MAX
    assert reader.pin(first) is None  # the caller sends first.data, which keeps its mapping
    last = reader.read(state.high_watermark - 1, 1 << 20, state)
    fd = reader.pin(last)
    assert fd is not None
    os.close(fd)
    reader.close()


def test_corrupt_crc_is_reported_when_verifying(open_log, tmp_path):
    log = open_log()
    fill(log, 2)
    state = state_of(log)
    with open(log.active_segment.path, "r+b") as f:
        f.seek(70)
        byte = f.read(1)
        f.seek(70)
        f.write(bytes([byte[0] ^ 0xFF]))
    reader = LogReader(tmp_path / "p0")
    with pytest.raises(errors.CorruptSegmentError):
        reader.read(0, 1 << 20, state)
    piece = reader.read(0, 1 << 20, state, verify_crc=False)  # the caller's decode checks it
    with pytest.raises(errors.CrcMismatchError):
        records.decode_records(piece.data)
    reader.close()


def test_keeps_a_bounded_number_of_segments_mapped(open_log, tmp_path):
    log = open_log(segment_bytes=600)
    expected = fill(log, 40)
    reader = LogReader(tmp_path / "p0")
    assert read_all(reader, state_of(log)) == expected
    assert len(log.segments) > reader_module.MAPPED_SEGMENTS_MAX
    mapped = [s for s in reader._segments.values() if s.fd is not None]
    assert len(mapped) <= reader_module.MAPPED_SEGMENTS_MAX
    reader.close()


def test_a_caught_up_reader_of_a_growing_segment_keeps_one_mapping(open_log, tmp_path):
    """The mapping reaches past the file's end, so appended batches appear in it: no mmap and
    munmap per read (Python's mmap can only map what the file holds, and remapped each time)."""
    log = open_log()
    reader = LogReader(tmp_path / "p0")
    maps = []  # the objects themselves (an id could be reused once one is freed)
    offset = 0
    for b in range(300):
        log.append(batch([b"v%d" % b]))
        piece = reader.read(offset, 1 << 20, state_of(log))
        assert [r.value for r in records.decode_records(piece.data)] == [b"v%d" % b]
        offset = piece.next_offset
        maps.append(_mapping_of(reader))
        del piece
    assert all(m is maps[0] for m in maps)
    reader.close()


def _mapping_of(reader: LogReader):
    (segment,) = [s for s in reader._segments.values() if s.map is not None]
    return segment.map


def test_file_map_reaches_past_the_end_and_sees_what_is_appended_later(tmp_path):
    from shmbroker.native import _native

    path = tmp_path / "grow"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"hello")
        mapping = _native.FileMap(fd, 1 << 20)  # 1 MiB over a 5-byte file
        view = memoryview(mapping)
        assert len(mapping) == len(view) == 1 << 20 and bytes(view[:5]) == b"hello"
        os.write(fd, b" world")
        assert bytes(view[:11]) == b"hello world"  # the same pages: the page cache
        with pytest.raises(BufferError):
            mapping.close()  # a view still uses it
        view.release()
        mapping.close()
        assert mapping.closed and len(mapping) == 0
        with pytest.raises(ValueError):
            memoryview(mapping)
        with pytest.raises(ValueError):
            _native.FileMap(fd, 0)
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        _native.FileMap(fd, 4096)  # closed fd


def test_tail_offset_covers_the_last_bytes_asked_across_segments(open_log, tmp_path):
    """What a restarted Kafka listener reads to rebuild producer state: from the offset it
    returns to the high watermark lie at least ``bytes_max`` bytes (where the log has them)
    and at most one index interval more; a small budget stays in the active segment, a
    large one reaches back into sealed segments, a larger one than the log starts at 0."""
    log = open_log(segment_bytes=4096, index_interval_bytes=256)
    fill(log, 120, per_batch=3, size=40)
    assert len(log.segments) > 3
    state = state_of(log)
    sizes = {s.base_offset: s.size for s in log.segments}
    with LogReader(tmp_path / "p0") as reader:
        for bytes_max in (100, 1000, 5000, 9000):
            start = reader.tail_offset(state, bytes_max)
            covered = sum(len(p) for p in _pieces(reader, state, start))
            assert bytes_max <= covered <= bytes_max + 256 + 400, (bytes_max, covered)
        assert reader.tail_offset(state, sum(sizes.values()) + 1) == 0


def _pieces(reader, state, offset):
    while offset < state.high_watermark:  # bounded: every read moves past a batch
        piece = reader.read(offset, 1 << 20, state)
        yield bytes(piece.data)
        offset = piece.last_offset + 1


def _walk_both(reader, segment, view, *args, **kwargs):
    """(C result, reference result): each a return value or the CorruptSegmentError text."""
    out = []
    for walk in (reader._walk, reader._walk_reference):
        try:
            out.append(walk(segment, view, *args, **kwargs))
        except errors.CorruptSegmentError as exc:
            out.append(("corrupt", str(exc)))
    return out


def test_the_c_header_walk_agrees_with_the_python_reference_on_good_and_bad_bytes(open_log,
                                                                                  tmp_path):
    """LogReader._walk runs in C (_native.walk_batches); _walk_reference is the Python it
    replaced. Every start (segment start, index entries, hints), every target offset, and
    the failures (stale entry, broken chain, bad magic, a batch cut by the end) agree."""
    log = open_log()
    fill(log, 12, per_batch=3)  # offsets 0..35, batches of 3
    end = log.active_segment.size
    path = log.active_segment.path
    log.close()
    state = ReadState(36, 0, 0, end)
    with LogReader(tmp_path / "p0") as reader:
        reader.read(0, 1, state)
        segment = reader.last_segment
        view = segment.view(end)
        positions, bases = [], []
        position = 0
        while position < end:  # bounded by the batches in the file
            base, length = struct.unpack_from(">qi", view, position)
            positions.append(position)
            bases.append(base)
            position += length + 12
        cases = 0
        for i, start in enumerate(positions):
            for offset in range(0, 40, 1):
                # From the segment's start, from an index entry (the batch's last offset, or a
                # wrong one), from a hint (the batch's base, or a wrong one).
                for args, kwargs in (((start, end, offset, bases[i] + 2), {}),
                                     ((start, end, offset, bases[i] + 1), {}),
                                     ((start, end, offset, -1), {"expected_base": bases[i]}),
                                     ((start, end, offset, -1), {"expected_base": bases[i] + 3}),
                                     ((start, end - 5, offset, bases[i] + 2), {})):
                    c, ref = _walk_both(reader, segment, view, *args, **kwargs)
                    assert c == ref, (args, kwargs)
                    cases += 1
        assert cases > 1000
        # Found, end, bad-entry and a corrupt chain were all among them:
        assert reader._walk(segment, view, 0, end, 20, -1) == (positions[6], 18)
        assert reader._walk(segment, view, 0, end, 99, -1) is None
        assert reader._walk(segment, view, positions[2], end, 20, 7) == "bad-entry"
        view.release()
        segment.close()
    # Damaged bytes: a bad magic in the 5th batch, then a base offset that breaks the chain.
    for at, patch, what in ((positions[4] + 16, b"\x07", "not a whole RecordBatch v2 header"),
                            (positions[4], struct.pack(">q", 99), "holds offsets 99..101")):
        with open(path, "r+b") as f:
            f.seek(at)
            saved = f.read(len(patch))
            f.seek(at)
            f.write(patch)
        with LogReader(tmp_path / "p0") as reader:
            reader.read(0, 1, state)
            segment = reader.last_segment
            view = segment.view(end)
            for start, entry in ((0, -1), (positions[1], 5), (positions[3], 11)):
                for offset in (14, 30):
                    c, ref = _walk_both(reader, segment, view, start, end, offset, entry)
                    assert c == ref
            c, _ = _walk_both(reader, segment, view, 0, end, 30, -1)
            assert c[0] == "corrupt" and what in c[1]
            c, _ = _walk_both(reader, segment, view, positions[3], end, 30, 11)
            assert c[0] == "corrupt" and what in c[1]  # past a good entry: the log's own fault
            assert reader._walk(segment, view, positions[4], end, 30, 14) == "bad-entry"
            view.release()
            segment.close()
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(saved)


def test_the_c_header_walk_refuses_a_range_outside_the_buffer():
    from shmbroker.native import _native

    with pytest.raises(ValueError, match="outside the buffer"):
        _native.walk_batches(b"x" * 100, 0, 101, 0, -1, -1)
    with pytest.raises(ValueError, match="outside the buffer"):
        _native.walk_batches(b"x" * 100, 50, 40, 0, -1, -1)
    assert _native.walk_batches(b"x" * 100, 0, 100, 0, -1, -1)[0] == _native.WALK_NOT_HEADER
    assert _native.walk_batches(b"x" * 100, 60, 100, 0, -1, -1)[0] == _native.WALK_END
