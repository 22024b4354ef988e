"""The partition owner and the background fsync of rolled segments: the loop is woken when a
rolled segment's fsync completes and then moves the checkpoint; a failed fsync stops the
loop with LogError. Real control region, rings, files and threads; the disk is held or
failed through PartitionOwner's ``flush_fsync`` seam."""
from __future__ import annotations

import errno
import os
import threading
import time

import pytest
from test_native_drain import CLOCK_MS, TIME0_MS, TOPIC, Rings

from shmbroker import errors
from shmbroker.config import LogConfig
from shmbroker.partition.owner import PartitionOwner
from shmbroker.shm.control import ControlRegion

pytestmark = pytest.mark.timeout(60)

CONFIG = LogConfig(segment_bytes=2048, index_interval_bytes=200)


def _checkpoint(owner: PartitionOwner) -> int:
    with open(os.path.join(owner.log.directory, "recovery-point-offset-checkpoint")) as f:
        return int(f.read().split("recovery_point ")[1].split()[0])


def _roll(rings: Rings, owner: PartitionOwner) -> None:
    for _ in range(20):  # bounded: ~500-byte frames, 2 KiB segments
        rings.frame(0, [(1, 400, TIME0_MS)])
        owner.step()
        rings.reap()
        if len(owner.log.segments) > 1:
            return
    raise AssertionError("no roll")


def test_the_loop_is_woken_when_a_rolled_segment_is_fsynced_and_moves_the_checkpoint(tmp_path):
    gate = threading.Event()

    def held(fd: int) -> None:
        assert gate.wait(30)
        os.fsync(fd)

    rings = Rings(str(tmp_path), 1, [1 << 16])
    owner = PartitionOwner(str(tmp_path), TOPIC, 0, CONFIG, clock_ms=lambda: CLOCK_MS,
                           control=ControlRegion.attach(rings.control.name), flush_fsync=held)
    try:
        _roll(rings, owner)
        base = owner.log.active_segment.base_offset
        assert owner.log.roll_flushes_pending
        assert owner.step() == 0 and _checkpoint(owner) == 0  # the fsync is still held
        timer = threading.Timer(0.1, gate.set)
        timer.start()
        t0 = time.monotonic()
        owner.wait_for_work(10_000)  # the flusher's doorbell ring ends it, not the timeout
        assert time.monotonic() - t0 < 5.0
        timer.join()
        assert owner.step() == 1
        assert _checkpoint(owner) == base == owner.log.recovery_point
        assert not owner.log.roll_flushes_pending
    finally:
        gate.set()
        owner.shutdown()
        owner.close()
        rings.close()


def test_a_failed_background_fsync_stops_the_partition_loop(tmp_path):
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    rings = Rings(str(tmp_path), 1, [1 << 16])
    owner = PartitionOwner(str(tmp_path), TOPIC, 0, CONFIG, clock_ms=lambda: CLOCK_MS,
                           control=ControlRegion.attach(rings.control.name), flush_fsync=broken)
    try:
        with pytest.raises(errors.LogError, match="background fsync .*Input/output error"):
            for _ in range(50):  # bounded: the roll comes within a few frames
                rings.frame(0, [(1, 400, TIME0_MS)])
                owner.step()
                rings.reap()
                owner.log._flusher.wait(30)
        # As process.py does after the loop raised: close(stopped=False) raises it again and
        # leaves no clean-shutdown marker, so the restarted process validates the segments.
        with pytest.raises(errors.LogError):
            owner.close(stopped=False)
        assert not os.path.exists(os.path.join(owner.log.directory, ".clean-shutdown"))
    finally:
        owner.ingress.close()
        owner.control.close()
        rings.close()
