#!/usr/bin/env python3
"""Remote clients through the router, beside pyzmq PUSH/PULL over tcp and Redis Streams
(issue 5, section 5).

Usage::

    .venv/bin/python perf/bench_remote.py [--count N] [--clients 1,4] [--runs 3] [--only NAMES]

Everything runs over loopback TCP on 127.0.0.1, every client is its own process, and each
message is 100 bytes. Cases, for each client count C in ``--clients``:

* **produce**: C producer processes, each sending ``--count`` messages into its own partition
  (shmbroker: ``Producer(broker="tcp://...", acks=1)`` ``send`` + ``flush``, every message
  appended to the partition's log and acknowledged; Redis: ``XADD`` pipelined 1024 at a time
  into its own stream, each pipeline's replies read). Time: from one start signal to the last
  producer's last acknowledgement.
* **consume**: C consumer processes, each reading the messages just produced from offset 0 of
  its partition (shmbroker: ``Consumer(topic, broker="tcp://...")`` assigned one partition,
  ``poll``; Redis: ``XREAD COUNT 1024`` from id 0 on its stream). Time: start signal to the
  last consumer's last message. Each consumer counts messages and sums their last bytes; a
  wrong count or sum prints BAD instead of a number.
* **pyzmq PUSH/PULL** over tcp (C pairs, per-message ``send``/``recv``; ZeroMQ batches on
  the wire itself): one number, the transfer producer -> consumer, shown in both rows. It is
  the raw transport shmbroker's router sits on, with no log, no acks and no offsets.

* **cold replay** (``--cold-gib``, default 1; 0 skips): that many GiB of a file sent to a
  receiver process over loopback TCP by ``os.sendfile`` (the router's cold-read path) and by
  ``readinto`` + ``sendall`` of the same bytes, rounds alternated, MB/s (medians);
  perf/bench_cold_read.py's transfer, which also measures the remote consumer's hot and cold
  replays through a broker. Target (issue 5): sendfile >= 1.5x the copying path.

Redis runs with ``--save '' --appendonly no`` (nothing durable), skipped with a note when
redis-server or redis-py is missing (``make bench`` installs redis-py; ``apt-get install
redis-server``). Numbers are medians of ``--runs`` runs. Targets (issue 5): shmbroker remote
produce and consume >= 2x Redis Streams.

Workers are this script run as a subprocess (``worker ROLE``): each connects, prints
``ready``, waits for ``go`` on stdin, does its work and prints one JSON line with its
``time.perf_counter`` start and end (CLOCK_MONOTONIC, the same clock in every process).
Every process started here is stopped at the end, even on failure, and the broker's data dir
(in a temporary directory) is removed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

MSG_BYTES = 100
#: Redis: XADDs per pipeline, and the COUNT of one XREAD.
REDIS_BATCH = 1024
#: Consumer poll size (Kafka's max.poll.records default is 500; larger is what a bulk reader
#: sets).
POLL_RECORDS_MAX = 4096
#: Every wait in this script ends: a worker that has not said ready, or finished, this long
#: after it should have is a failed case.
READY_S_MAX = 30.0
CASE_S_MAX = 180.0


def message(i: int) -> bytes:
    """100 bytes whose last byte varies, so a lost or repeated message changes the sum."""
    return (b"%010d" % i) * (MSG_BYTES // 10)


def checksum(count: int) -> int:
    return sum(message(i)[-1] for i in range(count))


# --- workers ------------------------------------------------------------------------------------


def _ready_then_go() -> float:
    print("ready", flush=True)
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit("no start signal")
    return time.perf_counter()


def shmbroker_produce(address: str, topic: str, partition: int, count: int) -> dict:
    from shmbroker import Producer

    values = [message(i) for i in range(count)]
    with Producer(broker=address, acks=1) as producer:
        t0 = _ready_then_go()
        send = producer.send
        for v in values:
            send(topic, v, partition=partition)
        producer.flush(timeout=CASE_S_MAX)
        t1 = time.perf_counter()
    return {"t0": t0, "t1": t1, "n": count}


def shmbroker_consume(address: str, topic: str, partition: int, count: int) -> dict:
    from shmbroker import Consumer, TopicPartition

    with Consumer(broker=address, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition(topic, partition)])
        n = s = 0
        t0 = _ready_then_go()
        deadline = t0 + CASE_S_MAX
        while n < count and time.perf_counter() < deadline:
            for r in consumer.poll(timeout_ms=1000, max_records=POLL_RECORDS_MAX):
                n += 1
                s += r.value[-1]
        t1 = time.perf_counter()
    return {"t0": t0, "t1": t1, "n": n, "sum": s}


def redis_produce(port: int, stream: str, count: int) -> dict:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    values = [message(i) for i in range(count)]
    t0 = _ready_then_go()
    for first in range(0, count, REDIS_BATCH):
        pipe = client.pipeline(transaction=False)
        for v in values[first:first + REDIS_BATCH]:
            pipe.xadd(stream, {b"v": v})
        pipe.execute()
    t1 = time.perf_counter()
    return {"t0": t0, "t1": t1, "n": count}


def redis_consume(port: int, stream: str, count: int) -> dict:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    n = s = 0
    last = b"0"
    t0 = _ready_then_go()
    deadline = t0 + CASE_S_MAX
    while n < count and time.perf_counter() < deadline:
        reply = client.xread({stream: last}, count=REDIS_BATCH, block=1000)
        for _, entries in reply:
            for entry_id, fields in entries:
                n += 1
                s += fields[b"v"][-1]
                last = entry_id
    t1 = time.perf_counter()
    return {"t0": t0, "t1": t1, "n": n, "sum": s}


def zmq_push(port: int, count: int) -> dict:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(f"tcp://127.0.0.1:{port}")
    values = [message(i) for i in range(count)]
    t0 = _ready_then_go()
    send = sock.send
    for v in values:
        send(v)
    t1 = time.perf_counter()
    sock.close(linger=int(CASE_S_MAX * 1000))  # waits until everything queued went out
    ctx.term()
    return {"t0": t0, "t1": t1, "n": count}


def zmq_pull(port: int, count: int) -> dict:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(f"tcp://127.0.0.1:{port}")
    sock.rcvtimeo = int(CASE_S_MAX * 1000)
    n = s = 0
    t0 = _ready_then_go()
    recv = sock.recv
    try:
        while n < count:
            v = recv()
            n += 1
            s += v[-1]
    except zmq.Again:
        pass
    t1 = time.perf_counter()
    sock.close(linger=0)
    ctx.term()
    return {"t0": t0, "t1": t1, "n": n, "sum": s}


WORKERS = {
    "shmbroker-produce": lambda a: shmbroker_produce(a[0], a[1], int(a[2]), int(a[3])),
    "shmbroker-consume": lambda a: shmbroker_consume(a[0], a[1], int(a[2]), int(a[3])),
    "redis-produce": lambda a: redis_produce(int(a[0]), a[1], int(a[2])),
    "redis-consume": lambda a: redis_consume(int(a[0]), a[1], int(a[2])),
    "zmq-push": lambda a: zmq_push(int(a[0]), int(a[1])),
    "zmq-pull": lambda a: zmq_pull(int(a[0]), int(a[1])),
}


def worker_main(role: str, args: list[str]) -> int:
    # Die with the parent, so a benchmark killed outright leaves nothing running.
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    print(json.dumps(WORKERS[role](args)), flush=True)
    return 0


# --- parent ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workers:
    """Worker processes started together, released by one ``go``, each reporting one line."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, role: str, *args) -> None:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", role,
                                 *map(str, args)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)

    def run(self) -> list[dict]:
        """Wait for every worker's ``ready``, say ``go`` to all, collect their reports."""
        deadline = time.monotonic() + READY_S_MAX
        for proc in self.procs:
            line = _readline(proc, deadline)
            if line != "ready":
                raise RuntimeError(f"a worker did not get ready (said {line!r})")
        for proc in self.procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        deadline = time.monotonic() + CASE_S_MAX + 10
        reports = []
        for proc in self.procs:
            line = _readline(proc, deadline)
            reports.append(json.loads(line))
        return reports

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for f in (proc.stdin, proc.stdout):
                f.close()
        self.procs = []


def _readline(proc: subprocess.Popen, deadline: float) -> str:
    import select
    left = deadline - time.monotonic()
    ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
    if not ready:
        raise RuntimeError("a worker did not answer in time")
    return proc.stdout.readline().strip()


def rate(reports: list[dict], expected_n: int, expected_sum: int | None) -> float | str:
    for r in reports:
        if r["n"] != expected_n or (expected_sum is not None and r.get("sum") != expected_sum):
            return "BAD"
    start = min(r["t0"] for r in reports)
    end = max(r["t1"] for r in reports)
    return len(reports) * expected_n / (end - start)


class Broker:
    def __init__(self, tmp: str):
        self.data_dir = os.path.join(tmp, "broker")
        self.log = open(os.path.join(tmp, "broker.log"), "wb")
        exe = os.path.join(os.path.dirname(sys.executable), "shmbroker")
        cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "shmbroker"]
        self.proc = subprocess.Popen(
            cmd + ["serve", "--data-dir", self.data_dir, "--listen", "tcp://127.0.0.1:*"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + READY_S_MAX
        path = os.path.join(self.data_dir, "runtime.json")
        self.address = None
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with open(path) as f:
                    self.address = json.load(f).get("router_endpoint")
            except (OSError, ValueError):
                pass
            if self.address:
                break
            time.sleep(0.1)
        if not self.address:
            self.stop()
            raise RuntimeError(f"the broker did not start (see {self.log.name})")

    def topic(self, name: str, partitions: int) -> None:
        from shmbroker import Admin
        with Admin(broker=self.address) as admin:
            admin.create_topic(name, partitions)
        # The partitions' processes start after the reply: wait until a producer is served.
        deadline = time.monotonic() + READY_S_MAX
        while time.monotonic() < deadline:
            with open(os.path.join(self.data_dir, "runtime.json")) as f:
                served = {(p.get("topic"), p.get("partition"))
                          for p in json.load(f).get("processes", []) if p.get("role") == "partition"}
            if all((name, i) in served for i in range(partitions)):
                return
            time.sleep(0.1)
        raise RuntimeError(f"topic {name}'s partitions were not served in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


class Redis:
    def __init__(self, tmp: str):
        self.proc = None
        self.missing = ""
        exe = shutil.which("redis-server")
        try:
            import redis
        except ImportError:
            self.missing = "redis-py not installed (make bench installs it)"
            return
        if not exe:
            self.missing = "redis-server not installed (apt-get install redis-server)"
            return
        self.port = free_port()
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", tmp, "--loglevel", "warning"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + READY_S_MAX
        while time.monotonic() < deadline:
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        self.missing = "redis-server did not start"

    def version(self) -> str:
        return self.client.info().get("redis_version", "?") if not self.missing else "-"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def run_case(start_workers) -> float | str:
    workers = Workers()
    try:
        return start_workers(workers)
    except (RuntimeError, ValueError) as exc:
        return f"FAILED ({exc})"
    finally:
        workers.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker_main(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000, help="messages per client")
    parser.add_argument("--clients", default="1,4", help="client counts, e.g. 1,4")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="shmbroker,zmq,redis")
    parser.add_argument("--cold-gib", type=float, default=1.0,
                        help="GiB of the sendfile vs read()+send() replay (0: skip)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    only = set(args.only.split(","))
    n, expected_sum = args.count, checksum(args.count)
    tmp = tempfile.mkdtemp(prefix="bench-remote-")
    results: dict[tuple[str, str, int], list] = {}
    notes = []
    broker = redis = None
    try:
        if "shmbroker" in only:
            broker = Broker(tmp)
        if "redis" in only:
            redis = Redis(tmp)
            if redis.missing:
                notes.append(f"Redis skipped: {redis.missing}")
                redis = None
        for c in counts:
            for run in range(args.runs):
                tag = f"c{c}r{run}"
                if broker:
                    topic = f"bench-{tag}"
                    broker.topic(topic, c)

                    def produce(w, topic=topic, c=c):
                        for p in range(c):
                            w.start("shmbroker-produce", broker.address, topic, p, n)
                        return rate(w.run(), n, None)

                    def consume(w, topic=topic, c=c):
                        for p in range(c):
                            w.start("shmbroker-consume", broker.address, topic, p, n)
                        return rate(w.run(), n, expected_sum)

                    results.setdefault(("produce", "shmbroker", c), []).append(run_case(produce))
                    results.setdefault(("consume", "shmbroker", c), []).append(run_case(consume))
                if redis:
                    def rproduce(w, tag=tag, c=c):
                        for p in range(c):
                            w.start("redis-produce", redis.port, f"s-{tag}-{p}", n)
                        return rate(w.run(), n, None)

                    def rconsume(w, tag=tag, c=c):
                        for p in range(c):
                            w.start("redis-consume", redis.port, f"s-{tag}-{p}", n)
                        return rate(w.run(), n, expected_sum)

                    results.setdefault(("produce", "redis", c), []).append(run_case(rproduce))
                    results.setdefault(("consume", "redis", c), []).append(run_case(rconsume))
                    redis.client.flushall()
                if "zmq" in only:
                    def transfer(w, c=c):
                        ports = [free_port() for _ in range(c)]
                        for port in ports:
                            w.start("zmq-pull", port, n)
                        for port in ports:
                            w.start("zmq-push", port, n)
                        reports = w.run()
                        pulls = reports[:c]
                        bad = rate(pulls, n, expected_sum)
                        if bad == "BAD":
                            return bad
                        return c * n / (max(r["t1"] for r in pulls) - min(r["t0"] for r in reports))

                    value = run_case(transfer)
                    results.setdefault(("produce", "zmq", c), []).append(value)
                    results.setdefault(("consume", "zmq", c), []).append(value)
                print(f"  done: {c} client(s), run {run + 1}/{args.runs}", file=sys.stderr)
        if args.cold_gib > 0:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import bench_cold_read

            cold = bench_cold_read.bench_transfer(tmp, args.cold_gib, args.runs)
            print("  done: cold replay", file=sys.stderr)
        else:
            cold = None
    finally:
        if broker:
            broker.stop()
        if redis:
            redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(render(results, counts, n, args.runs, notes, redis_version=_redis_version(),
                 cold=cold))
    return 0


def _redis_version() -> str:
    exe = shutil.which("redis-server")
    if not exe:
        return "-"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return out.split()[2].removeprefix("v=") if len(out.split()) > 2 else out.strip()


def median(values: list) -> float | str:
    numbers = [v for v in values if isinstance(v, float)]
    if len(numbers) != len(values):
        return next(v for v in values if not isinstance(v, float))
    return statistics.median(numbers)


def fmt(value) -> str:
    if isinstance(value, str):
        return value
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.0f}k"


def render(results, counts, n, runs, notes, redis_version, cold=None) -> str:
    import platform
    import zmq
    lines = [f"bench_remote: {MSG_BYTES} B messages, {n} per client, median of {runs} run(s), "
             f"loopback TCP; {os.cpu_count()} CPUs, Python {platform.python_version()}, "
             f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}), redis-server {redis_version}",
             "",
             f"{'case':<34}{'shmbroker (durable)':>22}{'pyzmq PUSH/PULL':>18}"
             f"{'Redis Streams':>16}{'shmbroker/Redis':>18}"]
    verdicts = []
    for kind in ("produce", "consume"):
        for c in counts:
            cells = {s: median(results[(kind, s, c)]) if (kind, s, c) in results else "-"
                     for s in ("shmbroker", "zmq", "redis")}
            ours, theirs = cells["shmbroker"], cells["redis"]
            ratio = f"{ours / theirs:.2f}x" if isinstance(ours, float) and \
                isinstance(theirs, float) else "-"
            lines.append(f"{f'{kind}, {c} client(s), msgs/s':<34}{fmt(ours):>22}"
                         f"{fmt(cells['zmq']):>18}{fmt(theirs):>16}{ratio:>18}")
            if ratio != "-":
                verdicts.append(f"target remote {kind} >= 2x Redis Streams, {c} client(s): "
                                f"{'PASS' if ours >= 2 * theirs else 'MISS'} ({ratio})")
    if cold is not None:
        send, copy = cold["sendfile"]["mb_s_median"], cold["read+sendall"]["mb_s_median"]
        ratio = cold["ratio_median"]
        lines += ["", f"cold replay, {cold['bytes'] / (1 << 30):.2f} GiB over loopback TCP: "
                      f"sendfile {send:,.0f} MB/s, read()+sendall() {copy:,.0f} MB/s "
                      f"(sender CPU {cold['sendfile']['sender_cpu_s_median']:.2f} s vs "
                      f"{cold['read+sendall']['sender_cpu_s_median']:.2f} s)"]
        verdicts.append(f"target cold replay sendfile >= 1.5x read()+sendall(): "
                        f"{'PASS' if ratio >= 1.5 else 'MISS'} ({ratio:.2f}x)")
    return "\n".join(lines + [""] + verdicts + notes)


if __name__ == "__main__":
    sys.exit(main())
