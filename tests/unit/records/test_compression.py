"""Decoding compressed batches (records/compression.py): each codec against the C decoder
and the Python reference; a missing optional package is a clear, typed error."""
from __future__ import annotations

import gzip
import struct
import sys

import pytest

from shmbroker import errors, records
from shmbroker.layout import record_batch as RB
from shmbroker.records import compression, reference

pytestmark = pytest.mark.timeout(60)


def _compressors():
    import cramjam
    import lz4.frame
    import zstandard

    def xerial(raw):  # the framing kafka-python and the Java client write
        out = bytearray(b"\x82SNAPPY\x00" + struct.pack(">ii", 1, 1))
        for i in range(0, len(raw), 100):
            block = bytes(cramjam.snappy.compress_raw(raw[i:i + 100]))
            out += struct.pack(">i", len(block)) + block
        return bytes(out)
    return {1: gzip.compress, 2: lambda b: bytes(cramjam.snappy.compress_raw(b)), 3: lz4.frame.compress,
            4: zstandard.ZstdCompressor().compress, 5: xerial}


def compressed(plain: bytes, codec: int, compress) -> bytes:
    block = compress(plain[RB.HEADER_SIZE:])
    out = bytearray(plain[:RB.HEADER_SIZE]) + block
    struct.pack_into(">i", out, 8, len(out) - RB.LOG_OVERHEAD)
    out[22] |= codec
    struct.pack_into(">I", out, 17, records.crc32c(bytes(out[21:])))
    return bytes(out)


@pytest.mark.parametrize("name", ["gzip", "snappy", "lz4", "zstd", "snappy-xerial"])
def test_each_codec_decodes_to_the_plain_batchs_records_in_c_and_reference(name):
    codec, key = {"gzip": (1, 1), "snappy": (2, 2), "lz4": (3, 3), "zstd": (4, 4),
                  "snappy-xerial": (2, 5)}[name]
    plain = records.encode_batch([b"v%d" % i * 30 for i in range(200)], keys=[b"k"] * 200,
                                 headers=[[("h", b"x")]] * 200, base_offset=7,
                                 timestamp=1_700_000_000_000)
    buf = plain + compressed(plain, codec, _compressors()[key])
    want = [(r.offset, r.timestamp, r.key, r.value, r.headers) for r in records.decode_records(plain)] * 2
    for decode in (records.decode_records, reference.decode_records):
        assert [(r.offset, r.timestamp, r.key, r.value, r.headers) for r in decode(buf)] == want
    cols = records.decode_columnar(buf)
    assert [bytes(cols.value(i)) for i in range(len(cols))] == [w[3] for w in want]
    # The broker's check: header only, accepted by C and the reference alike.
    assert records.scan_batches(buf, True, True).ok
    assert reference.scan_batches(buf, True, True).status == RB.SCAN_STATUS["OK"]


def test_a_compressed_batch_whose_count_disagrees_with_last_offset_delta_is_refused():
    plain = records.encode_batch([b"a", b"b"], timestamp=1)
    bad = bytearray(compressed(plain, 1, gzip.compress))
    struct.pack_into(">i", bad, 57, 3)
    struct.pack_into(">I", bad, 17, records.crc32c(bytes(bad[21:])))
    assert records.scan_batches(bytes(bad), True, True).status_name == "BAD_RECORD"
    assert reference.scan_batches(bytes(bad), True, True).status == RB.SCAN_STATUS["BAD_RECORD"]
    bad[22] |= 7  # codec 7: not Kafka's
    struct.pack_into(">I", bad, 17, records.crc32c(bytes(bad[21:])))
    assert records.scan_batches(bytes(bad), True, True).status_name == "COMPRESSED"


def test_corrupt_compressed_block_is_a_corrupt_record_error():
    plain = records.encode_batch([b"a" * 100], timestamp=1)
    bad = bytearray(compressed(plain, 1, gzip.compress))
    bad[-6] ^= 0xFF  # inside gzip's CRC-32 trailer
    struct.pack_into(">I", bad, 17, records.crc32c(bytes(bad[21:])))
    with pytest.raises(errors.CorruptRecordError, match="gzip"):
        records.decode_records(bytes(bad))


@pytest.mark.parametrize("codec,module,package", [(3, "lz4", "lz4"), (4, "zstandard", "zstandard"),
                                                  (2, "cramjam", "cramjam")])
def test_a_missing_codec_package_is_named_in_the_error(monkeypatch, codec, module, package):
    plain = records.encode_batch([b"x" * 50], timestamp=1)
    buf = compressed(plain, codec, _compressors()[codec])
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    with pytest.raises(errors.CompressionLibraryMissingError, match=f"pip install {package}") as info:
        records.decode_records(buf)
    assert isinstance(info.value, errors.UnsupportedCompressionError) and info.value.code == 76
