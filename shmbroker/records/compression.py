"""Decompressing Kafka's compressed batches for our own decoders.

The log stores a compressed batch exactly as the producer sent it (the broker reads only its
header, which is never compressed). Decoding is the consumer's business, as in Kafka: when a
decoder meets a batch whose attributes name a codec, the records section (everything after
the 61-byte header) is one compressed block. This module turns such batches back into the
plain batches the C decoder walks, so there is one record parser, not one per codec:

    compressed:   [header: attributes=codec, batch_length=49+len(block), crc]  [block]
    inflated:     [header: attributes=codec cleared, batch_length=49+len(raw), crc']  [raw]

Every other header field (offsets, timestamps, counts, producer fields) is kept, so the
records decode to the same offsets and timestamps. The inflated copy is private to the
decoder; the log and the wire keep the original bytes.

Codecs (Kafka's numbers): 1 gzip (zlib, standard library), 2 snappy (``cramjam``; raw
blocks as librdkafka writes them, or Xerial framing as the Java and kafka-python producers
write them), 3 lz4 (``lz4``, the LZ4 frame format), 4 zstd (``zstandard``). The three
packages are optional (``pip install 'shmbroker[compression]'``): a batch needing one that is
missing raises :class:`~shmbroker.errors.CompressionLibraryMissingError` naming it.

Limits: one batch inflates to at most ``DECOMPRESSED_BATCH_BYTES_MAX``; gzip, lz4 and zstd
stop producing output there, snappy declares its length before it is decompressed.
"""
from __future__ import annotations

import struct
import zlib
from typing import Any, Callable

from .. import errors
from ..layout import record_batch as L

#: One inflated batch at most. Producers cap a batch before compression (Kafka's default
#: max.message.bytes is 1 MiB and librdkafka's message.max.bytes too), so 64 MiB is far above
#: anything real and keeps a small "zip bomb" batch from taking the consumer's memory.
DECOMPRESSED_BATCH_BYTES_MAX = 64 << 20

#: Xerial snappy framing (Java's snappy-java, kafka-python): magic, then version and
#: compatible-version INT32s, then blocks of [INT32 length][raw snappy block].
_XERIAL_MAGIC = b"\x82SNAPPY\x00"
_XERIAL_HEADER_BYTES = 16
_XERIAL_BLOCKS_MAX = 1 << 20  # bounds the walk; 64 MiB of 32 KiB blocks is 2,048

_CODEC_NAMES = {1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}
_PACKAGES = {2: "cramjam", 3: "lz4", 4: "zstandard"}

_BATCH_LENGTH = struct.Struct(">i")
_ATTRIBUTES = struct.Struct(">h")


def codec_name(codec: int) -> str:
    return _CODEC_NAMES.get(codec, f"codec {codec}")


def _import(codec: int):
    """The module for ``codec``, or CompressionLibraryMissingError naming the package."""
    package = _PACKAGES[codec]
    try:
        if codec == 2:
            import cramjam
            return cramjam
        if codec == 3:
            import lz4.frame
            return lz4.frame
        import zstandard
        return zstandard
    except ImportError:
        raise errors.CompressionLibraryMissingError(
            f"decoding a {codec_name(codec)}-compressed batch needs the {package} package: "
            f"pip install {package} (or pip install 'shmbroker[compression]')") from None


def _too_big(codec: int) -> errors.CorruptRecordError:
    return errors.CorruptRecordError(
        f"{codec_name(codec)} block inflates past {DECOMPRESSED_BATCH_BYTES_MAX} bytes "
        "(DECOMPRESSED_BATCH_BYTES_MAX)")


def _gzip(block: bytes) -> bytes:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header and trailer
    out = d.decompress(block, DECOMPRESSED_BATCH_BYTES_MAX)
    if d.unconsumed_tail:
        raise _too_big(1)
    if not d.eof:
        raise errors.CorruptRecordError("gzip block ends before its end-of-stream marker")
    return out


def _snappy_raw(cramjam, block: bytes) -> bytes:
    if cramjam.snappy.decompress_raw_len(block) > DECOMPRESSED_BATCH_BYTES_MAX:
        raise _too_big(2)
    return bytes(cramjam.snappy.decompress_raw(block))


def _snappy(block: bytes) -> bytes:
    cramjam = _import(2)
    if not block.startswith(_XERIAL_MAGIC):
        return _snappy_raw(cramjam, block)  # librdkafka: one raw block
    out = bytearray()
    pos = _XERIAL_HEADER_BYTES
    for _ in range(_XERIAL_BLOCKS_MAX):
        if pos >= len(block):
            return bytes(out)
        if len(block) - pos < 4:
            raise errors.CorruptRecordError("xerial snappy block length is cut short")
        n, = _BATCH_LENGTH.unpack_from(block, pos)
        if n < 0 or n > len(block) - pos - 4:
            raise errors.CorruptRecordError(f"xerial snappy block of {n} bytes runs past the batch")
        out += _snappy_raw(cramjam, block[pos + 4:pos + 4 + n])
        if len(out) > DECOMPRESSED_BATCH_BYTES_MAX:
            raise _too_big(2)
        pos += 4 + n
    raise errors.CorruptRecordError(f"more than {_XERIAL_BLOCKS_MAX} xerial snappy blocks")


def _lz4(block: bytes) -> bytes:
    d = _import(3).LZ4FrameDecompressor()
    out = d.decompress(block, max_length=DECOMPRESSED_BATCH_BYTES_MAX)
    if not d.eof:
        if not d.needs_input:
            raise _too_big(3)
        raise errors.CorruptRecordError("lz4 frame ends before its end mark")
    return out


def _zstd(block: bytes) -> bytes:
    d = _import(4).ZstdDecompressor().decompressobj()
    out = d.decompress(block)  # stops at the frame end; bounded below
    if len(out) > DECOMPRESSED_BATCH_BYTES_MAX:
        raise _too_big(4)
    return out


_DECOMPRESS: dict[int, Callable[[bytes], bytes]] = {1: _gzip, 2: _snappy, 3: _lz4, 4: _zstd}


def decompress(codec: int, block: bytes) -> bytes:
    """The records section of a batch compressed with ``codec`` (Kafka's number, 1-4)."""
    if codec not in _DECOMPRESS:
        raise errors.UnsupportedCompressionError(f"compression codec {codec} is not one of Kafka's")
    if codec in _PACKAGES:
        _import(codec)  # the missing-package error before anything else
    try:
        return _DECOMPRESS[codec](block)
    except errors.ShmbrokerError:
        raise
    except Exception as exc:  # each library has its own error types for bad input
        raise errors.CorruptRecordError(
            f"{codec_name(codec)} block does not decompress: {exc}") from None


def inflate_batches(buf: Any, crc32c: Callable[[Any], int]) -> bytes:
    """``buf`` with every compressed batch replaced by its plain twin (module docstring).

    ``buf`` must hold whole, checked batches (the caller scanned it, CRCs included): this
    walks headers only. ``crc32c`` computes the new CRCs (the C one, or the reference's in
    the reference decoder), so the result passes a CRC check too.
    """
    view = memoryview(buf).cast("B")
    out = bytearray()
    pos = 0
    for _ in range(len(view) // L.HEADER_SIZE + 1):
        if pos >= len(view):
            break
        length, = _BATCH_LENGTH.unpack_from(view, pos + 8)
        end = pos + length + L.LOG_OVERHEAD
        attributes, = _ATTRIBUTES.unpack_from(view, pos + L.CRC_START)
        codec = attributes & L.COMPRESSION_MASK
        if not codec:
            out += view[pos:end]
            pos = end
            continue
        try:
            raw = decompress(codec, bytes(view[L.HEADER_SIZE + pos:end]))
        except errors.ShmbrokerError as exc:
            if exc.position is None:  # the batch's position in buf, like every decode error
                exc.position = pos
                exc.args = (f"{exc} (batch at byte {pos})",)
            raise
        header = bytearray(view[pos:pos + L.HEADER_SIZE])
        _BATCH_LENGTH.pack_into(header, 8, L.HEADER_SIZE - L.LOG_OVERHEAD + len(raw))
        _ATTRIBUTES.pack_into(header, L.CRC_START, attributes & ~L.COMPRESSION_MASK)
        crc = crc32c(bytes(header[L.CRC_START:]) + raw)
        struct.pack_into(">I", header, 17, crc)
        out += header
        out += raw
        pos = end
    assert pos == len(view), (pos, len(view))
    return bytes(out)
