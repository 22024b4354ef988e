"""index.py: Kafka's .index/.timeindex format, sparse lookups, sanity checks, truncation."""
from __future__ import annotations

import os
import struct

from shmbroker.log import files
from shmbroker.log.index import IndexRule, OffsetIndex, TimeIndex


def test_offset_index_file_is_kafkas_big_endian_int32_pairs(tmp_path):
    path = str(tmp_path / files.segment_file_name(100, ".index"))
    index = OffsetIndex.open(path, 100, 4096)
    index.append(139, 4500)
    index.append(179, 10500)
    index.flush()
    assert open(path, "rb").read() == struct.pack(">iiii", 39, 4500, 79, 10500)
    index.close()
    again = OffsetIndex.open(path, 100, 4096)
    assert again.entries() == [(139, 4500), (179, 10500)]
    assert again.sanity_problem(log_size=20000, next_offset=200) is None
    again.close()


def test_offset_index_lookup_returns_largest_entry_at_or_below(tmp_path):
    index = OffsetIndex.open(str(tmp_path / "a.index"), 100, 4096)
    for offset, position in [(139, 4500), (179, 10500), (219, 16500)]:
        index.append(offset, position)
    assert index.lookup(100) == (100, 0)  # before the first entry: start of the segment
    assert index.lookup(138) == (100, 0)
    assert index.lookup(139) == (139, 4500)
    assert index.lookup(152) == (139, 4500)
    assert index.lookup(10**9) == (219, 16500)
    index.close()


def test_offset_index_truncate_drops_entries_at_and_after_position(tmp_path):
    path = str(tmp_path / "a.index")
    index = OffsetIndex.open(path, 0, 4096)
    for i in range(1, 6):
        index.append(i * 10, i * 1000)
    index.truncate_to_position(3000)
    assert index.entries() == [(10, 1000), (20, 2000)]
    index.append(25, 2500)
    index.close()
    assert os.path.getsize(path) == 24


def test_offset_index_sanity_check_catches_torn_and_stale_entries(tmp_path):
    path = str(tmp_path / "a.index")
    with open(path, "wb") as f:
        f.write(struct.pack(">iiii", 10, 1000, 20, 2000) + b"\x00\x00\x00")  # torn 3rd entry
    assert "torn" in OffsetIndex.open(path, 0, 4096).sanity_problem(5000)
    with open(path, "wb") as f:
        f.write(struct.pack(">iiii", 10, 1000, 10, 2000))
    assert "does not grow" in OffsetIndex.open(path, 0, 4096).sanity_problem(5000)
    with open(path, "wb") as f:
        f.write(struct.pack(">iiii", 10, 1000, 20, 900))
    assert "position" in OffsetIndex.open(path, 0, 4096).sanity_problem(5000)
    with open(path, "wb") as f:
        f.write(struct.pack(">iiii", 10, 1000, 20, 2000))
    index = OffsetIndex.open(path, 0, 4096)
    assert "log size" in index.sanity_problem(2000)  # position not inside the log
    assert "next offset" in index.sanity_problem(5000, next_offset=20)  # offset not inside
    assert index.sanity_problem(5000, next_offset=21) is None


def test_time_index_appends_only_when_the_timestamp_grows(tmp_path):
    path = str(tmp_path / "a.timeindex")
    index = TimeIndex.open(path, 0, 4096)
    assert index.maybe_append(1000, 5)
    assert not index.maybe_append(1000, 9)
    assert not index.maybe_append(900, 12)
    assert index.maybe_append(1500, 20)
    index.flush()
    assert open(path, "rb").read() == struct.pack(">qiqi", 1000, 5, 1500, 20)
    assert index.lookup(1000) is None  # strictly below: nothing
    assert index.lookup(1001) == 5
    assert index.lookup(10**12) == 20
    index.truncate_to_offset(20)
    assert index.entries() == [(1000, 5)]
    index.close()
    assert TimeIndex.open(path, 0, 4096).sanity_problem(next_offset=6) is None


def test_index_is_full_at_index_bytes_max(tmp_path):
    index = OffsetIndex.open(str(tmp_path / "a.index"), 0, 64)
    for i in range(8):
        assert not index.is_full
        index.append(i, i * 10)
    assert index.is_full and index.entries_left == 0
    index.close()


def test_index_rule_indexes_a_batch_once_more_than_interval_bytes_preceded_it():
    rule = IndexRule(interval_bytes=4096)
    # Batches of 1500 bytes, 10 offsets each: entries at positions 4500, 9000 (module doc).
    entries, position = [], 0
    for i in range(8):
        if rule.observe(1500, 100 + 10 * i + 9, 1000 + i):
            entries.append((100 + 10 * i + 9, position))
        position += 1500
    assert entries == [(139, 4500), (169, 9000)]
    assert rule.max_timestamp == 1007 and rule.offset_of_max_timestamp == 179
