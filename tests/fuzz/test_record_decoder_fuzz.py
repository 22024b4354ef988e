"""Fuzz the C record decoders (shmbroker._native) with random and damaged bytes, seeded.

What this file proves, for every case made by ``batch_mutations`` (random bytes; valid batches
from ``records.encode_batch`` with bytes flipped, cut short, length fields set to absurd values,
varints replaced by runs of 0xff, records_count changed; several batches with one damaged; about
14,000 cases, half of them also through the reference):

* ``decode_records``, ``records.decode_columnar`` and ``decode_columnar_into`` raise nothing but
  shmbroker.errors record errors (``CorruptRecordError`` subclasses or
  ``UnsupportedCompressionError``), and the process does not crash;
* they never read a byte outside the buffer nor write into it: a sixth of the cases sit in
  read-only pages flush against an inaccessible guard page (``GuardedBuffer``), where either
  mistake is a SIGSEGV;
* with ``verify_crc=True``, damage inside a batch's CRC'd range is an error, never silently
  different records; damage every decoder must see (a cut, a wrong count) is an error either way;
* ``scan_batches`` never raises, ``0 <= valid_bytes <= len(buf)``, it stops exactly at the
  damaged batch, and it agrees with ``decode_records`` on which buffers are whole;
* undamaged buffers decode to exactly the records that were encoded, in all three forms;
* the input buffer is never modified;
* on the same inputs, the C core and the pure-Python reference (``shmbroker.records.reference``)
  give the same result: the same exception type, or the same records / scan / columns.

Everything is seeded (``random.Random(f"{kind}:{seed}")``), so a failure names a case that can
be replayed with ``batch_mutations.make_case(kind, seed)``.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import random
import struct

import numpy as np
import pytest

from shmbroker import _native, errors, records
from shmbroker.layout import record_batch as L
from shmbroker.records import reference

import batch_mutations as bm

pytestmark = pytest.mark.timeout(120)

#: The only exceptions a decoder may raise for bad bytes.
ALLOWED = (errors.CorruptRecordError, errors.UnsupportedCompressionError)

#: Cases per test item; items are split so that pytest-xdist can spread them over cores.
CASES_PER_CHUNK = 400
CHUNKS = 3
#: Every REFERENCE_EVERY-th case is also run through the (slow) pure-Python reference.
REFERENCE_EVERY = 2


def as_tuples(recs) -> list[tuple]:
    return [(r.offset, r.timestamp, r.key, r.value, tuple(r.headers)) for r in recs]


def outcome(label: str, fn, *args):
    """The result of ``fn(*args)``, or the allowed exception it raised; anything else fails."""
    try:
        return fn(*args)
    except ALLOWED as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - that is exactly what we are looking for
        pytest.fail(f"{label}: {getattr(fn, '__qualname__', fn)} raised {type(exc).__name__}: {exc}")


PROT_NONE = 0  # <sys/mman.h>; the mmap module does not export it


class GuardedBuffer:
    """Bytes in read-only pages with an inaccessible page on each side (mmap + mprotect).

    Placed flush against the guard page after them (``at_end``) or before them, so that a
    decoder reading even one byte outside the buffer, or writing to it at all, dies with
    SIGSEGV instead of passing by luck. (A crash fails the test run loudly.)
    """

    _libc = None

    def __init__(self, data: bytes, at_end: bool):
        libc = GuardedBuffer._load_libc()
        page = mmap.PAGESIZE
        pages = max(1, -(-len(data) // page))
        self.total = (pages + 2) * page
        addr = libc.mmap(None, self.total, mmap.PROT_READ | mmap.PROT_WRITE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), "mmap failed"
        self.addr = addr
        start = addr + (pages + 1) * page - len(data) if at_end else addr + page
        ctypes.memmove(start, data, len(data))
        for where, size, prot in ((addr, page, PROT_NONE),
                                  (addr + (pages + 1) * page, page, PROT_NONE),
                                  (addr + page, pages * page, mmap.PROT_READ)):
            assert libc.mprotect(where, size, prot) == 0, ctypes.get_errno()
        self.view = memoryview((ctypes.c_ubyte * len(data)).from_address(start)).cast("B")

    @classmethod
    def _load_libc(cls):
        if cls._libc is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_long]
            libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            cls._libc = libc
        return cls._libc

    def free(self) -> None:
        self.view.release()
        assert self._libc.munmap(self.addr, self.total) == 0


@contextlib.contextmanager
def buffer_form(case: bm.Case, index: int):
    """The case's bytes as one of several buffer types (the decoders take any buffer).

    "slice" sits in the middle of a larger buffer full of junk, so that a decoder reading past
    the end of its view would read bytes the reference never sees; the "guarded" forms crash a
    decoder that reads outside the buffer or writes into it.
    """
    form = index % 6
    if form in (4, 5):
        guarded = GuardedBuffer(case.buf, at_end=form == 4)
        yield guarded.view, "guarded-end" if form == 4 else "guarded-start"
        # Not reached when the checks failed: then the traceback may still refer to the
        # memory, and leaking one small mapping is better than a crash while reporting.
        guarded.free()
        return
    if form == 0:
        yield case.buf, "bytes"
    elif form == 1:
        yield bytearray(case.buf), "bytearray"
    elif form == 2:
        rng = random.Random(index)
        junk_before = rng.randbytes(rng.randrange(0, 64))
        big = bytearray(junk_before + case.buf + rng.randbytes(256))
        yield memoryview(big)[len(junk_before):len(junk_before) + len(case.buf)], "slice"
    else:
        yield np.frombuffer(case.buf, dtype=np.uint8), "ndarray"


def columnar_arrays(n: int):
    return (np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64),
            np.zeros(n, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int32))


def records_upper_bound(buf_len: int) -> int:
    """More records than any buffer of this size can hold (a record is at least 7 bytes)."""
    return buf_len // 7 + 1


def check_error(label: str, exc: Exception, buf_len: int) -> None:
    pos = getattr(exc, "position", None)
    assert isinstance(pos, int) and 0 <= pos <= buf_len, f"{label}: bad .position {pos!r} ({exc})"
    assert str(exc), f"{label}: {type(exc).__name__} without a message"


def check_scan(label: str, scan, buf_len: int) -> None:
    valid, status, err_pos, batches = scan
    assert 0 <= valid <= buf_len, f"{label}: valid_bytes {valid} outside [0, {buf_len}]"
    if status == records.SCAN_OK:
        assert valid == buf_len and err_pos == -1, f"{label}: OK scan {scan[:3]}"
    else:
        assert status in records.STATUS_ERRORS, f"{label}: unknown status {status}"
        assert err_pos == valid, f"{label}: error_position {err_pos} != valid_bytes {valid}"
    starts = [b[0] for b in batches]
    assert all(len(b) == 5 for b in batches), label
    assert not starts or starts[0] == 0, f"{label}: first batch at {starts[0]}"
    assert starts == sorted(set(starts)), f"{label}: batch positions {starts}"
    assert not starts or starts[-1] + L.HEADER_SIZE <= valid, f"{label}: batches {starts}, valid {valid}"


def check_columnar_matches(label: str, col, recs: list[tuple]) -> None:
    assert len(col) == len(recs), f"{label}: columnar has {len(col)} records, decode {len(recs)}"
    assert col.offsets.tolist() == [r[0] for r in recs], label
    assert col.timestamps.tolist() == [r[1] for r in recs], label
    for i, r in enumerate(recs):
        key, value = col.key(i), col.value(i)
        assert (None if key is None else bytes(key)) == r[2], f"{label}: key {i}"
        assert (None if value is None else bytes(value)) == r[3], f"{label}: value {i}"


def check_native(case: bm.Case, index: int) -> None:
    """Everything we can say about the C core on one case, without the reference."""
    with buffer_form(case, index) as (buf, form):
        check_native_on(case, buf, form)


def check_native_on(case: bm.Case, buf, form: str) -> None:
    before = bytes(buf)
    n = len(case.buf)
    label = f"{case.label} form={form}"
    for verify_crc in (True, False):
        lab = f"{label} verify_crc={verify_crc}"
        dec = outcome(lab, _native.decode_records, buf, verify_crc)
        col = outcome(lab, records.decode_columnar, buf, verify_crc)
        strict = records.scan_batches(buf, verify_crc, True)
        loose = records.scan_batches(buf, verify_crc, False)
        check_scan(lab + " strict", strict, n)
        check_scan(lab + " loose", loose, n)
        assert loose.valid_bytes >= strict.valid_bytes, lab

        # Damage the decoder must notice.
        if case.must_fail or (verify_crc and case.crc_broken):
            assert isinstance(dec, Exception), f"{lab}: damaged bytes decoded as {len(dec)} records"
            assert isinstance(col, Exception), f"{lab}: damaged bytes decoded (columnar)"
            assert strict.valid_bytes == case.bad_pos, (
                f"{lab}: scan stopped at {strict.valid_bytes}, damage starts at {case.bad_pos}")
        if case.truncated:
            assert isinstance(dec, errors.TruncatedBatchError), f"{lab}: cut batch gave {dec!r}"
        if case.bad_pos is not None:  # the batches before the damage are whole and valid
            assert strict.valid_bytes >= case.bad_pos, f"{lab}: scan stopped before the damage"

        # Undamaged bytes: exactly what was encoded.
        if case.expected is not None:
            assert not isinstance(dec, Exception), f"{lab}: valid bytes raised {dec!r}"
            assert as_tuples(dec) == case.expected, f"{lab}: records differ from those encoded"
            assert strict.ok and loose.ok, f"{lab}: scan of valid bytes {strict[:3]}"

        # The routines agree with each other.
        if isinstance(dec, Exception):
            check_error(lab, dec, n)
            # Only a header key that is not UTF-8 fails decode while the record walk passes.
            # A batch marked compressed (codec 1-4) passes the strict scan, which reads only
            # its header; the C decoder leaves decompression to records.compression.
            if strict.ok:
                assert isinstance(dec, (errors.InvalidRecordError, errors.UnsupportedCompressionError)), \
                    f"{lab}: {dec!r} but scan OK"
        else:
            assert strict.ok, f"{lab}: decode_records gave {len(dec)} records but scan {strict[:3]}"
            assert strict.records == len(dec), lab
            assert not isinstance(col, Exception), f"{lab}: decode OK, columnar raised {col!r}"
            check_columnar_matches(lab, col, as_tuples(dec))
        if isinstance(col, Exception):
            check_error(lab, col, n)
            assert isinstance(dec, Exception), f"{lab}: columnar raised {col!r}, decode did not"
    assert bytes(buf) == before, f"{label}: the decoder modified its input"


def same_outcome(label: str, got, want) -> None:
    """Native and reference results: the same exception type, or equal values."""
    if isinstance(want, Exception) or isinstance(got, Exception):
        assert type(got) is type(want), f"{label}: native {got!r}, reference {want!r}"
        got_pos, want_pos = getattr(got, "position", None), getattr(want, "position", None)
        if isinstance(want, errors.InvalidRecordError) and got_pos is not None and want_pos is not None:
            # The contract allows the position of the record at fault, inside the batch that
            # the reference names (it always gives the batch's position).
            assert want_pos <= got_pos, f"{label}: native position {got_pos} before batch {want_pos}"
        else:
            assert got_pos == want_pos, (
                f"{label}: native position {got_pos}, reference {want_pos} ({want})")
        return
    assert got == want, f"{label}: native and reference results differ"


def check_against_reference(case: bm.Case, index: int) -> None:
    buf = case.buf
    n = len(buf)
    rng = random.Random(index)
    for verify_crc in (True, False):
        lab = f"{case.label} verify_crc={verify_crc}"
        # records.decode_records: the C decoder plus records.compression's inflation, which
        # is what the reference's decode_records twins (it decompresses too).
        nat = outcome(lab, records.decode_records, buf, verify_crc)
        ref = outcome(lab, reference.decode_records, buf, verify_crc)
        same_outcome(lab + " decode_records", nat if isinstance(nat, Exception) else as_tuples(nat),
                     ref if isinstance(ref, Exception) else as_tuples(ref))

        for verify_records in (False, True):
            for bytes_max in (0, rng.randrange(L.HEADER_SIZE, n + 100)):
                args = (buf, verify_crc, verify_records, bytes_max)
                got = tuple(_native.scan_batches(*args))
                want = tuple(reference.scan_batches(*args))
                assert got[:3] == want[:3] and [tuple(b) for b in got[3]] == want[3], (
                    f"{lab} scan_batches(verify_records={verify_records}, "
                    f"batch_bytes_max={bytes_max}): native {got[:3]}, reference {want[:3]}")

        size = records_upper_bound(n)
        nat_cols, ref_cols = columnar_arrays(size), columnar_arrays(size)
        nat = outcome(lab, _native.decode_columnar_into, buf, *nat_cols, verify_crc)
        ref = outcome(lab, reference.decode_columnar_into, buf, *ref_cols, verify_crc)
        same_outcome(lab + " decode_columnar_into", nat, ref)
        if not isinstance(ref, Exception):
            for name, a, b in zip(("offsets", "timestamps", "key_starts", "key_lengths",
                                   "value_starts", "value_lengths"), nat_cols, ref_cols):
                assert np.array_equal(a[:ref], b[:ref]), f"{lab} decode_columnar_into: {name} differ"


def run_chunk(kind: str, chunk: int) -> None:
    for i in range(chunk * CASES_PER_CHUNK, (chunk + 1) * CASES_PER_CHUNK):
        case = bm.make_case(kind, i)
        check_native(case, i)
        if i % REFERENCE_EVERY == 0:
            check_against_reference(case, i)


@pytest.mark.parametrize("chunk", range(CHUNKS))
@pytest.mark.parametrize("kind", bm.KINDS)
def test_decoders_raise_only_record_errors_and_match_reference(kind, chunk):
    run_chunk(kind, chunk)


def test_fuzz_cases_really_are_damaged():
    """Guard against a mutator that silently stopped mutating (the tests would then pass on
    valid bytes): most damaged cases must fail to decode in the reference."""
    for kind in bm.DAMAGES:
        failures = 0
        for i in range(60):
            case = bm.make_case(kind, 10_000 + i)
            try:
                reference.decode_records(case.buf, True)
            except ALLOWED:
                failures += 1
        assert failures >= 30, f"{kind}: only {failures}/60 cases fail to decode"


def test_decode_columnar_into_rejects_short_arrays():
    rng = random.Random(5)
    buf = b"".join(bm.random_batch(rng).data for _ in range(3))
    count = records.scan_batches(buf).records
    for short in range(count):
        arrays = list(columnar_arrays(count))
        arrays[short % 6] = arrays[short % 6][:short]
        with pytest.raises(ValueError):
            _native.decode_columnar_into(buf, *arrays, True)
    assert _native.decode_columnar_into(buf, *columnar_arrays(count), True) == count


def test_offset_and_timestamp_int64_overflow_is_the_same_in_c_and_reference():
    """base_offset + offset_delta and base_timestamp + timestamp_delta can leave int64 in a
    batch with a valid CRC. Whatever the answer (wrap as Java does, or an error), the C core
    and the reference must give the same one, and columnar decode must not raise OverflowError."""
    cases = []
    batch = bytearray(records.encode_batch([b"a", b"b"], timestamps=[0, 2**62], timestamp=0))
    struct.pack_into(">q", batch, L.OFFSETS["base_timestamp"], 2**62)  # 2**62 + 2**62 > int64
    bm.fix_crc(batch)
    cases.append(bytes(batch))
    batch = bytearray(records.encode_batch([b"a", b"b"], timestamps=[0, -(2**62)], timestamp=0))
    struct.pack_into(">q", batch, L.OFFSETS["base_timestamp"], -(2**62) - 1)
    bm.fix_crc(batch)
    cases.append(bytes(batch))
    cases.append(records.encode_batch([b"a", b"b"], timestamp=0, base_offset=2**63 - 1))
    for i, buf in enumerate(cases):
        lab = f"overflow case {i}"
        nat = outcome(lab, _native.decode_records, buf, True)
        ref = outcome(lab, reference.decode_records, buf, True)
        same_outcome(lab, nat if isinstance(nat, Exception) else as_tuples(nat),
                     ref if isinstance(ref, Exception) else as_tuples(ref))
        nat_cols, ref_cols = columnar_arrays(4), columnar_arrays(4)
        nat = outcome(lab, _native.decode_columnar_into, buf, *nat_cols, True)
        ref = outcome(lab, reference.decode_columnar_into, buf, *ref_cols, True)
        same_outcome(lab + " columnar", nat, ref)
        if not isinstance(ref, Exception):
            assert all(np.array_equal(a, b) for a, b in zip(nat_cols, ref_cols)), lab


@pytest.mark.parametrize("run", [b"\xff" * 10, b"\xff" * 11])
def test_unterminated_varint_in_every_position_is_an_invalid_record(run):
    """Each varint of one batch in turn replaced by a run of 0xff, framing and CRC kept right:
    always InvalidRecordError (never a read past the record), in C and in the reference."""
    rng = random.Random(99)
    batch = bm.random_batch(rng)
    for v in bm.varints(batch.data):
        damaged = bm._splice_varint(random.Random(0), batch, v, run, "run")
        data = bytearray(damaged.data)
        bm.set_batch_length(data)
        assert bm.fix_crc(data)
        for codec in (_native, reference):
            with pytest.raises(errors.InvalidRecordError):
                codec.decode_records(bytes(data))
        assert not records.scan_batches(bytes(data), True, True).ok
