#!/usr/bin/env python3
"""Partition-log and records throughput next to what this machine can do (issue 2).

Usage::

    .venv/bin/python perf/bench_log.py [--quick] [--dir DIR] [--json PATH]

Prints a header naming the host, then one table:

* the machine: raw sequential write bandwidth to the same directory as the log (``os.write`` of
  1 MiB buffers into one file, page cache, once without and once with a final fsync; also
  writes of the 16 KiB batches' size, for context) and memcpy bandwidth (``numpy.copyto`` of
  256 MiB);
* ``PartitionLog.append`` of pre-encoded batches (100 B and 1 KiB records, ~1 MiB and ~16 KiB
  batches), the same number of bytes as the raw write, without and with a final ``flush()``,
  and the ratio to the raw write of the same kind;
* ``records.encode_batch`` from a list of bytes and from a 2-D uint8 array;
* reading: ``PartitionLog.read`` over the whole log (views only; the log checks each
  returned batch's CRC), ``decode_records`` into
  Python ``Record`` objects, ``decode_columnar`` into numpy, ``scan_batches`` with CRC, and
  ``crc32c`` alone;
* the issue-2 targets, PASS or MISS, with the measured ratio.

Every number is the median of 3 repetitions (memcpy: best of 5), timed with
``time.perf_counter`` and the garbage collector disabled. MB = 10**6 bytes, GB = 10**9 bytes.
The raw write and the append runs are interleaved (each round runs all of them once) and each
is preceded by an untimed touch of as much memory as it writes (``warm_memory``), so that the
ratio compares the log with the disk, not with a pause of the VM.
Files go under ``--dir`` (default: a fresh temporary directory under ``perf/out/``, which git
ignores, so on the same disk as the repository); they are deleted between repetitions and the
directory is removed at the end. A full run takes under 2 minutes, ``--quick`` under 20 s
(smaller totals, so its numbers are noisier).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from machine import cpu_model, filesystem_of, git_commit, memory_total  # noqa: E402  (perf/)
from shmbroker import _native, records  # noqa: E402
from shmbroker.config import LogConfig  # noqa: E402
from shmbroker.layout.record_batch import HEADER_SIZE  # noqa: E402
from shmbroker.log import PartitionLog  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
MB = 1e6
REPS = 3
MEMCPY_REPS = 5
RECORD_SIZES = (100, 1024)
#: (label, batch size in bytes): every append config uses pre-encoded batches of this size.
BATCH_SIZES = (("1 MiB", 1 * MiB), ("16 KiB", 16 * KiB))
#: Bytes a consumer asks for per read (Kafka's max.partition.fetch.bytes default).
READ_BYTES_MAX = 1 * MiB
#: The record size the records/s targets are judged on (Kafka's usual benchmark size).
TARGET_RECORD_BYTES = 100

#: Memory touched before each timed write beyond the bytes it writes (see warm_memory).
WARM_EXTRA_BYTES = 64 * MiB

TARGET_APPEND_RATIO = 0.70
TARGET_DECODE_RPS = 2e6
TARGET_COLUMNAR_RPS = 20e6


@dataclass
class Sizes:
    write_bytes: int      # raw write and each append configuration
    memcpy_bytes: int
    encode_bytes: int     # per repetition, per encode line
    decode_bytes: int     # of the log decoded into Record objects per repetition
    crc_bytes: int


FULL = Sizes(512 * MiB, 256 * MiB, 32 * MiB, 64 * MiB, 64 * MiB)
QUICK = Sizes(64 * MiB, 64 * MiB, 8 * MiB, 16 * MiB, 64 * MiB)


@dataclass
class Row:
    section: str
    name: str
    value: float
    unit: str
    ratio: str = ""   # vs raw write, where that comparison means something
    note: str = ""
    samples: list[float] = field(default_factory=list)


# --- timing ---------------------------------------------------------------------------------


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def timed(fn: Callable[[], object]) -> float:
    with no_gc():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# --- the host -------------------------------------------------------------------------------










def header(directory: str, quick: bool) -> dict[str, str]:
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": f"{cores} logical ({usable} usable by this process)",
        "memory": memory_total(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "numpy": np.__version__,
        "crc32c": _native.crc32c_impl(),
        "commit": git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "directory": f"{directory} ({filesystem_of(os.path.realpath(directory))})",
        "mode": "quick" if quick else "full",
        "method": f"median of {REPS} repetitions (memcpy: best of {MEMCPY_REPS}); "
                  "time.perf_counter, gc disabled; MB = 1e6 bytes; raw write and appends "
                  "interleaved, memory warmed before each (see warm_memory)",
    }


# --- the machine ----------------------------------------------------------------------------


def warm_memory(nbytes: int) -> None:
    """Touch and free ``nbytes`` of memory just before a timed write.

    On a VM whose balloon driver hands idle free pages back to the host (free page reporting,
    after ~2 s), the first write into such pages runs at a tenth of the normal speed, so
    whichever benchmark runs after a pause looks slow. Touching the memory first makes every
    timed write, raw or log, land on pages the host already backs. Not timed; done before
    every raw write and every append run alike.
    """
    a = np.empty(nbytes, dtype=np.uint8)
    a.fill(1)
    del a


def raw_write_once(directory: str, buf: bytes, count: int, rep: int) -> tuple[float, float]:
    """os.write of ``buf`` ``count`` times into one new file, then fsync: (write s, write+fsync s)."""
    path = os.path.join(directory, f"raw-write-{rep}.bin")
    warm_memory(count * len(buf) + WARM_EXTRA_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with no_gc():
            t0 = time.perf_counter()
            for _ in range(count):
                os.write(fd, buf)
            t1 = time.perf_counter()
            os.fsync(fd)
            t2 = time.perf_counter()
    finally:
        os.close(fd)
        os.unlink(path)
    return t1 - t0, t2 - t0


def bench_memcpy(total: int) -> Row:
    src = np.random.default_rng(1).integers(0, 255, total, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the destination pages once
    times = [timed(lambda: np.copyto(dst, src)) for _ in range(MEMCPY_REPS)]
    return Row("machine", "memcpy (numpy.copyto)", total / min(times) / MB, "MB/s",
               note=f"{total // MiB} MiB, best of {MEMCPY_REPS}", samples=times)


# --- batches ----------------------------------------------------------------------------------


def records_per_batch(record_bytes: int, batch_bytes: int) -> int:
    """The most records of ``record_bytes`` that fit a batch of at most ``batch_bytes``."""
    value = b"x" * record_bytes
    n = max(1, (batch_bytes - HEADER_SIZE) // (record_bytes + 8))
    while n > 1 and len(records.encode_batch([value] * n, timestamp=0)) > batch_bytes:
        n -= max(1, n // 100)
    return n


def batch_pool(record_bytes: int, batch_bytes: int, pool_bytes: int = 8 * MiB) -> tuple[list[bytes], int]:
    """Distinct pre-encoded batches (random values) cycled by the append benchmark."""
    n = records_per_batch(record_bytes, batch_bytes)
    rng = np.random.default_rng(record_bytes * 7 + batch_bytes)
    now_ms = time.time_ns() // 1_000_000
    pool = []
    for _ in range(max(4, pool_bytes // batch_bytes)):
        values = rng.integers(0, 256, (n, record_bytes), dtype=np.uint8)
        pool.append(records.encode_batch(values, timestamp=now_ms))
    return pool, n


# --- the log ----------------------------------------------------------------------------------


def log_config(batch_bytes: int) -> LogConfig:
    # Kafka's defaults (1 GiB segments: one segment for the whole run) except the batch limit,
    # which must admit our largest batch.
    return LogConfig(batch_bytes_max=max(LogConfig().batch_bytes_max, batch_bytes))


@dataclass
class AppendConfig:
    record_bytes: int
    batch_label: str
    batch_bytes: int
    batches: list[bytes]      # what one repetition appends, in order (cycling a pool)
    per_batch: int            # records per batch
    plain: list[float] = field(default_factory=list)
    flushed: list[float] = field(default_factory=list)
    kept: str | None = None   # the last repetition's log, kept for the read benchmarks

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.batches)

    @property
    def records(self) -> int:
        return len(self.batches) * self.per_batch


def append_config(record_bytes: int, batch_label: str, batch_bytes: int, total: int) -> AppendConfig:
    pool, per_batch = batch_pool(record_bytes, batch_bytes)
    appends = max(1, total // len(pool[0]))
    return AppendConfig(record_bytes, batch_label, batch_bytes,
                        [pool[i % len(pool)] for i in range(appends)], per_batch)


def append_once(directory: str, cfg: AppendConfig, rep: int, keep: bool) -> None:
    """Append cfg.batches to a fresh log; record the time without and with a final flush."""
    path = os.path.join(directory, f"log-{cfg.record_bytes}-{cfg.batch_bytes}-{rep}")
    log = PartitionLog.open(path, log_config(cfg.batch_bytes))
    warm_memory(cfg.size + WARM_EXTRA_BYTES)
    try:
        append = log.append
        with no_gc():
            t0 = time.perf_counter()
            for b in cfg.batches:
                append(b)
            t1 = time.perf_counter()
            log.flush()
            t2 = time.perf_counter()
        assert log.log_end_offset == cfg.records, (log.log_end_offset, cfg.records)
    finally:
        log.close()
    cfg.plain.append(t1 - t0)
    cfg.flushed.append(t2 - t0)
    if keep:
        cfg.kept = path
    else:
        shutil.rmtree(path)


def bench_write_and_append(directory: str, total: int) -> tuple[list[Row], list[AppendConfig]]:
    """Raw writes and every append configuration, interleaved: each of the REPS rounds runs
    all of them once, so slow and fast moments of a shared disk fall on all of them alike.

    Rows: raw 1 MiB writes, the same + fsync (the baselines of the ratios), and raw writes of
    the 16 KiB batches' size (context for the 16 KiB appends, whose cost is mostly per call).
    """
    configs = [append_config(rb, label, bb, total) for rb in RECORD_SIZES for label, bb in BATCH_SIZES]
    small = len(next(c for c in configs if c.batch_bytes == 16 * KiB).batches[0])
    buf, buf_small = os.urandom(1 * MiB), os.urandom(small)
    count, count_small = total // len(buf), total // small
    plain, synced, plain_small = [], [], []
    for rep in range(REPS):
        t_plain, t_synced = raw_write_once(directory, buf, count, rep)
        plain.append(t_plain)
        synced.append(t_synced)
        plain_small.append(raw_write_once(directory, buf_small, count_small, rep)[0])
        for cfg in configs:
            append_once(directory, cfg, rep, keep=rep == REPS - 1 and cfg.batch_bytes == 1 * MiB)
    size, size_small = count * len(buf), count_small * small
    note = f"{size // MiB} MiB in 1 MiB os.write calls"
    rows = [
        Row("machine", "raw sequential write, page cache", size / median(plain) / MB, "MB/s",
            note=note, samples=plain),
        Row("machine", "raw sequential write + final fsync", size / median(synced) / MB,
            "MB/s", note=note, samples=synced),
        Row("machine", f"raw sequential write, {small} B writes", size_small / median(plain_small) / MB,
            "MB/s", note=f"{size_small // MiB} MiB; the size of the 16 KiB batches (context only)",
            samples=plain_small),
    ]
    return rows, configs


def append_rows(cfg: AppendConfig, raw: Row, raw_sync: Row, raw_small: Row) -> list[Row]:
    name = f"append {cfg.record_bytes} B records, {cfg.batch_label} batches"
    rows = []
    for suffix, samples, base in (("", cfg.plain, raw), (" + flush", cfg.flushed, raw_sync)):
        t = median(samples)
        mbs = cfg.size / t / MB
        note = (f"{mbs:,.0f} MB/s; {cfg.per_batch} rec/batch, {len(cfg.batches)} appends, "
                f"{t / len(cfg.batches) * 1e6:.1f} us/append")
        if cfg.batch_bytes != 1 * MiB and not suffix:
            note += f"; {mbs / raw_small.value:.0%} of same-size raw writes"
        rows.append(Row("append", name + suffix, cfg.records / t, "rec/s",
                        ratio=f"{mbs / base.value:.0%}", note=note, samples=samples))
    return rows


def read_all(log: PartitionLog, consume: Callable[[memoryview], int]) -> tuple[int, int]:
    """log.read from offset 0 to the end, ``READ_BYTES_MAX`` at a time; (bytes, consumed)."""
    offset, end = 0, log.log_end_offset
    total_bytes = total = 0
    while offset < end:
        piece = log.read(offset, READ_BYTES_MAX)
        view = piece.data
        total_bytes += len(view)
        total += consume(view)
        offset = piece.next_offset
    return total_bytes, total


def read_prefix(log: PartitionLog, limit_bytes: int) -> list[memoryview]:
    """The views of the first ``limit_bytes`` of the log, as a consumer would get them."""
    views, offset, got = [], 0, 0
    while got < limit_bytes and offset < log.log_end_offset:
        piece = log.read(offset, READ_BYTES_MAX)
        views.append(piece.data)
        got += len(piece.data)
        offset = piece.next_offset
    return views


def bench_reads(path_1k: str, path_100: str, sizes: Sizes) -> list[Row]:
    rows: list[Row] = []
    log_1k = PartitionLog.open(path_1k, log_config(1 * MiB))
    log_100 = PartitionLog.open(path_100, log_config(1 * MiB))
    try:
        # 1. Views only: what a zero-copy fetch costs.
        times, nbytes = [], 0
        for _ in range(REPS):
            with no_gc():
                t0 = time.perf_counter()
                nbytes, _ = read_all(log_1k, lambda v: 0)
                times.append(time.perf_counter() - t0)
        rows.append(Row("read", "log.read, whole log, views only", nbytes / median(times) / MB,
                        "MB/s", note=f"{nbytes // MiB} MiB of 1 KiB records in "
                        f"{READ_BYTES_MAX // MiB} MiB reads", samples=times))

        # 2. decode_records / decode_columnar / scan_batches over views of the log.
        for record_bytes, log in ((100, log_100), (1024, log_1k)):
            views = read_prefix(log, sizes.decode_bytes)
            got = sum(len(v) for v in views)
            rows.append(decode_row(
                f"decode_records -> Record objects, {record_bytes} B", views,
                lambda v: len(records.decode_records(v)), f"{got // MiB} MiB in 1 MiB reads"))
        for record_bytes, log in ((100, log_100), (1024, log_1k)):
            views = read_prefix(log, 1 << 62)
            got = sum(len(v) for v in views)
            rows.append(decode_row(
                f"decode_columnar -> numpy, {record_bytes} B", views,
                lambda v: len(records.decode_columnar(v)), f"{got // MiB} MiB, CRC checked"))
        views = read_prefix(log_1k, 1 << 62)
        got = sum(len(v) for v in views)
        times = []
        for _ in range(REPS):
            times.append(timed(lambda: [records.scan_batches(v) for v in views]))
            assert all(records.scan_batches(v).ok for v in views[:4])
        rows.append(Row("read", "scan_batches with CRC", got / median(times) / MB, "MB/s",
                        note=f"{got // MiB} MiB of 1 KiB records", samples=times))
        del views
    finally:
        log_1k.close()
        log_100.close()

    buf = np.random.default_rng(3).integers(0, 256, sizes.crc_bytes, dtype=np.uint8)
    records.crc32c(buf)
    times = [timed(lambda: records.crc32c(buf)) for _ in range(REPS)]
    rows.append(Row("read", f"crc32c alone ({_native.crc32c_impl()})",
                    sizes.crc_bytes / median(times) / 1e9, "GB/s",
                    note=f"{sizes.crc_bytes // MiB} MiB buffer", samples=times))
    return rows


def decode_row(name: str, views: list[memoryview], fn: Callable[[memoryview], int], note: str) -> Row:
    times, count = [], 0
    for _ in range(REPS):
        with no_gc():
            t0 = time.perf_counter()
            count = 0
            for v in views:
                count += fn(v)
            times.append(time.perf_counter() - t0)
    return Row("read", name, count / median(times), "rec/s", note=f"{count} records, {note}",
               samples=times)


# --- encode -----------------------------------------------------------------------------------


def bench_encode(record_bytes: int, total: int) -> list[Row]:
    n = records_per_batch(record_bytes, 1 * MiB)
    batches = max(1, total // (n * record_bytes))
    rng = np.random.default_rng(record_bytes)
    arrays = [rng.integers(0, 256, (n, record_bytes), dtype=np.uint8) for _ in range(batches)]
    lists = [[row.tobytes() for row in a] for a in arrays]
    rows = []
    for what, inputs in (("list of bytes", lists), ("2-D uint8 array", arrays)):
        encode = records.encode_batch
        times = [timed(lambda: [encode(v, timestamp=1) for v in inputs]) for _ in range(REPS)]
        rows.append(Row("encode", f"encode_batch {record_bytes} B from {what}",
                        n * batches / median(times), "rec/s",
                        note=f"{batches} batches of {n} records", samples=times))
    return rows


# --- output -----------------------------------------------------------------------------------


def fmt_value(v: float, unit: str) -> str:
    if unit == "rec/s":
        return f"{v / 1e6:,.2f} M"
    if unit == "GB/s":
        return f"{v:,.2f}"
    return f"{v:,.0f}"


def render(head: dict[str, str], rows: list[Row], targets: list[list[str]]) -> str:
    out = ["bench_log (issue 2)"]
    width = max(len(k) for k in head)
    out += [f"  {k:<{width}}  {v}" for k, v in head.items()]
    out.append("")
    table = [["section", "measurement", "value", "unit", "vs raw write", "notes"]]
    for r in rows:
        unit = "M rec/s" if r.unit == "rec/s" else r.unit
        table.append([r.section, r.name, fmt_value(r.value, r.unit).rstrip(" M"), unit, r.ratio, r.note])
    out += align(table, right={2, 4})
    out.append("")
    out += align([["target", "required", "measured", "ratio", "result"]] + targets, right={2, 3})
    return "\n".join(out)


def align(table: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for j, row in enumerate(table):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


# --- main -------------------------------------------------------------------------------------


def run(directory: str, sizes: Sizes) -> tuple[list[Row], list[list[str]]]:
    machine, configs = bench_write_and_append(directory, sizes.write_bytes)
    raw, raw_sync, raw_small = machine
    rows: list[Row] = [*machine, bench_memcpy(sizes.memcpy_bytes)]
    for cfg in configs:
        rows += append_rows(cfg, raw, raw_sync, raw_small)
    kept = {cfg.record_bytes: cfg.kept for cfg in configs if cfg.kept}
    main_cfg = next(c for c in configs if c.record_bytes == 1024 and c.batch_bytes == 1 * MiB)
    append_1k_mbs = main_cfg.size / median(main_cfg.plain) / MB

    for record_bytes in RECORD_SIZES:
        rows += bench_encode(record_bytes, sizes.encode_bytes)
    rows += bench_reads(kept[1024], kept[100], sizes)
    for path in kept.values():
        shutil.rmtree(path)

    def find(name: str) -> Row:
        return next(r for r in rows if r.name == name)

    ratio = append_1k_mbs / raw.value
    decode = find(f"decode_records -> Record objects, {TARGET_RECORD_BYTES} B").value
    columnar = find(f"decode_columnar -> numpy, {TARGET_RECORD_BYTES} B").value
    targets = [
        ["append 1 KiB records (1 MiB batches) vs raw write", f">= {TARGET_APPEND_RATIO:.0%}",
         f"{append_1k_mbs:,.0f} / {raw.value:,.0f} MB/s", f"{ratio:.1%}",
         "PASS" if ratio >= TARGET_APPEND_RATIO else "MISS"],
        [f"decode_records, {TARGET_RECORD_BYTES} B records", f">= {TARGET_DECODE_RPS / 1e6:.0f} M rec/s",
         f"{decode / 1e6:.2f} M rec/s", f"{decode / TARGET_DECODE_RPS:.2f}x",
         "PASS" if decode >= TARGET_DECODE_RPS else "MISS"],
        [f"decode_columnar, {TARGET_RECORD_BYTES} B records", f">= {TARGET_COLUMNAR_RPS / 1e6:.0f} M rec/s",
         f"{columnar / 1e6:.2f} M rec/s", f"{columnar / TARGET_COLUMNAR_RPS:.2f}x",
         "PASS" if columnar >= TARGET_COLUMNAR_RPS else "MISS"],
    ]
    return rows, targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller totals: under 20 s, noisier")
    ap.add_argument("--dir", help="where to write benchmark files (default: a temp dir under perf/out/)")
    ap.add_argument("--json", metavar="PATH", help="also write every number (and samples) here")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL

    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
        directory = tempfile.mkdtemp(prefix="bench-log-", dir=args.dir)
    else:
        out = os.path.join(REPO, "perf", "out")
        os.makedirs(out, exist_ok=True)
        directory = tempfile.mkdtemp(prefix="bench-log-", dir=out)
    started = time.perf_counter()
    try:
        head = header(directory, args.quick)
        rows, targets = run(directory, sizes)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    head["runtime"] = f"{time.perf_counter() - started:.1f} s"
    print(render(head, rows, targets))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": head,
                       "rows": [r.__dict__ for r in rows],
                       "targets": [dict(zip(["target", "required", "measured", "ratio", "result"], t))
                                   for t in targets]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
