"""The public records API (shmbroker.records): defaults, headers, columnar numpy decode."""
import time

import numpy as np
import pytest

from shmbroker import errors, records
from shmbroker.layout import record_batch as layout


def test_encode_defaults_timestamp_to_now_and_header_reads_back():
    before = time.time_ns() // 1_000_000
    batch = records.encode_batch([b"a", b"bb", b"ccc"], keys=[b"k", None, b""])
    header = records.read_header(batch)
    assert header.magic == 2
    assert header.records_count == 3 and header.last_offset_delta == 2
    assert before <= header.base_timestamp <= time.time_ns() // 1_000_000
    assert header.size == len(batch)
    assert header.crc == records.crc32c(memoryview(batch)[layout.CRC_START:])


def test_read_header_of_short_buffer_is_a_truncation_error():
    with pytest.raises(errors.TruncatedBatchError, match="61 bytes"):
        records.read_header(b"\0" * 60)


def test_columnar_decode_points_into_the_original_buffer():
    values = [b"v%03d" % i for i in range(50)] + [None, b""]
    keys = [None] * 51 + [b"last"]
    batch = records.encode_batch(values, keys=keys, timestamp=1234, base_offset=100)
    cols = records.decode_columnar(batch)
    assert len(cols) == 52
    assert cols.offsets.tolist() == list(range(100, 152))
    assert set(cols.timestamps.tolist()) == {1234}
    assert bytes(cols.value(7)) == b"v007"
    assert cols.value(50) is None and bytes(cols.value(51)) == b""
    assert cols.key(0) is None and bytes(cols.key(51)) == b"last"
    start = int(cols.value_starts[7])
    assert batch[start:start + 4] == b"v007"


def test_columnar_decode_of_fixed_width_values_gives_a_2d_array():
    rows = np.arange(64 * 16, dtype=np.uint8).reshape(64, 16)
    batch = records.encode_batch(rows)
    cols = records.decode_columnar(batch + batch)
    assert len(cols) == 128
    np.testing.assert_array_equal(cols.values_2d()[:64], rows)
    np.testing.assert_array_equal(cols.values_2d()[64:], rows)


def test_columnar_decode_rejects_a_bad_crc():
    batch = bytearray(records.encode_batch([b"x" * 100]))
    batch[-1] ^= 0xFF
    with pytest.raises(errors.CrcMismatchError):
        records.decode_columnar(bytes(batch))


def test_scan_result_names_the_problem_and_builds_the_exception():
    good = records.encode_batch([b"x"] * 3)
    bad = bytearray(good)
    bad[16] = 1
    scan = records.scan_batches(good + bytes(bad))
    assert scan.valid_bytes == len(good) and scan.status_name == "BAD_MAGIC"
    assert scan.batches[0].records_count == 3 and scan.records == 3
    exc = scan.error(good + bytes(bad), "segment x")
    assert isinstance(exc, errors.InvalidMagicError) and exc.position == len(good)


def test_headers_round_trip_with_null_values_and_unicode_keys():
    hdrs = [[("trace", b"abc"), ("ünï", None)], None]
    out = records.decode_records(records.encode_batch([b"1", b"2"], headers=hdrs))
    assert out[0].headers == (("trace", b"abc"), ("ünï", None))
    assert out[1].headers == ()
