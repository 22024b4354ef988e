"""CRC-32C of the C core: published vectors, chaining, and the SSE4.2 and table paths agreeing
with each other and with the pure-Python reference on every length and alignment."""
from __future__ import annotations

import mmap
import random

import numpy as np
import pytest

from shmbroker import _native
from shmbroker.records import reference

IMPLS = {"dispatch": _native.crc32c, "table": _native.crc32c_table, "reference": reference.crc32c}

# RFC 3720 (iSCSI) appendix B.4 and the common check value.
VECTORS = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"123456789", 0xE3069283),
    (b"", 0),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("data,want", VECTORS)
def test_published_vectors(impl, data, want):
    assert IMPLS[impl](data) == want


@pytest.mark.parametrize("impl", IMPLS)
def test_chaining_equals_one_pass(impl):
    fn = IMPLS[impl]
    rng = random.Random(1)
    data = rng.randbytes(3000)
    for cut in (0, 1, 7, 8, 9, 1000, 2999, 3000):
        assert fn(data[cut:], fn(data[:cut])) == fn(data)


def test_impl_is_picked_from_cpuid():
    impl = _native.crc32c_impl()
    assert impl in ("sse4.2", "table")
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return
    if " sse4_2" in flags:
        assert impl == "sse4.2"


def test_paths_agree_on_random_lengths_and_alignments():
    """Lengths 0..5000 starting at every alignment, through memoryview slices of one buffer,
    so that the word loops, the 3-stream blocks and the byte tails are all exercised."""
    rng = random.Random(2)
    big = rng.randbytes(6000)
    view = memoryview(big)
    for _ in range(600):
        start = rng.randrange(0, 16)
        n = rng.randrange(0, 5001)
        piece = view[start:start + n]
        want = _native.crc32c_table(piece)
        assert _native.crc32c(piece) == want, (start, n)
        seed = rng.getrandbits(32)
        assert _native.crc32c(piece, seed) == _native.crc32c_table(piece, seed), (start, n)


def test_paths_agree_with_reference():
    rng = random.Random(3)
    for n in [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 255, 256, 767, 768, 769, 1000, 4099]:
        data = rng.randbytes(n + 3)[3:]
        assert _native.crc32c(data) == reference.crc32c(data) == _native.crc32c_table(data), n


@pytest.mark.parametrize("n", [3 * 8192 - 1, 3 * 8192, 3 * 8192 + 5, 200_001, 1 << 20])
def test_large_buffers_use_long_streams_correctly(n):
    """Above 3 * 8192 bytes the SSE4.2 path combines three 8 KiB streams (and the GIL is
    released): it must equal the table path and the chained CRC of pieces."""
    data = np.random.default_rng(n).integers(0, 256, n + 1, dtype=np.uint8)[1:]  # odd address
    whole = _native.crc32c(data)
    assert whole == _native.crc32c_table(data)
    cut = n // 3 + 1
    assert _native.crc32c(data[cut:], _native.crc32c(data[:cut])) == whole


def test_accepts_every_buffer_type():
    data = random.Random(4).randbytes(1000)
    want = reference.crc32c(data)
    with mmap.mmap(-1, len(data)) as m:
        m[:] = data
        forms = [data, bytearray(data), memoryview(data), np.frombuffer(data, np.uint8), m]
        for form in forms:
            assert _native.crc32c(form) == want
            assert _native.crc32c_table(form) == want


def test_rejects_non_buffers():
    for fn in (_native.crc32c, _native.crc32c_table):
        with pytest.raises(TypeError):
            fn("text")
        with pytest.raises(TypeError):
            fn(None)
