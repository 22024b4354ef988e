"""The committed-offsets store over real files, with a fake clock: no processes, no sockets.

Every test keeps a model (a plain dict of what must be committed) next to the store and
compares the two, in memory and after a reopen; crash cases are in
tests/crash/test_offset_store_crash.py.
"""
from __future__ import annotations

import io
import logging
import os
import random

import pytest
from fake_clock import FakeClock

from shmbroker import errors, records
from shmbroker.config import GROUP_OFFSET_COMMIT_PARTITIONS_MAX, GROUP_OFFSET_METADATA_BYTES_MAX
from shmbroker.coordinator.offsets import (COMPACTION_STEPS, CommittedOffset, OffsetKey,
                                           OffsetStore, OffsetStoreConfig, decode_key,
                                           decode_value, encode_key, encode_value, offsets_dir)
from shmbroker.log import PartitionLog
from shmbroker.log.dump import EXIT_OK, dump_log
from shmbroker.log.reader import LogReader, ReadState

GROUPS = [f"group-{i}" for i in range(6)]
TOPICS = ["orders", "payments", "audit.log"]
PARTITIONS = 5
#: Compaction settings small enough to exercise in a unit test.
SMALL = OffsetStoreConfig(compaction_ratio=2, compaction_records_min=10, compaction_batch_records=7)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def open_store(data_dir, clock, **kwargs) -> OffsetStore:
    return OffsetStore.open(str(data_dir), clock_ms=clock, **kwargs)


def random_commits(store: OffsetStore, model: dict, clock: FakeClock, rng: random.Random,
                   count: int) -> None:
    """``count`` commits of 1..6 random partitions each, applied to ``model`` as well."""
    for _ in range(count):
        clock.advance(rng.randint(1, 50))
        group = rng.choice(GROUPS)
        keys = {(rng.choice(TOPICS), rng.randrange(PARTITIONS)) for _ in range(rng.randint(1, 6))}
        offsets = {}
        for topic, partition in keys:
            epoch = rng.choice([-1, rng.randint(0, 9)])
            offsets[(topic, partition)] = (rng.randint(-1, 10**9), f"meta-{rng.randint(0, 99)}", epoch)
        store.commit(group, offsets)
        for (topic, partition), (offset, metadata, epoch) in offsets.items():
            model[(group, topic, partition)] = CommittedOffset(offset, epoch, metadata, clock.now_ms)


def delete_in_model(model: dict, group: str) -> None:
    for key in [k for k in model if k[0] == group]:
        del model[key]


def state_of(store: OffsetStore) -> dict:
    """The store as a model-shaped dict, built through the public read API only."""
    out = {}
    for group in store.groups():
        for (topic, partition), value in store.group_offsets(group).items():
            assert store.committed(group, topic, partition) == value
            out[(group, topic, partition)] = value
    return out


def log_records(directory: str) -> list:
    """Every record of a closed offsets log, read through PartitionLog."""
    out = []
    with PartitionLog.open(directory) as log:
        offset = log.log_start_offset
        while offset < log.log_end_offset:  # bounded: every read moves past >= 1 batch
            piece = log.read(offset, 1 << 20)
            out.extend(records.decode_records(piece.data))
            offset = piece.last_offset + 1
    return out


# -- round trips -----------------------------------------------------------------------------

def test_commit_then_committed_returns_what_was_stored(data_dir, clock):
    with open_store(data_dir, clock) as store:
        stored = store.commit("g", {("orders", 0): (42, "first"), ("orders", 1): (-1, None, 7)})
        expected = {("orders", 0): CommittedOffset(42, -1, "first", clock.now_ms),
                    ("orders", 1): CommittedOffset(-1, 7, "", clock.now_ms)}
        assert stored == expected
        assert store.committed("g", "orders", 0) == expected[("orders", 0)]
        assert store.committed("g", "orders", 2) is None
        assert store.committed("other", "orders", 0) is None
        assert store.group_offsets("g") == expected and store.group_offsets("none") == {}
        assert store.groups() == ["g"]
        assert (store.live_keys, store.records) == (2, 2)


@pytest.mark.parametrize("how", ["close", "abandon"])
def test_reopen_restores_every_offset(data_dir, clock, how):
    model: dict = {}
    store = open_store(data_dir, clock)
    random_commits(store, model, clock, random.Random(41), 300)
    records_written = store.records
    getattr(store, how)()  # a clean close, or the files as a crash of the process leaves them
    with open_store(data_dir, clock) as store:
        assert state_of(store) == model
        assert store.records == store.load_report.records == records_written
        assert store.live_keys == len(model)
        assert store.load_report.log_recovery.clean_shutdown == (how == "close")
        assert store.load_report.undecodable == 0 and not store.load_report.skipped


def test_the_last_commit_of_a_key_wins(data_dir, clock):
    with open_store(data_dir, clock) as store:
        for offset in range(10):
            clock.advance(1)
            store.commit("g", {("orders", 3): (offset * 100, f"m{offset}")})
        store.commit("g", {("orders", 3): (5, "back")})  # lower than before: still the latest
        last = CommittedOffset(5, -1, "back", clock.now_ms)
        assert store.committed("g", "orders", 3) == last
    with open_store(data_dir, clock) as store:
        assert store.committed("g", "orders", 3) == last
        assert (store.live_keys, store.records) == (1, 11)


def test_one_commit_call_is_one_batch_written_whole_or_not_at_all(data_dir, clock):
    with open_store(data_dir, clock) as store:
        store.commit("g", {("orders", 0): (1, "")})
        size = os.path.getsize(os.path.join(offsets_dir(str(data_dir)), f"{0:020d}.log"))
        bad = {("orders", p): (p, "") for p in range(4)}
        bad[("orders", 4)] = (-2, "")  # the last entry is bad: none of the others is stored
        with pytest.raises(errors.InvalidRequestError):
            store.commit("g", bad)
        assert store.group_offsets("g") == {("orders", 0): CommittedOffset(1, -1, "", clock.now_ms)}
        assert os.path.getsize(os.path.join(offsets_dir(str(data_dir)), f"{0:020d}.log")) == size
        store.commit("g", {("orders", p): (p, "") for p in range(4)})
    with PartitionLog.open(offsets_dir(str(data_dir))) as log:
        second = log.read(1, 1 << 20)
        assert (second.first_offset, second.last_offset) == (1, 4)
        assert len(records.scan_batches(second.data).batches) == 1


def test_an_empty_commit_writes_nothing(data_dir, clock):
    with open_store(data_dir, clock) as store:
        assert store.commit("g", {}) == {}
        assert store.records == 0 and store.groups() == []


def test_delete_group_tombstones_survive_reopen(data_dir, clock):
    model: dict = {}
    with open_store(data_dir, clock) as store:
        random_commits(store, model, clock, random.Random(7), 120)
        victims = [g for g in GROUPS if any(k[0] == g for k in model)][:2]
        for group in victims:
            expected = sum(1 for k in model if k[0] == group)
            assert store.delete_group(group) == expected > 0
            delete_in_model(model, group)
            assert store.group_offsets(group) == {} and group not in store.groups()
        records_before = store.records
        assert store.delete_group(victims[0]) == 0  # nothing left: no tombstone written
        assert store.delete_group("never-seen") == 0
        assert store.records == records_before
    with open_store(data_dir, clock) as store:
        assert state_of(store) == model
        assert store.load_report.tombstones > 0
        # A deleted group may commit again: its new offsets are not hidden by the tombstones.
        store.commit(victims[0], {("orders", 1): (9, "again")})
    with open_store(data_dir, clock) as store:
        assert store.group_offsets(victims[0]) == {("orders", 1): CommittedOffset(9, -1, "again", clock.now_ms)}


# -- compaction ------------------------------------------------------------------------------

def test_compaction_keeps_exactly_the_latest_value_per_live_key_and_drops_deleted_groups(data_dir, clock):
    model: dict = {}
    rng = random.Random(2024)
    with open_store(data_dir, clock, config=SMALL) as store:
        random_commits(store, model, clock, rng, 400)
        for group in GROUPS[:2]:
            store.delete_group(group)
            delete_in_model(model, group)
        random_commits(store, model, clock, rng, 30)  # deleted groups may come back
        assert store.compaction_due()
        result = store.compact()
        assert result is not None and result.records_after == len(model) < result.records_before
        assert result.bytes_after < result.bytes_before
        assert state_of(store) == model and store.records == len(model)
        assert not store.compaction_due()
        assert sorted(os.listdir(str(data_dir))) == ["__consumer_offsets-0"]
    written = log_records(offsets_dir(str(data_dir)))
    assert len(written) == len(model)  # one record per live key, no tombstone
    on_disk = {}
    for record in written:
        key, value = decode_key(record.key), decode_value(record.value)
        on_disk[(key.group, key.topic, key.partition)] = value
        assert record.timestamp == value.commit_timestamp_ms  # commit times are kept
    assert on_disk == model
    with open_store(data_dir, clock, config=SMALL) as store:
        assert state_of(store) == model and store.records == len(model)
        assert store.load_report.tombstones == 0


def test_compaction_waits_until_records_outnumber_live_keys_by_the_ratio(data_dir, clock):
    config = OffsetStoreConfig(compaction_ratio=3, compaction_records_min=12)
    with open_store(data_dir, clock, config=config) as store:
        store.commit("g", {("orders", p): (0, "") for p in range(5)})  # 5 live keys
        for i in range(9):
            assert not store.compaction_due() and store.compact() is None
            store.commit("g", {("orders", 0): (i, "")})
        # 14 records now: above the minimum (12) but below 3 x 5 live keys.
        assert store.records == 14 and not store.compaction_due()
        store.commit("g", {("orders", 0): (99, "")})
        assert store.records == 15 and store.compaction_due()
        assert store.compact().records_after == 5
        assert store.compact() is None and store.compact(force=True).records_after == 5


def test_compaction_of_a_store_whose_groups_are_all_deleted_leaves_an_empty_log(data_dir, clock):
    with open_store(data_dir, clock, config=SMALL) as store:
        for i in range(20):
            store.commit(f"g{i % 3}", {("orders", i % 4): (i, "")})
        for group in store.groups():
            store.delete_group(group)
        assert store.compact().records_after == 0
    assert log_records(offsets_dir(str(data_dir))) == []
    with open_store(data_dir, clock, config=SMALL) as store:
        assert store.groups() == [] and store.records == 0
        store.commit("g", {("orders", 0): (1, "")})
        assert store.committed("g", "orders", 0).offset == 1


class InjectedFailure(Exception):
    pass


@pytest.mark.parametrize("step", COMPACTION_STEPS)
def test_a_compaction_that_fails_at_any_step_loses_no_key(data_dir, clock, step):
    model: dict = {}
    store = open_store(data_dir, clock, config=SMALL)
    random_commits(store, model, clock, random.Random(99), 150)
    store.delete_group(GROUPS[0])
    delete_in_model(model, GROUPS[0])

    def fail_at(name):
        if name == step:
            raise InjectedFailure(name)

    rewriting = COMPACTION_STEPS.index(step) <= COMPACTION_STEPS.index("cleaned_written")
    with pytest.raises(InjectedFailure if rewriting else errors.LogError):
        store.compact(force=True, on_step=fail_at)
    if rewriting:
        # Failed before anything was swapped: the store goes on, the half-written copy is gone.
        assert not store.closed and state_of(store) == model
        assert sorted(os.listdir(str(data_dir))) == ["__consumer_offsets-0"]
        random_commits(store, model, clock, random.Random(100), 10)
        store.close()
    else:
        assert store.closed
        with pytest.raises(errors.LogClosedError):
            store.commit("g", {("orders", 0): (1, "")})
    with open_store(data_dir, clock, config=SMALL) as store:
        assert state_of(store) == model
        assert sorted(os.listdir(str(data_dir))) == ["__consumer_offsets-0"]


# -- inputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [None, "", 5, b"g", "g" * 250, "bad\udc80"])
def test_a_bad_group_id_is_invalid_group_id_error(data_dir, clock, group):
    with open_store(data_dir, clock) as store:
        for call in (lambda: store.commit(group, {("orders", 0): (1, "")}),
                     lambda: store.committed(group, "orders", 0),
                     lambda: store.group_offsets(group), lambda: store.delete_group(group)):
            with pytest.raises(errors.InvalidGroupIdError):
                call()
        assert store.records == 0


@pytest.mark.parametrize("offsets, error", [
    ([(("orders", 0), (1, ""))], errors.InvalidRequestError),             # not a mapping
    ({"orders": (1, "")}, errors.InvalidRequestError),                    # key not a pair
    ({("orders", 0, 1): (1, "")}, errors.InvalidRequestError),
    ({("", 0): (1, "")}, errors.InvalidTopicError),
    ({("a" * 250, 0): (1, "")}, errors.InvalidTopicError),
    ({("bad topic", 0): (1, "")}, errors.InvalidTopicError),
    ({("orders", -1): (1, "")}, errors.UnknownTopicOrPartitionError),
    ({("orders", 1024): (1, "")}, errors.UnknownTopicOrPartitionError),
    ({("orders", True): (1, "")}, errors.UnknownTopicOrPartitionError),
    ({("orders", "0"): (1, "")}, errors.UnknownTopicOrPartitionError),
    ({("orders", 0): 1}, errors.InvalidRequestError),                     # value not a tuple
    ({("orders", 0): (1,)}, errors.InvalidRequestError),
    ({("orders", 0): (-2, "")}, errors.InvalidRequestError),
    ({("orders", 0): (1 << 63, "")}, errors.InvalidRequestError),
    ({("orders", 0): (1.0, "")}, errors.InvalidRequestError),
    ({("orders", 0): (True, "")}, errors.InvalidRequestError),
    ({("orders", 0): (1, b"bytes")}, errors.InvalidRequestError),
    ({("orders", 0): (1, "x" * (GROUP_OFFSET_METADATA_BYTES_MAX + 1))}, errors.InvalidRequestError),
    # 1366 characters, but 4098 UTF-8 bytes: the limit is in bytes.
    ({("orders", 0): (1, "\u20ac" * 1366)}, errors.InvalidRequestError),
    ({("orders", 0): (1, "bad\udc80")}, errors.InvalidRequestError),
    ({("orders", 0): (1, "", -2)}, errors.InvalidRequestError),
    ({("orders", 0): (1, "", 1 << 31)}, errors.InvalidRequestError),
    ({(f"t{i}", 0): (1, "") for i in range(GROUP_OFFSET_COMMIT_PARTITIONS_MAX + 1)},
     errors.InvalidRequestError),                                         # too many partitions
], ids=lambda v: type(v).__name__ if isinstance(v, type) else None)
def test_bad_commit_entries_give_typed_errors_and_write_nothing(data_dir, clock, offsets, error):
    with open_store(data_dir, clock) as store:
        with pytest.raises(error):
            store.commit("g", offsets)
        assert store.records == 0 and store.groups() == []


def test_metadata_up_to_the_byte_limit_is_stored(data_dir, clock):
    fits = "\u20ac" * (GROUP_OFFSET_METADATA_BYTES_MAX // 3)  # 3 bytes each
    with open_store(data_dir, clock) as store:
        store.commit("g", {("orders", 0): (1, "x" * GROUP_OFFSET_METADATA_BYTES_MAX), ("orders", 1): (2, fits)})
    with open_store(data_dir, clock) as store:
        assert store.committed("g", "orders", 0).metadata == "x" * GROUP_OFFSET_METADATA_BYTES_MAX
        assert store.committed("g", "orders", 1).metadata == fits


@pytest.mark.parametrize("kwargs", [
    {"config": OffsetStoreConfig}, {"fsync": 1}, {"fsync": "yes"},
])
def test_bad_open_arguments_are_config_errors(data_dir, clock, kwargs):
    with pytest.raises(errors.ConfigError):
        open_store(data_dir, clock, **kwargs)


@pytest.mark.parametrize("field, value", [
    ("compaction_ratio", 1), ("compaction_ratio", 2.5), ("compaction_records_min", -1),
    ("compaction_batch_records", 0), ("compaction_batch_records", GROUP_OFFSET_COMMIT_PARTITIONS_MAX + 1),
    ("segment_bytes", 100), ("segment_bytes", True),
])
def test_bad_store_settings_are_config_errors(field, value):
    with pytest.raises(errors.ConfigError):
        OffsetStoreConfig(**{field: value})


def test_a_closed_store_refuses_every_call(data_dir, clock):
    store = open_store(data_dir, clock)
    store.close()
    store.close()  # idempotent
    for call in (lambda: store.commit("g", {("orders", 0): (1, "")}), lambda: store.committed("g", "orders", 0),
                 lambda: store.group_offsets("g"), store.groups, lambda: store.delete_group("g"),
                 store.compact, store.flush):
        with pytest.raises(errors.LogClosedError):
            call()


# -- the byte layout -------------------------------------------------------------------------

def test_key_and_value_have_kafkas_offset_commit_layout():
    # OffsetCommitKey (type 1): int16 1, string "g", string "t", int32 2.
    assert encode_key("g", "t", 2).hex() == "0001" "0001" "67" "0001" "74" "00000002"
    # OffsetCommitValue v3: int16 3, int64 offset, int32 epoch, string metadata, int64 time.
    value = CommittedOffset(5, -1, "m", 1_700_000_000_000)
    assert encode_value(value).hex() == "0003" "0000000000000005" "ffffffff" "0001" "6d" "0000018bcfe56800"
    assert decode_key(encode_key("g", "t", 2)) == OffsetKey("g", "t", 2)
    assert decode_value(encode_value(value)) == value
    # Kafka's key version 0 has the same layout and is read too.
    assert decode_key(bytes.fromhex("0000" "0001" "67" "0001" "74" "00000002")) == OffsetKey("g", "t", 2)
    rng = random.Random(5)
    for _ in range(200):
        group = "".join(rng.choice("aé€😀-_ .") for _ in range(rng.randint(1, 249)))
        key = OffsetKey(group, rng.choice(TOPICS), rng.randrange(1024))
        value = CommittedOffset(rng.randint(-1, 1 << 62), rng.randint(-1, 1 << 30),
                                "".join(rng.choice("xé€") for _ in range(rng.randint(0, 1365))),
                                rng.randint(0, 1 << 50))
        assert decode_key(encode_key(key.group, key.topic, key.partition)) == key
        assert decode_value(encode_value(value)) == value


@pytest.mark.parametrize("raw, error", [
    (None, errors.CorruptRecordError),
    (b"\x00", errors.CorruptRecordError),
    (b"\x00\x02" + b"\x00\x01g", errors.UnsupportedVersionError),        # group metadata key
    (b"\x00\x01\x00\x05g", errors.CorruptRecordError),                    # length past the end
    (b"\x00\x01\xff\xffg", errors.CorruptRecordError),                    # null string
    (b"\x00\x01\x00\x01g\x00\x01t\x00\x00", errors.CorruptRecordError),   # partition cut off
    (b"\x00\x01\x00\x01g\x00\x01t\x00\x00\x00\x02\x00", errors.CorruptRecordError),  # trailing
    (b"\x00\x01\x00\x00\x00\x01t\x00\x00\x00\x02", errors.CorruptRecordError),       # empty group
    (b"\x00\x01\x00\x01g\x00\x01 \x00\x00\x00\x02", errors.CorruptRecordError),      # bad topic
    (b"\x00\x01\x00\x01\xff\x00\x01t\x00\x00\x00\x02", errors.CorruptRecordError),   # not UTF-8
])
def test_keys_that_do_not_decode_raise_typed_errors(raw, error):
    with pytest.raises(error):
        decode_key(raw)


@pytest.mark.parametrize("hex_value, error", [
    ("", errors.CorruptRecordError),
    ("0004 0000000000000005 ffffffff 0000 0000018bcfe56800 00", errors.UnsupportedVersionError),
    ("0003 0000000000000005 ffffffff", errors.CorruptRecordError),                 # cut off
    ("0003 0000000000000005 ffffffff 0002 6d 0000018bcfe56800", errors.CorruptRecordError),
    ("0003 fffffffffffffffe ffffffff 0000 0000018bcfe56800", errors.CorruptRecordError),  # -2
    ("0003 0000000000000005 ffffffff 0001 ff 0000018bcfe56800", errors.CorruptRecordError),
])
def test_values_that_do_not_decode_raise_typed_errors(hex_value, error):
    with pytest.raises(error):
        decode_value(bytes.fromhex(hex_value))


def test_an_undecodable_record_is_skipped_counted_and_logged(data_dir, clock, caplog):
    with open_store(data_dir, clock) as store:
        store.commit("g", {("orders", 0): (1, "a")})  # offset 0
    newer_value = bytes.fromhex("0004") + b"\x00" * 30
    with PartitionLog.open(offsets_dir(str(data_dir))) as log:
        log.append(records.encode_batch(
            [encode_value(CommittedOffset(2, -1, "", 1)), newer_value, b"x", None],
            keys=[b"\x00\x07future-key", encode_key("g", "orders", 0), None, encode_key("g", "orders", 1)],
            timestamp=1))  # offsets 1..4: unknown key version, newer value, no key, a tombstone
    with open_store(data_dir, clock) as store:
        store.commit("g", {("orders", 2): (3, "c")})  # offset 5
    with caplog.at_level(logging.WARNING, logger="shmbroker.coordinator"):
        store = open_store(data_dir, clock)
    with store:
        report = store.load_report
        assert (report.records, report.undecodable, report.tombstones) == (6, 3, 1)
        assert report.undecodable_offsets == [1, 2, 3]
        # The undecodable newer value did not replace the older one, and the load went on.
        assert store.committed("g", "orders", 0).offset == 1
        assert store.committed("g", "orders", 2).offset == 3
        assert store.records == 6
    messages = [r.getMessage() for r in caplog.records]
    for offset in (1, 2, 3):
        assert any(f"record at offset {offset} skipped" in m for m in messages), messages


def test_records_that_do_not_decode_hold_back_compaction_until_forced(data_dir, clock):
    with PartitionLog.open(offsets_dir(str(data_dir))) as log:
        # What a newer build could have written: a value version this build does not read.
        log.append(records.encode_batch([bytes.fromhex("0004") + b"\x00" * 30],
                                        keys=[encode_key("g", "orders", 0)], timestamp=1))
    with open_store(data_dir, clock, config=SMALL) as store:
        for i in range(30):
            store.commit("g", {("orders", 1): (i, "")})
        assert store.records == 31 and store.live_keys == 1
        assert not store.compaction_due() and store.compact() is None  # would lose the record
        assert store.compact(force=True).records_after == 1
        assert store.compaction_due() is False and store.records == 1
    assert [decode_key(r.key) for r in log_records(offsets_dir(str(data_dir)))] == [OffsetKey("g", "orders", 1)]


def test_the_files_are_read_by_dump_log_and_the_log_reader(data_dir, clock):
    model: dict = {}
    with open_store(data_dir, clock) as store:
        random_commits(store, model, clock, random.Random(3), 40)
        store.delete_group(GROUPS[1])
        delete_in_model(model, GROUPS[1])
        end = store.records
    directory = offsets_dir(str(data_dir))
    out = io.StringIO()
    assert dump_log([directory], out, verify=True) == EXIT_OK
    assert out.getvalue().count("| offset: ") == end and "isvalid: true" in out.getvalue()
    size = os.path.getsize(os.path.join(directory, f"{0:020d}.log"))
    replayed: dict = {}
    with LogReader(directory) as reader:
        piece = reader.read(0, 1 << 24, ReadState(end, 0, 0, size))
        decoded = records.decode_records(piece.data)
    assert len(decoded) == end
    for record in decoded:
        key = decode_key(record.key)
        if record.value is None:
            replayed.pop((key.group, key.topic, key.partition), None)
        else:
            replayed[(key.group, key.topic, key.partition)] = decode_value(record.value)
    assert replayed == model


def test_fsync_true_makes_every_commit_durable_and_false_leaves_it_to_the_os(data_dir, clock, monkeypatch):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    for fsync in (False, True):
        with open_store(data_dir / str(fsync), clock, fsync=fsync) as store:
            store.commit("g", {("orders", 0): (0, "")})
            for i in range(5):
                calls.clear()
                store.commit("g", {("orders", 0): (i, "")})
                assert len(calls) == (1 if fsync else 0)
            calls.clear()
            store.delete_group("g")
            assert len(calls) == (1 if fsync else 0)
            store.flush()
            assert len(calls) == 1
