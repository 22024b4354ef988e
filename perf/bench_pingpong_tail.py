"""What a shmbroker ping-pong's slow round trips are made of (issue 3's round-trip targets).

bench_ipc's ping-pong (both clients spawned: ``Producer(acks=1, spin_ns=spin_us * 1000)``,
``Consumer(spin_us=...)``, ``poll(timeout_ms, max_records=1)``), with what bench_ipc does
not keep: every round trip's time, and after each send whether the record was *held* (left
in the accumulator for the background sender: its latency then includes the partition's
next round) and how many batches were in flight. It prints the percentiles, a histogram of
the round trips over 20 us, how many of the slow ones had a held send, how far apart the
slow ones come, and how often each producer read its completions (``Producer._reap``,
counted by wrapping it) and how many batches each such read resolved.

    .venv/bin/python perf/bench_pingpong_tail.py [--spin-us 1000] [--rounds 20000]

Machine-noise caveat: run A/B comparisons alternating in one sitting (perf/RESULTS.md).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time

from bench_pipeline import (HERE, _create_topic, _results, _sigterm_unwinds, _start_broker,
                            _stop_broker)

WARM = 2_000
POLL_MS = 5_000
START_S_MAX = 120.0
HIST_US = (20, 40, 60, 80, 100, 150, 200, 300, 500, 1_000)


def _side(data_dir: str, first: bool, results, spin_us: int, rounds: int) -> None:
    import numpy as np

    import shmbroker.client.producer as producer_module
    from shmbroker import Consumer, Producer
    from shmbroker.client.types import TopicPartition

    out_topic, in_topic = ("ping", "pong") if first else ("pong", "ping")
    consumer = Consumer(broker=data_dir, auto_offset_reset="earliest", spin_us=spin_us)
    consumer.assign([TopicPartition(in_topic, 0)])
    producer = Producer(broker=data_dir, acks=1, spin_ns=spin_us * 1000)
    reaps = {"reads": 0, "resolved": 0}
    reference = producer_module.Producer._reap

    def counted_reap(self, writer):
        before = len(writer.inflight)
        reference(self, writer)
        reaps["reads"] += 1
        reaps["resolved"] += before - len(writer.inflight)
    producer_module.Producer._reap = counted_reap
    total = WARM + rounds
    lat = np.zeros(total, dtype=np.int64)
    held = np.zeros(total, dtype=np.int32)
    inflight = np.zeros(total, dtype=np.int32)
    msg = b"x" * 100
    send, poll, clock = producer.send, consumer.poll, time.perf_counter_ns
    acc = None
    for i in range(total):  # bounded
        if first:
            t0 = clock()
            send(out_topic, msg, partition=0)
        else:
            got = poll(timeout_ms=POLL_MS, max_records=1)
            if not got:
                raise TimeoutError(f"pong: no record within {POLL_MS} ms")
            send(out_topic, got[0].value, partition=0)
        if acc is None:
            acc = producer._accs[(out_topic, 0)]
        held[i] = acc.records.count
        inflight[i] = len(acc.writer.inflight)
        if first:
            if not poll(timeout_ms=POLL_MS, max_records=1):
                raise TimeoutError(f"ping: no answer within {POLL_MS} ms")
            lat[i] = clock() - t0
    results.put((first, lat, held, inflight, reaps))
    producer.close()
    consumer.close()


def main() -> int:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spin-us", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20_000)
    args = parser.parse_args()
    _sigterm_unwinds()
    data_dir = tempfile.mkdtemp(prefix="shmb-pptail-")
    out_dir = os.path.join(HERE, "out")
    os.makedirs(out_dir, exist_ok=True)
    sides: list = []
    broker = _start_broker(data_dir, os.path.join(out_dir, "bench_pingpong_tail-broker.log"), ())
    try:
        _create_topic(data_dir, "ping")
        _create_topic(data_dir, "pong")
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        sides = [ctx.Process(target=_side, args=(data_dir, first, results, args.spin_us,
                                                  args.rounds)) for first in (False, True)]
        for p in sides:
            p.start()
        got = {}
        for first, lat, held, inflight, reaps in _results(results, sides, len(sides),
                                                          START_S_MAX + args.rounds * 0.01):
            got[first] = (lat, held, inflight, reaps)
        for p in sides:
            p.join(START_S_MAX)
    finally:
        for p in sides:  # gone before the broker stops, so that it unlinks their rings
            if p.is_alive():
                p.kill()
            p.join(START_S_MAX)
        _stop_broker(broker)
        shutil.rmtree(data_dir, ignore_errors=True)
    lat = got[True][0][WARM:] / 1e3
    held_any = (got[True][1][WARM:] > 0) | (got[False][1][WARM:] > 0)
    print(f"bench_pingpong_tail: {args.rounds} round trips of 100 B, acks=1, spin {args.spin_us} us")
    print(f"  round trip p50 {np.percentile(lat, 50):.1f}  p99 {np.percentile(lat, 99):.1f}  "
          f"p99.9 {np.percentile(lat, 99.9):.1f}  mean {lat.mean():.1f} us")
    counts, _ = np.histogram(lat, bins=list(HIST_US) + [np.inf])
    print("  round trips over 20 us: " + ", ".join(
        f"{lo}-{hi}: {n}" for lo, hi, n in zip(HIST_US, list(HIST_US[1:]) + ["inf"], counts)))
    slow = lat > 300
    print(f"  over 300 us: {int(slow.sum())}, of which with a held send: "
          f"{int((slow & held_any).sum())}; held sends in all: {int(held_any.sum())}")
    at = np.cumsum(lat)[lat > 40]
    if len(at) > 1:
        gaps = np.percentile(np.diff(at), [10, 50, 90])
        print(f"  time between round trips over 40 us (p10/p50/p90): "
              f"{gaps[0]:.0f} / {gaps[1]:.0f} / {gaps[2]:.0f} us")
    for first, name in ((True, "ping"), (False, "pong")):
        inflight, reaps = got[first][2][WARM:], got[first][3]
        per_read = reaps["resolved"] / max(reaps["reads"], 1)
        print(f"  {name}: batches in flight mean {inflight.mean():.0f} max {inflight.max()}; "
              f"completions read {reaps['reads']} times, {per_read:.0f} batches resolved each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
