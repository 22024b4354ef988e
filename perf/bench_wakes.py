"""The wake-up alone: a blocking ping-pong of two Python processes over ``os.pipe`` against
one over a futex on shared memory (``_native.futex_wait`` / ``futex_wake``, what shmbroker's
clients sleep and wake with), nothing else running.

Pipe wake-ups are ``WF_SYNC`` (the woken reader may run on the writer's CPU), ``FUTEX_WAKE``
has no such hint; this says how much of the gap between bench_ipc's shmbroker and os.pipe
blocking round trips that difference explains (fourteenth session, 5 pairs: little of it:
futex p50 52-63 us against the pipe's 48-58, p99 80-113 against 74-112, CPU per trip
18-24 us against 16-19; shmbroker's client spends 40-48 us per trip, bench_roundtrip.py).
Prints p50 /
p99 / p99.9 and the parent's CPU per round trip for each, alternating, ``--reps`` times.

    .venv/bin/python perf/bench_wakes.py [--rounds 20000] [--reps 3]
"""
from __future__ import annotations

import argparse
import mmap
import os
import resource
import struct
import sys
import time

WARM = 1_000
WAIT_MS = 1_000  # each futex wait re-checks at least this often (a lost wake cannot hang)
PING, PONG = 0, 64  # the two words, a cache line apart
_WORD = struct.Struct("<I")


def _pipe(rounds: int) -> list[int]:
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the pong: echo
        try:
            for _ in range(WARM + rounds):  # bounded
                os.write(b_w, os.read(a_r, 100))
        finally:
            os._exit(0)
    lat, msg, clock = [], b"x" * 100, time.perf_counter_ns
    for _ in range(WARM + rounds):  # bounded
        t0 = clock()
        os.write(a_w, msg)
        os.read(b_r, 100)
        lat.append(clock() - t0)
    os.waitpid(pid, 0)
    for fd in (a_r, a_w, b_r, b_w):
        os.close(fd)
    return lat[WARM:]


def _futex(rounds: int) -> list[int]:
    from shmbroker import _native

    region = mmap.mmap(-1, 4096)
    wait, wake, load, store = _native.futex_wait, _native.futex_wake, _WORD.unpack_from, _WORD.pack_into
    pid = os.fork()
    if pid == 0:  # the pong: each new ping value is echoed into the pong word
        try:
            seen = 0
            for _ in range(WARM + rounds):  # bounded
                while load(region, PING)[0] == seen:  # bounded: each wait ends by WAIT_MS
                    wait(region, PING, seen, WAIT_MS)
                seen = load(region, PING)[0]
                store(region, PONG, seen)
                wake(region, PONG)
        finally:
            os._exit(0)
    lat, clock = [], time.perf_counter_ns
    for i in range(1, WARM + rounds + 1):  # bounded
        t0 = clock()
        store(region, PING, i)
        wake(region, PING)
        while load(region, PONG)[0] != i:  # bounded: each wait ends by WAIT_MS
            wait(region, PONG, i - 1, WAIT_MS)
        lat.append(clock() - t0)
    os.waitpid(pid, 0)
    region.close()
    return lat[WARM:]


def main() -> int:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"bench_wakes: {args.rounds} blocking round trips per run (us; parent's CPU per trip)")
    for _ in range(args.reps):  # bounded
        for name, run in (("os.pipe", _pipe), ("futex", _futex)):
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            us = np.asarray(run(args.rounds), dtype=np.float64) / 1e3
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / (WARM + args.rounds)
            print(f"  {name:8s} p50 {np.percentile(us, 50):6.1f}  p99 {np.percentile(us, 99):7.1f}"
                  f"  p99.9 {np.percentile(us, 99.9):7.1f}  cpu {cpu * 1e6:5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
