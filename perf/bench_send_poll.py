"""A round trip's own work without its wake-ups: one process sends a 100 B record (acks=1, no
flush) and polls it back at once (a caught-up consumer of the same partition, reading the
producer's ring), timing ``send`` and ``poll`` separately. What a spinning ping-pong hop costs
besides the cache-line transfer; under ``valgrind --tool=callgrind`` (``--count`` 10000 vs
30000, difference / 20000) it gives instructions per send + poll, which this noisy VM cannot
disturb.

    .venv/bin/python perf/bench_send_poll.py [--count 30000] [--runs 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from bench_pipeline import _create_topic, _sigterm_unwinds, _start_broker, _stop_broker

WARM = 2_000
POLL_MS = 1_000


def _run(data_dir: str, count: int):
    import numpy as np

    from shmbroker import Consumer, Producer
    from shmbroker.client.types import TopicPartition

    sends = np.zeros(count, dtype=np.int64)
    polls = np.zeros(count, dtype=np.int64)
    with Producer(broker=data_dir, acks=1) as producer, \
            Consumer(broker=data_dir, auto_offset_reset="latest") as consumer:
        consumer.assign([TopicPartition("t", 0)])
        consumer.poll(timeout_ms=100)
        send, poll, clock = producer.send, consumer.poll, time.perf_counter_ns
        msg = b"x" * 100
        for i in range(count):  # bounded
            t0 = clock()
            send("t", msg, partition=0)
            t1 = clock()
            got = poll(timeout_ms=POLL_MS, max_records=1)
            t2 = clock()
            if len(got) != 1:
                raise RuntimeError(f"poll {i}: expected the record just sent, got {len(got)}")
            sends[i] = t1 - t0
            polls[i] = t2 - t1
    return sends[WARM:] / 1e3, polls[WARM:] / 1e3


def main() -> int:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=30_000, help="send+poll pairs per run")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if args.count <= WARM:
        ap.error(f"--count must be more than the {WARM} warm-up pairs")
    _sigterm_unwinds()
    data_dir = tempfile.mkdtemp(prefix="bench-send-poll-")
    broker = _start_broker(data_dir, os.path.join(data_dir, "broker.log"))
    try:
        _create_topic(data_dir)
        print(f"bench_send_poll: {args.count - WARM} send+poll pairs per run, us")
        for run in range(args.runs):
            sends, polls = _run(data_dir, args.count)
            print("  run %d  " % (run + 1) + "   ".join(
                f"{name} p10 {np.percentile(a, 10):5.2f} p50 {np.percentile(a, 50):5.2f} "
                f"p90 {np.percentile(a, 90):5.2f}" for name, a in (("send", sends), ("poll", polls))))
    finally:
        _stop_broker(broker)
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
