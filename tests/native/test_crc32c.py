"""CRC-32C of the C core: published vectors, chaining, and every path this CPU runs (the
VPCLMULQDQ/AVX-512 and PCLMULQDQ folding paths, SSE4.2, the table path) agreeing with each
other and with the pure-Python reference on every length and alignment."""
from __future__ import annotations

import mmap
import random

import numpy as np
import pytest

from shmbroker import _native
from shmbroker.records import reference

IMPLS = {"dispatch": _native.crc32c, "table": _native.crc32c_table, "reference": reference.crc32c}
# Every path this CPU runs, called by name (the dispatch above only reaches the fastest).
PATHS = _native.crc32c_impls()
for _name in PATHS:
    IMPLS[f"path:{_name}"] = lambda data, crc=0, _name=_name: _native.crc32c_with(_name, data, crc)
# Fastest first, as measured: 128-bit PCLMULQDQ folding loses to three crc32 streams.
ALL_PATH_NAMES = ("vpclmulqdq-avx512", "sse4.2", "pclmul", "table")

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


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_impl_is_picked_from_cpuid():
    """The dispatch uses the fastest path this CPU runs; the list is in speed order and always
    ends with the portable table path."""
    impl = _native.crc32c_impl()
    assert impl in ("vpclmulqdq-avx512", "sse4.2", "table")
    assert PATHS[0] == impl and PATHS[-1] == "table"
    assert list(PATHS) == [name for name in ALL_PATH_NAMES if name in PATHS]
    flags = _cpu_flags()
    if not flags:
        return
    # The kernel drops the AVX-512 flags when it does not enable their register state.
    want = [name for name, need in [
        ("vpclmulqdq-avx512", {"sse4_2", "pclmulqdq", "avx512f", "avx512vl", "vpclmulqdq"}),
        ("sse4.2", {"sse4_2"}),
        ("pclmul", {"sse4_2", "pclmulqdq"}),
        ("table", set()),
    ] if need <= flags]
    assert list(PATHS) == want


def test_crc32c_with_rejects_unknown_paths():
    with pytest.raises(ValueError):
        _native.crc32c_with("no-such-path", b"abc")
    for name in ALL_PATH_NAMES:
        if name not in PATHS:
            with pytest.raises(ValueError):
                _native.crc32c_with(name, b"abc")
    with pytest.raises(TypeError):
        _native.crc32c_with("table", "text")


@pytest.mark.parametrize("name", PATHS)
def test_every_path_equals_table_on_random_lengths_and_alignments(name):
    """Lengths 0..70000 at random alignments (memoryview slices of one buffer, and seeds), so
    that every path runs its alignment head, main fold loop (4 x 64 B or 4 x 16 B lanes), lane
    merge, 16-byte and 64-byte tails, and byte tail."""
    rng = random.Random(5)
    big = rng.randbytes(70_000 + 128)
    view = memoryview(big)
    lengths = [rng.randrange(0, 70_001) for _ in range(150)]
    lengths += [rng.randrange(0, 2048) for _ in range(300)]  # around the path thresholds
    lengths += [n + d for n in (64, 128, 256, 319, 320, 383, 512, 1024, 1087, 65536)
                for d in (-1, 0, 1)]
    for n in lengths:
        start = rng.randrange(0, 128)
        piece = view[start:start + n]
        seed = rng.getrandbits(32)
        assert _native.crc32c_with(name, piece) == _native.crc32c_table(piece), (start, n)
        assert _native.crc32c_with(name, piece, seed) == _native.crc32c_table(piece, seed), (
            start, n, seed)


@pytest.mark.parametrize("name", PATHS)
def test_every_path_chains(name):
    """Cutting a message anywhere, including inside a fold step, gives the one-pass CRC."""
    rng = random.Random(6)
    data = rng.randbytes(20_000)
    whole = _native.crc32c_table(data)
    for cut in [0, 1, 63, 64, 255, 256, 1024, 4097, 19_999, 20_000] + [
            rng.randrange(0, 20_001) for _ in range(40)]:
        first = _native.crc32c_with(name, data[:cut])
        assert _native.crc32c_with(name, data[cut:], first) == whole, cut


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
    for n in [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 255, 256, 767, 768, 769, 1000, 1024, 1100, 4099]:
        data = rng.randbytes(n + 3)[3:]
        want = reference.crc32c(data)
        assert _native.crc32c(data) == want == _native.crc32c_table(data), n
        for name in PATHS:
            assert _native.crc32c_with(name, data) == want, (name, n)


@pytest.mark.parametrize("n", [3 * 8192 - 1, 3 * 8192, 3 * 8192 + 5, 200_001, 1 << 20])
def test_large_buffers_use_long_streams_correctly(n):
    """Above 3 * 8192 bytes the SSE4.2 path combines three 8 KiB streams (and the GIL is
    released): it must equal the table path and the chained CRC of pieces."""
    data = np.random.default_rng(n).integers(0, 256, n + 1, dtype=np.uint8)[1:]  # odd address
    whole = _native.crc32c(data)
    assert whole == _native.crc32c_table(data)
    cut = n // 3 + 1
    assert _native.crc32c(data[cut:], _native.crc32c(data[:cut])) == whole
    for name in PATHS:
        assert _native.crc32c_with(name, data) == whole, name


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
