"""The futex and atomic primitives of the C core on shared mappings: atomics do what they say
at any aligned offset and refuse bad ones; a futex wait returns CHANGED without sleeping when
the word moved, times out on the monotonic clock, and is woken by another thread or another
process through a shared mapping."""
from __future__ import annotations

import mmap
import os
import threading
import time

import pytest

from shmbroker import _native
from shmbroker.layout.shm import WAIT_STATUS
from shmbroker.shm import wake

W = WAIT_STATUS


@pytest.fixture
def buf():
    m = mmap.mmap(-1, 4096)
    yield m
    m.close()


def test_atomics_load_store_cas_add(buf):
    _native.atomic_store_u32(buf, 8, 7)
    assert _native.atomic_load_u32(buf, 8) == 7
    assert _native.atomic_cas_u32(buf, 8, 7, 9)
    assert not _native.atomic_cas_u32(buf, 8, 7, 11)
    assert _native.atomic_add_u32(buf, 8, 1) == 9
    assert _native.atomic_add_u32(buf, 8, -10) == 10
    assert _native.atomic_load_u32(buf, 8) == 0
    _native.atomic_store_u64(buf, 16, 2**64 - 1)
    assert _native.atomic_add_u64(buf, 16, 1) == 2**64 - 1
    assert _native.atomic_load_u64(buf, 16) == 0
    assert _native.atomic_cas_u64(buf, 16, 0, 2**40)
    assert _native.atomic_load_u64(buf, 16) == 2**40


def test_atomics_refuse_misaligned_out_of_range_and_readonly(buf):
    for bad in (-4, 2, 4096, 4094):
        with pytest.raises(ValueError):
            _native.atomic_load_u32(buf, bad)
    with pytest.raises(ValueError):
        _native.atomic_store_u64(buf, 4, 1)
    with pytest.raises((TypeError, BufferError)):
        _native.atomic_store_u32(bytes(64), 0, 1)
    assert _native.atomic_load_u32(bytes(64), 0) == 0  # loads work on read-only memory


def test_futex_wait_changed_timeout_and_wake(buf):
    assert _native.futex_wait(buf, 0, 1, 1000) == W["CHANGED"]
    t0 = time.monotonic()
    assert _native.futex_wait(buf, 0, 0, 50) == W["TIMEOUT"]
    assert 0.04 <= time.monotonic() - t0 < 1.0
    assert _native.futex_wait(buf, 0, 0, 20, 1_000_000) == W["TIMEOUT"]  # spin, then sleep

    def bump():
        time.sleep(0.05)
        _native.atomic_add_u32(buf, 0, 1)
        wake.wake(buf, 0)

    t = threading.Thread(target=bump)
    t.start()
    t0 = time.monotonic()
    assert wake.wait(buf, 0, 0, 5000) in (W["WOKEN"], W["CHANGED"])
    assert time.monotonic() - t0 < 2.0
    t.join()


def test_futex_wakes_another_process_through_a_shared_mapping(buf):
    pid = os.fork()
    if pid == 0:  # child: wait for the parent's bump, report through the word at 64
        try:
            r = wake.wait(buf, 0, 0, 5000)
            _native.atomic_store_u32(buf, 64, 100 + r)
        finally:
            os._exit(0)
    time.sleep(0.1)
    _native.atomic_add_u32(buf, 0, 1)
    wake.wake(buf, 0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert _native.atomic_load_u32(buf, 64) in (100 + W["WOKEN"], 100 + W["CHANGED"])


def test_futex_waitv_sleeps_on_several_words_and_any_of_them_wakes_it():
    first, second = mmap.mmap(-1, 4096), mmap.mmap(-1, 4096)  # two regions, as two partitions
    words = [(first, 0, 0), (second, 8, 0)]
    if _native.futex_waitv(words, 1) is None:
        pytest.skip("this kernel has no futex_waitv (Linux < 5.16): the rotation is used")

    def bump_second():
        time.sleep(0.05)
        _native.atomic_add_u32(second, 8, 1)
        _native.futex_wake(second, 8)

    waker = threading.Thread(target=bump_second)
    waker.start()
    start = time.monotonic()
    status, index = _native.futex_waitv(words, 5_000)
    waker.join()
    assert (status, index) == (WAIT_STATUS["WOKEN"], 1)
    assert time.monotonic() - start < 4  # woken, not timed out
    assert _native.futex_waitv(words, 5_000) == (WAIT_STATUS["CHANGED"], 1)  # no sleep
    start = time.monotonic()
    assert _native.futex_waitv([(first, 0, 0)], 60)[0] == WAIT_STATUS["TIMEOUT"]
    assert time.monotonic() - start >= 0.05
    assert wake.wait_any([(first, 0, 0), (second, 8, 1)], 30) == wake.TIMEOUT
    with pytest.raises(ValueError):
        _native.futex_waitv([], 10)
    with pytest.raises(ValueError):
        _native.futex_waitv([(first, 0, 0)] * 129, 10)


def test_the_c_clocks_read_what_pythons_time_module_reads():
    """monotonic_ms and wall_clock_ms (the partition loop's clocks, in C) against
    time.monotonic_ns() // 1_000_000 and time.time_ns() // 1_000_000, read around them."""
    for _ in range(100):  # bounded
        before = time.monotonic_ns() // 1_000_000
        got = _native.monotonic_ms()
        assert before <= got <= time.monotonic_ns() // 1_000_000
        before = time.time_ns() // 1_000_000
        got = _native.wall_clock_ms()
        assert before <= got <= time.time_ns() // 1_000_000
