#!/usr/bin/env python3
"""Produce and consume through the Kafka listener with confluent-kafka (librdkafka), beside
shmbroker's native local and remote paths, 1 KiB messages, in one run (issue 7).

Usage::

    .venv/bin/python perf/bench_kafka.py [--count N] [--runs R] [--py-spy OUT.txt]

One broker (``serve --listen tcp://127.0.0.1:* --kafka-listen 127.0.0.1:0``, data dir in a
temporary directory, removed at the end), one topic of one partition per path and run, every
message 1 KiB (its last byte varies, so a lost or repeated message changes the sum). Paths:

* **kafka (confluent-kafka)**: ``confluent_kafka.Producer`` with acks=1, linger.ms=5,
  lz4 off (no compression), ``produce`` + ``flush``; ``confluent_kafka.Consumer`` assigned the
  partition from the beginning, ``consume(1000)`` until every message is in. Both talk to the
  ``shmbroker: kafka`` process over loopback TCP.
* **native local**: ``Producer(broker=DATA_DIR, acks=1)`` (shared-memory rings straight into
  the partition process) and ``Consumer(broker=DATA_DIR)`` (reads the mapped segments).
* **native remote**: the same two classes with ``broker="tcp://..."`` (the router).

Time: the first send to the last acknowledgement (produce), the first message received to
the last (consume: a client's start-up, librdkafka's connection and metadata round trips,
is left out, for every path alike); clients run in this process, one path after the other. MB/s is of values
(count x 1024 bytes / 1e6 / seconds); medians over ``--runs``.

``--kafka-only``: the kafka path alone (comparing two builds of the listener). Every run also
reads the listener's CPU time (utime + stime of ``shmbroker: kafka``, /proc, 10 ms ticks)
around the kafka produce and consume calls: CPU ms per MB of values, which a busy shared host
disturbs less than MB/s.

``--py-spy OUT``: during one extra kafka produce run, ``py-spy record --format raw`` samples
the listener process (250 Hz, ``--nonblocking``, three times ``--count`` messages); the collapsed stacks go to OUT and the top
frames by own time, and the share of time under each part of the listener, are printed.

Targets (issue 7): >= 100 MB/s produce and >= 200 MB/s consume through the Kafka listener
with confluent-kafka and 1 KiB messages.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

MSG_BYTES = 1024
READY_S_MAX = 30.0
CASE_S_MAX = 300.0
PRODUCE_TARGET_MBS = 100.0
CONSUME_TARGET_MBS = 200.0


def message(i: int) -> bytes:
    return (b"%016d" % i) * (MSG_BYTES // 16)


def checksum(count: int) -> int:
    return sum(message(i)[-1] for i in range(count))


class Broker:
    """``shmbroker serve`` with the router and the Kafka listener, stopped by ``stop``."""

    def __init__(self, tmp: str):
        self.data_dir = os.path.join(tmp, "broker")
        self.log = open(os.path.join(tmp, "broker.log"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shmbroker", "serve", "--data-dir", self.data_dir,
             "--listen", "tcp://127.0.0.1:*", "--kafka-listen", "127.0.0.1:0"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + READY_S_MAX
        doc = {}
        while time.monotonic() < deadline and self.proc.poll() is None:  # bounded
            doc = self.runtime()
            if doc.get("router_endpoint") and doc.get("kafka_endpoint") and self.kafka_pid(doc):
                break
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"the broker did not start (see {self.log.name})")
        self.router = doc["router_endpoint"]
        self.kafka = doc["kafka_endpoint"]

    def runtime(self) -> dict:
        try:
            with open(os.path.join(self.data_dir, "runtime.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    @staticmethod
    def kafka_pid(doc: dict) -> int | None:
        return next((p.get("pid") for p in doc.get("processes", []) if p.get("role") == "kafka"),
                    None)

    def topic(self, name: str) -> None:
        from shmbroker import Admin
        with Admin(broker=self.router) as admin:
            admin.create_topic(name, 1)
        deadline = time.monotonic() + READY_S_MAX
        while time.monotonic() < deadline:  # bounded: the partition process starts
            served = {(p.get("topic"), p.get("partition"))
                      for p in self.runtime().get("processes", []) if p.get("role") == "partition"}
            if (name, 0) in served:
                return
            time.sleep(0.1)
        raise RuntimeError(f"topic {name} was not served in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


# --- the paths -------------------------------------------------------------------------------

KAFKA = "kafka (confluent-kafka)"


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc/PID/stat fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")



def kafka_produce(address: str, topic: str, values: list) -> float:
    import confluent_kafka as ck
    p = ck.Producer({"bootstrap.servers": address, "acks": "1", "linger.ms": 5,
                     "batch.size": 1_000_000, "queue.buffering.max.kbytes": 512 * 1024,
                     "enable.idempotence": False})
    errors = []

    def done(err, _msg):
        if err is not None:
            errors.append(err)
    t0 = time.perf_counter()
    for v in values:  # bounded by the values
        for _ in range(100_000):  # bounded: the queue drains while we poll
            try:
                p.produce(topic, v, partition=0, on_delivery=done)
                break
            except BufferError:
                p.poll(0.01)
        p.poll(0)
    left = p.flush(CASE_S_MAX)
    t1 = time.perf_counter()
    if left or errors:
        raise RuntimeError(f"kafka produce: {left} undelivered, errors {errors[:3]}")
    return t1 - t0


def kafka_consume(address: str, topic: str, count: int) -> tuple[float, int, int]:
    import confluent_kafka as ck
    c = ck.Consumer({"bootstrap.servers": address, "group.id": "bench", "enable.auto.commit": False,
                     "fetch.max.bytes": 50 * 1024 * 1024, "max.partition.fetch.bytes": 8 * 1024 * 1024,
                     "queued.max.messages.kbytes": 256 * 1024})
    try:
        c.assign([ck.TopicPartition(topic, 0, ck.OFFSET_BEGINNING)])
        n = s = 0
        t0 = None
        deadline = time.perf_counter() + CASE_S_MAX
        while n < count and time.perf_counter() < deadline:  # bounded by the deadline
            for m in c.consume(1000, 1.0):
                if m.error() is None:
                    if t0 is None:
                        t0 = time.perf_counter()
                    n += 1
                    s += m.value()[-1]
        return time.perf_counter() - (t0 or 0.0), n, s
    finally:
        c.close()


def native_produce(broker: str, topic: str, values: list) -> float:
    from shmbroker import Producer
    with Producer(broker=broker, acks=1) as producer:
        t0 = time.perf_counter()
        send = producer.send
        for v in values:
            send(topic, v, partition=0)
        producer.flush(timeout=CASE_S_MAX)
        return time.perf_counter() - t0


def native_consume(broker: str, topic: str, count: int) -> tuple[float, int, int]:
    from shmbroker import Consumer, TopicPartition
    with Consumer(broker=broker, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition(topic, 0)])
        n = s = 0
        t0 = None
        deadline = time.perf_counter() + CASE_S_MAX
        while n < count and time.perf_counter() < deadline:  # bounded by the deadline
            for r in consumer.poll(timeout_ms=1000, max_records=4096):
                if t0 is None:
                    t0 = time.perf_counter()
                n += 1
                s += r.value[-1]
        return time.perf_counter() - (t0 or 0.0), n, s


# --- py-spy ----------------------------------------------------------------------------------


def profile_listener(broker: Broker, topic: str, values: list, out: str) -> str:
    """Produce through the listener while py-spy samples it; a summary of the stacks."""
    pid = broker.kafka_pid(broker.runtime())
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250",
                             "--nonblocking", "--output", out], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches
    seconds = kafka_produce(broker.kafka, topic, values)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    if not os.path.exists(out):
        return f"py-spy wrote nothing: {proc.stderr.read().decode(errors='replace')[-500:]}"
    proc.stderr.close()
    return f"(profiled run: {len(values) * MSG_BYTES / 1e6 / seconds:.0f} MB/s)\n" + summarise(out)


def summarise(path: str, top: int = 15) -> str:
    """Own-time top frames and time under each listener part, from py-spy's raw stacks."""
    own, under, total = collections.Counter(), collections.Counter(), 0
    parts = {"socket recv/send": ("recv", "sendmsg", "send ("), "framing and parse (kafka/messages, codec)":
             ("kafka/messages.py", "kafka/codec.py"), "produce checks + ring write (router/produce)":
             ("router/produce.py",), "idempotence": ("kafka/idempotence.py",),
             "selector wait (idle)": ("select (", "poll (")}
    with open(path) as f:
        for line in f:  # bounded by the file
            stack, _, count = line.rstrip().rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for name, needles in parts.items():
                if any(needle in fr for fr in frames for needle in needles):
                    under[name] += n
    if not total:
        return "no samples"
    lines = [f"{total} samples; own time, top {top}:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines.append("time under (inclusive; parts may overlap):")
    lines += [f"  {100 * under[name] / total:5.1f}%  {name}" for name in parts]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=100_000, help="messages per case")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--py-spy", dest="py_spy", default=None, help="raw stacks output file")
    ap.add_argument("--kafka-only", action="store_true", help="only the kafka path")
    args = ap.parse_args(argv)
    values = [message(i) for i in range(args.count)]
    want = checksum(args.count)
    mb = args.count * MSG_BYTES / 1e6
    tmp = tempfile.mkdtemp(prefix="bench-kafka-")
    results = collections.defaultdict(list)
    broker = None
    try:
        broker = Broker(tmp)
        paths = {
            KAFKA: (lambda t: kafka_produce(broker.kafka, t, values),
                                        lambda t: kafka_consume(broker.kafka, t, args.count)),
            "native local": (lambda t: native_produce(broker.data_dir, t, values),
                             lambda t: native_consume(broker.data_dir, t, args.count)),
            "native remote (router)": (lambda t: native_produce(broker.router, t, values),
                                       lambda t: native_consume(broker.router, t, args.count)),
        }
        if args.kafka_only:
            paths = {KAFKA: paths[KAFKA]}
        kafka_pid = broker.kafka_pid(broker.runtime())
        for run in range(args.runs):  # bounded by --runs
            for i, (name, (produce, consume)) in enumerate(paths.items()):
                topic = f"b{run}-{i}"
                broker.topic(topic)
                cpu0 = process_cpu_s(kafka_pid)
                results[(name, "produce")].append(mb / produce(topic))
                cpu1 = process_cpu_s(kafka_pid)
                seconds, n, s = consume(topic)
                cpu2 = process_cpu_s(kafka_pid)
                results[(name, "consume")].append(mb / seconds if (n, s) == (args.count, want) else "BAD")
                if name == KAFKA:
                    results["cpu produce"].append(1000 * (cpu1 - cpu0) / mb)
                    results["cpu consume"].append(1000 * (cpu2 - cpu1) / mb)
                print(f"run {run}: {name}: produce {results[(name, 'produce')][-1]:.0f} MB/s, "
                      f"consume {results[(name, 'consume')][-1]} MB/s"
                      + (f"; listener CPU ms/MB: produce {results['cpu produce'][-1]:.2f}, "
                         f"consume {results['cpu consume'][-1]:.2f}" if name == KAFKA else ""),
                      file=sys.stderr, flush=True)
        profile = None
        if args.py_spy:
            broker.topic("profiled")
            profile = profile_listener(broker, "profiled", values * 3, os.path.abspath(args.py_spy))
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(render(results, paths, args, profile))
    return 0


def _median(values: list):
    nums = [v for v in values if not isinstance(v, str)]
    return "BAD" if len(nums) != len(values) else statistics.median(nums)


def render(results, paths, args, profile) -> str:
    out = [f"# bench_kafka: {args.count} x {MSG_BYTES} B, median of {args.runs} runs",
           f"host: {machine.cpu_model()}, {os.cpu_count()} CPUs, commit {machine.git_commit()}",
           "", "| path | produce MB/s | consume MB/s |", "|---|---|---|"]
    for name in paths:
        p, c = _median(results[(name, "produce")]), _median(results[(name, "consume")])
        out.append(f"| {name} | {p if isinstance(p, str) else f'{p:.0f}'} | "
                   f"{c if isinstance(c, str) else f'{c:.0f}'} |")
    p = _median(results[(KAFKA, "produce")])
    c = _median(results[(KAFKA, "consume")])
    ok = lambda v, t: "BAD" if isinstance(v, str) else ("met" if v >= t else "missed")  # noqa: E731
    out += ["", f"targets (kafka listener, confluent-kafka, 1 KiB): produce >= {PRODUCE_TARGET_MBS:.0f} "
            f"MB/s: {ok(p, PRODUCE_TARGET_MBS)}; consume >= {CONSUME_TARGET_MBS:.0f} MB/s: "
            f"{ok(c, CONSUME_TARGET_MBS)}"]
    out.append(f"kafka listener CPU ms per MB of values (median): produce "
               f"{_median(results['cpu produce']):.2f}, consume {_median(results['cpu consume']):.2f}")
    if profile:
        out += ["", "py-spy, listener process during a kafka produce run:", profile]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
