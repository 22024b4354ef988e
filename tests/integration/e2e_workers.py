"""Producer and consumer workers for the end-to-end tests (tests/integration/test_end_to_end.py,
tests/crash/test_end_to_end_crashes.py): real client processes against a real `shmbroker serve`.

Importable by name, so ``spawn`` and ``Pool`` workers can run them.

* A producer writes ``value(producer, seq)``: an 8-byte head (producer, seq) and random filler
  (seeded per producer, so bytes differ between records and runs of a test cannot agree by
  accident). Record ``seq`` goes to partition ``seq % partitions``. After every chunk of
  acknowledged records it appends one ``ACK_DTYPE`` row per record to its out file: seq,
  partition, the offset its future gave, crc32 of the value it sent. A row is written only
  after the future resolved, so the file lists exactly what was acknowledged (a kill may cut
  the last row: readers keep whole rows only).
* A consumer polls its assignment and keeps, per record: partition, offset, producer, seq and
  crc32 of the value it received; it saves them as ``.npz`` (``CONSUMED_FIELDS``) once it has
  seen ``expected`` records (or at its deadline), after one more poll that must find nothing.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import struct
import time
import zlib

import numpy as np
from broker_harness import WAIT_S_MAX

from shmbroker import Admin
from shmbroker.shm import names

VALUE_HEAD = struct.Struct(">II")  # producer index, sequence
VALUE_SIZE = 100
ACK_DTYPE = np.dtype([("seq", "<i8"), ("partition", "<i4"), ("offset", "<i8"), ("crc", "<u4")])
CONSUMED_FIELDS = ("partition", "offset", "producer", "seq", "crc")


def value_maker(producer: int, size: int = VALUE_SIZE):
    rng = random.Random(producer * 7919 + size)
    filler = size - VALUE_HEAD.size

    def make(seq: int) -> bytes:
        return VALUE_HEAD.pack(producer, seq) + rng.randbytes(filler)
    return make


# --- producers ----------------------------------------------------------------------------------

def produce(data_dir: str, topic: str, producer: int, count: int, partitions: int,
            out_path: str, chunk: int = 5_000, acks=1, ring_bytes: int = 1 << 20) -> None:
    """Send ``count`` records (see module doc), waiting for the acks after every chunk."""
    from shmbroker import Producer

    make = value_maker(producer)
    with Producer(broker=data_dir, acks=acks, ring_bytes=ring_bytes,
                  send_timeout_ms=60_000) as p, open(out_path, "wb") as out:
        for first in range(0, count, chunk):
            seqs = range(first, min(count, first + chunk))
            futures, crcs = [], []
            send, crc32 = p.send, zlib.crc32
            for seq in seqs:
                value = make(seq)
                crcs.append(crc32(value))
                futures.append(send(topic, value, partition=seq % partitions))
            rows = np.empty(len(seqs), ACK_DTYPE)
            rows["seq"] = seqs
            rows["partition"] = np.asarray(seqs) % partitions
            rows["offset"] = [f.result(timeout=60).offset for f in futures]
            rows["crc"] = crcs
            out.write(rows.tobytes())
            out.flush()


def read_acks(out_path: str) -> np.ndarray:
    """The ACK_DTYPE rows a producer wrote (whole rows only: a kill may cut the last one)."""
    try:
        with open(out_path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return np.empty(0, ACK_DTYPE)
    whole = len(data) - len(data) % ACK_DTYPE.itemsize
    return np.frombuffer(data[:whole], ACK_DTYPE)


# --- consumers ----------------------------------------------------------------------------------

def consume(data_dir: str, topic: str, partitions, expected: int, out_path: str,
            ready=None, progress=None, deadline_s: float = 60.0, max_records: int = 2_000,
            auto_offset_reset: str = "earliest") -> None:
    """Read ``partitions`` (None: the whole topic) until ``expected`` records were seen.

    ``ready`` (an Event) is set once assigned; ``progress`` (a shared int array of one) holds
    how many records were seen so far. Saves CONSUMED_FIELDS plus ``extra`` (records a last
    poll found after ``expected``: must be 0), ``pid`` and ``polls``.
    """
    from shmbroker import Consumer

    cols: dict[str, list] = {k: [] for k in CONSUMED_FIELDS}
    unpack, crc32 = VALUE_HEAD.unpack_from, zlib.crc32
    seen = polls = 0
    extra = -1
    deadline = time.monotonic() + deadline_s
    with Consumer(broker=data_dir, auto_offset_reset=auto_offset_reset) as consumer:
        if partitions is None:
            consumer.subscribe([topic])
        else:
            consumer.assign([(topic, p) for p in partitions])
        if ready is not None:
            ready.set()
        while seen < expected and time.monotonic() < deadline:  # bounded by the deadline
            got = consumer.poll(timeout_ms=200, max_records=max_records)
            polls += 1
            if not got:
                continue
            values = [r.value for r in got]
            cols["partition"] += [r.partition for r in got]
            cols["offset"] += [r.offset for r in got]
            heads = [unpack(v) for v in values]
            cols["producer"] += [h[0] for h in heads]
            cols["seq"] += [h[1] for h in heads]
            cols["crc"] += [crc32(v) for v in values]
            seen += len(got)
            if progress is not None:
                progress[0] = seen
        if seen >= expected:
            extra = len(consumer.poll(timeout_ms=300))
    np.savez(out_path, pid=os.getpid(), extra=extra, polls=polls,
             **{k: np.asarray(v, dtype=np.int64) for k, v in cols.items()})


def load_consumed(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


# --- checks -------------------------------------------------------------------------------------

def check_consumed_partition(consumed: dict, partition: int, acks: dict[int, np.ndarray],
                             start: int = 0, end: int | None = None) -> int:
    """What a consumer saw of ``partition``: offsets ``start..end-1`` each exactly once and in
    order (so nothing lost, nothing duplicated), every producer's records in the order it sent
    them, each acknowledged record at the offset its future gave with the crc32 its producer
    computed. Returns how many records it saw of the partition."""
    mine = consumed["partition"] == partition
    offsets = consumed["offset"][mine]
    producers, seqs, crcs = consumed["producer"][mine], consumed["seq"][mine], consumed["crc"][mine]
    if end is None:
        end = start + len(offsets)
    assert np.array_equal(offsets, np.arange(start, end)), (
        f"partition {partition}: offsets not exactly {start}..{end - 1} in order "
        f"(first bad at index {_first_mismatch(offsets, np.arange(start, end))})")
    pairs = producers * (1 << 32) + seqs
    assert len(np.unique(pairs)) == len(pairs), f"partition {partition}: a record seen twice"
    for producer, rows in acks.items():
        from_me = producers == producer
        assert np.all(np.diff(seqs[from_me]) > 0), \
            f"producer {producer}'s records out of order in partition {partition}"
        rows = rows[rows["partition"] == partition]
        if len(rows) == 0:
            continue
        assert rows["offset"].min() >= start and rows["offset"].max() < end, \
            f"partition {partition}: acknowledged offsets outside what the consumer saw"
        at = rows["offset"] - start
        assert np.array_equal(producers[at], np.full(len(rows), producer)) and \
            np.array_equal(seqs[at], rows["seq"]), \
            f"partition {partition}: producer {producer}'s records not at their acked offsets"
        assert np.array_equal(crcs[at], rows["crc"].astype(np.int64)), \
            f"partition {partition}: payload checksums differ for producer {producer}"
    return len(offsets)


def _first_mismatch(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    bad = np.flatnonzero(a[:n] != b[:n])
    return int(bad[0]) if len(bad) else n


# --- starting and stopping the test's processes (shared by the e2e and e2e-crash tests) ------

SPAWN = multiprocessing.get_context("spawn")


def create_topic(data_dir, name, partitions, config=None):
    with Admin(broker=data_dir) as admin:
        admin.create_topic(name, partitions, config)


def start(target, *args, ctx=SPAWN, **kwargs):
    proc = ctx.Process(target=target, args=args, kwargs=kwargs, daemon=True)
    proc.start()
    return proc


def join_all(procs, timeout_s: float) -> None:
    """Join within one deadline for all; assert each exited 0."""
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.1, deadline - time.monotonic()))
    for proc in procs:
        assert proc.exitcode == 0, f"worker {proc.pid} exit code {proc.exitcode}"


def stop_all(procs) -> None:
    """finally: nothing we started outlives the test."""
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(WAIT_S_MAX)


def our_shm(data_dir: str) -> list[str]:
    """This broker's objects in /dev/shm."""
    prefix = names.broker_prefix(data_dir)
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
