"""Group wake words in the coordinator's counters region: the coordinator's bump wakes a member
sleeping read-only on its group's word beside other words (futex_waitv)."""
from __future__ import annotations

import threading
import time

import pytest

from shmbroker.layout import counters as CL
from shmbroker.shm import group_wake, names
from shmbroker.shm.counters import CountersRegion, CountersWriter
from shmbroker.shm.group_wake import GroupWakeWord

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def data_dir(tmp_path):
    prefix = names.broker_prefix(str(tmp_path))
    region = CountersRegion.create(names.counters_name(prefix, "coordinator"),
                                   CL.KIND_COORDINATOR)
    yield str(tmp_path)
    region.unlink()
    region.close()


def test_the_words_follow_the_counters_and_groups_get_stable_slots():
    assert CL.group_wake_offset() % 64 == 0
    assert CL.region_bytes(CL.KIND_COORDINATOR) == CL.group_wake_offset() + 4 * CL.GROUP_WAKE_WORDS
    import hashlib
    digest = hashlib.blake2b(b"g", digest_size=4).digest()  # not hash(): the same everywhere
    assert CL.group_wake_slot("g") == int.from_bytes(digest, "little") % CL.GROUP_WAKE_WORDS
    slots = {CL.group_wake_slot(f"group-{i}") for i in range(200)}
    assert len(slots) > 150 and all(0 <= s < CL.GROUP_WAKE_WORDS for s in slots)


def test_a_wake_moves_only_its_groups_word_and_wakes_a_read_only_sleeper(data_dir):
    writer = CountersWriter.attach(names.counters_name(names.broker_prefix(data_dir),
                                                       "coordinator"), CL.KIND_COORDINATOR)
    word = GroupWakeWord.attach(data_dir, "g")
    other = GroupWakeWord.attach(data_dir, next(f"o{i}" for i in range(1000)
                                                if CL.group_wake_slot(f"o{i}") != CL.group_wake_slot("g")))
    try:
        assert word is not None and word._region.readonly
        seen, seen_other = word.load(), other.load()
        woke_after: list[float] = []

        def sleeper() -> None:
            started = time.monotonic()
            from shmbroker.shm import wake
            wake.wait_any([other.word(seen_other), word.word(seen)], timeout_ms=10_000)
            woke_after.append(time.monotonic() - started)

        thread = threading.Thread(target=sleeper)
        thread.start()
        time.sleep(0.2)
        group_wake.wake(writer.buf, "g")
        thread.join(5)
        assert woke_after and 0.15 < woke_after[0] < 5  # woken by the bump, not the timeout
        assert word.load() == seen + 1 and other.load() == seen_other
    finally:
        word.close()
        other.close()
        writer.close()


def test_no_coordinator_region_means_no_word(tmp_path):
    assert GroupWakeWord.attach(str(tmp_path), "g") is None
