"""shmbroker in perf/bench_ipc.py: the broker the parent starts and the workers' loops.

The parent (``ShmbrokerEnv``) starts ``shmbroker serve --data-dir DIR`` with DIR in the
benchmark's temporary directory under perf/out/ (the same disk as the repository), creates a
fresh topic for every run (deleted after it, so its partition processes stop and its log goes
away) and stops the broker with SIGTERM at the end, SIGKILL of its process group if it does
not exit in time; then it checks /dev/shm for objects under this broker's prefix.

The workers (``Shmbroker``) use only the public client API: ``Producer(broker=DIR, acks=1)``
with ``send``/``send_batch``/``flush`` and ``Consumer(topic, broker=DIR,
auto_offset_reset="earliest")`` with ``assign``/``poll``/``poll_columnar``; ``spin_us`` for the
spin-mode ping-pong. Every message is appended to the partition's log (acks=1).

Only the standard library is imported at the top: spawned workers of every system import the
parent script, and this module with it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import ipc_workers
from ipc_workers import consumed, message_pool, pinger, ponger

#: Records one poll may return in the throughput loops (Kafka's max.poll.records is 500).
POLL_RECORDS_MAX = 4096
#: Busy-wait of the spin-mode consumer before it sleeps on the futex (1 ms).
SPIN_US = 1000
#: How long a new topic's partitions get to be served before the run is abandoned.
TOPIC_READY_S_MAX = 20.0
IDLE_SETTLE_S = 0.5


def client_api_missing() -> str:
    try:
        from shmbroker import Consumer, Producer  # noqa: F401
    except ImportError as exc:
        return f"shmbroker Producer/Consumer not importable yet ({exc})"
    return ""


# --- parent side -------------------------------------------------------------------------------


class ShmbrokerEnv:
    """The broker for one benchmark invocation (see the module docstring)."""

    name = "shmbroker"

    def __init__(self, ctx, tmp: str):
        self.ctx, self.tmp = ctx, tmp
        self.proc: subprocess.Popen | None = None
        self.topics: dict[str, str] = {}
        self.admin = None
        self.missing = client_api_missing()
        self.data_dir = os.path.join(tmp, "data")
        if not self.missing:
            self.start()

    # -- the broker -------------------------------------------------------------------------------

    def start(self) -> None:
        from shmbroker import Admin, errors
        os.makedirs(self.data_dir, exist_ok=True)
        exe = os.path.join(os.path.dirname(sys.executable), "shmbroker")
        cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "shmbroker"]
        self.log_path = os.path.join(self.tmp, "broker.log")
        with open(self.log_path, "wb") as log:
            # SIGTERM to the broker if this process dies (even by SIGKILL): a clean stop.
            self.proc = subprocess.Popen(
                # No router (--listen none): clients use shared memory; 7070 may be taken.
                cmd + ["serve", "--data-dir", self.data_dir, "--listen", "none"], stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=lambda: ipc_workers.die_with_parent(signal.SIGTERM))
        deadline = time.monotonic() + 30.0
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                self.admin = Admin(broker=self.data_dir)
                self.admin.list_topics()
                return
            except errors.ShmbrokerError as exc:
                last = exc
                if self.admin is not None:
                    self.admin.close()
                    self.admin = None
                time.sleep(0.1)
        self.missing = f"broker did not start ({last}); log: {self.tail_log()}"
        self.stop()

    def tail_log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-400:].decode(errors="replace").strip().replace("\n", " | ")
        except OSError:
            return "?"

    def server_pids(self) -> list[int]:
        if self.proc is None:
            return []
        import psutil
        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.Error:
            return []

    def stop(self) -> list[str]:
        warnings = []
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    rc = self.proc.wait(30.0)
                    if rc != 0:
                        warnings.append(f"shmbroker serve exited {rc} on SIGTERM: {self.tail_log()}")
                except subprocess.TimeoutExpired:
                    warnings.append("shmbroker serve did not stop within 30 s of SIGTERM: killed")
            # Whatever is left of its process group (partition processes, coordinator).
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
        warnings += self.shm_leaks()
        return warnings

    def shm_leaks(self) -> list[str]:
        try:
            from shmbroker.shm.names import broker_prefix
        except ImportError:
            return []
        prefix = broker_prefix(self.data_dir)
        left = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
        for name in left:
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass
        return [f"shmbroker left {len(left)} object(s) in /dev/shm after a clean stop "
                f"(removed): {', '.join(sorted(left)[:4])}"] if left else []

    def close(self) -> list[str]:
        return self.stop()

    # -- topics -----------------------------------------------------------------------------------

    def _topic(self, tag: str, partitions: int) -> str:
        from shmbroker import Consumer, errors
        topic = f"bench-{tag}"
        self.admin.create_topic(topic, partitions)
        self.topics[tag] = topic
        deadline = time.monotonic() + TOPIC_READY_S_MAX
        while True:  # bounded by the deadline: until every partition is served
            try:
                Consumer(topic, broker=self.data_dir).close()
                return topic
            except (errors.BrokerNotRunningError, errors.UnknownTopicOrPartitionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def channels(self, tag: str, n: int) -> list[Any]:
        topic = self._topic(tag, n)
        return [(self.data_dir, topic, i) for i in range(n)]

    def pingpong_channel(self, tag: str) -> Any:
        return (self.data_dir, self._topic(tag + "-ping", 1), self._topic(tag + "-pong", 1))

    def after_run(self, tag: str) -> None:
        for key in [k for k in self.topics if k == tag or k.startswith(tag + "-")]:
            self.admin.delete_topic(self.topics.pop(key))

    # -- idle -------------------------------------------------------------------------------------

    def idle(self, run_group, idle_s: float) -> dict[str, Any]:
        """CPU % of one core of the broker and 8 idle clients: {"value", "note"} or {"status"}.

        Measured with the scheduler's on-CPU time (/proc/PID/task/*/schedstat, nanoseconds):
        the 10 ms ticks of getrusage/psutil are 0.33% of a core per process over 3 s, too
        coarse for a 1% target."""
        chans = self.channels("idle", 4)
        measured: dict[str, Any] = {}

        def measure(g) -> None:
            time.sleep(IDLE_SETTLE_S)
            broker = self.server_pids()
            t0 = {pid: oncpu_ns(pid) for pid in broker + g.pids}
            time.sleep(idle_s)
            t1 = {pid: oncpu_ns(pid) for pid in broker + g.pids}
            measured["broker"] = {title_of(p): (t1[p] - t0[p]) / 1e9 for p in broker}
            measured["clients"] = sum(t1[p] - t0[p] for p in g.pids) / 1e9

        params = {"idx": 0, "stall_s": 1.0}
        try:
            g = run_group(self.ctx, "shmbroker",
                          [("idle_consumer", i, c, params) for i, c in enumerate(chans)],
                          [("idle_producer", i, c, params) for i, c in enumerate(chans)],
                          on_started=measure)
        finally:
            self.after_run("idle")
        if g.failure() or "broker" not in measured:
            return {"status": g.failure() or "FAILED: no measurement"}
        per = {k: v / idle_s * 100 for k, v in measured["broker"].items()}
        broker_pct = sum(per.values())
        clients_pct = measured["clients"] / idle_s * 100
        top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:3])
        return {"value": broker_pct + clients_pct,
                "note": (f"broker {broker_pct:.2f}% ({len(per)} processes; {top}) + 4 consumers "
                         f"in poll(500 ms) and 4 idle producers {clients_pct:.2f}%, over "
                         f"{idle_s:.0f} s")}


def oncpu_ns(pid: int) -> int:
    """Nanoseconds that the threads of ``pid`` alive now have run (0 if it is gone)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def title_of(pid: int) -> str:
    """The process title (``shmbroker: partition orders/3`` -> ``partition orders/3``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return str(pid)
    return title.removeprefix("shmbroker: ")[:40] or str(pid)


# --- worker side --------------------------------------------------------------------------------


class Shmbroker(ipc_workers.System):
    """Producer(acks=1) -> ingress ring -> partition process appends to the log -> Consumer."""

    def producer(self, chan, p):
        from shmbroker import Producer
        data_dir, topic, part = chan
        count, mask, batch = p["count"], p["pool_n"] - 1, p["batch"]
        pool = message_pool(p["msg_bytes"], p["pool_n"])
        self.prod = prod = Producer(broker=data_dir, acks=1)

        def run():
            if batch:
                import numpy as np
                values = np.frombuffer(b"".join(pool * (batch // len(pool))), dtype=np.uint8)
                values = values.reshape(batch, p["msg_bytes"])
                send_batch = prod.send_batch
                for _ in range(count // batch):
                    send_batch(topic, values, partition=part)
            else:
                send = prod.send
                for i in range(count):
                    send(topic, pool[i & mask], partition=part)
            prod.flush()
            return {"t_end": time.perf_counter()}
        return run

    def _consumer(self, chan, spin_us: int = 0):
        from shmbroker import Consumer
        data_dir, topic, part = chan
        self.cons = Consumer(topic, broker=data_dir, auto_offset_reset="earliest", spin_us=spin_us)
        self.cons.assign([(topic, part)])
        return self.cons

    def consumer(self, chan, p):
        cons = self._consumer(chan)
        count, stall_ms, batch = p["count"], int(p["stall_s"] * 1000), p["batch"]

        def run():
            n = s = 0
            if batch:
                poll_columnar = cons.poll_columnar
                while n < count:
                    got = poll_columnar(timeout_ms=stall_ms)
                    if not got:
                        break
                    for cb in got.values():
                        n += len(cb)
                        s += int(cb.data[cb.value_starts + cb.value_lengths - 1].sum())
            else:
                poll = cons.poll
                while n < count:
                    recs = poll(timeout_ms=stall_ms, max_records=POLL_RECORDS_MAX)
                    if not recs:
                        break
                    n += len(recs)
                    for r in recs:
                        s += r.value[-1]
            return consumed(n, s, time.perf_counter())
        return run

    def _pingpong(self, chan, p, first: bool):
        from shmbroker import Producer
        data_dir, ping_topic, pong_topic = chan
        out_topic, in_topic = (ping_topic, pong_topic) if first else (pong_topic, ping_topic)
        spin_us = SPIN_US if p["spin"] else 0
        cons = self._consumer((data_dir, in_topic, 0), spin_us)
        self.prod = prod = Producer(broker=data_dir, acks=1, spin_ns=spin_us * 1000)
        send_one, poll = prod.send, cons.poll
        stall_ms = int(p["stall_s"] * 1000)

        def send(m):
            # send() alone: a sparse send is written at once (and the producer's background
            # sender would write it anyway). The consumer reads the committed frame from the
            # producer's ring (decision 0005); the partition process appends it to the log
            # (acks=1) meanwhile or at the end of its doze; nobody waits for the ack itself.
            send_one(out_topic, m, partition=0)

        def recv():
            recs = poll(timeout_ms=stall_ms, max_records=1)
            if not recs:
                raise TimeoutError("shmbroker: no record within the stall time")
            return recs[0].value
        return send, recv

    def ping(self, chan, p):
        return pinger(*self._pingpong(chan, p, True), p)

    def pong(self, chan, p):
        return ponger(*self._pingpong(chan, p, False), p)

    def idle_consumer(self, chan, p):
        cons = self._consumer(chan)

        def run():
            while not self.stop_ev.is_set():  # bounded by the parent's stop event
                cons.poll(timeout_ms=500, max_records=1)
            return {"count": 0}
        return run

    def idle_producer(self, chan, p):
        from shmbroker import Producer
        self.prod = Producer(broker=chan[0], acks=1)

        def run():
            self.stop_ev.wait(ipc_workers.EVENT_WAIT_S_MAX)
            return {"count": 0}
        return run

    def close(self):
        for name in ("prod", "cons"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()

