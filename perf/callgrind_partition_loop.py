"""Instructions per pass of the partition process's loop, for callgrind (issue 3).

One PartitionOwner in this process, one producer ring; each pass commits one frame (one
batch of ``--records`` records of ``--value-bytes``) and then runs the body of
``process.run_loop`` once: ``step``, which drains it, then ``wait_for_work``, which finds
nothing and sleeps (1 ms at most here). Only that body is counted:
it is called through ``operator.methodcaller``, and callgrind collects inside
``methodcaller_call`` alone (``--toggle-collect``), so the producer's writes and completion
reads are left out. The monotonic clock the owner's periodic work (reap) uses advances
``--ms-per-pass`` per pass (default 0.25 ms: about one ping-pong round trip on the 2-vCPU VM),
so periodic work is counted as often as it would run, not as often as valgrind's slowness
makes it due. Instruction counts do not depend on the machine's load.

Run it for N and 2N passes and take the difference per pass (what one more round costs)::

    for n in 2000 4000; do
      PYTHONPATH=. valgrind --tool=callgrind --callgrind-out-file=perf/out/cg.$n \\
        --collect-atstart=no --toggle-collect=methodcaller_call \\
        .venv/bin/python perf/callgrind_partition_loop.py --passes $n
    done
    callgrind_annotate perf/out/cg.2000 | head -3; callgrind_annotate perf/out/cg.4000 | head -3

``--python`` runs the Python round (the reference) instead of the C one.
"""
from __future__ import annotations

import argparse
import operator
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
WARM_PASSES = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=2000)
    parser.add_argument("--records", type=int, default=1)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--ms-per-pass", type=float, default=0.25)
    parser.add_argument("--python", action="store_true", help="the Python round")
    args = parser.parse_args()

    from one_partition import one_partition

    clock = [1_000_000.0]
    never = lambda: False  # noqa: E731 (the loop's stop_requested)
    counted = operator.methodcaller("__call__")
    with one_partition("cg-loop-", monotonic_ms=lambda: int(clock[0])) as p:
        owner = p.owner
        owner.drainer.native = not args.python
        values = [b"v" * args.value_bytes] * args.records

        def body() -> None:
            # process.run_loop's body: step drains the frame, then wait_for_work looks at
            # the rings, finds nothing and sleeps on the doorbell; here for 1 ms at most (the
            # futex times out instead of being woken: the same instructions in this process).
            owner.step()
            owner.wait_for_work(min(1, owner.ms_until_due()), never)

        def one(measured: bool) -> None:
            p.commit(values)
            clock[0] += args.ms_per_pass
            if measured:
                counted(body)
            else:
                body()
            p.ring.poll_completions()

        for _ in range(WARM_PASSES):  # bounded
            one(False)
        for _ in range(args.passes):  # bounded
            one(True)
        drainer = owner.drainer
        assert owner.log.log_end_offset == (WARM_PASSES + args.passes) * args.records, \
            owner.log.log_end_offset
        print(f"callgrind_partition_loop: {args.passes} passes counted; {drainer.rounds} rounds,"
              f" {drainer.native_rounds} in C; declined: {drainer.native_declined or 'never'}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
