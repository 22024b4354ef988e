"""The floor of a round trip in which the producer's commit wakes the consumer itself
(decision 0005), beside an ``os.pipe`` ping-pong in the same run.

Two processes, two ingress rings, no broker: the ping encodes a 100 B record
(``encode_batch``), writes it into ring A (``ring_write``), bumps a futex word and wakes; the
pong waits on that word, reads the frame (``RingConsumer.poll``), decodes it
(``decode_records``), releases it and answers the same way on ring B. That is the work a
consumer reading committed ring frames would do per record, with today's Python around each C
call, and two wake-ups per round trip as a pipe has. What it leaves out (offset reservation,
validation by the reader, the partition process appending beside it) costs more, never less:
read the result as the best such a design can do with these calls, and the pipe as the target's
reference (issue 3: blocking p50 and p99 within 1.3x of the pipe, spin p50 <= 5 us).

    .venv/bin/python perf/bench_ring_floor.py [--rounds 20000] [--spin-us 0,50]
"""
from __future__ import annotations

import argparse
import mmap
import os
import sys
import time

import posix_ipc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from shmbroker import _native  # noqa: E402
from shmbroker.shm.ring import RingConsumer, RingProducer  # noqa: E402

from machine import cpu_model, git_commit  # noqa: E402

RING_BYTES = 1 << 20
WAIT_SLICE_MS = 200          # one futex wait; the loop below bounds the total
ROUND_WAIT_S_MAX = 5.0       # a round trip slower than this means the other side is gone
VALUE = b"x" * 100


def _word(name: str, create: bool) -> mmap.mmap:
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX if create else 0, mode=0o600,
                                 size=4096 if create else 0)
    try:
        return mmap.mmap(shm.fd, 4096)
    finally:
        shm.close_fd()


def _send(ring: RingProducer, word, value: bytes) -> None:
    _native.ring_write(ring.buf, [_native.encode_batch([value])], None)
    _native.atomic_add_u32(word, 0, 1)
    _native.futex_wake(word, 0, 1)


def _receive(ring: RingConsumer, word, spin_ns: int) -> bytes:
    deadline = time.monotonic() + ROUND_WAIT_S_MAX
    while True:
        seen = _native.atomic_load_u32(word, 0)
        batch = ring.poll()
        if batch is not None:
            break
        if time.monotonic() > deadline:
            raise TimeoutError("the other side stopped answering")
        _native.futex_wait(word, 0, seen, WAIT_SLICE_MS, spin_ns)
    value = _native.decode_records(batch.data)[0].value
    ring.release(batch.next_position)
    return value


def _ring_pingpong(tag: str, rounds: int, spin_ns: int) -> list[int]:
    ring_names = (f"{tag}.a", f"{tag}.b")
    word_names = (f"/{tag}.wa", f"/{tag}.wb")
    out_a = RingProducer.create(ring_names[0], RING_BYTES)
    out_b = RingProducer.create(ring_names[1], RING_BYTES)
    word_a, word_b = _word(word_names[0], True), _word(word_names[1], True)
    try:
        pid = os.fork()
        if pid == 0:  # pong: reads ring A, answers on ring B
            code = 1
            try:
                in_a = RingConsumer.attach(ring_names[0])
                for _ in range(rounds):
                    _send(out_b, word_b, _receive(in_a, word_a, spin_ns))
                code = 0
            finally:
                os._exit(code)
        in_b = RingConsumer.attach(ring_names[1])
        lat = []
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            _send(out_a, word_a, VALUE)
            _receive(in_b, word_b, spin_ns)
            lat.append(time.perf_counter_ns() - t0)
        _, status = os.waitpid(pid, 0)
        assert status == 0, f"pong exited with status {status}"
        in_b.close()
        return lat
    finally:
        for ring in (out_a, out_b):
            ring.region.unlink()
            ring.region.close()
        for name in word_names:
            posix_ipc.unlink_shared_memory(name)


def _pipe_pingpong(rounds: int, spin: bool) -> list[int]:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    if spin:
        os.set_blocking(r1, False)
        os.set_blocking(r2, False)

    def read(fd: int) -> bytes:
        if not spin:
            return os.read(fd, 100)
        deadline = time.monotonic() + ROUND_WAIT_S_MAX
        while time.monotonic() < deadline:
            try:
                return os.read(fd, 100)
            except BlockingIOError:
                pass
        raise TimeoutError("the other side stopped answering")

    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(rounds):
                os.write(w2, read(r1))
        finally:
            os._exit(0)
    lat = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        os.write(w1, VALUE)
        read(r2)
        lat.append(time.perf_counter_ns() - t0)
    os.waitpid(pid, 0)
    for fd in (r1, w1, r2, w2):
        os.close(fd)
    return lat


def _quantiles(lat: list[int]) -> tuple[float, float, float]:
    s = sorted(lat[len(lat) // 10:])  # the first 10% are warm-up
    return tuple(s[min(len(s) - 1, int(len(s) * q))] / 1e3 for q in (0.5, 0.99, 0.999))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20_000)
    ap.add_argument("--spin-us", default="0,50",
                    help="comma-separated spins before each futex sleep; 0 = blocking")
    args = ap.parse_args()
    print(f"bench_ring_floor: {cpu_model()}, {os.cpu_count()} cores, commit {git_commit()}, "
          f"{args.rounds} round trips of 100 B, p50 / p99 / p99.9 in us")
    for spin_us in (int(s) for s in args.spin_us.split(",")):
        mode = "blocking" if spin_us == 0 else f"spin {spin_us} us"
        ring = _quantiles(_ring_pingpong(f"shmb-floor{os.getpid()}", args.rounds,
                                         spin_us * 1000))
        pipe = _quantiles(_pipe_pingpong(args.rounds, spin_us > 0))
        print(f"  {mode:<14} ring + futex  {ring[0]:7.1f} {ring[1]:8.1f} {ring[2]:8.1f}    "
              f"os.pipe {pipe[0]:7.1f} {pipe[1]:8.1f} {pipe[2]:8.1f}    "
              f"p50 ratio {ring[0] / pipe[0]:.2f}x")


if __name__ == "__main__":
    main()
