"""Pure-Python twin of every routine in ``shmbroker._native`` (see docs/design/records.md).

It exists so that the C core can be checked against something short enough to read: the
tests run the same cases, random ones included, through both. It is never used at run time
(``shmbroker.records`` always calls the C core) because it is 50-100x slower.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

from .. import errors
from ..layout import record_batch as L
from . import compression
from .validation import STATUS_ERRORS, error_for

# --- CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) -----------------------------------


def _make_crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _make_crc_table()


def crc32c(data: Any, crc: int = 0) -> int:
    """CRC-32C of ``data``, continuing from ``crc`` (chained like zlib.crc32)."""
    table = _CRC_TABLE
    c = (crc ^ 0xFFFFFFFF) & 0xFFFFFFFF
    for byte in memoryview(data).cast("B"):
        c = table[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


# --- murmur2, exactly as Kafka's Utils.murmur2 -----------------------------------------------

_M32 = 0xFFFFFFFF


def murmur2(key: Any) -> int:
    data = bytes(memoryview(key).cast("B"))
    length = len(data)
    seed = 0x9747B28C
    m = 0x5BD1E995
    r = 24
    h = (seed ^ length) & _M32
    length4 = length // 4
    for i in range(length4):
        k = int.from_bytes(data[i * 4:i * 4 + 4], "little")
        k = (k * m) & _M32
        k ^= k >> r
        k = (k * m) & _M32
        h = (h * m) & _M32
        h ^= k
    tail = length4 * 4
    rest = length % 4
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & _M32
    h ^= h >> 13
    h = (h * m) & _M32
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for_key(key: Any, num_partitions: int) -> int:
    if num_partitions <= 0:
        raise ValueError(f"num_partitions must be positive, got {num_partitions}")
    return (murmur2(key) & 0x7FFFFFFF) % num_partitions


# --- varints (zigzag, as in protobuf) ----------------------------------------------------------


def _write_varint(out: bytearray, value: int) -> None:
    v = ((value << 1) ^ (value >> 63)) & 0xFFFFFFFFFFFFFFFF
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _i64(value: int) -> int:
    """Wrap to a signed 64-bit integer, as C and Java arithmetic on offsets and times does."""
    value &= 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >= 1 << 63 else value


class _Bad(Exception):
    """Internal: a record does not parse. Turned into InvalidRecordError with a position."""


def _read_varint(buf: memoryview, pos: int, end: int, max_bytes: int) -> tuple[int, int]:
    result = 0
    shift = 0
    for i in range(max_bytes):
        if pos >= end:
            raise _Bad("varint runs past the end of the batch")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            # Wrap to the field's width, as C (and Kafka's Java) do, so both agree on odd bytes.
            result &= 0xFFFFFFFF if max_bytes == 5 else 0xFFFFFFFFFFFFFFFF
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
    raise _Bad(f"varint longer than {max_bytes} bytes")


# --- encoding -----------------------------------------------------------------------------------


def _as_bytes(value: Any, what: str) -> bytes | None:
    if value is None:
        return None
    try:
        return bytes(memoryview(value).cast("B"))
    except TypeError:
        raise TypeError(f"{what} must be bytes-like or None, got {type(value).__name__}") from None


def _rows(values: Any) -> list[bytes | None]:
    try:
        view = memoryview(values)
    except TypeError:
        return [_as_bytes(v, "values[i]") for v in values]
    if view.ndim != 2:
        raise ValueError("a buffer of values must be 2-D (one row per value)")
    if view.format not in ("B", "b", "c") or not view.c_contiguous:
        raise ValueError("a 2-D values buffer must be C-contiguous uint8")
    rows, width = view.shape
    if rows == 0 or width == 0:
        return [b""] * rows  # cast() refuses zero-sized shapes
    flat = view.cast("B")
    return [bytes(flat[i * width:(i + 1) * width]) for i in range(rows)]


def encode_batch(values: Any, keys: Sequence[Any] | None = None,
                 headers: Sequence[Any] | None = None, timestamps: Any = None,
                 timestamp: int = 0, base_offset: int = 0, partition_leader_epoch: int = -1,
                 producer_id: int = -1, producer_epoch: int = -1, base_sequence: int = -1,
                 attributes: int = 0) -> bytes:
    """One uncompressed RecordBatch v2 holding ``values`` (see docs/design/records.md)."""
    rows = _rows(values)
    n = len(rows)
    if n == 0:
        raise ValueError("values must not be empty: a batch holds at least one record")
    if attributes & L.COMPRESSION_MASK:
        raise ValueError("attributes must not set compression bits: only uncompressed batches are encoded")
    if keys is not None and len(keys) != n:
        raise ValueError(f"keys has {len(keys)} items, values has {n}")
    if headers is not None and len(headers) != n:
        raise ValueError(f"headers has {len(headers)} items, values has {n}")
    if timestamps is not None:
        ts = [int(t) for t in timestamps]
        if len(ts) != n:
            raise ValueError(f"timestamps has {len(ts)} items, values has {n}")
    else:
        ts = [int(timestamp)] * n
    base_ts = ts[0]
    body = bytearray()
    for i in range(n):
        rec = bytearray([0])  # record attributes
        _write_varint(rec, ts[i] - base_ts)
        _write_varint(rec, i)
        key = _as_bytes(keys[i], "keys[i]") if keys is not None else None
        for item in (key, rows[i]):
            if item is None:
                _write_varint(rec, -1)
            else:
                _write_varint(rec, len(item))
                rec += item
        hdrs = headers[i] if headers is not None and headers[i] is not None else ()
        _write_varint(rec, len(hdrs))
        for hkey, hvalue in hdrs:
            if not isinstance(hkey, str):
                raise TypeError(f"header keys must be str, got {type(hkey).__name__}")
            kb = hkey.encode("utf-8")
            _write_varint(rec, len(kb))
            rec += kb
            hv = _as_bytes(hvalue, "header value")
            if hv is None:
                _write_varint(rec, -1)
            else:
                _write_varint(rec, len(hv))
                rec += hv
        _write_varint(body, len(rec))
        body += rec
    tail = struct.pack(">hiqqqhii", attributes, n - 1, base_ts, max(ts), producer_id,
                       producer_epoch, base_sequence, n) + bytes(body)
    crc = crc32c(tail)
    batch_length = L.HEADER_SIZE - L.LOG_OVERHEAD + len(body)
    return struct.pack(">qiibI", base_offset, batch_length, partition_leader_epoch, L.MAGIC, crc) + tail


# --- decoding -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple = ()
    topic: str | None = None  # set when a consumer decodes a partition's log
    partition: int = -1


class ScanResult(NamedTuple):
    valid_bytes: int
    status: int
    error_position: int
    batches: list


S = L.SCAN_STATUS


def _check_batch(buf: memoryview, pos: int, verify_crc: bool, batch_bytes_max: int) -> tuple[int, str, int]:
    """Validate the batch header at ``pos``: (status, message, batch end).

    The order of the checks is part of the contract (docs/design/records.md).
    """
    left = len(buf) - pos
    if left < L.LOG_OVERHEAD:
        return S["TRUNCATED"], f"{left} bytes left, fewer than a batch's offset and length", 0
    batch_length = struct.unpack_from(">i", buf, pos + 8)[0]
    if batch_length < L.BATCH_LENGTH_MIN:
        return S["BAD_LENGTH"], f"batch_length {batch_length} is smaller than a batch header", 0
    total = batch_length + L.LOG_OVERHEAD
    if batch_bytes_max > 0 and total > batch_bytes_max:
        return S["TOO_LARGE"], f"batch of {total} bytes is larger than the limit of {batch_bytes_max}", 0
    if left > 16 and buf[pos + 16] != L.MAGIC:
        return S["BAD_MAGIC"], f"magic {struct.unpack_from('>b', buf, pos + 16)[0]} is not 2", 0
    if left < total:
        return S["TRUNCATED"], f"batch of {total} bytes but only {left} bytes left", 0
    end = pos + total
    if verify_crc:
        stored = struct.unpack_from(">I", buf, pos + 17)[0]
        actual = crc32c(buf[pos + L.CRC_START:end])
        if stored != actual:
            return S["BAD_CRC"], f"CRC-32C mismatch: stored {stored:#010x}, computed {actual:#010x}", 0
    return S["OK"], "", end


def _walk_records(buf: memoryview, pos: int, end: int, build: bool) -> list:
    """Parse every record of the uncompressed batch at ``pos``; raise _Bad on any inconsistency.

    Returns (offset_delta, timestamp_delta, key, value, headers) tuples when ``build``.
    """
    (attributes, last_delta, base_ts, _max_ts, _pid, _pe, _bs, count) = struct.unpack_from(
        ">hiqqqhii", buf, pos + L.CRC_START)
    if attributes & L.COMPRESSION_MASK:
        raise _Bad("compressed")
    if count < 0:
        raise _Bad(f"records_count {count} is negative")
    p = pos + L.HEADER_SIZE
    out = []
    for i in range(count):
        if p >= end:
            raise _Bad(f"records_count says {count} records but the batch ends after {i}")
        length, p = _read_varint(buf, p, end, 5)
        if length < 1 or length > end - p:
            raise _Bad(f"record {i} length {length} does not fit in the batch")
        rec_end = p + length
        p += 1  # record attributes
        ts_delta, p = _read_varint(buf, p, rec_end, 10)
        off_delta, p = _read_varint(buf, p, rec_end, 5)
        fields = []
        for what in ("key", "value"):
            flen, p = _read_varint(buf, p, rec_end, 5)
            if flen < -1 or flen > rec_end - p:
                raise _Bad(f"record {i} {what} length {flen} does not fit in the record")
            if flen == -1:
                fields.append(None)
            else:
                fields.append(bytes(buf[p:p + flen]) if build else None)
                p += flen
        hcount, p = _read_varint(buf, p, rec_end, 5)
        if hcount < 0 or hcount > rec_end - p:
            raise _Bad(f"record {i} header count {hcount} does not fit in the record")
        hdrs = []
        for _ in range(hcount):
            klen, p = _read_varint(buf, p, rec_end, 5)
            if klen < 0 or klen > rec_end - p:
                raise _Bad(f"record {i} header key length {klen} does not fit in the record")
            hkey = bytes(buf[p:p + klen])
            p += klen
            vlen, p = _read_varint(buf, p, rec_end, 5)
            if vlen < -1 or vlen > rec_end - p:
                raise _Bad(f"record {i} header value length {vlen} does not fit in the record")
            hval = None
            if vlen >= 0:
                hval = bytes(buf[p:p + vlen])
                p += vlen
            if build:
                try:
                    hdrs.append((hkey.decode("utf-8"), hval))
                except UnicodeDecodeError:
                    raise _Bad(f"record {i} header key is not UTF-8") from None
        if p != rec_end:
            raise _Bad(f"record {i} has {rec_end - p} bytes after its last header")
        if build:
            out.append((off_delta, ts_delta, fields[0], fields[1], tuple(hdrs)))
        p = rec_end
    if p != end:
        raise _Bad(f"{end - p} bytes after the last of {count} records")
    if count and last_delta != count - 1:
        raise _Bad(f"last_offset_delta {last_delta} does not match records_count {count}")
    return out


def _verify_records(view: memoryview, pos: int, end: int) -> int:
    """The record check of scan_batches(verify_records=True); a compressed batch keeps its
    records compressed, so only its header can be checked (count against last_offset_delta)."""
    attributes, last_delta = struct.unpack_from(">hi", view, pos + L.CRC_START)
    codec = attributes & L.COMPRESSION_MASK
    if codec > L.COMPRESSION_CODEC_MAX:
        return S["COMPRESSED"]
    if codec:
        count, = struct.unpack_from(">i", view, pos + 57)
        ok = 1 <= count <= L.COMPRESSED_RECORDS_MAX and last_delta == count - 1
        return S["OK"] if ok else S["BAD_RECORD"]
    try:
        _walk_records(view, pos, end, build=False)
    except _Bad:
        return S["BAD_RECORD"]
    return S["OK"]


def scan_batches(buf: Any, verify_crc: bool = True, verify_records: bool = False,
                 batch_bytes_max: int = 0) -> ScanResult:
    view = memoryview(buf).cast("B")
    pos = 0
    batches = []
    while pos < len(view):
        status, _message, end = _check_batch(view, pos, verify_crc, batch_bytes_max)
        if status == S["OK"] and verify_records:
            status = _verify_records(view, pos, end)
        if status != S["OK"]:
            return ScanResult(pos, status, pos, batches)
        base_offset = struct.unpack_from(">q", view, pos)[0]
        last_delta, = struct.unpack_from(">i", view, pos + 23)
        max_ts, = struct.unpack_from(">q", view, pos + 35)
        count, = struct.unpack_from(">i", view, pos + 57)
        batches.append((pos, base_offset, base_offset + last_delta, max_ts, count))
        pos = end
    return ScanResult(pos, S["OK"], -1, batches)


def _decoded_batches(buf: Any, verify_crc: bool):
    """Yield (base_offset, base_timestamp, parsed records) per batch; raise typed errors."""
    view = memoryview(buf).cast("B")
    pos = 0
    while pos < len(view):
        status, message, end = _check_batch(view, pos, verify_crc, 0)
        if status != S["OK"]:
            raise STATUS_ERRORS[status](f"{message} (batch at byte {pos})", pos)
        base_offset, = struct.unpack_from(">q", view, pos)
        base_ts, = struct.unpack_from(">q", view, pos + 27)
        log_append_time = struct.unpack_from(">h", view, pos + 21)[0] & L.TIMESTAMP_TYPE_MASK
        max_ts, = struct.unpack_from(">q", view, pos + 35)
        try:
            parsed = _walk_records(view, pos, end, build=True)
        except _Bad as exc:
            if str(exc) == "compressed":
                raise errors.UnsupportedCompressionError(
                    f"batch at byte {pos} is compressed (codec {view[pos + 22] & 7}); "
                    "decompress it first", pos) from None
            raise errors.InvalidRecordError(f"{exc} (batch at byte {pos})", pos) from None
        if log_append_time:  # Kafka's rule: the broker's time (max_timestamp) for every record
            parsed = [(o, max_ts - base_ts, k, v, h) for o, _t, k, v, h in parsed]
        yield base_offset, base_ts, parsed
        pos = end


def decode_records(buf: Any, verify_crc: bool = True, topic: str | None = None,
                   partition: int = -1) -> list[Record]:
    """Like ``records.decode_records``: the plain decode first; if it stops at a compressed
    batch, the scanned bytes are inflated (``records.compression``, shared with the C path:
    decompression is not ours to twin) and decoded again."""
    try:
        return _decode_plain(buf, verify_crc, topic, partition)
    except errors.UnsupportedCompressionError:
        pass
    view = memoryview(buf).cast("B")
    scan = scan_batches(view, verify_crc)
    if scan.status != S["OK"]:  # as records.decode_records: the bytes' own error first
        raise error_for(view, scan.error_position, scan.status, 0, "decode")
    return _decode_plain(compression.inflate_batches(view, crc32c), False, topic, partition)


def _decode_plain(buf: Any, verify_crc: bool, topic: str | None, partition: int) -> list[Record]:
    out = []
    for base_offset, base_ts, parsed in _decoded_batches(buf, verify_crc):
        for off_delta, ts_delta, key, value, hdrs in parsed:
            out.append(Record(_i64(base_offset + off_delta), _i64(base_ts + ts_delta), key, value,
                              hdrs, topic, partition))
    return out


def decode_columnar_into(buf: Any, offsets: Any, timestamps: Any, key_starts: Any,
                         key_lengths: Any, value_starts: Any, value_lengths: Any,
                         verify_crc: bool = True) -> int:
    """Fill the six arrays (see the contract); a slow but obvious reading of the same bytes."""
    view = memoryview(buf).cast("B")
    records_total = sum(len(p) for _, _, p in _decoded_batches(view, verify_crc))
    outs = (offsets, timestamps, key_starts, key_lengths, value_starts, value_lengths)
    if any(len(a) < records_total for a in outs):
        raise ValueError(f"output arrays must hold {records_total} records")
    i = 0
    pos = 0
    while pos < len(view):
        batch_length, = struct.unpack_from(">i", view, pos + 8)
        end = pos + batch_length + L.LOG_OVERHEAD
        base_offset, = struct.unpack_from(">q", view, pos)
        base_ts, = struct.unpack_from(">q", view, pos + 27)
        count, = struct.unpack_from(">i", view, pos + 57)
        log_append_time = struct.unpack_from(">h", view, pos + 21)[0] & L.TIMESTAMP_TYPE_MASK
        max_ts, = struct.unpack_from(">q", view, pos + 35)
        p = pos + L.HEADER_SIZE
        for _ in range(count):
            length, p = _read_varint(view, p, end, 5)
            rec_end = p + length
            p += 1
            ts_delta, p = _read_varint(view, p, rec_end, 10)
            off_delta, p = _read_varint(view, p, rec_end, 5)
            offsets[i] = _i64(base_offset + off_delta)
            timestamps[i] = max_ts if log_append_time else _i64(base_ts + ts_delta)
            for starts, lengths in ((key_starts, key_lengths), (value_starts, value_lengths)):
                flen, p = _read_varint(view, p, rec_end, 5)
                starts[i] = p
                lengths[i] = flen
                p += max(flen, 0)
            i += 1
            p = rec_end
        pos = end
    return records_total
