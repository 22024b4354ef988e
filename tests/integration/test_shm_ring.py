"""Producer processes -> per-producer ingress rings -> one consumer (playing the partition
process), through real shared memory and real processes:

* one producer and several producers: every frame arrives once, in per-producer order, with
  equal checksums, and every producer learns each frame's offset from its completions;
* a full ring blocks the producer in the kernel (about 0 CPU), a release wakes it (it makes
  progress at once, no polling), and if nobody drains it fails after its timeout with
  RingFullTimeoutError;
* kill -9 of a producer in the middle of writing a large frame: the consumer never sees a
  partial frame, every frame committed before is delivered, the dead producer's registry slot
  is reclaimed and its ring unlinked;
* a corrupted ring header is a typed error for that ring only; the others keep flowing.
"""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import psutil
import pytest

from shmbroker import _native, errors, records
from shmbroker.layout import shm as L
from shmbroker.shm import names, stale
from shmbroker.shm.control import ControlRegion
from shmbroker.shm.ring import RingConsumer

# The producer side, run as `python -c CHILD <mode> <control name> <prefix> <args...>`.
CHILD = textwrap.dedent(r'''
    import os, signal, struct, sys, time, zlib
    from shmbroker import errors, records
    from shmbroker.layout import shm as L
    from shmbroker.shm import names
    from shmbroker.shm.control import ControlRegion
    from shmbroker.shm.ring import RingProducer

    mode, ctl_name, prefix, tag = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    count, size, capacity = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
    ctl = ControlRegion.attach(ctl_name)
    slot, gen = ctl.claim_slot(capacity)
    ring = RingProducer.create(names.ring_name(prefix, "t", 0, slot, gen), capacity,
                               partition=0, slot=slot, generation=gen, control=ctl)
    ctl.set_slot_state(slot, L.SLOT_READY)

    def value(i):
        body = (b"%d:%d:" % (tag, i)).ljust(size, b"x")
        return body + struct.pack("<I", zlib.crc32(body))

    if mode == "stream":          # count batches of 4 records, then a clean close
        for i in range(count):
            ring.send(records.encode_batch([value(4 * i + k) for k in range(4)]),
                      timeout_ms=20000)
        ring.close(drain_timeout_ms=20000)
        ctl.release_slot(slot, os.getpid())
    elif mode == "block":         # send until blocked; report the timeout error
        i = 0
        try:
            while True:
                ring.send(records.encode_batch([value(i)]), timeout_ms=count)
                i += 1
        except errors.RingFullTimeoutError as exc:
            print("TIMEOUT", i, exc, flush=True)
        ring.close()
        ctl.release_slot(slot, os.getpid())
    elif mode == "torn":          # commit `count` frames, copy a large one, die unpublished
        for i in range(count):
            ring.send(records.encode_batch([value(i)]))
        buf, mask = ring.buf, ring.capacity - 1
        tail = ring.write_position
        big = records.encode_batch([value(10**6)] * 64)
        at = L.RING_DATA_OFFSET + (tail & mask)
        assert (tail & mask) + L.frame_bytes(len(big)) <= ring.capacity
        buf[at + 16:at + 16 + len(big)] = big          # what ring_write copies first ...
        struct.pack_into("<iQ", buf, at + 4, L.FRAME_TYPE_DATA, count)
        os.kill(os.getpid(), signal.SIGKILL)            # ... and it dies before the length
    elif mode == "flood":         # large frames, back to back, until killed from outside
        i = 0
        while True:
            ring.send(records.encode_batch([value(16 * i + k) for k in range(16)]),
                      timeout_ms=20000)
            i += 1
''')

TIMEOUT_S = 60


def spawn(mode, ctl, prefix, tag, count, size, capacity):
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, ctl.name, prefix, str(tag), str(count), str(size),
         str(capacity)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_value(v: bytes) -> tuple[int, int]:
    body, crc = v[:-4], int.from_bytes(v[-4:], "little")
    assert zlib.crc32(body) == crc, "checksum mismatch"
    tag, i, _ = body.split(b":", 2)
    return int(tag), int(i)


class Partition:
    """What the partition process does with its rings, reduced to what these tests need:
    attach READY slots, drain committed frames (checking every record), complete them with
    offsets, release, sleep on the doorbell, drain and reclaim dead or closed producers."""

    def __init__(self, ctl: ControlRegion):
        self.ctl = ctl
        self.rings: dict[int, RingConsumer] = {}
        self.seen: dict[int, list[int]] = {}
        self.next_offset = 0
        self.reclaimed: list[int] = []
        self.broken: set[int] = set()  # slots whose ring raised RingCorruptError

    def attach_new(self):
        for s in self.ctl.slots():
            if s.state == L.SLOT_READY and s.slot not in self.rings \
                    and s.slot not in self.broken:
                name = names.ring_name(self.prefix, "t", 0, s.slot, s.generation)
                try:
                    self.rings[s.slot] = RingConsumer.attach(name)
                except errors.RegionNotFoundError:
                    pass  # closed and unlinked already

    def drain_once(self) -> int:
        taken = 0
        for slot, ring in list(self.rings.items()):
            rb = ring.poll(max_bytes=1 << 20)
            if rb is not None:
                for r in records.decode_records(rb.data):
                    tag, i = check_value(r.value)
                    self.seen.setdefault(tag, []).append(i)
                ring.complete(rb.first_sequence, rb.last_sequence, self.next_offset)
                self.next_offset += rb.count
                ring.release(rb.next_position)
                taken += rb.count
            elif ring.finished():
                pid = self.ctl.slot(slot).pid
                if not ring.owner_alive():
                    ring.unlink_for_dead_owner()
                    self.ctl.release_slot(slot, pid)
                    self.reclaimed.append(slot)
                ring.close()
                del self.rings[slot]
        return taken

    def run_until(self, done, timeout_s=TIMEOUT_S):
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, "partition loop timed out"
            self.attach_new()
            if self.drain_once():
                continue
            seen = self.ctl.sleep_prepare()
            if any(r.has_unread() for r in self.rings.values()):
                self.ctl.sleep_cancel()
                continue
            self.ctl.sleep(seen, timeout_ms=50)

    def close(self):
        for ring in self.rings.values():
            ring.close()


@pytest.fixture
def part(tmp_path):
    prefix = names.broker_prefix(tmp_path)
    ctl = ControlRegion.create(names.control_name(prefix, "t", 0), 0, registry_slots=16)
    ctl.start_offsets(0)  # what a partition process does at start (decision 0005)
    p = Partition(ctl)
    p.prefix = prefix
    yield p
    p.close()
    ctl.unlink()
    ctl.close()


def finish(proc, timeout=TIMEOUT_S):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.parametrize("producers", [1, 4])
def test_producers_to_one_consumer_in_order_with_checksums(part, producers):
    n, size = 1500, 100
    procs = [spawn("stream", part.ctl, part.prefix, tag, n, size, 64 * 1024)
             for tag in range(producers)]
    part.run_until(lambda: all(p.poll() is not None for p in procs) and not part.rings
                   and not part.ctl.slots())
    for p in procs:
        rc, _, err = finish(p)
        assert rc == 0, err
    assert sorted(part.seen) == list(range(producers))
    for tag, got in part.seen.items():
        assert got == list(range(4 * n)), f"producer {tag}: lost, duplicated or reordered"
    assert part.next_offset == producers * n


def test_full_ring_blocks_without_cpu_is_woken_by_release_then_times_out(part):
    proc = spawn("block", part.ctl, part.prefix, 0, 1500, 1000, 8192)
    try:
        deadline = time.monotonic() + 20
        while not part.rings:
            assert time.monotonic() < deadline
            part.attach_new()
            time.sleep(0.01)
        (ring,) = part.rings.values()

        def sent():
            return _native.atomic_load_u64(ring.buf, L.RING["next_sequence"])

        while not (ring.has_unread() and not _native.ring_fits(ring.buf, 1100)):
            time.sleep(0.01)
        time.sleep(0.05)
        # Blocked: asleep in the kernel, not spinning.
        child = psutil.Process(proc.pid)
        before = sum(child.cpu_times()[:2])
        before_sent = sent()
        time.sleep(0.5)
        used = sum(child.cpu_times()[:2]) - before
        assert used < 0.05, f"a blocked producer used {used:.3f} s CPU in 0.5 s"
        assert sent() == before_sent
        # One release frees space: it wakes and writes at once (woken, not polled).
        rb = ring.poll()
        ring.release(rb.next_position)
        t0 = time.monotonic()
        while sent() == before_sent:
            assert time.monotonic() - t0 < 0.5, "producer did not resume after the release"
            time.sleep(0.001)
        # Then nobody drains: after its 1.5 s timeout it gets RingFullTimeoutError.
        rc, out, err = finish(proc)
        assert rc == 0, err
        assert out.startswith("TIMEOUT") and "stayed full for 1500 ms" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_during_large_frame_never_delivers_it_and_slot_is_reclaimed(part):
    proc = spawn("torn", part.ctl, part.prefix, 7, 25, 200, 1 << 20)
    rc, _, err = finish(proc)
    assert rc == -signal.SIGKILL, err
    part.run_until(lambda: part.reclaimed)
    assert part.seen == {7: list(range(25))}  # every committed frame, nothing partial
    assert part.ctl.slots() == []             # the dead producer's slot is free again
    assert [n for n in os.listdir("/dev/shm") if n.startswith(part.prefix + "r.")] == []
    slot, gen = part.ctl.claim_slot(4096)
    assert (slot, gen) == (0, 2)
    part.ctl.release_slot(slot, os.getpid())


def test_kill_minus_9_in_a_loop_while_streaming_large_frames(part):
    """Producers killed at random points of a stream of 200 KiB frames: whatever the consumer
    receives is whole (checksums) and gap-free per producer; slots are reclaimed."""
    rounds = 4
    for r in range(rounds):
        proc = spawn("flood", part.ctl, part.prefix, r, 0, 12_000, 1 << 20)
        deadline = time.monotonic() + 20
        while len(part.seen.get(r, ())) < 32:
            assert time.monotonic() < deadline and proc.poll() is None
            part.attach_new()
            part.drain_once()
        time.sleep(0.003 * r)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        part.run_until(lambda: len(part.reclaimed) == r + 1)
        got = part.seen[r]
        assert got == list(range(len(got)))
    assert part.ctl.slots() == []


def test_corrupted_ring_header_is_a_typed_error_and_others_keep_flowing(part):
    good = spawn("stream", part.ctl, part.prefix, 1, 400, 50, 64 * 1024)
    bad = spawn("block", part.ctl, part.prefix, 2, 5000, 50, 8192)
    try:
        deadline = time.monotonic() + 20
        while len(part.rings) < 2:
            assert time.monotonic() < deadline
            part.attach_new()
            time.sleep(0.01)
        bad_slot = next(s for s, r in part.rings.items() if r.owner_pid == bad.pid)
        bad_ring = part.rings.pop(bad_slot)
        part.broken.add(bad_slot)
        struct.pack_into("<Q", bad_ring.buf, L.RING["write_position"], 1 << 40)
        with pytest.raises(errors.RingCorruptError) as info:
            bad_ring.poll()
        assert "positions out of range" in str(info.value)
        bad_ring.close()
        part.run_until(lambda: good.poll() is not None and not part.rings)
        assert part.seen[1] == list(range(1600))
        rc, _, err = finish(good)
        assert rc == 0, err
    finally:
        bad.kill()
        bad.wait()
        # the killed producer never unlinked its ring: clean it up as stale cleanup would
        report = stale.find_stale(part.prefix, remove_unreadable=True)
        assert report.to_drain == []
