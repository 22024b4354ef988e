"""Seeded makers of valid RecordBatch v2 bytes and of damaged copies, shared by the fuzz tests.

Each damaged buffer comes with what its damage implies, so that a test can assert more than
"it did not crash":

* ``crc_broken``: a byte that some batch's CRC covers changed (or the batch's framing changed)
  and the CRC was left as it was, so a decoder that verifies CRCs must report an error;
* ``must_fail``: the damage breaks the framing or the record count in a way every decoder must
  notice even without the CRC (a cut inside a batch, records_count changed, ...);
* ``expected``: the records the buffer holds when it is not damaged at all (or when only bytes
  outside the CRC'd range changed: base_offset and the leader epoch).
* ``bad_pos``: where the damaged batch starts; every byte before it is whole, valid batches.

The layout (offsets of batch_length, records_count, ...) comes from shmbroker.layout, the one
declaration of RecordBatch v2. This module is not a test file; it is imported by them.
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from typing import Callable

from shmbroker import records
from shmbroker.layout import record_batch as L

OFF = L.OFFSETS
#: One expected record: (offset, timestamp, key, value, headers).
RecordTuple = tuple

HEADER_KEYS = ["h", "trace-id", "ünïcode", "", "k" * 40, "\u2603"]


# --- valid batches ----------------------------------------------------------------------------


@dataclass
class Batch:
    data: bytes
    records: list[RecordTuple]
    base_offset: int


def _blob(rng: random.Random, allow_null: bool = True) -> bytes | None:
    roll = rng.random()
    if allow_null and roll < 0.12:
        return None
    if roll < 0.22:
        return b""
    if roll < 0.9:
        return rng.randbytes(rng.randrange(1, 40))
    return rng.randbytes(rng.choice([127, 128, 300, 700]))


def _timestamps(rng: random.Random, n: int) -> list[int]:
    roll = rng.random()
    if roll < 0.4:
        return [rng.randrange(0, 2**41)] * n
    if roll < 0.9:
        base = rng.randrange(-(2**40), 2**41)
        return [base + rng.randrange(-10**6, 10**6) for _ in range(n)]
    # Long timestamp-delta varints (up to 9 bytes) without overflowing int64.
    return [rng.randrange(-(2**61), 2**61) for _ in range(n)]


def random_batch(rng: random.Random, records_max: int = 12) -> Batch:
    """One valid batch made by shmbroker.records.encode_batch, with the records it holds."""
    n = rng.randrange(1, records_max + 1)
    values = [_blob(rng) for _ in range(n)]
    keys = None if rng.random() < 0.3 else [_blob(rng) for _ in range(n)]
    headers = None
    if rng.random() < 0.5:
        headers = [None if rng.random() < 0.3 else
                   [(rng.choice(HEADER_KEYS), _blob(rng)) for _ in range(rng.choice([0, 1, 1, 2, 4]))]
                   for _ in range(n)]
    ts = _timestamps(rng, n)
    base_offset = rng.choice([0, rng.randrange(0, 2**40)])
    producer = rng.choice([(-1, -1, -1), (rng.randrange(0, 2**40), rng.randrange(0, 2**15),
                                          rng.randrange(0, 2**30))])
    attributes = rng.choice([0, 0, 0, L.TIMESTAMP_TYPE_MASK, L.TRANSACTIONAL_MASK])
    data = records.encode_batch(values, keys, headers, ts, 0, base_offset,
                                rng.choice([-1, 0, 7]), *producer, attributes=attributes)
    # LogAppendTime (Kafka's rule): every record reads back with the batch's max timestamp.
    read_ts = [max(ts)] * n if attributes & L.TIMESTAMP_TYPE_MASK else list(ts)
    recs = [(base_offset + i, read_ts[i], None if keys is None else keys[i], values[i],
             tuple(headers[i] or ()) if headers is not None else ())
            for i in range(n)]
    return Batch(data, recs, base_offset)


# --- byte helpers -----------------------------------------------------------------------------


def zigzag_varint(value: int) -> bytes:
    """Zigzag varint of a signed 64-bit value (what Kafka writes for every varint field)."""
    v = ((value << 1) ^ (value >> 63)) & 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a well-formed varint of a batch we built ourselves."""
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7


@dataclass
class Varint:
    """Where a varint of a valid batch lies: [start, end), what it is, and its record."""

    start: int
    end: int
    kind: str
    value: int
    record_start: int   # position of the record's length varint
    limit: int          # end of what encloses it (the record, or the batch for a record length)


def varints(batch: bytes) -> list[Varint]:
    """Every varint of a valid, uncompressed batch (one we built), in byte order."""
    out: list[Varint] = []
    end = len(batch)
    count, = struct.unpack_from(">i", batch, OFF["records_count"])
    p = L.HEADER_SIZE

    def take(kind: str, limit: int, rec: int) -> int:
        nonlocal p
        start = p
        value, p = _read_varint(batch, p)
        out.append(Varint(start, p, kind, value, rec, limit))
        return value

    for _ in range(count):
        rec = p
        length = take("record_length", end, rec)
        rec_end = p + length
        p += 1  # record attributes
        take("timestamp_delta", rec_end, rec)
        take("offset_delta", rec_end, rec)
        for kind in ("key_length", "value_length"):
            n = take(kind, rec_end, rec)
            p += max(n, 0)
        for _ in range(take("header_count", rec_end, rec)):
            # (take() moves p itself, so its result is added in a second statement.)
            key_length = take("header_key_length", rec_end, rec)
            p += key_length
            value_length = take("header_value_length", rec_end, rec)
            p += max(value_length, 0)
        assert p == rec_end, "varints(): not a batch we built"
    assert p == end
    return out


def fix_crc(batch: bytearray) -> bool:
    """Recompute the CRC over the batch as its (maybe damaged) batch_length frames it.

    Returns False (and changes nothing) when that frame does not fit the bytes.
    """
    if len(batch) < L.HEADER_SIZE:
        return False
    length, = struct.unpack_from(">i", batch, OFF["batch_length"])
    end = length + L.LOG_OVERHEAD
    if length < L.BATCH_LENGTH_MIN or end > len(batch):
        return False
    struct.pack_into(">I", batch, OFF["crc"], records.crc32c(memoryview(batch)[L.CRC_START:end]))
    return True


def set_batch_length(batch: bytearray) -> None:
    struct.pack_into(">i", batch, OFF["batch_length"], len(batch) - L.LOG_OVERHEAD)


def _int32_absurd(rng: random.Random, original: int, room: int) -> int:
    """An absurd value for a length/count field: negative, huge, or just past what fits."""
    return rng.choice([-1, -2, -3, -(2**31), -(2**31) + 1, 2**31 - 1, 2**31 - 2, 0,
                       room, room + 1, room + 2, original + 1, original - 1,
                       rng.randrange(-(2**31), 2**31)])


# --- damage to one batch ------------------------------------------------------------------------


@dataclass
class Damaged:
    data: bytes
    note: str
    crc_broken: bool
    must_fail: bool
    #: For damage that only touched base_offset / leader epoch: the new base_offset.
    still_valid_base_offset: int | None = None
    truncated: bool = False  # the data was cut: nothing can follow it


def _maybe_fix(rng: random.Random, data: bytearray, changed_crc_range: bool, p_fix: float = 0.6):
    fixed = rng.random() < p_fix and fix_crc(data)
    return fixed, changed_crc_range and not fixed


def damage_flip(rng: random.Random, b: Batch) -> Damaged:
    data = bytearray(b.data)
    k = rng.choice([1, 1, 2, 3, 8])
    where = []
    for _ in range(k):
        pos = rng.randrange(0, L.HEADER_SIZE) if rng.random() < 0.35 else rng.randrange(len(data))
        data[pos] ^= rng.choice([1 << rng.randrange(8), rng.randrange(1, 256)])
        where.append(pos)
    changed = [i for i in range(len(data)) if data[i] != b.data[i]]
    outside_crc = set(range(0, 8)) | set(range(12, 16))
    only_offsets = all(i in outside_crc for i in changed)
    fixed, broken = _maybe_fix(rng, data, not only_offsets)
    d = Damaged(bytes(data), f"flip at {where} crc_fixed={fixed}", broken, False)
    if only_offsets:
        d.still_valid_base_offset, = struct.unpack_from(">q", data, 0)
    return d


def damage_truncate(rng: random.Random, b: Batch) -> Damaged:
    if rng.random() < 0.5:
        # A torn write: the bytes simply stop inside the batch.
        cut = rng.randrange(1, len(b.data))
        return Damaged(b.data[:cut], f"cut at {cut} of {len(b.data)}", True, True, truncated=True)
    # A batch whose batch_length agrees with its shortened body: the records walk must fail.
    cut = rng.randrange(L.HEADER_SIZE, len(b.data))
    data = bytearray(b.data[:cut])
    set_batch_length(data)
    fixed, broken = _maybe_fix(rng, data, True, 0.7)
    return Damaged(bytes(data), f"records cut at {cut} of {len(b.data)}, length fixed, crc_fixed={fixed}",
                   broken, True)


def damage_batch_length(rng: random.Random, b: Batch) -> Damaged:
    data = bytearray(b.data)
    original = len(data) - L.LOG_OVERHEAD
    value = rng.choice([_int32_absurd(rng, original, original), 48, 49, 0, -1])
    if value == original:
        value += 1
    struct.pack_into(">i", data, OFF["batch_length"], value)
    # A different frame: too short or long for the records, or for the bytes.
    return Damaged(bytes(data), f"batch_length {original} -> {value}", True, True)


def damage_records_count(rng: random.Random, b: Batch) -> Damaged:
    data = bytearray(b.data)
    original = len(b.records)
    value = rng.choice([original + 1, original - 1, 0, -1, 2**31 - 1, -(2**31), original * 2,
                        rng.randrange(-(2**31), 2**31)])
    if value == original:
        value = original + 1
    struct.pack_into(">i", data, OFF["records_count"], value)
    if rng.random() < 0.5:  # keep last_offset_delta consistent, so only the count disagrees
        struct.pack_into(">i", data, OFF["last_offset_delta"], (value - 1) & 0x7FFFFFFF
                         if value > 0 else -1)
    fixed, broken = _maybe_fix(rng, data, True, 0.8)
    return Damaged(bytes(data), f"records_count {original} -> {value} crc_fixed={fixed}", broken, True)


def damage_header_field(rng: random.Random, b: Batch) -> Damaged:
    """Attributes (compression bits), last_offset_delta or magic, usually with a fixed CRC."""
    data = bytearray(b.data)
    which = rng.choice(["compression", "last_offset_delta", "magic", "attributes_other"])
    must_fail = True
    if which == "compression":
        attrs, = struct.unpack_from(">h", data, OFF["attributes"])
        # Codecs 5-7: refused by the strict scan. Codecs 1-4 pass it (a compressed batch's
        # records stay compressed in the log) and fail in decode; see check_native_on.
        struct.pack_into(">h", data, OFF["attributes"], (attrs & ~7) | rng.randrange(5, 8))
    elif which == "last_offset_delta":
        n = len(b.records)
        value = rng.choice([n, n - 2, -1, 2**31 - 1, -(2**31)])
        if value == n - 1:
            value = n
        struct.pack_into(">i", data, OFF["last_offset_delta"], value)
    elif which == "magic":
        data[OFF["magic"]] = rng.choice([0, 1, 3, 0xFF])
    else:
        # Control / delete-horizon bits: not our business to judge, the batch stays valid.
        attrs, = struct.unpack_from(">h", data, OFF["attributes"])
        struct.pack_into(">h", data, OFF["attributes"], attrs | rng.choice([0x20, 0x40, 0x80]))
        must_fail = False
    fixed, broken = _maybe_fix(rng, data, True, 0.8)
    return Damaged(bytes(data), f"header {which} crc_fixed={fixed}", broken, must_fail)


#: Replacement varints: runs of 0xff that never end in time, over-long and padded encodings.
VARINT_PATTERNS = [
    b"\xff" * 10, b"\xff" * 11, b"\xff" * 5, b"\xff" * 6, b"\xff" * 9 + b"\x01",
    b"\xff" * 9 + b"\x7f", b"\xff" * 4 + b"\x0f", b"\xff" * 4 + b"\x7f", b"\x80" * 4 + b"\x00",
    b"\x80" * 5 + b"\x00", b"\x80" * 9 + b"\x00", b"\xfe\xff\xff\xff\x0f", b"\x80",
]


def _splice_varint(rng: random.Random, b: Batch, v: Varint, new: bytes, note: str) -> Damaged:
    """Put ``new`` in place of varint ``v``; then maybe re-frame the record and batch, maybe re-CRC."""
    old = b.data[v.start:v.end]
    data = bytearray(b.data[:v.start] + new + b.data[v.end:])
    delta = len(new) - len(old)
    framing = rng.choice(["none", "batch", "record", "record"])
    if framing == "record" and v.kind != "record_length" and delta:
        rec_len, rec_body = _read_varint(b.data, v.record_start)
        new_len = zigzag_varint(rec_len + delta)
        len_end = v.record_start + (rec_body - v.record_start)
        data[v.record_start:len_end] = new_len
    if framing != "none":
        set_batch_length(data)
    changed = bytes(data) != b.data
    fixed, broken = _maybe_fix(rng, data, changed)
    return Damaged(bytes(data), f"{note} {v.kind}@{v.start} {old.hex()}->{new.hex()} "
                                f"framing={framing} crc_fixed={fixed}", broken, False)


def damage_varint_length(rng: random.Random, b: Batch) -> Damaged:
    """A length/count varint overwritten by an absurd value (negative, huge, just past the end)."""
    vs = [v for v in varints(b.data) if v.kind not in ("timestamp_delta", "offset_delta")]
    v = rng.choice(vs)
    room = v.limit - v.end
    value = _int32_absurd(rng, v.value, room)
    return _splice_varint(rng, b, v, zigzag_varint(value), f"length={value}")


def damage_varint_run(rng: random.Random, b: Batch) -> Damaged:
    """Any varint replaced by a run of 0xff (10 or 11 bytes: never terminated in time) or another odd form."""
    v = rng.choice(varints(b.data))
    new = rng.choice(VARINT_PATTERNS[:2] * 3 + VARINT_PATTERNS)
    return _splice_varint(rng, b, v, new, "run")


def damage_garbage_body(rng: random.Random, b: Batch) -> Damaged:
    """A plausible header (length, magic, CRC all right) over random record bytes."""
    data = bytearray(b.data[:L.HEADER_SIZE] + rng.randbytes(rng.randrange(0, 120)))
    if rng.random() < 0.5:
        struct.pack_into(">i", data, OFF["records_count"], rng.randrange(0, 6))
    set_batch_length(data)
    fix_crc(data)
    return Damaged(bytes(data), "garbage body", False, False)


DAMAGES: dict[str, Callable[[random.Random, Batch], Damaged]] = {
    "flip": damage_flip,
    "truncate": damage_truncate,
    "batch_length": damage_batch_length,
    "records_count": damage_records_count,
    "header_field": damage_header_field,
    "varint_length": damage_varint_length,
    "varint_run": damage_varint_run,
    "garbage_body": damage_garbage_body,
}


# --- whole cases (one buffer, maybe several batches) --------------------------------------------


@dataclass
class Case:
    buf: bytes
    label: str
    crc_broken: bool = False
    must_fail: bool = False
    expected: list | None = None
    bad_pos: int | None = None
    truncated: bool = False
    batches: list[Batch] = field(default_factory=list)


def random_bytes_case(rng: random.Random, label: str) -> Case:
    roll = rng.random()
    if roll < 0.6:
        buf = rng.randbytes(rng.randrange(0, 200))
    else:
        # Random bytes that get past the first checks: a sane length and magic 2.
        buf = bytearray(rng.randbytes(rng.randrange(L.HEADER_SIZE, 260)))
        struct.pack_into(">i", buf, OFF["batch_length"],
                         rng.choice([len(buf) - 12, rng.randrange(49, 300)]))
        buf[OFF["magic"]] = L.MAGIC
        if rng.random() < 0.5:
            fix_crc(buf)
        buf = bytes(buf)
    return Case(buf, label)


def valid_case(rng: random.Random, label: str, batches_max: int = 4) -> Case:
    bs = [random_batch(rng) for _ in range(rng.randrange(0, batches_max + 1))]
    buf = b"".join(b.data for b in bs)
    return Case(buf, label, expected=[r for b in bs for r in b.records], batches=bs)


def damaged_case(rng: random.Random, kind: str, label: str, batches_max: int = 4) -> Case:
    """Valid batches, then one damaged batch, then maybe more valid batches."""
    before = [random_batch(rng) for _ in range(rng.randrange(0, batches_max))]
    target = random_batch(rng)
    after = [random_batch(rng) for _ in range(rng.randrange(0, 2))]
    d = DAMAGES[kind](rng, target)
    prefix = b"".join(b.data for b in before)
    suffix = b"" if d.truncated else b"".join(b.data for b in after)
    case = Case(prefix + d.data + suffix, f"{label} kind={kind} {d.note} at={len(prefix)}",
                crc_broken=d.crc_broken, must_fail=d.must_fail, bad_pos=len(prefix),
                truncated=d.truncated)
    if d.still_valid_base_offset is not None:
        shift = d.still_valid_base_offset - target.base_offset
        moved = [((r[0] + shift + 2**63) % 2**64 - 2**63,) + r[1:] for r in target.records]
        case.expected = ([r for b in before for r in b.records] + moved +
                         [r for b in after for r in b.records])
    return case


def all_counts_case(rng: random.Random, label: str) -> Case:
    """Several batches, every one with a huge records_count and a CRC that matches it.

    Their sum is far more records than the bytes can hold (or than memory can index): a decoder
    that sizes anything from the header counts before walking the records must still fail
    with a record error, not run out of memory.
    """
    parts = []
    for _ in range(rng.randrange(2, 5)):
        data = bytearray(random_batch(rng).data)
        struct.pack_into(">i", data, OFF["records_count"],
                         rng.choice([2**31 - 1, 2**31 - 2, 2**30, 2**28 + 3]))
        fix_crc(data)
        parts.append(bytes(data))
    return Case(b"".join(parts), f"{label} kind=records_count_all", must_fail=True, bad_pos=0)


KINDS = ["random", "valid", *DAMAGES, "records_count_all"]


def make_case(kind: str, seed: int) -> Case:
    rng = random.Random(f"{kind}:{seed}")
    label = f"seed={seed}"
    if kind == "random":
        return random_bytes_case(rng, f"{label} kind=random")
    if kind == "valid":
        return valid_case(rng, f"{label} kind=valid")
    if kind == "records_count_all":
        return all_counts_case(rng, label)
    return damaged_case(rng, kind, label)
