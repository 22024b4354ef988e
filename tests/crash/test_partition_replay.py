"""The partition process's drain round, driven in-process so that a crash can be put exactly
between "appended" and "released": a restarted owner recognises the frames in the log (they
carry the offsets their producer took at its commit, decision 0005: a frame below the log end
whose batch is the log's batch at that offset was appended) and neither appends them again nor
loses their acks. The batches carry a Kafka producer's own
fields (the same producer id and sequence in every frame), which the partition never rewrites
and the replay does not need. Also: one bad frame in a round is rejected alone."""
from __future__ import annotations

import struct

import pytest

from shmbroker import errors, records
from shmbroker.config import LogConfig
from shmbroker.layout import shm as L
from shmbroker.partition.drain import NativeRoundStopped
from shmbroker.partition.owner import PartitionOwner
from shmbroker.shm import names
from shmbroker.shm.control import ControlRegion
from shmbroker.shm.ring import RingProducer

TOPIC = "t"
#: What a Kafka client's idempotent producer puts in its batches; here every frame has the same
#: (producer id, base sequence), so nothing can tell frames apart by those fields.
CLIENT_PRODUCER_ID = 4242


class Crash(Exception):
    """Stands for a kill -9 at the point where it is raised."""


@pytest.fixture
def shm(data_dir):
    """A control region as the supervisor makes it, and one producer's ring registered in it."""
    prefix = names.broker_prefix(str(data_dir))
    control = ControlRegion.create(names.control_name(prefix, TOPIC, 0), 0)
    slot, generation = control.claim_slot(1 << 16)
    ring = RingProducer.create(names.ring_name(prefix, TOPIC, 0, slot, generation), 1 << 16,
                               partition=0, slot=slot, generation=generation, control=control)
    control.set_slot_state(slot, L.SLOT_READY)
    control.announce_registry_change()
    yield control, ring, CLIENT_PRODUCER_ID
    ring.close()
    control.unlink()
    control.close()


def owner_for(data_dir, control) -> PartitionOwner:
    return PartitionOwner(str(data_dir), TOPIC, 0, LogConfig(),
                          control=ControlRegion.attach(control.name))


def crash(owner: PartitionOwner) -> None:
    """What a kill -9 leaves: the log's files as they are, the shared memory as it is."""
    owner.log.abandon()
    for ring in owner.ingress:
        ring.consumer.close()
    owner.control.close()


def write_frames(ring: RingProducer, producer_id: int, count: int, per_frame: int = 3,
                 tag: bytes = b"") -> None:
    for _ in range(count):
        seq = ring.next_sequence
        ring.send(records.encode_batch([tag + b"f%d-r%d" % (seq, i) for i in range(per_frame)],
                                       producer_id=producer_id, producer_epoch=0,
                                       base_sequence=0))


def values_in_log(owner: PartitionOwner) -> list[bytes]:
    piece = owner.log.read(owner.log.log_start_offset, 1 << 24)
    return [r.value for r in records.decode_records(piece.data)]


def step_then_crash(owner: PartitionOwner, round_: str, crash_after: str) -> None:
    """One step whose drain round is killed after ``crash_after`` (append: the write;
    publish; complete), in the Python round (a patched _finish) or in the C round (its
    test-only stop point, drain.h's SHMB_DRAIN_STOP_*)."""
    if round_ == "native":
        owner.drainer.native_stop_after = "write" if crash_after == "append" else crash_after
        with pytest.raises(NativeRoundStopped):  # so the C round ran
            owner.step()
        return
    owner.drainer.native = False
    assert crash_after in ("append", "complete")

    def finish_then_crash(done):
        if crash_after == "complete":
            owner.drainer.publish()
            for r, first, last, base, _ in done:
                r.consumer.complete(first, last, base)
        raise Crash

    owner.drainer._finish = finish_then_crash
    with pytest.raises(Crash):
        owner.step()


@pytest.mark.parametrize("round_,crash_after", [
    ("python", "append"), ("python", "complete"),
    ("native", "append"), ("native", "publish"), ("native", "complete")])
def test_frames_appended_but_not_released_before_a_crash_are_not_appended_twice(
        data_dir, shm, round_, crash_after, caplog):
    control, ring, producer_id = shm
    owner = owner_for(data_dir, control)
    write_frames(ring, producer_id, 2)
    assert owner.step()  # frames 0-1 appended, completed, released
    write_frames(ring, producer_id, 4)
    step_then_crash(owner, round_, crash_after)  # frames 2-5 appended (offsets 6..17)
    crash(owner)
    assert ring.read_position < ring.write_position

    restarted = owner_for(data_dir, control)
    with caplog.at_level("INFO", logger="shmbroker.partition"):
        restarted.step()
    assert "4 frame(s) appended before the restart but not released" in caplog.text
    assert restarted.drainer.frames_settled == 4
    assert ring.drained()
    values = values_in_log(restarted)
    assert len(values) == 18 and len(set(values)) == 18  # every record once
    completions = ring.poll_completions()
    assert completions[0] == (0, 1, 0, 0)
    assert completions[1] == (2, 5, 6, 0)  # the replay's (or the crashed process's) ack
    assert len(completions) == 2  # never acknowledged twice
    restarted.shutdown()
    restarted.close()


def test_one_bad_frame_in_a_round_is_rejected_alone(data_dir, shm):
    control, ring, producer_id = shm
    owner = owner_for(data_dir, control)
    write_frames(ring, producer_id, 1)
    ring.send(b"\0" * 70)  # not a RecordBatch
    too_big = records.encode_batch([b"x" * 2000], producer_id=producer_id, producer_epoch=0,
                                   base_sequence=0)
    write_frames(ring, producer_id, 1)
    owner.log.config = LogConfig(batch_bytes_max=1024)  # as a topic with max.message.bytes=1024
    ring.send(too_big)
    write_frames(ring, producer_id, 1)
    assert owner.step()
    owner.step()
    got = ring.poll_completions()
    assert ring.drained()
    assert [(c.first_sequence, c.last_sequence) for c in got if c.error_code == 0] == \
        [(0, 0), (2, 2), (4, 4)]
    errors_by_seq = {c.first_sequence: c.error_code for c in got if c.error_code}
    assert errors_by_seq == {1: errors.CorruptRecordError.code,
                             3: errors.RecordTooLargeError.code}
    assert values_in_log(owner) == [b"f0-r0", b"f0-r1", b"f0-r2", b"f2-r0", b"f2-r1", b"f2-r2",
                                    b"f4-r0", b"f4-r1", b"f4-r2"]
    assert owner.drainer.frames_rejected == 2
    owner.shutdown()
    owner.close()


def test_a_ring_header_overwritten_between_poll_and_release_drops_only_that_ring(
        data_dir, shm, caplog):
    """A producer that scribbles over its ring's header while the partition process appends
    its frames: release's header check raised RingCorruptError out of the round, which killed
    the partition process (found by tests/integration/test_end_to_end.py). Now the frames
    stay appended and completed, the ring is marked broken and logged, the process goes on."""
    control, ring, producer_id = shm
    owner = owner_for(data_dir, control)
    write_frames(ring, producer_id, 2)
    owner.drainer.native = False  # it patches PartitionLog.append, which the C round skips
    real_append = owner.log.append

    def append_then_scribble(data):
        info = real_append(data)
        struct.pack_into("<Q", ring.buf, L.RING["write_position"], 1 << 60)
        return info

    owner.log.append = append_then_scribble
    with caplog.at_level("ERROR", logger="shmbroker.partition"):
        assert owner.step() == 2  # no RingCorruptError out of the round
    owner.log.append = real_append
    assert len(values_in_log(owner)) == 6
    assert [c[:3] for c in ring.poll_completions()] == [(0, 1, 0)]
    (ingress_ring,) = list(owner.ingress)
    assert ingress_ring.broken and "is corrupt and is no longer read" in caplog.text
    assert owner.step() == 0  # the broken ring is no longer read
    owner.shutdown()
    owner.close()


def second_ring(data_dir, control) -> RingProducer:
    prefix = names.broker_prefix(str(data_dir))
    slot, generation = control.claim_slot(1 << 16)
    ring = RingProducer.create(names.ring_name(prefix, TOPIC, 0, slot, generation), 1 << 16,
                               partition=0, slot=slot, generation=generation, control=control)
    control.set_slot_state(slot, L.SLOT_READY)
    control.announce_registry_change()
    return ring


def check_every_record_once_and_acked_once(owner: PartitionOwner, rings: dict) -> None:
    """Each record in the log once; each ring's frames acknowledged exactly once, with the
    offset its first record really has in the log."""
    piece = owner.log.read(owner.log.log_start_offset, 1 << 24)
    by_value = {r.value: r.offset for r in records.decode_records(piece.data)}
    values = [r.value for r in records.decode_records(piece.data)]
    assert len(values) == len(set(values)), "a record was appended twice"
    for tag, ring in rings.items():
        assert ring.drained()
        acked = []
        for first, last, base, code in ring.poll_completions():
            assert code == 0
            assert by_value[tag + b"f%d-r0" % first] == base
            acked.extend(range(first, last + 1))
        assert acked == list(range(ring.next_sequence)), acked  # every frame, once
        for seq in range(ring.next_sequence):
            assert tag + b"f%d-r2" % seq in by_value  # nothing lost


def test_two_rings_crash_between_their_completions(data_dir, shm):
    """The Python round appends two rings' frames in one write and dies after completing the
    first ring only: the restart completes the second ring's frames with the offsets they got
    (the manifest's ring order gives them), skips the first's (acked_sequence), appends
    nothing again."""
    control, ring_a, producer_id = shm
    ring_b = second_ring(data_dir, control)
    owner = owner_for(data_dir, control)
    owner.drainer.native = False
    write_frames(ring_a, producer_id, 3, tag=b"a")
    write_frames(ring_b, producer_id, 2, tag=b"b")

    def complete_one_then_crash(done):
        assert len(done) == 2
        owner.drainer.publish()
        r, first, last, base, _ = done[0]
        r.consumer.complete(first, last, base)
        raise Crash

    owner.drainer._finish = complete_one_then_crash
    with pytest.raises(Crash):
        owner.step()
    crash(owner)
    restarted = owner_for(data_dir, control)
    restarted.step()
    assert restarted.drainer.frames_settled == 5
    check_every_record_once_and_acked_once(restarted, {b"a": ring_a, b"b": ring_b})
    restarted.shutdown()
    restarted.close()
    ring_b.close()


@pytest.mark.parametrize("round_", ["python", "native"])
def test_a_write_torn_inside_the_last_frame_appends_that_frame_once(data_dir, shm, round_):
    """A kill inside the write: log recovery cuts the torn last batch, the replay finds the
    frames before it in the log (acked once) and not the last, which the next round appends."""
    control, ring, producer_id = shm
    owner = owner_for(data_dir, control)
    write_frames(ring, producer_id, 1)
    assert owner.step()  # the C round takes only rings read before
    write_frames(ring, producer_id, 4)
    step_then_crash(owner, round_, "append")
    path = owner.log.active_segment.path
    crash(owner)
    with open(path, "r+b") as f:  # the last batch only partly written
        f.truncate(f.seek(0, 2) - 7)
    restarted = owner_for(data_dir, control)
    assert restarted.log.log_end_offset == 12  # frames 0-3: recovery cut frame 4's batch
    restarted.step()
    check_every_record_once_and_acked_once(restarted, {b"": ring})
    restarted.shutdown()
    restarted.close()


def test_a_crash_before_the_write_appends_once(data_dir, shm):
    control, ring, producer_id = shm
    owner = owner_for(data_dir, control)
    owner.drainer.native = False
    write_frames(ring, producer_id, 3)

    def crash_before_write(data):
        raise Crash

    owner.drainer._log_append = crash_before_write
    with pytest.raises(Crash):
        owner.step()
    crash(owner)
    restarted = owner_for(data_dir, control)
    restarted.step()
    check_every_record_once_and_acked_once(restarted, {b"": ring})
    restarted.shutdown()
    restarted.close()


def test_a_crash_between_rounds_finds_nothing_to_replay(data_dir, shm):
    """The last round was released: the restart finds only new frames, at the log end."""
    control, ring, producer_id = shm
    owner = owner_for(data_dir, control)
    write_frames(ring, producer_id, 2)
    assert owner.step()
    crash(owner)
    write_frames(ring, producer_id, 2)  # written while no partition process runs
    restarted = owner_for(data_dir, control)
    restarted.step()
    assert restarted.drainer.frames_settled == 0
    check_every_record_once_and_acked_once(restarted, {b"": ring})
    restarted.shutdown()
    restarted.close()


def test_a_frame_of_two_batches_cut_between_them_is_neither_appended_again_nor_acked(
        data_dir, shm):
    """Only another writer's ring holds frames of several batches. When the write stops
    between them, the frame's first batch is in the log and the second is not: the producer
    gets REQUEST_TIMED_OUT for it (may or may not be appended) and nothing is duplicated."""
    control, ring, producer_id = shm
    owner = owner_for(data_dir, control)
    write_frames(ring, producer_id, 1)
    two = records.encode_batch([b"x0"], producer_id=producer_id, producer_epoch=0,
                               base_sequence=0) + \
        records.encode_batch([b"x1"], producer_id=producer_id, producer_epoch=0,
                             base_sequence=0)
    ring.send(two)
    second_batch_bytes = len(two) // 2
    step_then_crash(owner, "python", "append")
    path = owner.log.active_segment.path
    crash(owner)
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) - second_batch_bytes + 5)
    restarted = owner_for(data_dir, control)
    restarted.step()
    assert values_in_log(restarted) == [b"f0-r0", b"f0-r1", b"f0-r2", b"x0"]
    got = ring.poll_completions()
    assert [tuple(c) for c in got] == [(0, 0, 0, 0), (1, 1, -1, errors.RequestTimeoutError.code)]
    assert ring.drained()
    restarted.shutdown()
    restarted.close()
