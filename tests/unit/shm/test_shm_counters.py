"""Counters regions (shmbroker/shm/counters.py): owner-only, the header checked before any
counter is trusted, one writer whose values a reader sees, and a restarted writer that
continues its predecessor's counters."""
from __future__ import annotations

import os
import stat
import struct

import pytest

from shmbroker import errors
from shmbroker.layout import counters as CL
from shmbroker.shm import names, stale
from shmbroker.shm.counters import CountersReader, CountersRegion, CountersWriter

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def region(prefix):
    made = CountersRegion.create(names.counters_name(prefix, "partition", "t", 0),
                                 CL.KIND_PARTITION)
    yield made
    made.unlink()
    made.close()


def test_region_is_owner_only_and_a_reader_sees_the_writers_counters(region):
    mode = os.stat(os.path.join("/dev/shm", region.name)).st_mode
    assert stat.S_IMODE(mode) == 0o600
    writer = CountersWriter.attach(region.name, CL.KIND_PARTITION)
    writer.values[CL.PARTITION["records_in"]] = 1234
    writer.values[CL.PARTITION["bytes_in"]] = 99_999
    writer.store()
    writer.add(CL.PARTITION["frames_rejected"], 2)
    with CountersReader.attach(region.name) as reader:
        got = reader.read()
        assert reader.kind == CL.KIND_PARTITION
        assert (got["records_in"], got["bytes_in"], got["frames_rejected"]) == (1234, 99_999, 2)
        assert set(got) == {c.name for c in CL.PARTITION_COUNTERS}
        header = reader.header()
        assert header.writer_pid == os.getpid() and header.writer_attaches == 1
        assert header.owner_pid == os.getpid()
    writer.close()


def test_a_restarted_writer_continues_its_predecessors_counters(region):
    first = CountersWriter.attach(region.name, CL.KIND_PARTITION)
    first.values[CL.PARTITION["records_in"]] = 10
    first.store()
    first.close()  # as if the partition process died: the supervisor keeps the region
    second = CountersWriter.attach(region.name, CL.KIND_PARTITION)
    assert second.values[CL.PARTITION["records_in"]] == 10
    with CountersReader.attach(region.name) as reader:
        assert reader.header().writer_attaches == 2
    second.close()


@pytest.mark.parametrize("offset,value,message", [
    (0, int.from_bytes(b"NOTOURS!", "little"), "bad magic"),
    (8, CL.COUNTERS_LAYOUT_VERSION + 1, "layout version 3, this build reads version 2"),
    (28, 77, "kind 77"),
    (40, 3, "3 counters"),
])
def test_a_reader_refuses_a_region_with_a_wrong_header(region, offset, value, message):
    fmt = "<Q" if offset == 0 else "<I"
    struct.pack_into(fmt, region.region.buf, offset, value)
    with pytest.raises(errors.RegionHeaderError, match=message) as caught:
        CountersReader.attach(region.name)
    assert region.name in str(caught.value)
    with pytest.raises(errors.RegionHeaderError):
        CountersWriter.attach(region.name, CL.KIND_PARTITION)


def test_a_writer_of_another_kind_is_refused(region):
    with pytest.raises(errors.RegionHeaderError, match="kind 1, expected coordinator"):
        CountersWriter.attach(region.name, CL.KIND_COORDINATOR)


def test_stale_cleanup_knows_counters_regions_by_their_owner(region, prefix):
    [info] = [i for i in stale.list_regions(prefix) if i.name == region.name]
    assert info.kind == names.COUNTERS_KIND and info.owner_alive and info.error is None
    assert stale.find_stale(prefix).alive == [info]  # a live owner's: left alone


def test_private_counters_need_no_shared_memory():
    writer = CountersWriter.private(CL.KIND_ROUTER)
    writer.values[0] = 5
    writer.store()
    assert writer.values == [5] + [0] * (len(CL.ROUTER_COUNTERS) - 1)


# --- a local consumer's region ---------------------------------------------------------------

from shmbroker.shm.counters import ConsumerCounters, read_consumer_slots  # noqa: E402


class _Read:
    """What ConsumerCounters.publish reads of a consumer's per-partition fetch."""

    def __init__(self, topic: str, partition: int, records_out: int, bytes_out: int):
        self.topic, self.partition = topic, partition
        self.records_out, self.bytes_out = records_out, bytes_out
        self.counter_slot = None


def test_a_consumer_region_keeps_one_slot_per_partition_and_counts_beyond_the_last_slot(prefix):
    counters = ConsumerCounters.create(prefix)
    try:
        assert counters.name.startswith(names.consumer_counters_prefix(prefix) + f"{os.getpid()}.")
        assert stat.S_IMODE(os.stat(os.path.join("/dev/shm", counters.name)).st_mode) == 0o600
        a, b = _Read("a", 0, 10, 1000), _Read("b", 3, 5, 500)
        counters.publish([a, b])
        assert (a.records_out, a.bytes_out, a.counter_slot, b.counter_slot) == (0, 0, 0, 1)
        a.records_out, a.bytes_out = 2, 20
        counters.publish([a, b])  # the same partition keeps its slot; b read nothing
        for p in range(CL.CONSUMER_SLOTS_MAX - 2):
            assert counters.slot("many", p) >= 0
        late = _Read("one-too-many", 0, 7, 70)
        counters.publish([a, b, late])
        assert late.counter_slot == -1
        with CountersReader.attach(counters.name, CL.KIND_CONSUMER) as reader:
            totals = reader.read()
            slots = read_consumer_slots(reader.region.buf)
            assert reader.header().owner_pid == reader.header().writer_pid == os.getpid()
        assert (totals["records_out"], totals["bytes_out"], totals["records_unslotted"]) == \
            (24, 1590, 7)
        assert (totals["polls"], totals["partitions"], totals["slots_used"]) == \
            (3, 3, CL.CONSUMER_SLOTS_MAX)
        assert slots[0] == (CL.topic_hash("a"), 0, 12, 1020)
        assert slots[1] == (CL.topic_hash("b"), 3, 5, 500)
        assert slots[2][2:] == (0, 0) and len(slots) == CL.CONSUMER_SLOTS_MAX
        # Its owner is alive: stale cleanup leaves it alone.
        info = stale.inspect(counters.name, prefix)
        assert info.owner_alive and info.error is None
    finally:
        counters.close()
    assert not os.path.exists(os.path.join("/dev/shm", counters.name))
