"""What is wrong with some batch bytes, in words and as a typed exception.

``records.scan_batches`` never raises: it reports a status and the position where it stopped.
This module turns that into a message naming the problem and the position, and into the
exception class that ``shmbroker.errors`` assigns to it (the mapping of docs/design/records.md),
in one place, so that decoding, append, read, recovery and dump-log all say the same thing
about the same bytes.
"""
from __future__ import annotations

import struct

from .. import errors
from ..layout import record_batch as layout

STATUS = layout.SCAN_STATUS
STATUS_NAMES = {code: name for name, code in STATUS.items()}

#: scan status -> exception class (docs/design/records.md, "Error mapping").
STATUS_ERRORS: dict[int, type[errors.ShmbrokerError]] = {
    STATUS["TRUNCATED"]: errors.TruncatedBatchError,
    STATUS["BAD_LENGTH"]: errors.CorruptRecordError,
    STATUS["BAD_MAGIC"]: errors.InvalidMagicError,
    STATUS["BAD_CRC"]: errors.CrcMismatchError,
    STATUS["BAD_RECORD"]: errors.InvalidRecordError,
    STATUS["COMPRESSED"]: errors.UnsupportedCompressionError,
    STATUS["TOO_LARGE"]: errors.RecordTooLargeError,
}

_LENGTH = struct.Struct(">i")
_MAGIC = struct.Struct(">b")
_CRC = struct.Struct(">I")
_OFF = layout.OFFSETS


def batch_length_at(buf, position: int) -> int | None:
    """The batch_length field of the batch at ``position``, or None when it is not all there."""
    if len(buf) - position < layout.LOG_OVERHEAD:
        return None
    return _LENGTH.unpack_from(buf, position + _OFF["batch_length"])[0]


def describe(buf, position: int, status: int, batch_bytes_max: int = 0) -> str:
    """One sentence saying what is wrong with the batch that starts at ``position`` of ``buf``."""
    available = len(buf) - position
    length = batch_length_at(buf, position)
    if status == STATUS["TRUNCATED"]:
        if length is None or available < layout.HEADER_SIZE:
            return (f"truncated batch at position {position}: only {available} bytes left, "
                    f"fewer than the {layout.HEADER_SIZE}-byte batch header")
        return (f"truncated batch at position {position}: batch_length {length} needs "
                f"{length + layout.LOG_OVERHEAD} bytes, only {available} are there")
    if status == STATUS["TOO_LARGE"]:
        limit = f"batch_bytes_max={batch_bytes_max}" if batch_bytes_max else "the limit"
        return (f"batch at position {position} is {length + layout.LOG_OVERHEAD} bytes, "
                f"larger than {limit}")
    if status == STATUS["BAD_LENGTH"]:
        return (f"batch at position {position} has batch_length {length}, below the minimum "
                f"{layout.BATCH_LENGTH_MIN}")
    if status == STATUS["BAD_MAGIC"]:
        magic = _MAGIC.unpack_from(buf, position + _OFF["magic"])[0]
        return f"batch at position {position} has magic {magic}; only magic 2 (RecordBatch v2) is supported"
    if status == STATUS["BAD_CRC"]:
        stored = _CRC.unpack_from(buf, position + _OFF["crc"])[0]
        return f"CRC-32C mismatch in the batch at position {position} (stored crc {stored:#010x})"
    if status == STATUS["BAD_RECORD"]:
        return (f"malformed record in the batch at position {position}: varint lengths, record "
                f"count or last_offset_delta do not add up")
    if status == STATUS["COMPRESSED"]:
        return f"batch at position {position} is compressed; only uncompressed batches are supported"
    return f"batch at position {position}: scan status {status}"


def error_for(buf, position: int, status: int, batch_bytes_max: int = 0,
              context: str = "") -> errors.ShmbrokerError:
    """The typed exception for a failed scan; ``context`` (e.g. "append") prefixes the message."""
    message = describe(buf, position, status, batch_bytes_max)
    if context:
        message = f"{context}: {message}"
    return STATUS_ERRORS.get(status, errors.CorruptRecordError)(message, position)
