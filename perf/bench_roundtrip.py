"""Where one shmbroker round trip goes (decision 0004: profile before building step 2).

A ping client sends a 100 B record to topic ``ping`` (acks=1, no flush) and polls ``pong``; a
pong process polls ``ping`` and answers on ``pong``. Both stamp CLOCK_MONOTONIC (shared by all
processes) into the record, so each round trip splits into: the ping's send call, the hop to
the pong's poll (the consumer's wake-up by the commit and its read), the pong's turnaround
(poll's return to the line before its send: its second stamp), and the pong's send with the
hop back (the pong cannot stamp the end of the send that carries the stamp). It also reports the CPU each process spent per round trip
(psutil), which says whether the trip is CPU-bound or waits on wake-ups, and with
``--py-spy`` records the ping partition process and the pong client (py-spy --native, raw
stacks in perf/out/) and prints their top frames.

    .venv/bin/python perf/bench_roundtrip.py [--rounds 3000] [--spin-us 0] [--py-spy]
                                             [--partition-spin-us 0]
"""
from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

from bench_pipeline import HERE, _create_topic, _sigterm_unwinds, _start_broker, _stop_broker

WARM = 300
STAMPS = struct.Struct("<qqq")  # sequence, first stamp, second stamp
START_S_MAX = 30.0
POLL_MS = 5_000
PY_SPY_S = 6


def _pong(data_dir: str, rounds: int, spin_us: int, ready) -> None:
    from shmbroker import Consumer, Producer

    _sigterm_unwinds()  # a SIGTERMed bench closes this side too (no ring left in /dev/shm)
    consumer = Consumer("ping", broker=data_dir, spin_us=spin_us)
    producer = Producer(broker=data_dir)
    try:
        consumer.poll()
        ready.set()
        answered = 0
        deadline = time.monotonic() + START_S_MAX + rounds * 0.01
        while answered < rounds and time.monotonic() < deadline:  # bounded
            for record in consumer.poll(timeout_ms=POLL_MS):
                received = time.perf_counter_ns()
                seq, _, _ = STAMPS.unpack_from(record.value)
                # The second stamp is taken before send(): the pong's send is in the hop back.
                producer.send("pong", STAMPS.pack(seq, received, time.perf_counter_ns())
                              + record.value[STAMPS.size:], partition=0)
                answered += 1
        producer.flush()
    finally:
        producer.close()
        consumer.close()


def _py_spy() -> str:
    """py-spy beside this interpreter (the venv's), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return beside if os.path.exists(beside) else (shutil.which("py-spy") or "py-spy")


def _top_frames(path: str, what: str, count: int = 12) -> None:
    self_samples: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack:
                continue
            total += int(n)
            self_samples[stack.split(";")[-1]] += int(n)
    print(f"py-spy, {what}: {total} samples, top frames by own time ({path})")
    for frame, n in self_samples.most_common(count):
        print(f"  {100 * n / max(total, 1):5.1f}%  {frame[:110]}")


def main() -> int:
    import numpy as np
    import psutil

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3000)
    parser.add_argument("--spin-us", type=int, default=0)
    parser.add_argument("--py-spy", action="store_true")
    parser.add_argument("--partition-spin-us", type=int, default=0,
                        help="serve --partition-spin-us: the partition processes spin too")
    args = parser.parse_args()
    _sigterm_unwinds()
    from shmbroker import Consumer, Producer

    data_dir = tempfile.mkdtemp(prefix="shmb-rtt-")
    out_dir = os.path.join(HERE, "out")
    os.makedirs(out_dir, exist_ok=True)
    broker = _start_broker(data_dir, os.path.join(out_dir, "bench_roundtrip-broker.log"),
                           ("--partition-spin-us", str(args.partition_spin_us)))
    total = args.rounds + WARM
    pong = None
    try:
        _create_topic(data_dir, "ping")
        _create_topic(data_dir, "pong")
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        pong = ctx.Process(target=_pong, args=(data_dir, total, args.spin_us, ready))
        pong.start()
        if not ready.wait(START_S_MAX):
            raise RuntimeError("the pong process did not start")
        consumer = Consumer("pong", broker=data_dir, spin_us=args.spin_us)
        consumer.poll()
        producer = Producer(broker=data_dir)
        processes = {"ping client": psutil.Process(), "pong client": psutil.Process(pong.pid)}
        for child in psutil.Process(broker.pid).children():
            title = " ".join(" ".join(child.cmdline()).split())
            if "partition" in title:
                processes[title.removeprefix("shmbroker: ")] = child
        rows, cpu0, ctx0, started = [], {}, {}, 0.0
        for i in range(total):  # bounded
            if i == WARM:
                cpu0 = {k: sum(p.cpu_times()[:2]) for k, p in processes.items()}
                ctx0 = {k: p.num_ctx_switches() for k, p in processes.items()}
                started = time.perf_counter()
                if args.py_spy:
                    targets = [("partition ping-0", processes["partition ping/0"].pid),
                               ("pong client", pong.pid)]
                    for name, pid in targets:
                        subprocess.Popen([_py_spy(), "record", "-p",
                                          str(pid), "-d", str(PY_SPY_S), "-r", "500", "--native",
                                          "-f", "raw", "-o",
                                          os.path.join(out_dir, f"roundtrip-{name.replace(' ', '-')}.txt")],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            t0 = time.perf_counter_ns()
            producer.send("ping", STAMPS.pack(i, t0, 0) + b"x" * (100 - STAMPS.size), partition=0)
            t1 = time.perf_counter_ns()
            got: list = []
            deadline = time.monotonic() + POLL_MS / 1000
            while not got and time.monotonic() < deadline:  # bounded
                got = consumer.poll(timeout_ms=POLL_MS)
            if not got:
                raise RuntimeError(f"round trip {i}: no answer within {POLL_MS} ms")
            t4 = time.perf_counter_ns()
            _, t2, t3 = STAMPS.unpack_from(got[0].value)
            if i >= WARM:
                rows.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0))
        wall = time.perf_counter() - started
        cpu1 = {k: sum(p.cpu_times()[:2]) for k, p in processes.items()}
        ctx1 = {k: p.num_ctx_switches() for k, p in processes.items()}
        pong.join(START_S_MAX)
        producer.close()
        consumer.close()
    finally:
        # The pong before the broker: it closes its producer while the broker still runs.
        if pong is not None and pong.is_alive():
            pong.terminate()
        if pong is not None:
            pong.join(START_S_MAX)
        _stop_broker(broker)
        shutil.rmtree(data_dir, ignore_errors=True)
    us = np.asarray(rows, dtype=np.float64).T / 1e3
    print(f"bench_roundtrip: {args.rounds} round trips of 100 B, acks=1, spin {args.spin_us} us")
    for name, column in zip(("ping send", "hop ping -> pong poll", "pong turnaround",
                             "pong send + hop back", "round trip"), us):
        print(f"  {name:24s} p50 {np.percentile(column, 50):8.1f} us   mean {column.mean():8.1f} us"
              f"   p99 {np.percentile(column, 99):8.1f} us   p99.9 {np.percentile(column, 99.9):8.1f} us")
    # Where the slow trips go: each part's mean over the round trips above the p99, beside its
    # mean over all (a part that grows is where the tail comes from).
    slow = us[:, us[4] > np.percentile(us[4], 99)]
    print("  round trips above the p99, mean of each part (all trips in brackets):")
    print("   " + "  ".join(f"{name} {s_.mean():.1f} ({a.mean():.1f})" for name, s_, a in
                            zip(("send", "hop", "turn", "send+hop"), slow[:4], us[:4])))
    print(f"  wall per round trip        {wall / args.rounds * 1e6:8.1f} us")
    for name in processes:
        voluntary = (ctx1[name].voluntary - ctx0[name].voluntary) / args.rounds
        involuntary = (ctx1[name].involuntary - ctx0[name].involuntary) / args.rounds
        print(f"  cpu {name:22s} {(cpu1[name] - cpu0[name]) / args.rounds * 1e6:8.1f} us per round trip,"
              f" context switches {voluntary:.3f} voluntary {involuntary:.3f} involuntary")
    if args.py_spy:
        time.sleep(1)
        for name in ("partition ping-0", "pong client"):
            path = os.path.join(out_dir, f"roundtrip-{name.replace(' ', '-')}.txt")
            if os.path.exists(path):
                _top_frames(path, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
