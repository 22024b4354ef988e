"""What the counters region costs a drain round: ``Drainer._count_native_round`` timed alone.

bench_drain_round.py times a whole round (15-30 us of C round on the 2-vCPU VM, with a spread
between runs far larger than a microsecond), so the counters' share of it cannot be read from
two of its runs. This times exactly the code a round runs for the counters (the additions to
the mirror, the high watermark, the log's size, the fill of each ring, one C store of the
counters) over ``--rings`` rings, in blocks, and reports the best and the median
block. Same setup as bench_drain_round.py: a real control region, real rings, a real log.

    PYTHONPATH=. .venv/bin/python perf/bench_counters.py [--rings 1] [--calls 200000]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rings", type=int, default=1, help="producer rings of the partition")
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--block", type=int, default=10_000)
    args = parser.parse_args()

    from shmbroker.config import LogConfig
    from shmbroker.layout import shm as L
    from shmbroker.partition.drain import FILL_SAMPLE_ROUNDS
    from shmbroker.partition.owner import PartitionOwner
    from shmbroker.shm import names
    from shmbroker.shm.control import ControlRegion
    from shmbroker.shm.ring import RingProducer
    sys.path.insert(0, HERE)
    import machine

    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    data_dir = tempfile.mkdtemp(prefix="bench-counters-", dir=os.path.join(HERE, "out"))
    prefix = names.broker_prefix(data_dir)
    control = ControlRegion.create(names.control_name(prefix, "t", 0), 0)
    rings = []
    for _ in range(args.rings):  # bounded
        slot, generation = control.claim_slot(1 << 20)
        rings.append(RingProducer.create(names.ring_name(prefix, "t", 0, slot, generation),
                                         1 << 20, partition=0, slot=slot,
                                         generation=generation, control=control))
        control.set_slot_state(slot, L.SLOT_READY)
    control.announce_registry_change()
    owner = PartitionOwner(data_dir, "t", 0, LogConfig(),
                           control=ControlRegion.attach(control.name))
    try:
        drainer = owner.drainer
        attached = list(owner.ingress)
        assert len(attached) == args.rings, attached
        count_round = drainer._count_native_round
        # What the C round returns for one frame of one 100-byte record (the counting code
        # reads the first six fields).
        appended = (1, 1, 1, 161, 1000, 161_000, -1, 0, 0, 0, [], [])
        blocks = []
        for _ in range(max(1, args.calls // args.block)):  # bounded
            t0 = time.perf_counter_ns()
            for _ in range(args.block):  # bounded
                count_round(attached, appended)
            blocks.append((time.perf_counter_ns() - t0) / args.block)
        print(f"bench_counters: Drainer._count_native_round over {args.rings} ring(s) (fill "
              f"sampled every {FILL_SAMPLE_ROUNDS} rounds), "
              f"{len(blocks)} blocks of {args.block:,} calls; {machine.cpu_model()}, "
              f"{os.cpu_count()} cpus, commit {machine.git_commit()}")
        print(f"  per round: best block {min(blocks):6.0f} ns, median block "
              f"{statistics.median(blocks):6.0f} ns")
    finally:
        owner.shutdown()
        owner.close()
        for ring in rings:
            ring.close()
        control.unlink()
        control.close()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
