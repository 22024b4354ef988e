"""One drain round, timed alone: the Python round against the C round, same build, one process.

Decision 0004 puts a one-frame round at 120-145 us of Python; this measures exactly that
call, ``Drainer.round()``, with nothing else in the loop: a producer ring in this process
gets one frame (one batch of ``--records`` records of ``--value-bytes``), then one round
appends, publishes, completes and releases it. The two rounds alternate in blocks of
``--block`` rounds so that machine noise hits both alike. What it leaves out: the wake-ups
(no consumer sleeps on the high watermark, so no FUTEX_WAKE is made) and the process hops a
real round trip has (perf/bench_ipc.py measures those).

    PYTHONPATH=. .venv/bin/python perf/bench_drain_round.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20_000, help="rounds per kind")
    parser.add_argument("--block", type=int, default=500, help="rounds per block")
    parser.add_argument("--records", type=int, default=1, help="records per frame")
    parser.add_argument("--value-bytes", type=int, default=100)
    args = parser.parse_args()

    sys.path.insert(0, HERE)
    import machine
    from one_partition import one_partition

    times = {False: [], True: []}
    values = [b"v" * args.value_bytes] * args.records
    with one_partition("bench-drain-") as p:
        drainer = p.owner.drainer

        def one(native: bool) -> None:
            p.commit(values)
            drainer.native = native
            t0 = time.perf_counter_ns()
            done = drainer.round()
            times[native].append(time.perf_counter_ns() - t0)
            assert done == 1
            p.ring.poll_completions()

        one(False)  # the ring's first frame is always a Python round (it learns the sequence)
        for _ in range(args.rounds // args.block):  # bounded
            for native in (False, True):
                for _ in range(args.block):
                    one(native)
        print(f"bench_drain_round: {args.rounds:,} rounds per kind, 1 frame of "
              f"{args.records} x {args.value_bytes} B each; {machine.cpu_model()}, "
              f"{os.cpu_count()} cpus, commit {machine.git_commit()}")
        print(f"  C rounds declined: {drainer.native_declined or 'none'}")
        for native in (False, True):
            t = sorted(times[native][1:])
            print(f"  {'C round     ' if native else 'Python round'}  p50 "
                  f"{t[len(t) // 2] / 1000:7.1f} us  p99 {t[len(t) * 99 // 100] / 1000:7.1f} us"
                  f"  mean {statistics.fmean(t) / 1000:7.1f} us")


if __name__ == "__main__":
    main()
