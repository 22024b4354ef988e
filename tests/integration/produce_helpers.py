"""Helpers for tests that produce through a real broker: producer workers that run in other
processes (importable by name, so ``spawn`` works), and a reader that takes every record of a
partition straight from its segment files.

Every value a worker sends is ``struct(producer, sequence)`` followed by filler derived from
both, so a test can tell whose record it is, in which order it was sent, and whether its bytes
arrived intact.
"""
from __future__ import annotations

import glob
import json
import os
import struct
import zlib

from shmbroker import records

VALUE_HEAD = struct.Struct(">II")  # producer index, sequence


#: The start of a script for a producer process as Producer makes one (slot, ring, READY)
#: without the Producer class, so that a test decides exactly what it commits; run it as
#: ``python -c RAW_PRODUCER + more DATA_DIR TOPIC``; it leaves ``ring``, ``ctl``, ``records``
#: and ``_native`` for what follows.
RAW_PRODUCER = r"""
import os, signal, sys
from shmbroker import records
from shmbroker.layout import shm as L
from shmbroker.native import _native
from shmbroker.shm import names
from shmbroker.shm.control import ControlRegion
from shmbroker.shm.ring import RingProducer

data_dir, topic = sys.argv[1], sys.argv[2]
prefix = names.broker_prefix(data_dir)
ctl = ControlRegion.attach(names.control_name(prefix, topic, 0))
slot, gen = ctl.claim_slot(1 << 16)
ring = RingProducer.create(names.ring_name(prefix, topic, 0, slot, gen), 1 << 16, partition=0,
                           slot=slot, generation=gen, control=ctl)
ctl.set_slot_state(slot, L.SLOT_READY)
ctl.announce_registry_change()
"""


def make_value(producer: int, seq: int, size: int = 100) -> bytes:
    head = VALUE_HEAD.pack(producer, seq)
    filler = bytes([(producer * 31 + seq) & 0xFF]) * max(0, size - len(head))
    return head + filler


def parse_value(value: bytes) -> tuple[int, int]:
    return VALUE_HEAD.unpack_from(value, 0)


def read_partition(data_dir: str, topic: str, partition: int) -> list:
    """Every record in the partition's .log files (valid batches only: a batch being written
    while we read is left out), in offset order."""
    out = []
    for path in sorted(glob.glob(os.path.join(data_dir, f"{topic}-{partition}", "*.log"))):
        with open(path, "rb") as f:
            data = f.read()
        scan = records.scan_batches(data, verify_crc=True, verify_records=True)
        out.extend(records.decode_records(memoryview(data)[:scan.valid_bytes]))
    return out


def read_topic(data_dir: str, topic: str, partitions: int) -> dict[int, list]:
    return {p: read_partition(data_dir, topic, p) for p in range(partitions)}


def produce_worker(data_dir: str, topic: str, producer: int, count: int, partitions: int,
                   out_path: str, acks=1, chunk: int = 0, value_size: int = 100,
                   ring_bytes: int = 1 << 20) -> None:
    """Send ``count`` records, record i to partition i % partitions; write the offsets the
    futures gave as JSON lines ``[seq_first, [partition, offset], ...]`` to ``out_path`` (with
    ``chunk``: after every chunk of records, so a crash test knows what was acknowledged)."""
    from shmbroker import Producer

    checksum = 0
    with Producer(broker=data_dir, acks=acks, ring_bytes=ring_bytes,
                  send_timeout_ms=60_000) as p, open(out_path, "w") as out:
        step = chunk or count
        for first in range(0, count, step):
            futures = []
            for seq in range(first, min(count, first + step)):
                value = make_value(producer, seq, value_size)
                checksum = zlib.crc32(value, checksum)
                futures.append(p.send(topic, value, partition=seq % partitions))
            acked = [list(f.result(timeout=120)[1:]) for f in futures]
            out.write(json.dumps([first, acked]) + "\n")
            out.flush()
        out.write(json.dumps(["checksum", checksum]) + "\n")


def read_acked(out_path: str) -> tuple[dict[int, tuple[int, int]], int | None]:
    """seq -> (partition, offset) of every record the worker saw acknowledged; its checksum
    (None if it did not finish)."""
    acked: dict[int, tuple[int, int]] = {}
    checksum = None
    with open(out_path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # cut by a kill
            first, data = json.loads(line)
            if first == "checksum":
                checksum = data
                continue
            for i, (partition, offset) in enumerate(data):
                acked[first + i] = (partition, offset)
    return acked, checksum


def check_exactly_once(data_dir, topic, partitions, producers: dict[int, str], count: int,
                       partial: dict[int, str] | None = None):
    """Every record of every producer present once, at the offset its future gave, in the
    order it was sent within its partition; payload checksums equal."""
    logs = read_topic(data_dir, topic, partitions)
    seen: dict[tuple[int, int], tuple[int, int]] = {}
    for p, recs in logs.items():
        last_seq: dict[int, int] = {}
        for r in recs:
            producer, seq = parse_value(r.value)
            assert (producer, seq) not in seen, f"record {producer}/{seq} appears twice"
            seen[(producer, seq)] = (p, r.offset)
            assert r.value == make_value(producer, seq, len(r.value))
            assert seq > last_seq.get(producer, -1), f"producer {producer} out of order in {p}"
            last_seq[producer] = seq
    for producer, out_path in producers.items():
        acked, checksum = read_acked(out_path)
        assert len(acked) == count, f"producer {producer} finished {len(acked)} of {count}"
        for seq, where in acked.items():
            assert seen.get((producer, seq)) == tuple(where), (producer, seq)
        values = [make_value(producer, seq) for seq in range(count)]
        assert checksum == zlib.crc32(b"".join(values))
    for producer, out_path in (partial or {}).items():
        # A producer that was killed: what it saw acknowledged is there, at those offsets.
        acked, _ = read_acked(out_path)
        for seq, where in acked.items():
            assert seen.get((producer, seq)) == tuple(where), (producer, seq)
    mine = {k for k in seen if k[0] in producers}
    assert len(mine) == count * len(producers)
    return seen



def spawn_producer(ctx, *args, **kwargs):
    proc = ctx.Process(target=produce_worker, args=args, kwargs=kwargs, daemon=True)
    proc.start()
    return proc


def assert_logs_whole(data_dir: str, topic: str, partitions: int) -> None:
    """No torn or partial batch anywhere: every .log file is valid batches to its last byte."""
    for p in range(partitions):
        for path in glob.glob(os.path.join(data_dir, f"{topic}-{p}", "*.log")):
            with open(path, "rb") as f:
                data = f.read()
            scan = records.scan_batches(data, verify_crc=True, verify_records=True)
            assert scan.ok and scan.valid_bytes == len(data), (path, scan.status_name)
