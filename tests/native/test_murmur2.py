"""Kafka's murmur2 and default partitioner in the C core, against Kafka's own test values and
the pure-Python reference."""
from __future__ import annotations

import random

import pytest

from shmbroker import _native
from shmbroker.records import reference

# From Kafka's UtilsTest.testMurmur2.
KAFKA_VALUES = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize("codec", [_native, reference], ids=["native", "reference"])
@pytest.mark.parametrize("key,want", KAFKA_VALUES.items())
def test_kafka_utils_test_values(codec, key, want):
    assert codec.murmur2(key) == want


def test_native_matches_reference_on_random_keys():
    rng = random.Random(7)
    for _ in range(3000):
        key = rng.randbytes(rng.randrange(0, 101))
        h = _native.murmur2(key)
        assert h == reference.murmur2(key), key
        assert -(2**31) <= h < 2**31
        n = rng.randrange(1, 1000)
        assert _native.partition_for_key(key, n) == reference.partition_for_key(key, n) == (
            (h & 0x7FFFFFFF) % n)


def test_every_tail_length_and_buffer_type():
    data = bytes(range(200, 256)) * 2
    for n in range(0, 12):
        key = data[:n]
        want = reference.murmur2(key)
        assert _native.murmur2(key) == want
        assert _native.murmur2(bytearray(key)) == want
        assert _native.murmur2(memoryview(data)[:n]) == want


def test_partition_for_key_rejects_bad_partition_counts():
    for n in (0, -1):
        with pytest.raises(ValueError):
            _native.partition_for_key(b"k", n)
        with pytest.raises(ValueError):
            reference.partition_for_key(b"k", n)
    # More partitions than murmur2's positive range leaves the hash as it is.
    assert _native.partition_for_key(b"abc", 2**40) == 479470107
