"""What one ``Consumer.poll()`` costs when it returns one freshly published record: the
latency case, where a consumer is caught up and each poll finds one new record.

A broker with one partition; this process sends one 100 B record, waits for its ack
(``flush``: appended and published), then times one ``poll()``. Both consumer read paths in
the same run, alternating: the one-call C read (``_native.tail_read``) and the Python read
(``LogReader.read`` + ``decode_records``, the reference).

    .venv/bin/python perf/bench_poll_fresh.py [--polls 3000] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from bench_pipeline import _create_topic, _sigterm_unwinds, _start_broker, _stop_broker
from machine import cpu_model, git_commit


def _measure(data_dir: str, polls: int, tail: bool) -> list[int]:
    import shmbroker.client.consumer as consumer_module
    from shmbroker import Consumer, Producer

    consumer_module.TAIL_READ = tail
    out = []
    with Producer(broker=data_dir) as producer, \
            Consumer("t", broker=data_dir, auto_offset_reset="latest") as consumer:
        consumer.poll(timeout_ms=100)
        for _ in range(polls):
            producer.send("t", b"x" * 100, partition=0)
            producer.flush()
            t0 = time.perf_counter_ns()
            got = consumer.poll()
            out.append(time.perf_counter_ns() - t0)
            assert len(got) == 1, f"expected the one record just published, got {len(got)}"
    return sorted(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--polls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    _sigterm_unwinds()
    data_dir = tempfile.mkdtemp(prefix="bench-poll-")
    proc = _start_broker(data_dir, os.path.join(data_dir, "broker.log"))
    try:
        _create_topic(data_dir)
        print(f"bench_poll_fresh: {cpu_model()}, {os.cpu_count()} cores, commit "
              f"{git_commit()}, {args.polls} polls of one fresh 100 B record each, us")
        for r in range(args.rounds):
            for tail in (False, True):
                lat = _measure(data_dir, args.polls, tail)
                name = "C tail_read" if tail else "Python read"
                print(f"  round {r + 1}  {name:<12} p10 {lat[len(lat) // 10] / 1e3:6.2f}  "
                      f"p50 {lat[len(lat) // 2] / 1e3:6.2f}  p90 {lat[len(lat) * 9 // 10] / 1e3:6.2f}")
    finally:
        _stop_broker(proc)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
