"""Crashes of the committed-offsets store: kill -9 while committing, torn and damaged tails,
corrupt sealed segments, and a kill -9 at every step of compaction.

Each case compares the reopened store with a model of what was acknowledged:

* every acknowledged commit is there (or a later one of the same key);
* a commit is all or nothing: the partitions of one commit never come from two commits;
* nothing damaged is loaded, and the store goes on committing after recovery.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from fake_clock import FakeClock

from shmbroker import errors, records
from shmbroker.coordinator.offsets import (CLEANED_SUFFIX, COMPACTION_STEPS, OLD_SUFFIX,
                                           CommittedOffset, OffsetStore, OffsetStoreConfig,
                                           decode_key, decode_value, encode_key, encode_value,
                                           offsets_dir)
from shmbroker.layout import record_batch as layout

pytestmark = pytest.mark.timeout(120)

CHILD_TIMEOUT_S = 60
ACKS_BEFORE_KILL = 300
PARTITIONS_PER_COMMIT = 8
MARKER = ".clean-shutdown"
CHECKPOINT = "recovery-point-offset-checkpoint"


def _child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.getcwd()}


def _segment(data_dir, base: int = 0) -> str:
    return os.path.join(offsets_dir(str(data_dir)), f"{base:020d}.log")


def _state(store: OffsetStore) -> dict:
    return {(g, t, p): v for g in store.groups() for (t, p), v in store.group_offsets(g).items()}


# -- kill -9 while committing ----------------------------------------------------------------

_COMMITTER = textwrap.dedent("""
    import sys
    from shmbroker.coordinator.offsets import OffsetStore
    store = OffsetStore.open(sys.argv[1], fsync=sys.argv[2] == "1")
    i = 0
    while True:  # runs until the parent kills it
        offsets = {("orders", p): (i, "commit-%d" % i) for p in range(int(sys.argv[3]))}
        store.commit("g%d" % (i % 3), offsets)
        print(i, flush=True)  # acknowledged: the commit returned
        i += 1
""")


def _run_committer_and_kill(data_dir, fsync: bool) -> list[int]:
    """Start the committer, read ACKS_BEFORE_KILL acknowledgements, kill -9 it; every line it
    printed before dying is an acknowledged commit (the pipe keeps them after the kill)."""
    child = subprocess.Popen(
        [sys.executable, "-c", _COMMITTER, str(data_dir), "1" if fsync else "0", str(PARTITIONS_PER_COMMIT)],
        stdout=subprocess.PIPE, env=_child_env())
    acked = []
    try:
        for _ in range(ACKS_BEFORE_KILL):
            line = child.stdout.readline()
            assert line, "committer died"
            acked.append(int(line))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=CHILD_TIMEOUT_S)
        rest = child.stdout.read()
        child.stdout.close()
    acked.extend(int(line) for line in rest.split())
    assert child.returncode == -signal.SIGKILL
    assert acked == list(range(len(acked)))
    return acked


def _torn_copy_of_a_commit() -> bytes:
    """The first half of a batch like the committer's: what a write cut by a crash leaves."""
    key = encode_key("g0", "orders", 0)
    value = encode_value(CommittedOffset(0, -1, "torn", 0))
    batch = records.encode_batch([value] * PARTITIONS_PER_COMMIT, keys=[key] * PARTITIONS_PER_COMMIT,
                                 timestamp=0)
    return batch[:len(batch) // 2]


@pytest.mark.parametrize("fsync", [False, True], ids=["page-cache", "fsync"])
def test_kill_9_while_committing_loses_no_acknowledged_commit(data_dir, fsync):
    acked = _run_committer_and_kill(data_dir, fsync)
    last = acked[-1]
    torn = _torn_copy_of_a_commit()
    segment = _segment(data_dir)
    size = os.path.getsize(segment)
    with open(segment, "ab") as f:
        f.write(torn)  # a torn tail on top, as a crash in the middle of a write leaves
    with OffsetStore.open(str(data_dir)) as store:
        recovery = store.load_report.log_recovery
        assert not recovery.clean_shutdown
        assert recovery.bytes_dropped == len(torn) and recovery.position == size
        assert os.path.getsize(segment) == size
        for k in range(3):
            offsets = store.group_offsets(f"g{k}")
            assert sorted(offsets) == [("orders", p) for p in range(PARTITIONS_PER_COMMIT)]
            commits = {v.offset for v in offsets.values()}
            assert len(commits) == 1, f"g{k} mixes commits {commits}: not atomic"
            [commit] = commits
            last_acked = max(i for i in acked if i % 3 == k)
            # The acknowledged one, or the one the child was writing when it died.
            allowed = {last_acked} | ({last + 1} if (last + 1) % 3 == k else set())
            assert commit in allowed, (k, commit, last_acked, last)
            assert all(v.metadata == f"commit-{commit}" for v in offsets.values())
        assert store.records in (PARTITIONS_PER_COMMIT * (last + 1), PARTITIONS_PER_COMMIT * (last + 2))
        store.commit("g0", {("orders", 0): (10**6, "after")})
    with OffsetStore.open(str(data_dir)) as store:
        assert store.committed("g0", "orders", 0).offset == 10**6


# -- damaged tails and segments ------------------------------------------------------------------

def _build(data_dir, commits: int, config: OffsetStoreConfig = OffsetStoreConfig(),
           keys: int = 5, flush: bool = False) -> tuple[list[dict], list[int]]:
    """``commits`` commits (one batch each) of 1..3 of ``keys`` partitions, left as a crash
    leaves them (no clean shutdown). Returns the model after each commit, and the log size
    after each commit (for a single-segment log). ``flush``: fsync all before the crash, so
    the checkpoint covers every sealed segment (rolled segments are fsynced in the
    background, and without it how far the checkpoint got depends on timing)."""
    rng = random.Random(1234)
    clock = FakeClock()
    models, sizes, model = [], [], {}
    store = OffsetStore.open(str(data_dir), clock_ms=clock, config=config)
    for i in range(commits):
        clock.advance(1)
        parts = rng.sample(range(keys), rng.randint(1, 3))
        store.commit("g", {("orders", p): (i, f"m{i}") for p in parts})
        for p in parts:
            model[("g", "orders", p)] = CommittedOffset(i, -1, f"m{i}", clock.now_ms)
        models.append(dict(model))
        sizes.append(sum(os.path.getsize(os.path.join(store.directory, n))
                         for n in os.listdir(store.directory) if n.endswith(".log")))
    if flush:
        store.flush()
    store.abandon()
    return models, sizes


def test_a_torn_last_commit_is_dropped_whole_at_every_cut(data_dir, tmp_path):
    models, sizes = _build(data_dir, 30)
    pristine = str(tmp_path / "pristine")
    shutil.copytree(str(data_dir), pristine)
    start, end = sizes[-2], sizes[-1]
    for cut in range(1, end - start):  # every byte of the last batch
        shutil.rmtree(str(data_dir))
        shutil.copytree(pristine, str(data_dir))
        os.truncate(_segment(data_dir), start + cut)
        with OffsetStore.open(str(data_dir)) as store:
            assert store.load_report.log_recovery.bytes_dropped == cut
            assert _state(store) == models[-2], cut
            store.commit("g", {("orders", 9): (1, "")})
        with OffsetStore.open(str(data_dir)) as store:
            assert store.committed("g", "orders", 9).offset == 1


def test_flipped_bytes_in_the_last_commit_drop_it_whole(data_dir, tmp_path):
    models, sizes = _build(data_dir, 30)
    pristine = str(tmp_path / "pristine")
    shutil.copytree(str(data_dir), pristine)
    start, end = sizes[-2], sizes[-1]
    rng = random.Random(20240602)
    for case in range(120):
        shutil.rmtree(str(data_dir))
        shutil.copytree(pristine, str(data_dir))
        # Every header byte once (the fields outside the CRC included), then random ones.
        where = [start + case] if case < layout.HEADER_SIZE else \
            [start + at for at in rng.sample(range(end - start), rng.randint(1, 3))]
        with open(_segment(data_dir), "r+b") as f:
            for at in where:
                f.seek(at)
                byte = f.read(1)[0]
                f.seek(at)
                f.write(bytes([byte ^ rng.randint(1, 255)]))
        with OffsetStore.open(str(data_dir)) as store:
            assert store.load_report.log_recovery.bytes_dropped == end - start, (case, where)
            assert _state(store) == models[-2], (case, where)
            assert store.load_report.undecodable == 0


@pytest.mark.parametrize("found_by", ["recovery", "read"])
def test_a_corrupt_sealed_segment_costs_only_the_commits_stored_after_the_damage(data_dir, found_by):
    config = OffsetStoreConfig(segment_bytes=1024)
    _build(data_dir, 80, config=config, keys=4, flush=True)
    directory = offsets_dir(str(data_dir))
    bases = sorted(int(n[:20]) for n in os.listdir(directory) if n.endswith(".log"))
    assert len(bases) >= 4
    victim = bases[1]
    # Damage the third batch of the second segment (a value byte: only the CRC notices).
    with open(_segment(data_dir, victim), "r+b") as f:
        data = f.read()
        position = 0
        for _ in range(2):  # bounded: walk two batch headers
            position += records.read_header(data, position).size
        bad_offset = records.read_header(data, position).base_offset
        f.seek(position + records.read_header(data, position).size - 3)
        f.write(bytes([data[position + records.read_header(data, position).size - 3] ^ 0x40]))
    assert not os.path.exists(os.path.join(directory, MARKER))  # _build left it as a crash does
    if found_by == "recovery":
        # Without a checkpoint every segment is validated at open; with it, the sealed ones
        # are trusted and the damage is found by the load's reads.
        os.unlink(os.path.join(directory, CHECKPOINT))
    with OffsetStore.open(str(data_dir), config=config) as store:
        [(first, resume, why)] = store.load_report.skipped
        assert (first, resume) == (bad_offset, bases[2]) and "position" in why
        recovery = store.load_report.log_recovery
        assert len(recovery.corrupt_segments) == (1 if found_by == "recovery" else 0)
        # The model: every record replayed except those in the lost range.
        expected = _replay_except(store, first, resume)
        assert _state(store) == expected


def _replay_except(store: OffsetStore, first: int, resume: int) -> dict:
    """Replay the segment files of ``store`` (offsets outside [first, resume)) from raw
    batches, so the check does not go through the store's load or the log's reads."""
    model = {}
    directory = store.directory
    for name in sorted(n for n in os.listdir(directory) if n.endswith(".log")):
        data = open(os.path.join(directory, name), "rb").read()
        scan = records.scan_batches(data)
        for batch in scan.batches:
            if first <= batch.base_offset < resume:
                continue
            end = batch.position + records.read_header(data, batch.position).size
            for record in records.decode_records(data[batch.position:end]):
                key = decode_key(record.key)
                model[(key.group, key.topic, key.partition)] = decode_value(record.value)
    return model


# -- compaction, killed at every step -----------------------------------------------------------

_COMPACTOR = textwrap.dedent("""
    import os, signal, sys
    from shmbroker.coordinator.offsets import OffsetStore, OffsetStoreConfig
    def on_step(name):
        if name == sys.argv[2]:
            print("dying at", name, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    store = OffsetStore.open(sys.argv[1], config=OffsetStoreConfig(compaction_batch_records=7))
    store.compact(force=True, on_step=on_step)
    print("finished", flush=True)
""")

#: What the data dir holds when compaction dies right after each step (main, .cleaned, .old),
#: and whether the .cleaned log was closed (fsynced, clean-shutdown marker) by then.
_ON_DISK_AFTER = {
    "cleaned_partial": ({"main", "cleaned"}, False),
    "cleaned_written": ({"main", "cleaned"}, True),
    "old_closed": ({"main", "cleaned"}, True),
    "old_renamed": ({"old", "cleaned"}, True),
    "new_renamed": ({"main", "old"}, None),
    "old_deleted": ({"main"}, None),
}


def _build_for_compaction(data_dir) -> dict:
    rng = random.Random(77)
    clock = FakeClock()
    with OffsetStore.open(str(data_dir), clock_ms=clock) as store:
        for i in range(300):
            clock.advance(3)
            group = f"group-{rng.randrange(6)}"
            store.commit(group, {(f"t{rng.randrange(3)}", rng.randrange(5)): (i, f"m{i}", rng.randint(-1, 3))
                                 for _ in range(rng.randint(1, 4))})
            if i in (120, 200):
                store.delete_group(group)  # tombstones the rewrite must drop
        model = _state(store)
        assert store.records > 2 * len(model) and len(model) > 7  # several rewritten batches
    return model


def _on_disk(data_dir) -> set[str]:
    main = offsets_dir(str(data_dir))
    names = {"main": main, "cleaned": main + CLEANED_SUFFIX, "old": main + OLD_SUFFIX}
    return {name for name, path in names.items() if os.path.isdir(path)}


@pytest.mark.parametrize("step", COMPACTION_STEPS)
def test_kill_9_at_each_compaction_step_loses_no_key(data_dir, step):
    model = _build_for_compaction(data_dir)
    child = subprocess.run([sys.executable, "-c", _COMPACTOR, str(data_dir), step],
                           stdout=subprocess.PIPE, env=_child_env(), timeout=CHILD_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL and child.stdout.split()[-1].decode() == step
    present, cleaned_closed = _ON_DISK_AFTER[step]
    assert _on_disk(data_dir) == present
    if cleaned_closed is not None:
        marker = os.path.join(offsets_dir(str(data_dir)) + CLEANED_SUFFIX, MARKER)
        assert os.path.exists(marker) == cleaned_closed
    with OffsetStore.open(str(data_dir)) as store:
        assert _state(store) == model
        assert _on_disk(data_dir) == {"main"}
        assert bool(store.load_report.notes) == (present != {"main"})
        # Compacted (from new_renamed on) or not, the store goes on: commit, compact again.
        store.commit("group-0", {("t9", 0): (1, "after")})
        model[("group-0", "t9", 0)] = store.committed("group-0", "t9", 0)
        assert store.compact(force=True).records_after == len(model)
    with OffsetStore.open(str(data_dir)) as store:
        assert _state(store) == model and store.records == len(model)


def test_a_half_deleted_old_log_is_removed_on_open(data_dir, tmp_path):
    model = _build_for_compaction(data_dir)
    subprocess.run([sys.executable, "-c", _COMPACTOR, str(data_dir), "new_renamed"],
                   stdout=subprocess.PIPE, env=_child_env(), timeout=CHILD_TIMEOUT_S, check=False)
    old = offsets_dir(str(data_dir)) + OLD_SUFFIX
    for name in sorted(os.listdir(old))[:2]:  # as an rmtree cut short leaves it
        os.unlink(os.path.join(old, name))
    with OffsetStore.open(str(data_dir)) as store:
        assert _state(store) == model and store.records == len(model)
    assert _on_disk(data_dir) == {"main"}


def test_a_cleaned_log_alone_is_refused_not_guessed(data_dir):
    main = offsets_dir(str(data_dir))
    with OffsetStore.open(str(data_dir)) as store:
        store.commit("g", {("orders", 0): (1, "")})
    os.rename(main, main + CLEANED_SUFFIX)  # no step of compaction leaves this
    with pytest.raises(errors.LogError, match="not a state"):
        OffsetStore.open(str(data_dir))
    assert _on_disk(data_dir) == {"cleaned"}
