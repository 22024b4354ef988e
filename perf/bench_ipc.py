#!/usr/bin/env python3
"""shmbroker beside the IPC queues a Python user would pick instead (issue 3, section 7).

Usage::

    .venv/bin/python perf/bench_ipc.py [--quick] [--only NAMES] [--json PATH] [--quiet-wait S]

Needs the ``bench`` extra (``pip install -e '.[dev,bench]'``, which ``make bench`` does) and,
for the Redis rows, a redis-server binary (``apt-get install redis-server``).

One invocation runs, system by system, shmbroker (a broker started here with
``shmbroker serve``; every message appended to the partition log, acks=1) and the peers:
multiprocessing.Queue, faster-fifo, pyzmq PUSH/PULL over ipc://, iceoryx2 publish-subscribe,
and Redis Streams (a redis-server started here on 127.0.0.1, random port, ``--save ''
--appendonly no``; skipped with a note when redis-server is not installed). None of the peers
is durable. It prints a header naming the machine and one table:

* throughput, 1 producer -> 1 consumer, 100 B messages, per-message API and batch API
  (faster-fifo put_many/get_many, zmq send_multipart/recv_multipart, Redis pipelined XADD with
  XREAD COUNT, shmbroker send_batch/poll_columnar), batches of 1024 messages;
* throughput, 4 producers -> 4 partitions (queues, sockets, services, streams) -> 4 consumers,
  per-message API, aggregate;
* 64 KiB messages in MB/s, beside memcpy (numpy.copyto) on this machine;
* ping-pong round trips of a 100 B message between two processes, p50/p99/p99.9, blocking
  and spin mode (peers without a spin mode spin on their non-blocking call), with a raw
  os.pipe ping-pong and a Python spin on shared memory as references;
* CPU seconds per million messages for every throughput row: user+sys of every worker
  (``getrusage`` in each, all threads, from the start signal until every consumer is done)
  plus the server's processes (broker tree, redis-server) by psutil over the same interval;
* idle: the broker with 4 consumers blocked in poll and 4 idle producers, CPU % of one core
  over ``IDLE_S`` seconds (scheduler on-CPU time from /proc/PID/task/*/schedstat);

then the issue-3 targets with PASS/MISS and the measured ratios.

Method. Every case runs its producers and consumers as separate processes (multiprocessing,
spawn). Workers connect first, then wait for one start signal; the parent takes the start
time just before it gives the signal, and the end is the moment the last consumer received
its last message (time.perf_counter: CLOCK_MONOTONIC, the same clock in every process).
Each throughput case sends a fixed count per producer (per system, see ``COUNTS``); each consumer counts its messages and adds up their last bytes, and a case
whose count or checksum differs prints LOST/BAD instead of a number. Throughput numbers are
medians of 3 runs; each latency percentile is the median of 3 runs' (each ``ROUNDS`` timed
round trips after ``WARM`` untimed ones; the runs' p50/p99 are in the note). Every process started here is stopped at the end, even on failure
(stop event, then SIGTERM/SIGKILL after a timeout; workers and servers also get
PR_SET_PDEATHSIG, so a benchmark killed outright leaves nothing running); the temporary
directory under perf/out/
is removed and shared-memory objects of the broker and iceoryx2 instances started here are
checked for and removed (a leak is reported in the output). The os.pipe and shared-memory
references run first, then shmbroker (round trips first): its blocking round trip is compared
with a pipe measured seconds before. A full run takes about 4-5 minutes on the 2-core VM (with redis-server), ``--quick`` (1/8 of the counts, 1 run per case) about 25 s.
Progress goes to stderr, the table to stdout.

The machine may be shared: the column "other CPU %" says how much CPU processes outside the
case used while it ran (from /proc/stat), and ``--quiet-wait S`` waits up to S seconds before
each run for such load to go away. A row with much other load is not a clean number.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing as mp
import os
import platform
import queue
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

PERF = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(PERF)
sys.path.insert(0, PERF)

import ipc_shmbroker  # noqa: E402  (both stdlib only at the top: spawned workers import them)
import ipc_workers  # noqa: E402
from bench_pipeline import _sigterm_unwinds  # noqa: E402
from machine import cpu_model, filesystem_of, git_commit, memory_total  # noqa: E402

KiB = 1024
MB = 1e6
REPS = 3
BATCH = 1024
WARM, ROUNDS = 2_000, 20_000
QUICK_DIV = 8
IDLE_S = 3.0
#: A consumer that receives nothing for this long reports a short count (LOST).
STALL_S = 10.0
#: Longest one group of processes (one run of one case) may take before it is killed.
GROUP_S_MAX = 45.0
#: How long workers get to import and connect before a group is abandoned.
READY_S_MAX = 60.0
MEMCPY_BYTES, MEMCPY_REPS = 256 * 2**20, 5
#: faster-fifo's shared buffer (its default is 1 MB, too small for a batch of 64 KiB messages).
FASTER_FIFO_BYTES = 8 * 2**20

TARGET_MSG_RPS = 1_000_000
TARGET_VS_ZMQ = 2.0
TARGET_BATCH_RPS = 5_000_000
TARGET_FAN_RPS = 1_000_000
TARGET_BIG_MBS = 3_000
TARGET_SPIN_P50_US, TARGET_SPIN_P99_US = 5.0, 20.0
TARGET_BLOCK_VS_PIPE = 1.3
TARGET_IDLE_PCT = 1.0

LABELS = {
    "shmbroker": "shmbroker (durable, acks=1)",
    "mpqueue": "multiprocessing.Queue",
    "fasterfifo": "faster-fifo",
    "zmq": "pyzmq PUSH/PULL ipc://",
    "iceoryx2": "iceoryx2 pub/sub",
    "redis": "Redis Streams",
    "pipe": "os.pipe (reference)",
    "shmspin": "Python spin on shm (reference)",
}
ORDER = ["shmbroker", "zmq", "fasterfifo", "iceoryx2", "mpqueue", "redis", "pipe", "shmspin"]
#: The order systems run in: the os.pipe reference right before shmbroker's round trips (each
#: system runs its round trips first), so that the blocking target compares two numbers taken
#: seconds apart, not minutes, on a machine whose load may change.
RUN_ORDER = ["shmspin", "pipe", "shmbroker", "zmq", "fasterfifo", "iceoryx2", "mpqueue", "redis"]


@dataclass(frozen=True)
class Case:
    key: str
    section: str
    pairs: int
    msg_bytes: int
    batch: int
    pool_n: int


CASES = [
    Case("msg", "1->1 100 B, per-message API", 1, 100, 0, 256),
    Case("batch", "1->1 100 B, batch API (1024/batch)", 1, 100, BATCH, 256),
    Case("fan4", "4->4->4 100 B, per-message, aggregate", 4, 100, 0, 256),
    Case("big", "1->1 64 KiB messages", 1, 64 * KiB, 0, 16),
]
LATENCY_MODES = [("block", "round trip, blocking"), ("spin", "round trip, spin")]
#: More N->N->N cases (--fan-pairs), to see how the aggregate scales with processes and
#: partitions on a host with the cores for it. Each pair sends fan4's count.
EXTRA_CASES: list[Case] = []


def fan_case(pairs: int) -> Case:
    return Case(f"fan{pairs}", f"{pairs}->{pairs}->{pairs} 100 B, per-message, aggregate", pairs, 100, 0, 256)


#: --cases: only these steps (keys as progress prints them: rtt-block, rtt-spin, msg, batch,
#: fan4, big, idle); empty: all. For A/B runs of one row; the table marks the rest missing.
CASE_KEYS: set[str] = set()


def all_cases() -> list[Case]:
    return CASES + EXTRA_CASES

#: Messages per producer in a full run, per case and system: a run of each takes about
#: 0.3-2 s here (shmbroker: at its targets' rates); fixed, so every run of a row sends the
#: same. Multiples of BATCH. --quick divides by QUICK_DIV.
COUNTS: dict[str, dict[str, int]] = {
    "msg": {"shmbroker": 1024 * KiB, "zmq": 512 * KiB, "fasterfifo": 256 * KiB,
            "iceoryx2": 256 * KiB, "mpqueue": 64 * KiB, "redis": 32 * KiB},
    "batch": {"shmbroker": 4096 * KiB, "zmq": 1024 * KiB, "fasterfifo": 512 * KiB,
              "redis": 128 * KiB},
    "fan4": {"shmbroker": 256 * KiB, "zmq": 128 * KiB, "fasterfifo": 64 * KiB,
             "iceoryx2": 64 * KiB, "mpqueue": 16 * KiB, "redis": 8 * KiB},
    "big": {"shmbroker": 32 * KiB, "zmq": 16 * KiB, "fasterfifo": 16 * KiB,
            "iceoryx2": 16 * KiB, "mpqueue": 8 * KiB, "redis": 4 * KiB},
}
#: How each system's throughput rows use its API (printed in the notes).
API_NOTES = {
    ("shmbroker", "msg"): "send(partition=p); poll(max_records=4096)",
    ("shmbroker", "batch"): "send_batch(2-D uint8 array); poll_columnar",
    ("zmq", "batch"): "send_multipart / recv_multipart of 1024 frames",
    ("fasterfifo", "batch"): "put_many / get_many",
    ("redis", "msg"): "XADD each; XREAD COUNT 1024 BLOCK",
    ("redis", "batch"): "pipelined XADD x1024; XREAD COUNT 1024 BLOCK",
    ("iceoryx2", "msg"): "loan+memmove+send; consumer busy-polls receive()",
    ("mpqueue", "msg"): "unbounded Queue, put/get",
}
#: What a system cannot do, with the reason printed in its row.
NOT_APPLICABLE = {
    ("mpqueue", "batch"): "no batch API (put/get one object)",
    ("iceoryx2", "batch"): "no batch API (one sample per send)",
}
SPIN_NOTES = {
    "shmbroker": "send (no flush); Consumer(spin_us=1000), Producer(spin_ns=1e6)",
    "mpqueue": "get_nowait loop",
    "fasterfifo": "get_nowait loop",
    "zmq": "recv(NOBLOCK) loop",
    "iceoryx2": "receive() polling (native)",
    "redis": "XREAD without BLOCK, in a loop",
    "pipe": "O_NONBLOCK read loop",
    "shmspin": "8 B counters, no payload",
}
BLOCK_NOTES = {
    "shmbroker": "send (no flush); poll(timeout_ms)",
    "mpqueue": "get()",
    "fasterfifo": "get()",
    "zmq": "recv()",
    "iceoryx2": "notify + Listener.timed_wait",
    "redis": "XREAD BLOCK",
    "pipe": "blocking os.read",
}


@dataclass
class Row:
    section: str
    system: str
    value: float | None = None   # msgs/s, MB/s or CPU %; None: no number (see status)
    unit: str = ""
    cpu_per_m: float | None = None
    note: str = ""
    status: str = ""             # "" when the value is good; else n/a, skipped, LOST, FAILED...
    lat_us: tuple[float, float, float] | None = None
    #: Most CPU that other processes used during a run of this row, % of one core.
    other_pct: float | None = None
    samples: list[float] = field(default_factory=list)


# --- host ---------------------------------------------------------------------------------------


def package_version(dist: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def redis_server_version() -> str:
    exe = shutil.which("redis-server")
    if not exe:
        return "not installed"
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
        return next((w[2:] for w in out.split() if w.startswith("v=")), out.strip())
    except (OSError, subprocess.SubprocessError):
        return "?"


def header(tmp: str, quick: bool, only: set[str]) -> dict[str, str]:
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    zmq_v = package_version("pyzmq")
    if zmq_v != "not installed":
        import zmq
        zmq_v = f"pyzmq {zmq_v}, libzmq {zmq.zmq_version()}"
    return {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": f"{cores} logical ({usable} usable by this process)",
        "memory": memory_total(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "peers": (f"{zmq_v}; faster-fifo {package_version('faster-fifo')}; "
                  f"iceoryx2 {package_version('iceoryx2')}; redis-server {redis_server_version()}, "
                  f"redis-py {package_version('redis')}, hiredis {package_version('hiredis')}"),
        "commit": git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "directory": f"{tmp} ({filesystem_of(os.path.realpath(tmp))})",
        "mode": ("quick" if quick else "full") + (f", only {','.join(sorted(only))}" if only else ""),
        "method": (f"throughput: median of {1 if quick else REPS} runs, fixed count per producer, "
                   f"consumers verify count+checksum; latency: each percentile the median of "
                   f"{1 if quick else REPS} runs of {ROUNDS // (QUICK_DIV if quick else 1)} "
                   f"round trips after {WARM // (QUICK_DIV if quick else 1)} warm-up; spawn start "
                   "method; time.perf_counter; MB = 1e6 bytes"),
        "other CPU %": ("CPU that processes outside the case used meanwhile (/proc/stat busy minus "
                        "the case's own processes), % of one core, the most of its runs"),
    }


# --- processes ----------------------------------------------------------------------------------


@dataclass
class Group:
    """What one run of one case reported."""
    t0: float = 0.0
    ready: dict[tuple[str, int], int] = field(default_factory=dict)
    done: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    cpu: dict[tuple[str, int], float] = field(default_factory=dict)
    server_cpu_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    timed_out: bool = False
    pids: list[int] = field(default_factory=list)
    #: CPU of processes that are not part of this case (other users of the machine), and
    #: the hypervisor's steal, in % of one core over the timed interval.
    other_pct: float = 0.0
    steal_pct: float = 0.0

    def failure(self) -> str:
        if self.errors:
            last = self.errors[0].strip().splitlines()[-1]
            return f"FAILED: {last[:110]}"
        if self.timed_out:
            return f"TIMEOUT: not done within {GROUP_S_MAX:.0f} s"
        return ""


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal: irq and softirq time is no process's,
    # and much of it is caused by the case itself (wake-ups), so it is not counted as busy.
    return (v[0] + v[1] + v[2]) / tick, v[7] / tick


def own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


#: --quiet-wait: the longest one run waits for a quiet machine (0: no wait), and the total.
QUIET = {"max_s": 0.0, "waited_s": 0.0}
QUIET_SAMPLE_S = 0.3
QUIET_BUSY_PCT_MAX = 10.0


def wait_for_quiet() -> None:
    """With --quiet-wait, wait (up to its value) until the CPU load of the machine is below
    QUIET_BUSY_PCT_MAX % of one core over QUIET_SAMPLE_S. Called by each run right before its
    start signal, when its own workers are ready and blocked."""
    if not QUIET["max_s"]:
        return
    t_start = time.monotonic()
    while True:  # bounded by max_s
        b0, _ = machine_cpu_s()
        time.sleep(QUIET_SAMPLE_S)
        b1, _ = machine_cpu_s()
        waited = time.monotonic() - t_start
        if (b1 - b0) / QUIET_SAMPLE_S * 100 < QUIET_BUSY_PCT_MAX or waited >= QUIET["max_s"]:
            QUIET["waited_s"] += waited
            return


def server_cpu(pids_fn: Callable[[], list[int]] | None) -> dict[int, float]:
    """user+sys seconds of each server process (broker tree, redis-server) now."""
    if pids_fn is None:
        return {}
    import psutil
    out = {}
    for pid in pids_fn():
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def stop_processes(procs: list[Any], wait_s: float = 5.0) -> None:
    deadline = time.monotonic() + wait_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)


def run_group(ctx, system: str, first: list[tuple], then: list[tuple],
              server_pids: Callable[[], list[int]] | None = None,
              on_started: Callable[[Group], None] | None = None,
              timeout_s: float = GROUP_S_MAX) -> Group:
    """Spawn ``first`` (consumers, pongers), wait until they are ready, spawn ``then``
    (producers, pingers), start them all at once and collect what they report.

    Each entry is ``(role, idx, chan, params)``. ``on_started`` (the idle case) runs right
    after the start signal instead of the wait for "done" reports; the stop event is set when
    it returns, and the workers' loops end on it.
    """
    ctl, start_ev, stop_ev = ctx.Queue(), ctx.Event(), ctx.Event()
    g, procs = Group(), []
    try:
        for batch in (first, then):
            for role, idx, chan, params in batch:
                proc = ctx.Process(target=ipc_workers.worker_main, daemon=True,
                                   args=(system, role, idx, chan, params, ctl, start_ev, stop_ev))
                proc.start()
                procs.append(proc)
            if not wait_for(ctl, g, "ready", len(procs), READY_S_MAX):
                if not g.errors:
                    g.errors.append(f"workers not ready within {READY_S_MAX:.0f} s")
                return g
        g.pids = [p.pid for p in procs]
        wait_for_quiet()
        before = server_cpu(server_pids)
        busy0, steal0 = machine_cpu_s()
        own0 = own_cpu_s()
        g.t0 = time.perf_counter()
        start_ev.set()
        if on_started is not None:
            on_started(g)
            stop_ev.set()
            wait_for(ctl, g, "done", len(procs), 10.0)
        else:
            g.timed_out = not wait_for(ctl, g, "done", len(procs), timeout_s)
        g.server_cpu_s = cpu_delta(before, server_cpu(server_pids))
        busy1, steal1 = machine_cpu_s()
        own1 = own_cpu_s()
        elapsed = time.perf_counter() - g.t0
        stop_ev.set()
        wait_for(ctl, g, "cpu", len(procs), 20.0)
        ours = sum(g.cpu.values()) + g.server_cpu_s + own1 - own0
        g.other_pct = max(0.0, (busy1 - busy0 - ours) / elapsed * 100)
        g.steal_pct = (steal1 - steal0) / elapsed * 100
        return g
    finally:
        start_ev.set()
        stop_ev.set()
        stop_processes(procs)
        ctl.close()
        ctl.join_thread()


def wait_for(ctl, g: Group, kind: str, n: int, timeout_s: float) -> bool:
    """Read the control queue until ``n`` workers in all reported ``kind``; False on an error
    report or a timeout. Reports of other kinds that arrive meanwhile are kept in ``g``."""
    deadline = time.monotonic() + timeout_s
    while len(getattr(g, kind)) < n:
        try:
            msg = ctl.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            return False
        what, role, idx, payload = msg
        if what == "error":
            g.errors.append(f"{role}[{idx}]: {payload}")
            return False
        getattr(g, what)[(role, idx)] = payload
    return True


# --- systems' environments ----------------------------------------------------------------------


class Env:
    """What the parent makes for one system: channels per run, its server, its clean-up."""

    name = ""
    missing = ""  # why the system cannot run here ("" when it can)

    def __init__(self, ctx, tmp: str):
        self.ctx, self.tmp = ctx, tmp

    def channels(self, tag: str, n: int) -> list[Any]:
        raise NotImplementedError

    def pingpong_channel(self, tag: str) -> Any:
        raise NotImplementedError

    def after_run(self, tag: str) -> None:
        pass

    def server_pids(self) -> list[int]:
        return []

    def close(self) -> list[str]:
        """Stop what was started; return warnings (leaks) for the output."""
        return []


class MpQueueEnv(Env):
    name = "mpqueue"

    def channels(self, tag, n):
        return [self.ctx.Queue() for _ in range(n)]

    def pingpong_channel(self, tag):
        return (self.ctx.Queue(), self.ctx.Queue())


class FasterFifoEnv(Env):
    name = "fasterfifo"

    def __init__(self, ctx, tmp):
        super().__init__(ctx, tmp)
        try:
            import faster_fifo
            import faster_fifo_reduction  # noqa: F401  (makes the queue picklable for spawn)
            self.Queue = faster_fifo.Queue
        except ImportError:
            self.missing = "faster-fifo not installed (pip install '.[bench]')"

    def channels(self, tag, n):
        return [self.Queue(max_size_bytes=FASTER_FIFO_BYTES) for _ in range(n)]

    def pingpong_channel(self, tag):
        return (self.Queue(max_size_bytes=FASTER_FIFO_BYTES), self.Queue(max_size_bytes=FASTER_FIFO_BYTES))


class ZmqEnv(Env):
    name = "zmq"

    def channels(self, tag, n):
        return [f"ipc://{self.tmp}/zmq-{tag}-{i}" for i in range(n)]

    def pingpong_channel(self, tag):
        return (f"ipc://{self.tmp}/zmq-{tag}-ping", f"ipc://{self.tmp}/zmq-{tag}-pong")


class Iceoryx2Env(Env):
    name = "iceoryx2"

    def __init__(self, ctx, tmp):
        super().__init__(ctx, tmp)
        try:
            import iceoryx2  # noqa: F401
        except ImportError:
            self.missing = "iceoryx2 not installed (pip install '.[bench]')"
        # A short root: iceoryx2's listeners are unix sockets under it (108-byte path limit).
        self.root = tempfile.mkdtemp(prefix="iox2-", dir="/tmp") + "/"
        self.prefix = f"iox2b{os.getpid()}_"

    def channels(self, tag, n):
        return [(self.root, self.prefix, f"bench/{tag}/{i}") for i in range(n)]

    def pingpong_channel(self, tag):
        return (self.root, self.prefix, f"bench/{tag}")

    def close(self):
        shutil.rmtree(self.root, ignore_errors=True)
        left = [n for n in os.listdir("/dev/shm") if n.startswith(self.prefix)]
        for name in left:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join("/dev/shm", name))
        # iceoryx2 keeps its global management segment by design; anything else is a leak.
        leaks = [n for n in left if not n.endswith(".global_mgmt")]
        return [f"iceoryx2 left {len(leaks)} object(s) in /dev/shm (removed)"] if leaks else []


class RedisEnv(Env):
    name = "redis"

    def __init__(self, ctx, tmp):
        super().__init__(ctx, tmp)
        self.proc = None
        self.exe = shutil.which("redis-server")
        try:
            import redis
            self.redis = redis
        except ImportError:
            self.missing = "redis-py not installed (pip install '.[bench]')"
            return
        if not self.exe:
            self.missing = "redis-server not installed (apt-get install redis-server)"
            return
        self.start()

    def start(self) -> None:
        for _ in range(3):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            log = open(os.path.join(self.tmp, "redis.log"), "wb")
            self.proc = subprocess.Popen(
                [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.tmp, "--daemonize", "no", "--loglevel", "warning"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=lambda: ipc_workers.die_with_parent(signal.SIGTERM))
            log.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    self.client = self.redis.Redis(host="127.0.0.1", port=self.port)
                    self.client.ping()
                    return
                except self.redis.ConnectionError:
                    time.sleep(0.05)
            self.stop()
        self.missing = "redis-server did not start (see redis.log)"

    def channels(self, tag, n):
        return [(self.port, f"s-{tag}-{i}".encode()) for i in range(n)]

    def pingpong_channel(self, tag):
        return (self.port, f"s-{tag}".encode())

    def after_run(self, tag):
        self.client.flushall()

    def server_pids(self):
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def close(self):
        self.stop()
        return []


class PipeEnv(Env):
    name = "pipe"

    def pingpong_channel(self, tag):
        return (self.ctx.Pipe(duplex=False), self.ctx.Pipe(duplex=False))


class ShmSpinEnv(Env):
    name = "shmspin"

    def pingpong_channel(self, tag):
        return self.ctx.RawArray("q", 16)


ENVS: dict[str, type[Env]] = {e.name: e for e in (MpQueueEnv, FasterFifoEnv, ZmqEnv, Iceoryx2Env,
                                                  RedisEnv, PipeEnv, ShmSpinEnv)}

ENVS["shmbroker"] = ipc_shmbroker.ShmbrokerEnv
IDLE_SECTION = "idle, 8 clients"


# --- cases --------------------------------------------------------------------------------------


def params_for(case: Case, count: int, idx: int) -> dict[str, Any]:
    return {"idx": idx, "count": count, "msg_bytes": case.msg_bytes, "pool_n": case.pool_n,
            "batch": case.batch, "stall_s": STALL_S}


def run_tagged(ctx, env: Env, tag: str, waiters: list, starters: list):
    """One run_group of ``env``'s system on the channels made for ``tag``; the environment
    hears of its end (after_run) whatever happened."""
    try:
        return run_group(ctx, env.name, waiters, starters, server_pids=env.server_pids)
    finally:
        env.after_run(tag)


def throughput_row(ctx, env: Env, case: Case, reps: int, quick: bool) -> Row:
    system = env.name
    row = Row(case.section, system, unit="MB/s" if case.msg_bytes >= KiB else "msgs/s")
    if (system, case.key) in NOT_APPLICABLE:
        row.status, row.note = "n/a", NOT_APPLICABLE[(system, case.key)]
        return row
    count = COUNTS.get(case.key, COUNTS["fan4"])[system] // (QUICK_DIV if quick else 1)
    count -= count % max(1, case.batch)
    expected_sum = ipc_workers.expected_checksum(count, case.pool_n)
    rates, cpus, other = [], [], []
    for rep in range(reps):
        tag = f"{case.key}-{rep}"
        chans = env.channels(tag, case.pairs)
        g = run_tagged(ctx, env, tag,
                       [("consumer", i, c, params_for(case, count, i)) for i, c in enumerate(chans)],
                       [("producer", i, c, params_for(case, count, i)) for i, c in enumerate(chans)])
        if g.failure():
            row.status = g.failure()
            return row
        got = [g.done[("consumer", i)] for i in range(case.pairs)]
        lost = sum(count - d["count"] for d in got)
        bad = sum(d["checksum"] != expected_sum for d in got if d["count"] == count)
        if lost or bad:
            row.status = (f"LOST {lost:,} of {count * case.pairs:,} messages" if lost
                          else f"BAD checksum in {bad} consumer(s)")
            return row
        elapsed = max(d["t_end"] for d in got) - g.t0
        total = count * case.pairs
        rates.append(total / elapsed)
        cpus.append((sum(g.cpu.values()) + g.server_cpu_s) / total * 1e6)
        other.append(g.other_pct)
    rate = statistics.median(rates)
    row.other_pct = max(other)
    row.samples = rates
    row.cpu_per_m = statistics.median(cpus)
    if case.msg_bytes >= KiB:
        row.value = rate * case.msg_bytes / MB
        row.note = f"{rate:,.0f} msgs/s; "
    else:
        row.value = rate
    row.note += f"{count:,} msgs/producer x{case.pairs}"
    api = API_NOTES.get((system, case.key))
    if api:
        row.note += f"; {api}"
    return row


def latency_row(ctx, env: Env, mode: str, section: str, quick: bool, reps: int) -> Row:
    """Each percentile is the median of ``reps`` runs' (as throughput is): one run's p99 moves
    by 1.5-2x between runs on this VM, the pipe's as much as anyone's (perf/RESULTS.md,
    fifteenth session)."""
    import numpy as np
    system = env.name
    row = Row(section, system, unit="us")
    notes = SPIN_NOTES if mode == "spin" else BLOCK_NOTES
    if system not in notes:
        row.status, row.note = "n/a", "spins only" if system == "shmspin" else ""
        return row
    div = QUICK_DIV if quick else 1
    params = {"idx": 0, "msg_bytes": 100, "warm": WARM // div, "rounds": ROUNDS // div,
              "spin": mode == "spin", "stall_s": STALL_S}
    runs, means, other, count = [], [], [], 0
    for rep in range(reps):
        tag = f"rtt-{mode}-{rep}"
        chan = env.pingpong_channel(tag)
        g = run_tagged(ctx, env, tag, [("pong", 0, chan, params)], [("ping", 0, chan, params)])
        if g.failure():
            row.status = g.failure()
            return row
        lat = np.asarray(g.done[("ping", 0)]["lat_ns"], dtype=np.float64) / 1e3
        runs.append(tuple(np.percentile(lat, [50, 99, 99.9])))
        means.append(lat.mean())
        other.append(g.other_pct)
        count = len(lat)
    p50, p99, p999 = (statistics.median(r[i] for r in runs) for i in range(3))
    row.value, row.lat_us, row.other_pct = p50, (p50, p99, p999), max(other)
    row.samples = [v for r in runs for v in r]
    each = "; runs' p50/p99: " + ", ".join(f"{r[0]:.1f}/{r[1]:.0f}" for r in runs) if reps > 1 else ""
    row.note = (f"{notes[system]}; {count:,} round trips x{reps}, median of each percentile, "
                f"mean {statistics.median(means):.1f} us{each}")
    return row


def memcpy_row(quick: bool) -> Row:
    import numpy as np
    total = MEMCPY_BYTES // (4 if quick else 1)
    src = np.random.default_rng(1).integers(0, 255, total, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(MEMCPY_REPS):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return Row(CASES[3].section, "memcpy (numpy.copyto, 1 thread)", total / min(times) / MB, "MB/s",
               note=f"{total // 2**20} MiB (out of cache), best of {MEMCPY_REPS}", samples=times)


def skipped_rows(system: str, why: str) -> list[Row]:
    rows = [Row(c.section, system, status="skipped", note=why) for c in all_cases()]
    rows += [Row(s, system, status="skipped", note=why) for _, s in LATENCY_MODES]
    return rows


def run_system(ctx, system: str, tmp: str, quick: bool, warnings: list[str]) -> list[Row]:
    """Every case of one system, its environment up only meanwhile."""
    reps = 1 if quick else REPS
    sys_tmp = tempfile.mkdtemp(prefix=f"{system}-", dir=tmp)
    env = None
    rows: list[Row] = []
    started = time.perf_counter()
    try:
        env = ENVS[system](ctx, sys_tmp)
        if env.missing:
            return skipped_rows(system, env.missing)
        steps: list[tuple[str, Callable[[], Row]]] = [
            (f"rtt-{mode}", lambda m=mode, s=section: latency_row(ctx, env, m, s, quick, reps))
            for mode, section in LATENCY_MODES]
        if system not in ("pipe", "shmspin"):
            steps += [(c.key, lambda c=c: throughput_row(ctx, env, c, reps, quick)) for c in all_cases()]
        if hasattr(env, "idle"):
            steps.append(("idle", lambda: Row(IDLE_SECTION, system, unit="%", **env.idle(run_group, IDLE_S))))
        if CASE_KEYS:
            steps = [(key, step) for key, step in steps if key in CASE_KEYS]
        for key, step in steps:
            t = time.perf_counter()
            rows.append(step())
            progress(f"{system} {key}: {time.perf_counter() - t:.1f} s")
    except Exception as exc:  # noqa: BLE001 - one broken system must not hide the others
        rows.append(Row("error", system, status=f"FAILED: {type(exc).__name__}: {exc}"[:140]))
    finally:
        if env is not None:
            warnings += env.close()
        shutil.rmtree(sys_tmp, ignore_errors=True)
    progress(f"{system}: {time.perf_counter() - started:.1f} s in all")
    return rows


def progress(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


# --- targets ------------------------------------------------------------------------------------


def find(rows: list[Row], section: str, system: str) -> Row | None:
    r = next((r for r in rows if r.section == section and r.system == system), None)
    return r if r is not None and not r.status and r.value is not None else None


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def targets(rows: list[Row]) -> list[list[str]]:
    msg, batch, fan, big = (c.section for c in CASES)
    block, spin = (s for _, s in LATENCY_MODES)
    out = []

    def rate_target(name, section, required):
        r = find(rows, section, "shmbroker")
        out.append([name, f">= {required:,.0f} msgs/s",
                    f"{r.value:,.0f} msgs/s" if r else "not run", f"{r.value / required:.2f}x" if r else "",
                    verdict(r.value >= required if r else None)])

    rate_target("1->1 100 B per-message", msg, TARGET_MSG_RPS)
    s, z = find(rows, msg, "shmbroker"), find(rows, msg, "zmq")
    out.append(["1->1 100 B per-message vs pyzmq ipc", f">= {TARGET_VS_ZMQ:.0f}x pyzmq",
                f"{s.value:,.0f} / {z.value:,.0f}" if s and z else "not run",
                f"{s.value / z.value:.2f}x" if s and z else "",
                verdict(s.value / z.value >= TARGET_VS_ZMQ if s and z else None)])
    rate_target("1->1 100 B batch API", batch, TARGET_BATCH_RPS)
    rate_target("4->4->4 aggregate, per-message", fan, TARGET_FAN_RPS)
    r = find(rows, big, "shmbroker")
    out.append(["64 KiB messages", f">= {TARGET_BIG_MBS:,} MB/s", f"{r.value:,.0f} MB/s" if r else "not run",
                f"{r.value / TARGET_BIG_MBS:.2f}x" if r else "", verdict(r.value >= TARGET_BIG_MBS if r else None)])
    r = find(rows, spin, "shmbroker")
    for i, (pct, limit) in enumerate((("p50", TARGET_SPIN_P50_US), ("p99", TARGET_SPIN_P99_US))):
        v = r.lat_us[i] if r else None
        out.append([f"round trip, spin, {pct}", f"<= {limit:.0f} us", f"{v:,.1f} us" if r else "not run",
                    f"{v / limit:.2f}x" if r else "", verdict(v <= limit if r else None)])
    r, p = find(rows, block, "shmbroker"), find(rows, block, "pipe")
    for i, pct in ((0, "p50"), (1, "p99")):
        ok = r and p
        out.append([f"round trip, blocking, {pct} vs os.pipe", f"<= {TARGET_BLOCK_VS_PIPE}x pipe",
                    f"{r.lat_us[i]:,.1f} / {p.lat_us[i]:,.1f} us" if ok else "not run",
                    f"{r.lat_us[i] / p.lat_us[i]:.2f}x" if ok else "",
                    verdict(r.lat_us[i] / p.lat_us[i] <= TARGET_BLOCK_VS_PIPE if ok else None)])
    r = find(rows, IDLE_SECTION, "shmbroker")
    out.append(["idle broker + 8 idle clients", f"< {TARGET_IDLE_PCT:.0f}% of a core",
                f"{r.value:.2f}%" if r else "not run", f"{r.value / TARGET_IDLE_PCT:.2f}x" if r else "",
                verdict(r.value < TARGET_IDLE_PCT if r else None)])
    return out


# --- output -------------------------------------------------------------------------------------


def fmt_value(r: Row) -> str:
    if r.status:
        return r.status.split(":")[0] if r.status.startswith(("FAILED", "TIMEOUT")) else r.status
    if r.lat_us is not None:
        return " / ".join(f"{v:,.1f}" for v in r.lat_us)
    if r.unit == "%":
        return f"{r.value:.2f}"
    return f"{r.value:,.0f}"


def render(head: dict[str, str], rows: list[Row], tgts: list[list[str]], warnings: list[str]) -> str:
    out = ["bench_ipc (issue 3)"]
    width = max(len(k) for k in head)
    out += [f"  {k:<{width}}  {v}" for k, v in head.items()]
    out.append("")
    table = [["case", "system", "result", "unit", "CPU s/M msgs", "other CPU %", "notes"]]
    for r in rows:
        unit = "us p50/p99/p99.9" if r.lat_us is not None else r.unit
        note = r.note
        if r.status.startswith(("FAILED", "TIMEOUT")):
            note = (r.status.split(":", 1)[1].strip() + ("; " + note if note else ""))
        table.append([r.section, LABELS.get(r.system, r.system), fmt_value(r), unit,
                      f"{r.cpu_per_m:.2f}" if r.cpu_per_m is not None else "",
                      f"{r.other_pct:.0f}" if r.other_pct is not None else "", note])
    out += align(table, right={2, 4, 5})
    out.append("")
    out += align([["target (shmbroker)", "required", "measured", "ratio", "result"]] + tgts, right={2, 3})
    for w in warnings:
        out.append(f"WARNING: {w}")
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


def sort_rows(rows: list[Row]) -> list[Row]:
    sections = [c.section for c in all_cases()] + [s for _, s in LATENCY_MODES] + [IDLE_SECTION, "error"]
    rank = {s: i for i, s in enumerate(sections)}
    sysrank = {s: i for i, s in enumerate(ORDER)}
    return sorted(rows, key=lambda r: (rank.get(r.section, 99), sysrank.get(r.system, 50)))


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"1/{QUICK_DIV} of the counts, 1 run per case")
    ap.add_argument("--only", metavar="NAMES", default="",
                    help=f"comma-separated systems ({','.join(ORDER)}); memcpy always runs")
    ap.add_argument("--json", metavar="PATH", help="also write every number (and samples) here")
    ap.add_argument("--quiet-wait", metavar="S", type=float, default=0.0,
                    help="before each run, wait up to S seconds for the load on the machine to "
                         "drop below 10%% of a core (default 0: do not wait)")
    ap.add_argument("--fan-pairs", metavar="N,N", default="",
                    help="also run N->N->N aggregate cases for these N (4 always runs), e.g. 1,8,16")
    ap.add_argument("--cases", metavar="KEYS", default="",
                    help="comma-separated steps to run (rtt-block,rtt-spin,msg,batch,fan4,big,"
                         "idle; default: all), e.g. for an A/B of the round trips")
    args = ap.parse_args(argv)
    try:
        pairs = sorted({int(n) for n in args.fan_pairs.split(",") if n.strip()} - {4})
    except ValueError:
        ap.error(f"--fan-pairs takes comma-separated integers, not {args.fan_pairs!r}")
    if any(not 1 <= n <= 64 for n in pairs):
        ap.error("--fan-pairs: each N must be 1..64")
    EXTRA_CASES[:] = [fan_case(n) for n in pairs]
    CASE_KEYS.clear()
    CASE_KEYS.update(k.strip() for k in args.cases.split(",") if k.strip())
    known = {f"rtt-{m}" for m, _ in LATENCY_MODES} | {c.key for c in all_cases()} | {"idle"}
    if CASE_KEYS - known:
        ap.error(f"unknown case(s) {', '.join(sorted(CASE_KEYS - known))}; known: "
                 f"{', '.join(sorted(known))}")
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = only - set(ORDER)
    if unknown:
        ap.error(f"unknown system(s) {', '.join(sorted(unknown))}; known: {', '.join(ORDER)}")
    systems = [s for s in RUN_ORDER if not only or s in only]

    out_dir = os.path.join(PERF, "out")
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bench-ipc-", dir=out_dir)
    ctx = mp.get_context("spawn")
    started = time.perf_counter()
    rows: list[Row] = []
    warnings: list[str] = []
    old_term = _sigterm_unwinds()
    try:
        head = header(tmp, args.quick, only)
        rows.append(memcpy_row(args.quick))
        QUIET["max_s"] = args.quiet_wait
        for system in systems:
            rows += run_system(ctx, system, tmp, args.quick, warnings)
        if args.quiet_wait:
            head["quiet wait"] = (f"{QUIET['waited_s']:.1f} s in all (before each run, up to "
                                  f"{args.quiet_wait:g} s, for load < {QUIET_BUSY_PCT_MAX:.0f}% of a core)")
    finally:
        signal.signal(signal.SIGTERM, old_term)
        shutil.rmtree(tmp, ignore_errors=True)
    rows = sort_rows(rows)
    tgts = targets(rows)
    head["runtime"] = f"{time.perf_counter() - started:.1f} s"
    print(render(head, rows, tgts, warnings))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": head, "rows": [r.__dict__ for r in rows], "warnings": warnings,
                       "targets": [dict(zip(["target", "required", "measured", "ratio", "result"], t))
                                   for t in tgts]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
