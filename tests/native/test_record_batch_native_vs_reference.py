"""The RecordBatch v2 routines of the C core against the pure-Python reference, same cases
through both: encoding is byte-identical, decoding gives equal records, scanning gives equal
results (every truncation of a batch, random byte flips), and bad bytes or bad arguments give
the same exception types (and, for batch-level errors, the same positions)."""
from __future__ import annotations

import pickle
import random
import struct
import threading

import numpy as np
import pytest

from shmbroker import _native, errors, records
from shmbroker.layout import record_batch as L
from shmbroker.records import reference

CODECS = [_native, reference]
CODEC_IDS = ["native", "reference"]
SCAN_OPTIONS = [(c, r) for c in (True, False) for r in (False, True)]
S = L.SCAN_STATUS
OFF = L.OFFSETS


# --- helpers ------------------------------------------------------------------------------------


def as_tuples(recs) -> list[tuple]:
    return [(r.offset, r.timestamp, r.key, r.value, tuple(r.headers)) for r in recs]


def blob(rng: random.Random, nullable: bool = True):
    roll = rng.random()
    if nullable and roll < 0.15:
        return None
    if roll < 0.3:
        return b""
    return rng.randbytes(rng.choice([1, 5, 60, 127, 128, 300]))


def random_args(rng: random.Random, n: int) -> dict:
    """encode_batch arguments with null/empty keys and values, headers with null values and
    unicode keys, and timestamps going backwards as well as forwards."""
    base_ts = rng.randrange(-(2**40), 2**41)
    kwargs = dict(
        values=[blob(rng) for _ in range(n)],
        keys=None if rng.random() < 0.3 else [blob(rng) for _ in range(n)],
        headers=None if rng.random() < 0.3 else [
            None if rng.random() < 0.2 else
            [(rng.choice(["", "h", "trace-id", "ünïcode", "\u2603" * 3]), blob(rng))
             for _ in range(rng.choice([0, 1, 2, 5]))]
            for _ in range(n)],
        base_offset=rng.randrange(0, 2**40),
        partition_leader_epoch=rng.choice([-1, 0, 7]),
        producer_id=rng.choice([-1, 12345]),
        producer_epoch=rng.choice([-1, 3]),
        base_sequence=rng.choice([-1, 99]),
        attributes=rng.choice([0, L.TIMESTAMP_TYPE_MASK, L.TRANSACTIONAL_MASK]),
    )
    if rng.random() < 0.7:
        kwargs["timestamps"] = [base_ts + rng.randrange(-100_000, 100_000) for _ in range(n)]
    else:
        kwargs["timestamp"] = base_ts
    return kwargs


def expected_records(kwargs: dict) -> list[tuple]:
    n = len(kwargs["values"])
    ts = kwargs.get("timestamps") or [kwargs.get("timestamp", 0)] * n
    if kwargs.get("attributes", 0) & L.TIMESTAMP_TYPE_MASK:  # LogAppendTime: the batch's time
        ts = [max(ts)] * n
    keys = kwargs["keys"] or [None] * n
    headers = kwargs["headers"] or [None] * n
    return [(kwargs["base_offset"] + i, ts[i], keys[i], kwargs["values"][i],
             tuple(tuple(h) for h in (headers[i] or ()))) for i in range(n)]


def zz(v: int) -> bytes:
    """A zigzag varint (test-side writer, independent of both codecs)."""
    u = ((v << 1) ^ (v >> 63)) & (2**64 - 1)
    out = bytearray()
    while u >= 0x80:
        out.append(u & 0x7F | 0x80)
        u >>= 7
    out.append(u)
    return bytes(out)


def record(body: bytes) -> bytes:
    return zz(len(body)) + body


def body(ts_delta=0, offset_delta=0, key=None, value=b"v", headers=()) -> bytes:
    out = b"\x00" + zz(ts_delta) + zz(offset_delta)
    for item in (key, value):
        out += zz(-1) if item is None else zz(len(item)) + item
    out += zz(len(headers))
    for hk, hv in headers:
        out += zz(len(hk)) + hk + (zz(-1) if hv is None else zz(len(hv)) + hv)
    return out


def raw_batch(records: bytes, count: int, last_delta: int | None = None, attributes: int = 0,
              magic: int = 2, base_offset: int = 0, fix_crc: bool = True) -> bytes:
    """A batch around hand-made record bytes, with a correct batch_length and CRC."""
    tail = struct.pack(">hiqqqhii", attributes, count - 1 if last_delta is None else last_delta,
                       1000, 1000, -1, -1, -1, count) + records
    crc = reference.crc32c(tail) if fix_crc else 0
    return struct.pack(">qiibI", base_offset, 49 + len(records), -1, magic, crc) + tail


def set_crc(batch: bytearray, pos: int = 0) -> None:
    length = struct.unpack_from(">i", batch, pos + 8)[0]
    end = pos + 12 + length
    struct.pack_into(">I", batch, pos + 17, reference.crc32c(bytes(batch[pos + 21:end])))


def outcome(fn, *args):
    try:
        return fn(*args)
    except (errors.CorruptRecordError, errors.UnsupportedCompressionError) as exc:
        return exc


def assert_same_outcome(buf, verify_crc=True) -> object:
    """decode_records, decode_columnar_into and scan_batches agree between the two codecs."""
    nat = outcome(_native.decode_records, buf, verify_crc)
    ref = outcome(reference.decode_records, buf, verify_crc)
    if isinstance(ref, Exception) or isinstance(nat, Exception):
        assert type(nat) is type(ref), (nat, ref)
        if isinstance(ref, errors.CorruptRecordError):
            assert isinstance(nat.position, int) and 0 <= nat.position <= len(buf)
            if not isinstance(ref, errors.InvalidRecordError):  # record errors may point inside
                assert nat.position == ref.position, (nat, ref)
        assert str(nat)
    else:
        assert as_tuples(nat) == as_tuples(ref)
    for verify_crc2, verify_records in SCAN_OPTIONS:
        for bytes_max in (0, 200):
            got = _native.scan_batches(buf, verify_crc2, verify_records, bytes_max)
            want = tuple(reference.scan_batches(buf, verify_crc2, verify_records, bytes_max))
            assert got == want, (verify_crc2, verify_records, bytes_max)
    n = len(buf) // 7 + 1
    cols_n = columnar(n)
    cols_r = columnar(n)
    got = outcome(_native.decode_columnar_into, buf, *cols_n, verify_crc)
    want = outcome(reference.decode_columnar_into, buf, *cols_r, verify_crc)
    if isinstance(want, Exception) or isinstance(got, Exception):
        assert type(got) is type(want), (got, want)
    else:
        assert got == want
        for a, b in zip(cols_n, cols_r):
            assert np.array_equal(a[:got], b[:got])
    return nat


def columnar(n: int):
    return (np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64),
            np.zeros(n, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int32))


def both_raise(exc_type, fn_name, *args, **kwargs):
    """Both codecs raise exactly exc_type; returns the two exceptions."""
    out = []
    for codec in CODECS:
        with pytest.raises(exc_type) as info:
            getattr(codec, fn_name)(*args, **kwargs)
        assert type(info.value) is exc_type, (codec.__name__, info.value)
        out.append(info.value)
    return out


# --- encode -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_random_batches_encode_identically_and_decode_to_what_was_encoded(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 2, 3, 10, 57, 200, 1000]) if seed % 8 else 1000
    kwargs = random_args(rng, n)
    nat = _native.encode_batch(**kwargs)
    assert nat == reference.encode_batch(**kwargs)
    assert as_tuples(_native.decode_records(nat)) == expected_records(kwargs)
    assert_same_outcome(nat)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 8191, 8193, 20_000])
def test_values_only_batches_take_the_plain_path_and_encode_like_the_reference(n):
    # No keys, no headers, one timestamp: the C encoder's plain path (offset deltas cross
    # the 1-, 2- and 3-byte varint sizes at 64 and 8192; values of 0, 1, 127, 128 and 300
    # bytes cross the length varint's sizes; None values are null).
    rng = random.Random(n)
    values = [None if i % 97 == 5 else bytes([i % 256]) * rng.choice((0, 1, 127, 128, 300))
              for i in range(n)]
    nat = _native.encode_batch(values, timestamp=1_700_000_000_123, base_offset=7)
    assert nat == reference.encode_batch(values, timestamp=1_700_000_000_123, base_offset=7)
    assert [r.value for r in _native.decode_records(nat)] == values
    grid = np.frombuffer(rng.randbytes(n * 100), dtype=np.uint8).reshape(n, 100)
    assert _native.encode_batch(grid) == reference.encode_batch([bytes(r) for r in grid])


def two_dimensional_case():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 256, (300, 100), dtype=np.uint8)
    ts = np.ascontiguousarray(np.arange(300, dtype=np.int64)[::-1] * 7 + 1_700_000_000_000)
    keys = [bytes([i % 256]) for i in range(300)]
    return values, ts, keys


def test_two_dimensional_values_and_int64_timestamps():
    values, ts, keys = two_dimensional_case()
    nat = _native.encode_batch(values, keys=keys, timestamps=ts, base_offset=5)
    as_lists = dict(keys=keys, timestamps=ts.tolist(), base_offset=5)
    assert nat == reference.encode_batch([bytes(r) for r in values], **as_lists)
    assert nat == _native.encode_batch([bytes(r) for r in values], **as_lists)
    recs = _native.decode_records(nat)
    assert [r.value for r in recs] == [bytes(r) for r in values]
    assert [r.timestamp for r in recs] == ts.tolist()
    header = struct.unpack_from(">qiibIhiqqqhii", nat)
    assert header[7] == int(ts[0]) and header[8] == int(ts.max())  # base and max timestamp


def test_reference_encodes_two_dimensional_values_like_native():
    values, ts, keys = two_dimensional_case()
    assert reference.encode_batch(values, keys=keys, timestamps=ts) == _native.encode_batch(
        values, keys=keys, timestamps=ts)


def test_values_of_every_buffer_type_encode_like_bytes():
    data = [b"abc", b"", b"\x00" * 300]
    want = _native.encode_batch(data, timestamp=1)
    forms = [bytearray(b) for b in data], [memoryview(b) for b in data], \
        [np.frombuffer(b, np.uint8) for b in data], tuple(data)
    for form in forms:
        assert _native.encode_batch(form, timestamp=1) == want
    strided = np.zeros((3, 4), np.uint8)[:, ::2]  # not contiguous
    both_raise(ValueError, "encode_batch", strided)


def test_default_header_fields():
    batch = _native.encode_batch([b"x"])
    assert batch == reference.encode_batch([b"x"])
    (base_offset, _len, epoch, magic, _crc, attributes, last_delta, base_ts, max_ts, pid,
     pepoch, seq, count) = struct.unpack_from(">qiibIhiqqqhii", batch)
    assert (base_offset, epoch, magic, attributes, last_delta, base_ts, max_ts) == (
        0, -1, 2, 0, 0, 0, 0)
    assert (pid, pepoch, seq, count) == (-1, -1, -1, 1)


@pytest.mark.parametrize("kwargs,exc", [
    (dict(values=[]), ValueError),
    (dict(values=np.zeros((0, 5), np.uint8)), ValueError),
    (dict(values=b"abc"), ValueError),                      # a 1-D buffer is not rows
    (dict(values=[b"a"], attributes=1), ValueError),        # compression bits
    (dict(values=[b"a", b"b"], keys=[b"k"]), ValueError),
    (dict(values=[b"a", b"b"], headers=[None]), ValueError),
    (dict(values=[b"a", b"b"], timestamps=[1]), ValueError),
    (dict(values=["text"]), TypeError),
    (dict(values=[1]), TypeError),
    (dict(values=[b"a"], keys=["k"]), TypeError),
    (dict(values=[b"a"], headers=[[(b"bytes-key", b"v")]]), TypeError),
    (dict(values=[b"a"], headers=[[("k", "str-value")]]), TypeError),
])
def test_bad_arguments_raise_the_same_type(kwargs, exc):
    both_raise(exc, "encode_batch", **kwargs)


def test_bad_arguments_native_only():
    with pytest.raises(ValueError):
        _native.encode_batch([b"a"], partition_leader_epoch=2**31)
    with pytest.raises(ValueError):
        _native.encode_batch([b"a"], timestamps=[2**63])
    with pytest.raises(ValueError):  # the delta from the first timestamp leaves int64
        _native.encode_batch([b"a", b"b"], timestamps=[-(2**63), 2**63 - 1])
    with pytest.raises(TypeError):
        _native.encode_batch([b"a"], timestamps=np.zeros(1, np.float64))
    with pytest.raises(TypeError):
        _native.encode_batch([b"a", b"b"], timestamps=np.zeros(4, np.int64)[::2])
    with pytest.raises(TypeError):
        _native.encode_batch([b"a"], base_offset="0")


def test_encode_is_safe_while_other_threads_run():
    """encode_batch releases the GIL for big batches; run it from several threads at once."""
    values = [bytes([i % 251]) * 100 for i in range(2000)]
    want = _native.encode_batch(values, timestamp=5)
    results = []

    def work():
        for _ in range(5):
            results.append(_native.encode_batch(list(values), timestamp=5))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20 and all(r == want for r in results)


# --- decode -------------------------------------------------------------------------------------


def test_record_type():
    batch = _native.encode_batch([b"v1", None], keys=[None, b"k"],
                                 headers=[[("é", None)], None], timestamps=[10, 5],
                                 base_offset=3)
    r1, r2 = _native.decode_records(batch)
    assert isinstance(r1, _native.Record)
    assert (r1.offset, r1.timestamp, r1.key, r1.value, r1.headers) == (3, 10, None, b"v1",
                                                                         (("é", None),))
    assert (r2.offset, r2.timestamp, r2.key, r2.value, r2.headers) == (4, 5, b"k", None, ())
    assert r2.headers is _native.decode_records(batch)[1].headers  # one shared empty tuple
    assert r1 == _native.Record(3, 10, None, b"v1", (("é", None),))
    assert r1 != r2 and not (r1 == r2)
    assert r1 != (3, 10, None, b"v1", (("é", None),))
    assert hash(r1) == hash(_native.Record(3, 10, None, b"v1", (("é", None),)))
    assert repr(r2) == "Record(offset=4, timestamp=5, key=b'k', value=None, headers=())"
    assert pickle.loads(pickle.dumps(r1)) == r1
    with pytest.raises(AttributeError):
        r1.offset = 5
    with pytest.raises(AttributeError):
        r1.extra = 1  # no __dict__: compact like __slots__
    with pytest.raises(TypeError):
        _native.Record(0, 0, "str-key", None)
    with pytest.raises(TypeError):  # only (str, bytes | None) tuples, so no cycle can form
        _native.Record(0, 0, None, None, [["k", b"v"]])


def test_records_decoded_for_a_consumer_carry_topic_and_partition_in_both_codecs():
    batch = _native.encode_batch([b"v1", b"v2"], base_offset=7, timestamps=[1, 2])
    for decode in (_native.decode_records, reference.decode_records):
        r1, r2 = decode(batch, True, "orders", 3)
        assert (r1.topic, r1.partition, r1.offset, r2.topic, r2.partition, r2.offset) == \
            ("orders", 3, 7, "orders", 3, 8)
        plain = decode(batch)[0]
        assert (plain.topic, plain.partition) == (None, -1)
    r1 = _native.decode_records(batch, True, "orders", 3)[0]
    assert r1 == _native.Record(7, 1, None, b"v1", (), "orders", 3)
    assert r1 != _native.Record(7, 1, None, b"v1", (), "orders", 4)  # partition counts
    assert r1 != _native.Record(7, 1, None, b"v1", (), "other", 3)   # and so does the topic
    assert r1 != _native.decode_records(batch)[0]
    assert r1.topic_partition == ("orders", 3) and r1.record is r1
    assert repr(r1).startswith("Record(topic='orders', partition=3, offset=7")
    assert pickle.loads(pickle.dumps(r1)) == r1
    with pytest.raises(TypeError):
        _native.decode_records(batch, True, b"bytes-topic", 0)


def test_many_batches_back_to_back():
    rng = random.Random(11)
    parts, want = [], []
    for i in range(30):
        kwargs = random_args(rng, rng.randrange(1, 40))
        parts.append(_native.encode_batch(**kwargs))
        want += expected_records(kwargs)
    buf = b"".join(parts)
    assert as_tuples(_native.decode_records(buf)) == want
    nat = assert_same_outcome(buf)
    assert len(nat) == len(want)
    scan = _native.scan_batches(buf)
    assert scan[:3] == (len(buf), S["OK"], -1)
    assert [b[0] for b in scan[3]] == [sum(map(len, parts[:i])) for i in range(30)]
    assert sum(b[4] for b in scan[3]) == len(want)


def test_decode_columnar_into_matches_decode_records():
    rng = random.Random(12)
    buf = b"".join(_native.encode_batch(**random_args(rng, rng.randrange(1, 300)))
                   for _ in range(5))
    recs = _native.decode_records(buf)
    cols = columnar(len(recs) + 3)
    assert _native.decode_columnar_into(buf, *cols) == len(recs)
    offsets, timestamps, key_starts, key_lengths, value_starts, value_lengths = cols
    for i, r in enumerate(recs):
        assert (offsets[i], timestamps[i]) == (r.offset, r.timestamp)
        for start, length, want in ((key_starts[i], key_lengths[i], r.key),
                                    (value_starts[i], value_lengths[i], r.value)):
            assert (None if length < 0 else buf[start:start + length]) == want


def test_decode_columnar_into_checks_its_arrays():
    buf = _native.encode_batch([b"a", b"b", b"c"])
    for short in range(6):
        cols = list(columnar(3))
        cols[short] = cols[short][:2]
        both_raise(ValueError, "decode_columnar_into", buf, *cols)
    wrong = list(columnar(3))
    wrong[3] = np.zeros(3, np.int64)  # key_lengths must be int32
    with pytest.raises(TypeError):
        _native.decode_columnar_into(buf, *wrong)
    readonly = list(columnar(3))
    readonly[0] = bytes(24)
    with pytest.raises(TypeError):
        _native.decode_columnar_into(buf, *readonly)
    # Bad bytes are reported before short arrays.
    bad = buf + _native.encode_batch([b"x"])[:-1]
    both_raise(errors.TruncatedBatchError, "decode_columnar_into", bad, *columnar(1))


def test_empty_buffer():
    for codec in CODECS:
        assert codec.decode_records(b"") == []
        assert tuple(codec.scan_batches(b"")) == (0, S["OK"], -1, [])
        assert codec.decode_columnar_into(b"", *columnar(0)) == 0


# --- scan: truncations and flips ------------------------------------------------------------------


def small_batch() -> bytes:
    return _native.encode_batch([b"value-1", None, b""], keys=[b"k", None, b""],
                                headers=[[("h", b"v")], None, [("ü", None)]],
                                timestamps=[100, 90, 130], base_offset=42)


def test_every_truncation_of_a_small_batch():
    first = _native.encode_batch([b"whole"], base_offset=1)
    batch = small_batch()
    for prefix in (b"", first):
        for cut in range(len(batch)):
            buf = prefix + batch[:cut]
            for verify_crc, verify_records in SCAN_OPTIONS:
                scan = _native.scan_batches(buf, verify_crc, verify_records)
                assert scan == tuple(reference.scan_batches(buf, verify_crc, verify_records))
                if cut:
                    assert scan[:3] == (len(prefix), S["TRUNCATED"], len(prefix))
            if cut:
                for codec in CODECS:
                    with pytest.raises(errors.TruncatedBatchError) as info:
                        codec.decode_records(buf)
                    assert info.value.position == len(prefix)


def test_random_byte_flips():
    rng = random.Random(13)
    clean = _native.encode_batch([b"a" * 20] * 4, base_offset=9) + small_batch()
    for _ in range(300):
        buf = bytearray(clean)
        for _ in range(rng.choice([1, 1, 2, 4])):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        if rng.random() < 0.5:  # also damage that only a record walk can see
            for pos in (0, len(clean) - len(small_batch())):
                set_crc(buf, pos)
        for verify_crc in (True, False):
            assert_same_outcome(bytes(buf), verify_crc)


@pytest.mark.parametrize("shape", ["values only", "keys and timestamps"])
def test_byte_flips_in_headerless_records_decode_like_the_reference(shape):
    # Records without headers take the C walk's short path; any byte flip must still give the
    # reference's records (columns included) or its error. 70 records: offset deltas of one and
    # two varint bytes; values of 0, 63, 64 and 200 bytes and null: length varints of both
    # sizes; timestamp deltas of one and two bytes and negative ones.
    values = [None if i % 11 == 3 else bytes([i]) * (0, 63, 64, 200)[i % 4] for i in range(70)]
    kwargs = {}
    if shape == "keys and timestamps":
        kwargs = dict(keys=[None if i % 5 == 0 else b"k" * (i % 70) for i in range(70)],
                      timestamps=[1_700_000_000_000 + (i * 37) % 900 - 300 for i in range(70)])
    clean = _native.encode_batch(values, base_offset=3, **kwargs)
    assert clean == reference.encode_batch(values, base_offset=3, **kwargs)
    assert_same_outcome(clean)
    rng = random.Random(5)
    # 150 record bytes (the reference decoder is pure Python: every flip costs it a full walk)
    for pos in sorted(rng.sample(range(61, len(clean)), 150)):
        buf = bytearray(clean)
        buf[pos] ^= 1 << rng.randrange(8)
        set_crc(buf)
        assert_same_outcome(bytes(buf))


# --- bad bytes: the right exception and position --------------------------------------------------


def second_batch(damage) -> tuple[bytes, int]:
    """A valid batch followed by a damaged one; returns the buffer and the damaged batch's
    position (every batch-level error must point there)."""
    first = _native.encode_batch([b"first"], base_offset=0)
    bad = bytearray(small_batch())
    damage(bad)
    return first + bytes(bad), len(first)


@pytest.mark.parametrize("name,damage,exc,status", [
    ("magic", lambda b: b.__setitem__(OFF["magic"], 1), errors.InvalidMagicError, "BAD_MAGIC"),
    ("crc", lambda b: b.__setitem__(len(b) - 1, b[-1] ^ 1), errors.CrcMismatchError, "BAD_CRC"),
    ("length past end", lambda b: struct.pack_into(">i", b, 8, len(b)),
     errors.TruncatedBatchError, "TRUNCATED"),
    ("length below header", lambda b: struct.pack_into(">i", b, 8, 48),
     errors.CorruptRecordError, "BAD_LENGTH"),
    ("negative length", lambda b: struct.pack_into(">i", b, 8, -5),
     errors.CorruptRecordError, "BAD_LENGTH"),
])
def test_batch_level_errors(name, damage, exc, status):
    buf, pos = second_batch(damage)
    for e in both_raise(exc, "decode_records", buf):
        assert e.position == pos
        assert str(e)
    for verify_records in (False, True):
        scan = _native.scan_batches(buf, True, verify_records)
        assert scan[:3] == (pos, S[status], pos) and len(scan[3]) == 1
        assert scan == tuple(reference.scan_batches(buf, True, verify_records))


def test_compressed_batch():
    """A plain batch labelled snappy: the C core leaves decompression to records.compression
    (UnsupportedCompressionError); the reference, like records.decode_records, decompresses
    and finds garbage. The broker's check reads the header only, so the scan accepts it; a
    codec above 4 is refused. Real codecs: tests/unit/records/test_compression.py."""
    buf, pos = second_batch(lambda b: (struct.pack_into(">h", b, OFF["attributes"], 2),
                                       set_crc(b)))
    with pytest.raises(errors.UnsupportedCompressionError):
        _native.decode_records(buf)
    for decode in (records.decode_records, reference.decode_records):
        with pytest.raises(errors.CorruptRecordError, match="snappy"):
            decode(buf)
    both_raise(errors.UnsupportedCompressionError, "decode_columnar_into", buf, *columnar(10))
    assert _native.scan_batches(buf, True, False)[1] == S["OK"]  # headers alone are fine
    assert _native.scan_batches(buf, True, True)[1] == S["OK"]
    assert tuple(reference.scan_batches(buf, True, True)) == _native.scan_batches(buf, True, True)
    buf, pos = second_batch(lambda b: (struct.pack_into(">h", b, OFF["attributes"], 5),
                                       set_crc(b)))
    assert _native.scan_batches(buf, True, True)[:3] == (pos, S["COMPRESSED"], pos)
    assert tuple(reference.scan_batches(buf, True, True)) == _native.scan_batches(buf, True, True)


def test_batch_bytes_max():
    batch = small_batch()
    buf = batch + batch
    assert _native.scan_batches(buf, batch_bytes_max=len(batch))[1] == S["OK"]
    scan = _native.scan_batches(buf, batch_bytes_max=len(batch) - 1)
    assert scan == (0, S["TOO_LARGE"], 0, [])
    assert scan == tuple(reference.scan_batches(buf, batch_bytes_max=len(batch) - 1))


OK_RECORD = record(body(key=b"k", value=b"value"))


@pytest.mark.parametrize("name,records,count,last_delta", [
    ("varint of ten 0xff", b"\xff" * 10 + b"\x01" + OK_RECORD, 1, None),
    ("length varint runs off the batch", b"\x80\x80", 1, None),
    ("record length past batch end", zz(200) + body(), 1, None),
    ("zero record length", zz(0) + OK_RECORD, 2, None),
    ("timestamp varint of eleven bytes", record(b"\x00" + b"\xff" * 10 + b"\x00" * 4), 1, None),
    ("key length -2", record(b"\x00\x00\x00" + zz(-2) + zz(1) + b"v" + zz(0)), 1, None),
    ("key length past record end", record(b"\x00\x00\x00" + zz(50) + b"kk" + zz(-1) + zz(0)),
     1, None),
    ("value length huge", record(b"\x00\x00\x00" + zz(-1) + zz(2**31 - 1) + zz(0)), 1, None),
    ("headers count huge", record(b"\x00\x00\x00" + zz(-1) + zz(-1) + zz(2**31 - 1)), 1, None),
    ("headers count negative", record(b"\x00\x00\x00" + zz(-1) + zz(-1) + zz(-1)), 1, None),
    ("header key length negative", record(b"\x00\x00\x00" + zz(-1) + zz(-1) + zz(1) + zz(-1)
                                          + zz(-1)), 1, None),
    ("header key not utf-8", record(body(headers=[(b"\xff\xfe", b"v")])), 1, None),
    ("bytes after the record fields", record(body() + b"\x00"), 1, None),
    ("records_count too small", OK_RECORD * 2, 1, 0),
    ("records_count too big", OK_RECORD * 2, 3, 2),
    ("records_count huge", OK_RECORD, 2**31 - 1, 2**31 - 2),
    ("records_count negative", OK_RECORD, -1, 0),
    ("last_offset_delta wrong", OK_RECORD * 2, 2, 5),
])
def test_record_level_errors(name, records, count, last_delta):
    buf = _native.encode_batch([b"ok"]) + raw_batch(records, count, last_delta)
    for e in both_raise(errors.InvalidRecordError, "decode_records", buf):
        assert isinstance(e.position, int) and 0 <= e.position <= len(buf) and str(e)
    both_raise(errors.InvalidRecordError, "decode_columnar_into", buf, *columnar(100))
    if name != "header key not utf-8":  # the scan does not decode header keys
        scan = _native.scan_batches(buf, True, True)
        assert scan[1] == S["BAD_RECORD"] and scan[2] == len(buf) - len(raw_batch(records, count,
                                                                                   last_delta))
    assert_same_outcome(buf)


def test_hand_made_batches_that_are_valid():
    """Odd but legal bytes decode the same in both: a five-byte varint whose top bits are
    dropped (as Kafka's Java does), an empty batch, utf-8 header keys."""
    five_byte_zero_delta = b"\x80\x80\x80\x80\x70"  # bits above 32 dropped: 0
    rec = record(b"\x00\x00" + five_byte_zero_delta + zz(-1) + zz(1) + b"v" + zz(0))
    for buf in (raw_batch(rec, 1), raw_batch(b"", 0, last_delta=0),
                raw_batch(record(body(headers=[("ключ".encode(), None)])), 1)):
        nat = assert_same_outcome(buf)
        assert not isinstance(nat, Exception), nat
    assert _native.decode_records(raw_batch(rec, 1))[0].offset == 0


def test_log_append_time_batches_give_every_record_the_batch_time():
    """Kafka's rule for LogAppendTime (attributes bit 3): record timestamp = max_timestamp."""
    for codec in (_native, reference):
        batch = codec.encode_batch([b"a", b"b"], None, None, [100, 250], 0, 0, -1, -1, -1, -1, 0x08)
        assert [r.timestamp for r in codec.decode_records(batch)] == [250, 250]
        cols = [np.zeros(2, np.int64) for _ in range(3)]
        lens = [np.zeros(2, np.int32) for _ in range(2)]
        codec.decode_columnar_into(batch, cols[0], cols[1], cols[2], lens[0], np.zeros(2, np.int64), lens[1])
        assert cols[1].tolist() == [250, 250]
