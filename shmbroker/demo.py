"""`make run` / `shmbroker demo`: the broker end to end, printed step by step.

:func:`run_broker_demo` (the default) starts `shmbroker serve` on the data directory, creates a
topic, runs producer and consumer processes against it through shared memory, prints what each
did and how fast, and stops the broker cleanly. :func:`run_log_demo` (``--log-only``) shows the
partition log alone, without any broker process.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from typing import TextIO

from . import records
from .config import LogConfig, MiB
from .log import PartitionLog

TOPIC_DIR = "log-demo-0"
BATCH_RECORDS = 1000


def run_log_demo(data_dir: str, out: TextIO, records_total: int = 200_000) -> int:
    records_total = max(BATCH_RECORDS, records_total)
    say = lambda text="": print(text, file=out, flush=True)  # noqa: E731
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    directory = os.path.join(data_dir, TOPIC_DIR)
    if os.path.isdir(directory):
        shutil.rmtree(directory)  # the demo starts afresh each run; it owns only this directory
    config = LogConfig(segment_bytes=16 * MiB)
    say(f"shmbroker demo: partition log in {directory}")
    say(f"  segment_bytes={config.segment_bytes}, index every {config.index_interval_bytes} bytes")

    log = PartitionLog.open(directory, config)
    try:
        batches = _encode(records_total)
        t0 = time.perf_counter()
        for batch in batches:
            log.append(batch)
        log.flush()
        elapsed = time.perf_counter() - t0
        size = sum(len(b) for b in batches)
        say(f"appended {records_total:,} records in {len(batches)} batches "
            f"({size / 1e6:.1f} MB) in {elapsed * 1e3:.1f} ms including the final fsync: "
            f"{records_total / elapsed / 1e6:.2f} M records/s, {size / elapsed / 1e6:.0f} MB/s")
        say(f"log start offset {log.log_start_offset}, end offset {log.log_end_offset}, "
            f"{len(log.segments)} segments:")
        for name in sorted(os.listdir(directory)):
            say(f"    {name:32s} {os.path.getsize(os.path.join(directory, name)):>12,} bytes")

        t0 = time.perf_counter()
        offset, seen, checksum = 0, 0, 0
        while offset < log.log_end_offset:
            piece = log.read(offset, 1 * MiB)
            for record in records.decode_records(piece.data):
                if record.offset >= offset:
                    seen += 1
                    checksum ^= hash(record.value)
            offset = piece.last_offset + 1
        elapsed = time.perf_counter() - t0
        say(f"read back {seen:,} records (zero-copy mmap views, CRC-checked) in {elapsed * 1e3:.1f} ms: "
            f"{seen / elapsed / 1e6:.2f} M records/s")
        assert seen == records_total, (seen, records_total)

        middle = records_total // 2
        piece = log.read(middle, 1)
        first = next(r for r in records.decode_records(piece.data) if r.offset == middle)
        say(f"offset {middle}: key={first.key!r} value={bytes(first.value[:24])!r}... "
            f"in {os.path.basename(piece.path)} at byte {piece.file_position}")
        found = log.offset_for_timestamp(first.timestamp)
        say(f"first offset with timestamp >= {first.timestamp}: {found}")
        say(f"inspect the files with: shmbroker dump-log {directory} --max-records 5")
    finally:
        log.close()
    return 0


def _encode(records_total: int) -> list[bytes]:
    now_ms = time.time_ns() // 1_000_000
    out = []
    for start in range(0, records_total, BATCH_RECORDS):
        n = min(BATCH_RECORDS, records_total - start)
        values = [b"event %08d " % (start + i) + b"x" * 88 for i in range(n)]
        keys = [b"user-%d" % ((start + i) % 97) for i in range(n)]
        out.append(records.encode_batch(values, keys, timestamp=now_ms + start // BATCH_RECORDS))
    return out


# --- the broker demo ---------------------------------------------------------------------------

DEMO_TOPIC = "demo-events"
DEMO_PARTITIONS = 4
DEMO_PRODUCERS = 2
DEMO_CONSUMERS = 2
#: Every wait of the demo is bounded by this.
DEMO_WAIT_S_MAX = 60.0


def _produce_worker(data_dir: str, worker: int, count: int) -> tuple[int, float, int]:
    """A producer process: ``count`` keyed messages, acks=1. Returns (sent, seconds, checksum)."""
    from .client.producer import Producer

    checksum = 0
    with Producer(broker=data_dir, acks=1) as producer:
        t0 = time.perf_counter()
        futures = []
        for i in range(count):
            value = b"worker %d event %08d " % (worker, i) + b"." * 72
            checksum ^= zlib.crc32(value)
            futures.append(producer.send(DEMO_TOPIC, value, key=b"user-%d" % (i % 1000)))
        producer.flush()
        for f in futures[-1:]:
            f.result(timeout=DEMO_WAIT_S_MAX)  # the last future resolving means all were appended
        return count, time.perf_counter() - t0, checksum


def _consume_worker(data_dir: str, partitions: list[int], expected: int) -> tuple[int, float, int, str]:
    """A consumer process: reads its partitions from the beginning until ``expected`` records
    arrived (or the deadline). Returns (records, seconds, checksum, first record)."""
    from .client.consumer import Consumer

    seen, checksum, first = 0, 0, ""
    deadline = time.monotonic() + DEMO_WAIT_S_MAX
    with Consumer(broker=data_dir, auto_offset_reset="earliest") as consumer:
        consumer.assign([(DEMO_TOPIC, p) for p in partitions])
        t0 = time.perf_counter()
        while seen < expected and time.monotonic() < deadline:  # bounded by the deadline
            for r in consumer.poll(timeout_ms=500, max_records=10_000):
                if not first:
                    first = f"{DEMO_TOPIC}/{r.partition}@{r.offset} key={r.key!r} value={bytes(r.value[:22])!r}"
                checksum ^= zlib.crc32(r.value)
                seen += 1
        return seen, time.perf_counter() - t0, checksum, first


def run_broker_demo(data_dir: str, out: TextIO, records_total: int = 200_000) -> int:
    say = lambda text="": print(text, file=out, flush=True)  # noqa: E731
    per_producer = max(1, records_total // DEMO_PRODUCERS)
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    log_path = os.path.join(data_dir, "demo-broker.log")
    # No router: the demo's clients use shared memory, and a broker already on this host may
    # hold serve's default port (7070), which must not break `make run`.
    say(f"shmbroker demo: starting `shmbroker serve --data-dir {data_dir} --listen none` (its "
        f"log: {log_path})")
    with open(log_path, "ab") as broker_log:
        broker = subprocess.Popen([sys.executable, "-m", "shmbroker", "serve", "--data-dir", data_dir,
                                   "--listen", "none"],
                                  stdout=broker_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        with _wait_for_broker(data_dir, broker, log_path) as admin:
            if DEMO_TOPIC in admin.list_topics():
                admin.delete_topic(DEMO_TOPIC)  # the demo starts afresh; it owns only this topic
            admin.create_topic(DEMO_TOPIC, DEMO_PARTITIONS)
        say(f"broker up (supervisor pid {broker.pid}); topic {DEMO_TOPIC!r} with {DEMO_PARTITIONS} "
            f"partitions, one OS process each:")
        for line in _broker_processes(data_dir):
            say(f"    {line}")

        ctx = multiprocessing.get_context("spawn")
        total = per_producer * DEMO_PRODUCERS
        expected = _expected_per_partition(per_producer)
        shares = [list(range(DEMO_PARTITIONS))[i::DEMO_CONSUMERS] for i in range(DEMO_CONSUMERS)]
        with ctx.Pool(DEMO_PRODUCERS + DEMO_CONSUMERS) as pool:
            # Consumers start first and block in poll: the partitions' watermarks wake them.
            consumers = [pool.apply_async(_consume_worker, (data_dir, share, sum(expected[p] for p in share)))
                         for share in shares]
            producers = [pool.apply_async(_produce_worker, (data_dir, w, per_producer))
                         for w in range(DEMO_PRODUCERS)]
            sent_checksum = 0
            for w, result in enumerate(producers):
                sent, seconds, checksum = result.get(timeout=DEMO_WAIT_S_MAX)
                sent_checksum ^= checksum
                say(f"producer process {w}: {sent:,} keyed messages of 100 B, acks=1 (each appended "
                    f"to the log), in {seconds:.2f} s: {sent / seconds / 1e6:.2f} M msgs/s")
            ends = _end_offsets(data_dir)
            say("partition end offsets: " + ", ".join(f"{p}: {ends[p]:,}" for p in sorted(ends)) +
                f" (Kafka's murmur2 on the keys predicted {', '.join(f'{expected[p]:,}' for p in sorted(expected))})")
            got_checksum, got = 0, 0
            for share, result in zip(shares, consumers):
                seen, seconds, checksum, first = result.get(timeout=DEMO_WAIT_S_MAX + 10)
                got_checksum ^= checksum
                got += seen
                say(f"consumer process for partitions {share}: {seen:,} records, read live from the "
                    f"mmapped segments, in {seconds:.2f} s")
                say(f"    first: {first}")
        ok = got == total and got_checksum == sent_checksum
        say(f"{'OK' if ok else 'MISMATCH'}: {got:,} of {total:,} records consumed, checksums "
            f"{'equal' if got_checksum == sent_checksum else 'differ'}")
        say(f"try: .venv/bin/shmbroker consume {DEMO_TOPIC} --data-dir {data_dir} --from-beginning "
            f"--max-messages 3 --format '%p/%o %k %s\\n'  (while a broker runs)")
        return 0 if ok else 1
    finally:
        _stop_broker(broker, say)


def _expected_per_partition(per_producer: int) -> dict[int, int]:
    """Where the producers' keys land, computed here with the same murmur2 mapping."""
    counts = {p: 0 for p in range(DEMO_PARTITIONS)}
    for i in range(per_producer):
        counts[records.partition_for_key(b"user-%d" % (i % 1000), DEMO_PARTITIONS)] += DEMO_PRODUCERS
    return counts


def _wait_for_broker(data_dir: str, broker: subprocess.Popen, log_path: str):
    """An Admin connected to the broker we just started, once it answers (bounded wait)."""
    from . import errors
    from .client.admin import Admin

    deadline = time.monotonic() + DEMO_WAIT_S_MAX
    while True:  # bounded by the deadline
        if broker.poll() is not None:
            with open(log_path, errors="replace") as f:
                tail = f.read()[-2000:]
            raise errors.BrokerNotRunningError(f"the broker exited with status {broker.returncode}:\n{tail}")
        admin = None
        try:
            admin = Admin(broker=data_dir)
            admin.list_topics()
            return admin
        except errors.BrokerNotRunningError:
            if admin is not None:
                admin.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _broker_processes(data_dir: str) -> list[str]:
    import json

    try:
        with open(os.path.join(data_dir, "runtime.json")) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return ["(runtime.json not readable)"]
    out = []
    for p in doc.get("processes", []):
        what = f"partition {p['topic']}/{p['partition']}" if p["role"] == "partition" else p["role"]
        out.append(f"pid {p['pid']:>7}  shmbroker: {what}")
    return out


def _end_offsets(data_dir: str) -> dict[int, int]:
    from .client.consumer import Consumer

    with Consumer(broker=data_dir) as consumer:
        tps = [(DEMO_TOPIC, p) for p in range(DEMO_PARTITIONS)]
        consumer.assign(tps)
        return {tp[1]: end for tp, end in consumer.end_offsets(tps).items()}


def _stop_broker(broker: subprocess.Popen, say) -> None:
    if broker.poll() is None:
        broker.send_signal(signal.SIGTERM)
        try:
            status = broker.wait(timeout=DEMO_WAIT_S_MAX)
        except subprocess.TimeoutExpired:
            broker.kill()
            status = broker.wait(timeout=DEMO_WAIT_S_MAX)
        say(f"broker stopped with SIGTERM: exit status {status} (rings drained, logs flushed, "
            f"shared memory removed)")
