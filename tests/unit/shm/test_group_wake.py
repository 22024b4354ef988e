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


def test_the_words_follow_the_counters_and_slots_are_handed_out_one_per_group():
    assert CL.group_wake_offset() % 64 == 0
    assert CL.region_bytes(CL.KIND_COORDINATOR) == CL.group_wake_offset() + 4 * CL.GROUP_WAKE_WORDS
    slots = group_wake.WakeSlots(3)
    assert [slots.slot(g) for g in ("a", "b", "a", "c", "d")] == [0, 1, 0, 2, None]
    slots.release("b")
    assert slots.held("b") is None and slots.slot("d") == 1 and slots.held("d") == 1
    slots.release("nobody")  # forgetting a group without a slot is no error


def test_a_wake_moves_only_its_groups_word_and_wakes_a_read_only_sleeper(data_dir):
    writer = CountersWriter.attach(names.counters_name(names.broker_prefix(data_dir),
                                                       "coordinator"), CL.KIND_COORDINATOR)
    word, other = GroupWakeWord.attach(data_dir), GroupWakeWord.attach(data_dir)
    try:
        assert word is not None and word._region.readonly
        assert word.load() == -1 and word.word(0) is None  # no slot named yet: no word
        word.follow(7)
        other.follow(8)
        seen, seen_other = word.load(), other.load()
        assert seen == group_wake.load(writer.buf, 7)
        woke_after: list[float] = []

        def sleeper() -> None:
            started = time.monotonic()
            from shmbroker.shm import wake
            wake.wait_any([other.word(seen_other), word.word(seen)], timeout_ms=10_000)
            woke_after.append(time.monotonic() - started)

        thread = threading.Thread(target=sleeper)
        thread.start()
        time.sleep(0.2)
        group_wake.wake(writer.buf, 7)
        thread.join(5)
        assert woke_after and 0.15 < woke_after[0] < 5  # woken by the bump, not the timeout
        assert word.load() == seen + 1 and other.load() == seen_other
        for bad in (None, -1, CL.GROUP_WAKE_WORDS, True, "7"):  # from a reply: checked
            word.follow(bad)
            assert word.offset is None and word.load() == -1
    finally:
        word.close()
        other.close()
        writer.close()


def test_no_coordinator_region_means_no_word(tmp_path):
    assert GroupWakeWord.attach(str(tmp_path)) is None
