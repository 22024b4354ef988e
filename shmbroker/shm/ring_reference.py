"""Pure-Python twin of the ring routines of the C core (``native/src/ring.c``).

Same names, arguments, results and exceptions as ``shmbroker._native.ring_*``; the tests in
``tests/native/test_ring_native_vs_reference.py`` run the same cases through both and read what
one wrote with the other. Single-threaded semantics (struct on a memoryview, no atomics): it
documents the algorithm and checks the C; it is never used at run time.
"""
from __future__ import annotations

import struct

from .. import errors
from ..layout import record_batch as RB
from ..layout import shm as L

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_FRAME = L.FRAME_HEADER_STRUCT

RING_OK = L.RING_STATUS["OK"]
RING_FULL = L.RING_STATUS["FULL"]


def _u32(buf, off: int) -> int:
    return _U32.unpack_from(buf, off)[0]


def _u64(buf, off: int) -> int:
    return _U64.unpack_from(buf, off)[0]


def _corrupt(position: int, message: str) -> errors.RingCorruptError:
    return errors.RingCorruptError(message, position)


def ring_check(ring) -> int:
    """Checks the header; returns the capacity or raises RingCorruptError."""
    buf = memoryview(ring).cast("B")
    if len(buf) < L.RING_DATA_OFFSET:
        raise _corrupt(0, f"ring region of {len(buf)} bytes is smaller than its header "
                          f"({L.RING_DATA_OFFSET})")
    R = L.RING
    magic = _u64(buf, R["magic"])
    if magic != L.RING_MAGIC:
        raise _corrupt(R["magic"], f"bad ring magic 0x{magic:016x}")
    version = _u32(buf, R["layout_version"])
    if version != L.RING_LAYOUT_VERSION:
        raise _corrupt(R["layout_version"], f"ring layout version {version}, this build reads "
                                            f"version {L.RING_LAYOUT_VERSION}")
    header_bytes = _u32(buf, R["header_bytes"])
    capacity = _u64(buf, R["capacity"])
    region_bytes = _u64(buf, R["region_bytes"])
    if header_bytes != L.RING_DATA_OFFSET:
        raise _corrupt(R["header_bytes"], f"ring header_bytes {header_bytes}, expected "
                                          f"{L.RING_DATA_OFFSET}")
    if not (L.RING_CAPACITY_MIN <= capacity <= L.RING_CAPACITY_MAX) or capacity & (capacity - 1):
        raise _corrupt(R["capacity"], f"ring capacity {capacity} is not a power of two in "
                                      f"[{L.RING_CAPACITY_MIN}, {L.RING_CAPACITY_MAX}]")
    if region_bytes != L.RING_DATA_OFFSET + capacity or region_bytes > len(buf):
        raise _corrupt(R["region_bytes"], f"ring region_bytes {region_bytes} does not match "
                                          f"capacity {capacity} or the mapping ({len(buf)})")
    read, write = _u64(buf, R["read_position"]), _u64(buf, R["write_position"])
    if (read | write) & (L.FRAME_ALIGN - 1) or not 0 <= write - read <= capacity:
        raise _corrupt(R["write_position"], f"ring positions out of range: read {read}, "
                                            f"write {write}, capacity {capacity}")
    return capacity


def _room_for(tail: int, head: int, capacity: int, need: int) -> bool:
    return (tail - head) + need + L.FRAME_ALIGN <= capacity


def _needed(tail: int, capacity: int, payload_len: int) -> int:
    fb = L.frame_bytes(payload_len)
    idx = tail & (capacity - 1)
    return (capacity - idx) + fb if idx + fb > capacity else fb


def ring_fits(ring, payload_bytes: int) -> bool:
    buf = memoryview(ring).cast("B")
    capacity = ring_check(buf)
    if payload_bytes > L.payload_bytes_max(capacity):
        return False
    tail, head = _u64(buf, L.RING["write_position"]), _u64(buf, L.RING["read_position"])
    return _room_for(tail, head, capacity, _needed(tail, capacity, payload_bytes))


_BE64 = struct.Struct(">q")
_BE32 = struct.Struct(">i")


def _frame_steps(payload):
    """(position, offsets) of each batch of a frame's payload, by shmb_frame_offsets' walk."""
    pos, end = 0, len(payload)
    while pos + RB.HEADER_SIZE <= end:  # bounded: each step is at least 61 bytes
        blen = _BE32.unpack_from(payload, pos + RB.OFFSETS["batch_length"])[0]
        if blen < RB.BATCH_LENGTH_MIN:
            return
        delta = _BE32.unpack_from(payload, pos + RB.OFFSETS["last_offset_delta"])[0]
        yield pos, (1 if delta < 0 else delta + 1)
        pos += blen + RB.LOG_OVERHEAD


def frame_offsets(payload) -> int:
    """Offsets one frame's payload takes (shmb_frame_offsets): lastOffsetDelta + 1 summed over
    its batches, at least 1."""
    return sum(n for _, n in _frame_steps(payload)) or 1


def frame_set_base(payload, base: int) -> None:
    """shmb_frame_set_base: consecutive base offsets on the frame's batches, from ``base``."""
    _BE64.pack_into(payload, 0, base)
    for pos, n in _frame_steps(payload):
        _BE64.pack_into(payload, pos, base)
        base += n


def _reserve_offsets(buf, ctl, tail: int, mask: int, views: list) -> int:
    """reserve_offsets in ring.c: take the frames' offsets from next_offset, patch them in."""
    R = L.RING
    total = sum(frame_offsets(v) for v in views)
    _U64.pack_into(buf, R["reserved_base"], L.RESERVED_PENDING)
    at = L.CONTROL["next_offset"]
    base = _u64(ctl, at)
    _U64.pack_into(ctl, at, base + total)  # (single-threaded reference: no fetch_add needed)
    _U64.pack_into(buf, R["reserved_end"], base + total)
    _U64.pack_into(buf, R["reserved_base"], base)
    pos, data, nxt = tail, L.RING_DATA_OFFSET, base
    for v in views:
        if _I32.unpack_from(buf, data + (pos & mask) + 4)[0] == L.FRAME_TYPE_PADDING:
            pos += (mask + 1) - (pos & mask)
        off = data + (pos & mask) + L.FRAME_HEADER_BYTES
        frame_set_base(buf[off:off + len(v)], nxt)
        nxt += frame_offsets(v)
        pos += L.frame_bytes(len(v))
    return base


def ring_write(ring, payloads, doorbell=None) -> tuple[int, int, int]:
    """Writes as many payloads as fit, publishes them at once: (status, first_sequence, written).

    Order of stores, as in C: every frame except the first gets its length at once; the
    length word after the last frame is zeroed; next_sequence and write_position are stored;
    the first frame's length is stored last (the commit).
    """
    buf = memoryview(ring).cast("B")
    capacity = ring_check(buf)
    items = [payloads] if isinstance(payloads, (bytes, bytearray, memoryview)) else list(payloads)
    views = [memoryview(p).cast("B") for p in items]
    limit = L.payload_bytes_max(capacity)
    for i, v in enumerate(views):
        if len(v) > limit:
            raise errors.RecordTooLargeError(
                f"payload {i} of {len(v)} bytes is larger than this ring can ever hold "
                f"({limit} bytes, capacity {capacity})")
    ctl = memoryview(doorbell).cast("B") if doorbell is not None else None
    if ctl is not None:
        for i, v in enumerate(views):
            if len(v) < RB.HEADER_SIZE:
                raise errors.CorruptRecordError(
                    f"payload {i} of {len(v)} bytes is shorter than a record batch header "
                    f"({RB.HEADER_SIZE} bytes)")
        if _u64(ctl, L.CONTROL["next_offset"]) & L.NEXT_OFFSET_UNSET:
            return L.RING_STATUS["OFFSETS_UNSET"], 0, 0
    R, data, mask = L.RING, L.RING_DATA_OFFSET, capacity - 1
    tail = pos = _u64(buf, R["write_position"])
    head = _u64(buf, R["read_position"])
    first_seq = seq = _u64(buf, R["next_sequence"])
    first_len = 0
    written = 0

    def put_header(at: int, length: int, ftype: int, sequence: int) -> None:
        nonlocal first_len
        off = data + (at & mask)
        _I32.pack_into(buf, off + 4, ftype)
        if ftype == L.FRAME_TYPE_DATA:
            _U64.pack_into(buf, off + 8, sequence)
        if at == tail:
            first_len = length
        else:
            _I32.pack_into(buf, off, length)

    for v in views:
        fb = L.frame_bytes(len(v))
        idx = pos & mask
        pad = capacity - idx if idx + fb > capacity else 0
        if not _room_for(pos, head, capacity, pad + fb):
            break
        if pad:
            put_header(pos, pad, L.FRAME_TYPE_PADDING, 0)
            pos += pad
        off = data + (pos & mask) + L.FRAME_HEADER_BYTES
        buf[off:off + len(v)] = v
        put_header(pos, L.FRAME_HEADER_BYTES + len(v), L.FRAME_TYPE_DATA, seq)
        pos += fb
        seq += 1
        written += 1
    if written == 0:
        return RING_FULL, first_seq, 0
    if ctl is not None:
        _reserve_offsets(buf, ctl, tail, mask, views[:written])
    _U64.pack_into(buf, data + (pos & mask), 0)
    _U64.pack_into(buf, R["next_sequence"], seq)
    _U64.pack_into(buf, R["write_position"], pos)
    _I32.pack_into(buf, data + (tail & mask), first_len)
    if ctl is not None:
        _U64.pack_into(buf, R["reserved_base"], L.RESERVED_NONE)
        off = L.CONTROL["commit_seq"]  # commit_wake in ring.c (the wake itself: C only)
        _U32.pack_into(ctl, off, (_u32(ctl, off) + 1) & 0xFFFFFFFF)
    if doorbell is not None:
        ctl = memoryview(doorbell).cast("B")
        if _u32(ctl, L.CONTROL["partition_sleeping"]):
            off = L.CONTROL["doorbell"]
            _U32.pack_into(ctl, off, (_u32(ctl, off) + 1) & 0xFFFFFFFF)
    return (RING_OK if written == len(views) else RING_FULL), first_seq, written


def _collect(buf, position: int, expected_sequence: int, max_bytes: int, frames_max: int):
    if max_bytes < 0 or frames_max <= 0:
        raise ValueError("max_bytes must be >= 0 and frames_max > 0")
    capacity = ring_check(buf)
    mask, data = capacity - 1, L.RING_DATA_OFFSET
    head = _u64(buf, L.RING["read_position"])
    if position & (L.FRAME_ALIGN - 1) or position < head or position - head > capacity:
        raise _corrupt(position, f"read position {position} outside [read_position {head}, "
                                 f"+{capacity}]")
    pos, total, spans = position, 0, []
    while len(spans) < frames_max and (pos - head) + L.FRAME_ALIGN <= capacity:
        idx = pos & mask
        length, ftype = struct.unpack_from("<ii", buf, data + idx)
        if length == 0:
            break
        if length < 0:
            raise _corrupt(pos, f"frame at {pos} has length {length}")
        if ftype == L.FRAME_TYPE_PADDING:
            if length != capacity - idx:
                raise _corrupt(pos, f"padding frame at {pos} has length {length}, expected "
                                    f"{capacity - idx}")
            pos += length
            continue
        fb = L.frame_bytes(length - L.FRAME_HEADER_BYTES)
        if (ftype != L.FRAME_TYPE_DATA or length < L.FRAME_HEADER_BYTES or idx + fb > capacity
                or (pos - head) + fb > capacity):
            raise _corrupt(pos, f"frame at {pos}: type {ftype}, length {length} do not fit "
                                f"the ring")
        seq = _u64(buf, data + idx + 8)
        if seq != expected_sequence + len(spans):
            raise _corrupt(pos, f"frame at {pos} has sequence {seq}, expected "
                                f"{expected_sequence + len(spans)}")
        plen = length - L.FRAME_HEADER_BYTES
        if total + plen > max_bytes and spans:
            break
        spans.append((data + idx + L.FRAME_HEADER_BYTES, plen))
        total += plen
        pos += fb
    return pos, spans


def ring_read(ring, position: int, expected_sequence: int, max_bytes: int = 1 << 20,
              frames_max: int = 1 << 16) -> tuple[int, int, bytes]:
    """Committed frames from ``position``: (next_position, count, payloads concatenated)."""
    buf = memoryview(ring).cast("B")
    pos, spans = _collect(buf, position, expected_sequence, max_bytes, frames_max)
    return pos, len(spans), b"".join(bytes(buf[o:o + n]) for o, n in spans)


def ring_scan(ring, position: int, expected_sequence: int, max_bytes: int = 1 << 20,
              frames_max: int = 1 << 16) -> tuple[int, list[tuple[int, int]]]:
    """Like ring_read, without copying: (next_position, [(payload_offset, length), ...])."""
    buf = memoryview(ring).cast("B")
    return _collect(buf, position, expected_sequence, max_bytes, frames_max)


def ring_release(ring, position: int) -> None:
    buf = memoryview(ring).cast("B")
    ring_check(buf)
    head, tail = _u64(buf, L.RING["read_position"]), _u64(buf, L.RING["write_position"])
    if position & (L.FRAME_ALIGN - 1) or not head <= position <= tail:
        raise _corrupt(position, f"release to {position} outside [read {head}, write {tail}]")
    _U64.pack_into(buf, L.RING["read_position"], position)
    if _u32(buf, L.RING["space_waiting"]):
        off = L.RING["space_seq"]
        _U32.pack_into(buf, off, (_u32(buf, off) + 1) & 0xFFFFFFFF)


def frame_ok(payload, batch_bytes_max: int, records_max: int) -> bool:
    """shmb_frame_ok: the partition's rule for a ring frame (CRC and records checked, every
    batch at most ``batch_bytes_max``, 1..``records_max`` records, no control batch)."""
    from ..records import reference as records_reference
    view = memoryview(payload).cast("B")
    if not len(view):
        return False
    scan = records_reference.scan_batches(view, verify_crc=True, verify_records=True,
                                          batch_bytes_max=batch_bytes_max)
    if scan.error_position != -1:
        return False
    for pos, _base, _last, _ts, count in scan.batches:
        attributes = struct.unpack_from(">h", view, pos + RB.OFFSETS["attributes"])[0]
        if not 1 <= count <= records_max or attributes & RB.CONTROL_MASK:
            return False
    return True


def ring_frame_at(ring, control, offset: int, hint: int, batch_bytes_max: int,
                  records_max: int) -> tuple:
    """shmb_ring_frame_at: (status, payload or None, base, span, next_hint) of the committed
    frame of ``ring`` whose offsets hold ``offset`` (a consumer reading rings). Single-threaded:
    a torn read cannot happen here, so TORN comes only from a read_position past the walk."""
    S = L.FRAME_AT_STATUS
    buf = memoryview(ring).cast("B")
    ctl = memoryview(control).cast("B")
    try:
        capacity = ring_check(buf)
    except errors.RingCorruptError:
        return S["NONE"], None, -1, 0, hint
    if _u32(buf, L.RING["fsync_required"]):
        return S["NONE"], None, -1, 0, hint
    head = _u64(buf, L.RING["read_position"])
    pos = hint if (hint % L.FRAME_ALIGN == 0 and head <= hint <= head + capacity) else head
    next_hint, mask, data = pos, capacity - 1, L.RING_DATA_OFFSET
    while (pos - head) + L.FRAME_ALIGN <= capacity:  # bounded: pos grows within a capacity
        idx = pos & mask
        length, ftype, _seq = _FRAME.unpack_from(buf, data + idx)
        if length <= 0:
            return S["NONE"], None, -1, 0, next_hint
        if ftype == L.FRAME_TYPE_PADDING:
            if length != capacity - idx:
                return S["NONE"], None, -1, 0, next_hint
            pos += length
            continue
        fb = L.frame_bytes(length - L.FRAME_HEADER_BYTES)
        if ftype != L.FRAME_TYPE_DATA or length < L.FRAME_HEADER_BYTES + RB.HEADER_SIZE \
                or idx + fb > capacity or (pos - head) + fb > capacity:
            return S["NONE"], None, -1, 0, next_hint
        start = data + idx + L.FRAME_HEADER_BYTES
        payload = bytearray(buf[start:start + length - L.FRAME_HEADER_BYTES])
        base = struct.unpack_from(">q", payload, 0)[0]
        span = frame_offsets(payload)
        if base > offset:
            return S["NONE"], None, -1, 0, next_hint
        if offset - base >= span:
            pos += fb
            next_hint = pos
            continue
        if len(payload) > L.RING_READ_COPY_BYTES_MAX:
            return S["LARGE"], None, base, span, pos + fb
        next_offset = _u64(ctl, L.CONTROL["next_offset"])
        if base < 0 or next_offset & L.NEXT_OFFSET_UNSET or base >= next_offset \
                or not frame_ok(payload, batch_bytes_max, records_max):
            return S["REFUSED"], None, base, span, pos + fb
        frame_set_base(payload, base)
        return S["FOUND"], bytes(payload), base, span, pos + fb
    return S["NONE"], None, -1, 0, next_hint
