"""A 64 KiB stream across a segment roll: MB/s and the partition process's CPU per record.

Starts ``shmbroker serve --data-dir perf/out/bench_roll-<pid>/data --listen none`` (the same
disk as the repository), creates one topic of one partition (``--segment-bytes`` sets its
``segment.bytes``; default 1 GiB, so 20,000 x 64 KiB = 1.31 GB rolls once), sends ``--records``
values of ``--value-bytes`` with ``Producer(acks=1).send(topic, value, partition=0)``, then
``flush()``; the clock runs from the first send to the end of the flush. CPU: user + system
time of the partition process (all its threads, psutil) over the same span, per record.
Stops the broker with SIGTERM (SIGKILL of its process group after 30 s), removes the data
directory and checks /dev/shm for leftovers under the broker's prefix.

Run from the checkout to measure (its ``shmbroker`` package is imported)::

    cd /work/wt-flush && PYTHONPATH=$PWD /work/main/.venv/bin/python perf/bench_roll.py
    cd /tmp/base-flush && PYTHONPATH=$PWD /work/main/.venv/bin/python perf/bench_roll.py

Prints one line: commit, MB/s, partition CPU per record, rolls seen, load average.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
BROKER_START_S_MAX = 30.0
TOPIC_READY_S_MAX = 20.0
STOP_S_MAX = 30.0


def start_broker(data_dir: str, log_path: str) -> subprocess.Popen:
    from shmbroker import Admin, errors
    os.makedirs(data_dir, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shmbroker", "serve", "--data-dir", data_dir, "--listen",
             "none"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + BROKER_START_S_MAX
    while time.monotonic() < deadline:  # bounded by the deadline
        if proc.poll() is not None:
            raise SystemExit(f"broker exited {proc.returncode}; see {log_path}")
        try:
            with Admin(broker=data_dir) as admin:
                admin.list_topics()
            return proc
        except errors.ShmbrokerError:
            time.sleep(0.1)
    stop_broker(proc)
    raise SystemExit(f"broker did not start; see {log_path}")


def stop_broker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_S_MAX)
        except subprocess.TimeoutExpired:
            print("broker did not stop within 30 s: killed", file=sys.stderr)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(5.0)


def partition_process(broker_pid: int, topic: str) -> psutil.Process:
    deadline = time.monotonic() + TOPIC_READY_S_MAX
    while time.monotonic() < deadline:  # bounded by the deadline
        for child in psutil.Process(broker_pid).children(recursive=True):
            try:
                if f"partition {topic}/0" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                pass
        time.sleep(0.05)
    raise SystemExit(f"no partition process for {topic}/0")


def wait_served(data_dir: str, topic: str) -> None:
    from shmbroker import Consumer, errors
    deadline = time.monotonic() + TOPIC_READY_S_MAX
    while True:  # bounded by the deadline
        try:
            Consumer(topic, broker=data_dir).close()
            return
        except (errors.BrokerNotRunningError, errors.UnknownTopicOrPartitionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def run(args: argparse.Namespace) -> str:
    from shmbroker import Admin, Producer
    from shmbroker.shm.names import broker_prefix
    tmp = os.path.join(HERE, "out", f"bench_roll-{os.getpid()}")
    data_dir = os.path.join(tmp, "data")
    proc = start_broker(data_dir, os.path.join(HERE, "out", f"bench_roll-{os.getpid()}.log"))
    try:
        topic = "roll"
        config = None if args.segment_bytes is None else {"segment.bytes": args.segment_bytes}
        with Admin(broker=data_dir) as admin:
            admin.create_topic(topic, 1, config)
        wait_served(data_dir, topic)
        part = partition_process(proc.pid, topic)
        value = os.urandom(args.value_bytes)
        producer = Producer(broker=data_dir, acks=1)
        try:
            cpu0 = part.cpu_times()
            t0 = time.perf_counter()
            for _ in range(args.records):
                producer.send(topic, value, partition=0)
            producer.flush()
            elapsed = time.perf_counter() - t0
            cpu1 = part.cpu_times()
        finally:
            producer.close()
        segment_dir = next(os.path.join(r, d) for r, ds, _ in os.walk(data_dir) for d in ds
                           if d.startswith(topic))
        rolls = sum(1 for n in os.listdir(segment_dir) if n.endswith(".log")) - 1
    finally:
        stop_broker(proc)
        prefix = broker_prefix(data_dir)
        left = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
        shutil.rmtree(tmp, ignore_errors=True)
    cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    mbs = args.records * args.value_bytes / elapsed / 1e6
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.getcwd()).stdout.strip()
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    line = (f"commit {commit}: {mbs:,.0f} MB/s, partition CPU {cpu_s / args.records * 1e6:.1f} "
            f"us/record, rolls {rolls}, {elapsed:.2f} s, load {load}")
    if left:
        line += f"; /dev/shm leftovers {left}"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--value-bytes", type=int, default=64 * 1024)
    ap.add_argument("--segment-bytes", type=int, default=None)
    print(run(ap.parse_args()), flush=True)


if __name__ == "__main__":
    main()
