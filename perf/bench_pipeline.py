"""One pipeline, looked at closely: 1 producer process -> 1 partition -> 1 consumer process.

Where perf/bench_ipc.py compares shmbroker with its peers, this script measures what one
change to shmbroker does: it prints msgs/s end to end, the CPU each client process spends
per record, and how many records the producer put in each batch (the partition process's
work per record depends on it). Run it against two trees in one sitting to compare them:

    .venv/bin/python perf/bench_pipeline.py                       # this tree
    PYTHONPATH=/tmp/base .venv/bin/python perf/bench_pipeline.py  # a `git worktree` of the
                                                                  # baseline, extension built
                                                                  # there (setup.py build_ext
                                                                  # --inplace)

It starts its own broker (`python -m shmbroker serve`) on a temporary data dir under
perf/out/, creates topic ``t`` with one partition, and stops the broker with SIGTERM at the
end (SIGKILL of its process group if it does not stop). Producer: ``send(partition=0)`` in a
loop, then ``flush``. Consumer: ``poll(max_records=4096)``, touching every value.
"""
from __future__ import annotations

import argparse
import glob
import multiprocessing as mp
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
#: How long the broker gets to start and the topic to be served.
START_S_MAX = 30.0
RESULT_S_MAX = 300.0
#: How often a wait for workers' results looks whether one of them died without its result.
RESULT_POLL_S = 0.5


def _producer(data_dir: str, count: int, value_bytes: int, go, results) -> None:
    from shmbroker import Producer

    producer = Producer(broker=data_dir, acks=1)
    value = b"x" * value_bytes
    producer.send("t", value, partition=0).result(10)  # ring and slot made before timing
    go.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    send = producer.send
    for _ in range(count):
        send("t", value, partition=0)
    t1, c1 = time.perf_counter(), time.process_time()
    producer.flush()
    results.put(("producer loop msgs/s", count / (t1 - t0)))
    results.put(("producer CPU ns/record", (c1 - c0) / count * 1e9))
    producer.close()


def _consumer(data_dir: str, count: int, go, results, producers: int = 1) -> None:
    from shmbroker import Consumer

    consumer = Consumer("t", broker=data_dir, auto_offset_reset="earliest")
    consumer.assign([("t", 0)])
    go.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    got = touched = 0
    while got < count + producers:  # bounded: each producer sends its share + 1 records
        records = consumer.poll(timeout_ms=10_000, max_records=4096)
        if not records:
            raise TimeoutError(f"no record for 10 s after {got}")
        got += len(records)
        for record in records:
            touched += record.value[-1]
    results.put(("end-to-end msgs/s", count / (time.perf_counter() - t0)))
    results.put(("consumer CPU ns/record", (time.process_time() - c0) / count * 1e9))
    consumer.close()


def _batches(data_dir: str) -> int:
    from shmbroker import records

    n = 0
    for path in glob.glob(os.path.join(data_dir, "t-0", "*.log")):
        with open(path, "rb") as f:
            n += len(records.scan_batches(f.read()).batches)
    return n


def _start_broker(data_dir: str, log_path: str, extra_args: tuple = ()) -> subprocess.Popen:
    with open(log_path, "w") as log:
        # No router (--listen none): the bench uses shared memory, and 7070 may be taken.
        return subprocess.Popen([sys.executable, "-m", "shmbroker", "serve", "--data-dir",
                                 data_dir, "--listen", "none", *extra_args], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _interrupted(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _sigterm_unwinds():
    """SIGTERM (``timeout``, a cancelled job) raises KeyboardInterrupt in the main thread, so
    the script's ``finally`` blocks stop what they started (its broker): by default SIGTERM
    ends Python at once, leaving the broker, its processes and its shared memory behind.
    Returns the handler it replaced."""
    return signal.signal(signal.SIGTERM, _interrupted)


def _results(results, procs: list, count: int, timeout_s: float) -> list:
    """``count`` items from the workers ``procs`` through the queue ``results``: a
    RuntimeError as soon as a worker exited with an error before they all came (not after
    the whole timeout, with the broker left running meanwhile), TimeoutError after
    ``timeout_s``."""
    out: list = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count:  # bounded by the deadline
        try:
            out.append(results.get(timeout=RESULT_POLL_S))
            continue
        except queue.Empty:
            pass
        failed = [p for p in procs if p.exitcode not in (None, 0)]
        if failed:
            raise RuntimeError(f"worker {failed[0].name} exited with {failed[0].exitcode} "
                               f"before its result ({len(out)} of {count} came)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(out)} of {count} worker results within {timeout_s:.0f} s")
    return out


def _stop_broker(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def _create_topic(data_dir: str, name: str = "t") -> None:
    from shmbroker import Admin, errors

    deadline = time.monotonic() + START_S_MAX
    while True:  # bounded by the deadline
        try:
            with Admin(broker=data_dir) as admin:
                admin.create_topic(name, 1)
                return
        except errors.BrokerNotRunningError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _start_top(data_dir: str) -> subprocess.Popen:
    """`shmbroker top --json --interval 1` on the broker, as an operator would leave it
    running (the --with-top A/B: does watching slow the broker?)."""
    return subprocess.Popen([sys.executable, "-m", "shmbroker", "top", "--json", "--interval",
                             "1", "--data-dir", data_dir], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _cpu_ms(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return (t.user + t.system) * 1000


def _broker_cpu_ms(data_dir: str) -> dict[str, float]:
    """user+sys ms of the broker's coordinator and partition process so far (runtime.json)."""
    import json

    import psutil

    with open(os.path.join(data_dir, "runtime.json")) as f:
        doc = json.load(f)
    out = {}
    for entry in doc.get("processes", []):
        if entry.get("role") in ("coordinator", "partition"):
            try:
                t = psutil.Process(entry["pid"]).cpu_times()
            except psutil.NoSuchProcess:
                continue
            out[entry["role"]] = (t.user + t.system) * 1000
    return out


def run_once(count: int, value_bytes: int, with_top: bool = False, producers: int = 1
             ) -> dict[str, float]:
    out_dir = os.path.join(HERE, "out")
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bench-pipeline-", dir=out_dir)
    data_dir = os.path.join(tmp, "data")
    broker = _start_broker(data_dir, os.path.join(tmp, "broker.log"))
    procs = []
    top = None
    try:
        _create_topic(data_dir)
        if with_top:
            top = _start_top(data_dir)
        ctx = mp.get_context("spawn")
        go, results = ctx.Event(), ctx.Queue()
        share = count // producers
        count = share * producers
        procs = [ctx.Process(target=_consumer, args=(data_dir, count, go, results, producers))]
        procs += [ctx.Process(target=_producer, args=(data_dir, share, value_bytes, go, results))
                  for _ in range(producers)]
        for proc in procs:
            proc.start()
        # Both attached and idle; top (if on) past its start-up (~0.5 s of CPU), so that the
        # A/B measures top watching, not a Python process starting beside the run.
        time.sleep(3.0 if top is not None else 1.5)
        top_cpu0 = _cpu_ms(top.pid) if top is not None else 0.0
        before = _broker_cpu_ms(data_dir)
        started = time.perf_counter()
        go.set()
        # (With several producers, the producer lines are the last one's to report.)
        out = dict(_results(results, procs, 2 + 2 * producers, RESULT_S_MAX))
        seconds = time.perf_counter() - started
        after = _broker_cpu_ms(data_dir)
        for role in ("coordinator", "partition"):
            if role in before and role in after:  # CPU ms per second of the run
                out[f"{role} CPU ms/s"] = (after[role] - before[role]) / seconds
        for proc in procs:
            proc.join(30)
        out["records per batch"] = (count + producers) / max(1, _batches(data_dir))
        if top is not None:
            if top.poll() is not None:
                raise RuntimeError(f"shmbroker top exited early ({top.returncode})")
            out["top CPU ms/s"] = (_cpu_ms(top.pid) - top_cpu0) / seconds
        return out
    finally:
        if top is not None and top.poll() is None:
            top.terminate()
            top.wait(10)
        for proc in procs:  # gone before the broker stops, so that it unlinks their rings
            if proc.is_alive():
                proc.kill()
            proc.join(START_S_MAX)
        _stop_broker(broker)
        _print_drain_counts(os.path.join(tmp, "broker.log"))
        shutil.rmtree(tmp, ignore_errors=True)


def _print_drain_counts(log_path: str) -> None:
    """The partition process's last line says how many drain rounds ran in C and why the
    others did not (trees without the C round print nothing here)."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f if "drain rounds" in line]
    except OSError:
        return
    for line in lines:
        print("    " + line[line.find("partition "):], flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=400_000, help="records (default 400,000)")
    ap.add_argument("--value-bytes", type=int, default=100, help="value size (default 100)")
    ap.add_argument("--runs", type=int, default=3, help="runs, each printed (default 3)")
    ap.add_argument("--with-top", choices=("no", "yes", "alternate"), default="no",
                    help="run `shmbroker top --json --interval 1` against the broker during "
                         "the runs (alternate: every other run, starting without)")
    ap.add_argument("--producers", type=int, default=1,
                    help="producer processes, all to partition 0, count split between them "
                         "(their commits interleave: the partition merges them by offset)")
    args = ap.parse_args(argv)
    _sigterm_unwinds()
    import shmbroker

    print(f"bench_pipeline: shmbroker from {os.path.dirname(shmbroker.__file__)}, "
          f"{args.count:,} x {args.value_bytes} B, {args.producers} producer(s), "
          f"{args.runs} runs")
    for i in range(args.runs):
        with_top = args.with_top == "yes" or (args.with_top == "alternate" and i % 2 == 1)
        result = run_once(args.count, args.value_bytes, with_top, args.producers)
        print(f"  top {'on ' if with_top else 'off'}  " +
              "  ".join(f"{k} {v:,.0f}" for k, v in sorted(result.items())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
