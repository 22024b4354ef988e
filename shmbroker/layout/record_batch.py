"""Kafka RecordBatch v2 (magic 2): the bytes of every segment file and of every produce.

::

    offset  size  field                  notes
    ------  ----  ---------------------  -------------------------------------------------
         0     8  base_offset            int64; assigned by the log on append (outside CRC)
         8     4  batch_length           int32; bytes that follow this field (total - 12)
        12     4  partition_leader_epoch int32; set by the log on append (outside CRC)
        16     1  magic                  int8; always 2
        17     4  crc                    uint32; CRC-32C (Castagnoli) of bytes [21, end)
        21     2  attributes             int16; bits 0-2 compression, 3 timestamp type,
                                           4 transactional, 5 control, 6 delete horizon
        23     4  last_offset_delta      int32; offset of the last record - base_offset
        27     8  base_timestamp         int64; ms; Kafka calls it firstTimestamp
        35     8  max_timestamp          int64; ms
        43     8  producer_id            int64; -1 when not idempotent
        51     2  producer_epoch         int16; -1 when not idempotent
        53     4  base_sequence          int32; -1 when not idempotent
        57     4  records_count          int32
        61     .  records                each: varint length, then the record body

    record body (all varints are zigzag, as in protobuf):
        attributes      int8 (unused, 0)
        timestamp_delta varlong  (timestamp - base_timestamp)
        offset_delta    varint   (offset - base_offset)
        key_length      varint   (-1 = null key), key bytes
        value_length    varint   (-1 = null value), value bytes
        headers_count   varint,  each: key_length varint + UTF-8 key,
                                       value_length varint (-1 = null) + value bytes

All integers in the header are big-endian. ``base_offset`` and ``partition_leader_epoch`` sit
before the CRC'd range, which is why the log can assign offsets without recomputing the CRC.
"""
from __future__ import annotations

import struct
from typing import NamedTuple


class Field(NamedTuple):
    name: str
    offset: int
    size: int
    struct_code: str  # big-endian struct format character


FIELDS: tuple[Field, ...] = (
    Field("base_offset", 0, 8, "q"),
    Field("batch_length", 8, 4, "i"),
    Field("partition_leader_epoch", 12, 4, "i"),
    Field("magic", 16, 1, "b"),
    Field("crc", 17, 4, "I"),
    Field("attributes", 21, 2, "h"),
    Field("last_offset_delta", 23, 4, "i"),
    Field("base_timestamp", 27, 8, "q"),
    Field("max_timestamp", 35, 8, "q"),
    Field("producer_id", 43, 8, "q"),
    Field("producer_epoch", 51, 2, "h"),
    Field("base_sequence", 53, 4, "i"),
    Field("records_count", 57, 4, "i"),
)

#: Bytes of the fixed header; records start here.
HEADER_SIZE = 61
#: base_offset + batch_length: bytes not counted by batch_length.
LOG_OVERHEAD = 12
#: The CRC covers [CRC_START, end of batch).
CRC_START = 21
#: The only magic we read or write.
MAGIC = 2
#: Smallest batch_length that can hold a header (HEADER_SIZE - LOG_OVERHEAD).
BATCH_LENGTH_MIN = HEADER_SIZE - LOG_OVERHEAD

# attributes bits
COMPRESSION_MASK = 0x07
TIMESTAMP_TYPE_MASK = 0x08
TRANSACTIONAL_MASK = 0x10
CONTROL_MASK = 0x20
DELETE_HORIZON_MASK = 0x40

COMPRESSION_NONE = 0
COMPRESSION_GZIP = 1
COMPRESSION_SNAPPY = 2
COMPRESSION_LZ4 = 3
COMPRESSION_ZSTD = 4
#: Codecs above this (5-7 of the three bits) are not Kafka codecs: refused as unsupported.
COMPRESSION_CODEC_MAX = COMPRESSION_ZSTD
#: A compressed batch's records_count cannot be bounded by its bytes (a kilobyte of gzip can
#: hold a million empty records), yet it advances the log end offset before anyone looks
#: inside. This caps it: far above what a producer's batch holds (Kafka's default
#: max.message.bytes of 1 MiB fits at most ~150,000 of the smallest records), far below what
#: would make a single batch skip billions of offsets.
COMPRESSED_RECORDS_MAX = 1 << 20

#: Kafka's "no producer" values for the idempotence fields.
NO_PRODUCER_ID = -1
NO_PRODUCER_EPOCH = -1
NO_SEQUENCE = -1

HEADER_STRUCT = struct.Struct(">" + "".join(f.struct_code for f in FIELDS))
#: The prefix the log rewrites on append: base_offset, batch_length, leader epoch, magic.
PREFIX_STRUCT = struct.Struct(">qiib")

assert HEADER_STRUCT.size == HEADER_SIZE
assert all(a.offset + a.size == b.offset for a, b in zip(FIELDS, FIELDS[1:]))
assert FIELDS[-1].offset + FIELDS[-1].size == HEADER_SIZE
assert dict((f.name, f.offset) for f in FIELDS)["attributes"] == CRC_START

OFFSETS = {f.name: f.offset for f in FIELDS}

#: Why a scan of batches stopped. Shared by the C scanner and the Python reference; the
#: records package maps each non-OK status to an exception class of shmbroker.errors.
SCAN_STATUS = {
    "OK": 0,          # the buffer ended exactly at a batch boundary
    "TRUNCATED": 1,   # the last batch is incomplete (fewer bytes than its header says)
    "BAD_LENGTH": 2,  # batch_length below the size of a batch header
    "BAD_MAGIC": 3,   # magic is not 2
    "BAD_CRC": 4,     # CRC-32C mismatch
    "BAD_RECORD": 5,  # CRC fine but a record inside is malformed (varints, lengths, counts)
    "COMPRESSED": 6,  # a codec above COMPRESSION_CODEC_MAX, or compressed where a decoder needs plain records
    "TOO_LARGE": 7,   # a whole, well-formed length, but above the caller's batch_bytes_max
}

CONSTANTS = {
    "HEADER_SIZE": HEADER_SIZE,
    "LOG_OVERHEAD": LOG_OVERHEAD,
    "CRC_START": CRC_START,
    "MAGIC": MAGIC,
    "BATCH_LENGTH_MIN": BATCH_LENGTH_MIN,
    "COMPRESSION_MASK": COMPRESSION_MASK,
    "COMPRESSION_CODEC_MAX": COMPRESSION_CODEC_MAX,
    "COMPRESSED_RECORDS_MAX": COMPRESSED_RECORDS_MAX,
    "TIMESTAMP_TYPE_MASK": TIMESTAMP_TYPE_MASK,
    "TRANSACTIONAL_MASK": TRANSACTIONAL_MASK,
    "CONTROL_MASK": CONTROL_MASK,
    **{f"SCAN_{k}": v for k, v in SCAN_STATUS.items()},
}
