"""How fast a consumer group hands its partitions out again, and records flow again (issue 4 §5).

For groups of 2, 8 and 32 members over one 64-partition topic it measures, on a real broker,
two events in two modes (``--mode``, default both):

* **join**: a new member joins a settled group;
* **kill -9**: SIGKILL of a member process (not the newest one).

``raw``: members are processes speaking the coordinator's protocol directly (join, sync,
heartbeat every --heartbeat-ms, rejoin when told; the "range" assignor, an eager rebalance).
Measured: from the event to every member holding its part of one generation's assignment
(all partitions owned exactly once). The assignment in the members' hands, not records.

``consumer``: members are real ``Consumer(topic, group=...)`` processes (default assignors,
so eager on the client side: every member revokes all its partitions and rejoins; with
``--protocols cooperative-sticky`` only moved partitions pause, and a partition its owner kept
throughout counts as consuming from the event on; ``heartbeat_interval_ms`` = --heartbeat-ms,
by default the Consumer's own: they learn of a rebalance from the group's wake word, not from
a heartbeat; each loops on ``poll(timeout_ms=--member-poll-ms)``, 100 ms by default; before
the ninth session both were 20 ms, which on a 2-vCPU VM, where every wake-up costs ~0.1 ms of
CPU, kept half the machine busy with 32 idle members), and a feeder process sends one record
to every partition every --feed-ms. Each member reports, per partition it is assigned, when it was
assigned (its on_assign, which the Consumer calls once the partition is positioned at the
group's committed offset, just before that poll reads it) and when a poll first handed it a
record of that partition. Two times are printed, both from the event, both taken once the
live members own every partition exactly once, each assigned after the event:

* **consuming** (the measure of every earlier RESULTS table): the last partition's first
  record at its new owner. Records flowing again; it includes the heartbeat or wake that tells
  members to rejoin, revocation, join, sync, offset fetch, *and* the wait for the next fed
  record: up to --feed-ms, since the committed offset a new owner starts at is the end its
  predecessor consumed, so a record is waiting there only if the feeder wrote one after the
  revocation;
* **positioned**: the last partition's assignment at its new owner, i.e. that owner reads it
  from the next record on, and a record already waiting would be returned by the same poll.
  The rebalance without the feed's phase; it does not show a slow first read.

The raw mode runs first, before the feeder starts. The feed is
every 50 ms by default because a faster one saturates a 2-core machine by itself (64 partition
processes and up to 32 consumers woken every time): with 10 ms, the consumer rows measured
1.5-10 s, which is CPU starvation, not the protocol (perf/RESULTS.md).

Kafka's defaults are printed beside as reference lines: a dead member is noticed after the
session timeout (45 s), a rebalance waits for members' heartbeats (every 3 s).

    .venv/bin/python perf/bench_groups.py [--mode raw|consumer|both] [--partitions 64]
        [--sizes 2,8,32] [--runs 3] [--heartbeat-ms MS] [--member-poll-ms 100] [--feed-ms 50]
        [--protocols cooperative-sticky,range | cooperative-sticky]
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import signal
import socket
import statistics
import sys
import time

from bench_pipeline import HERE, _sigterm_unwinds, _start_broker, _stop_broker

from shmbroker.config import GROUP_HEARTBEAT_INTERVAL_MS_DEFAULT

TOPIC = "bench-groups"
#: How long one measurement may take before it is reported as a failure.
SETTLE_S_MAX = 30.0
REPLY_TIMEOUT_MS = 5_000
#: How long to wait for every partition of the new topic to take its first record.
FEEDER_START_S_MAX = 120.0


# --- a member process ----------------------------------------------------------------------------

def _member(data_dir: str, group: str, heartbeat_s: float, go, events, stop) -> None:
    """Join when ``go`` is set; report (pid, generation, assignment, time) after every sync."""
    import zmq

    from shmbroker import errors
    from shmbroker.coordinator import protocol

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect("ipc://" + os.path.join(data_dir, "coordinator.sock"))
    ids = itertools.count(1)

    def ask(kind: str, **fields):
        request_id = next(ids)
        sock.send(protocol.request(request_id, kind, **fields))
        deadline = time.monotonic() + REPLY_TIMEOUT_MS / 1000
        while sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):  # bounded
            reply_id, result = protocol.decode_reply(sock.recv())
            if reply_id == request_id:
                return result
        raise TimeoutError(f"{kind}: no reply")

    member_id, generation = "", -1
    go.wait()
    while not stop.is_set():  # bounded: the parent sets stop (or kills us)
        joined = ask("join", group_id=group, member_id=member_id, client_id="bench",
                     pid=os.getpid(), host=socket.gethostname(), topics=[TOPIC],
                     protocols=["range"], session_timeout_ms=10_000, rebalance_timeout_ms=10_000)
        if isinstance(joined, errors.UnknownMemberIdError):
            member_id = ""
            continue
        member_id, generation = joined["member_id"], joined["generation_id"]
        synced = ask("sync", group_id=group, member_id=member_id, generation_id=generation)
        if not isinstance(synced, dict):
            continue
        events.put((os.getpid(), generation, sorted(tuple(tp) for tp in synced["assignment"]),
                    time.monotonic()))
        while not stop.is_set():  # bounded: heartbeats until told to rejoin, or stop
            time.sleep(heartbeat_s)
            if not isinstance(ask("heartbeat", group_id=group, member_id=member_id,
                                  generation_id=generation), dict):
                break


# --- the parent ------------------------------------------------------------------------------------

class Group:
    """The member processes of one group and what they reported."""

    def __init__(self, ctx, data_dir: str, name: str, heartbeat_s: float):
        self.ctx, self.data_dir, self.name, self.heartbeat_s = ctx, data_dir, name, heartbeat_s
        self.events, self.stop = ctx.Queue(), ctx.Event()
        self.procs: dict[int, mp.Process] = {}
        self.latest: dict[int, tuple[int, list, float]] = {}  # pid -> generation, tps, time

    def add(self):
        """A started member process waiting for its go; returns (process, go event)."""
        go = self.ctx.Event()
        proc = self.ctx.Process(target=_member, args=(self.data_dir, self.name, self.heartbeat_s,
                                                      go, self.events, self.stop), daemon=True)
        proc.start()
        self.procs[proc.pid] = proc
        return proc, go

    def settled_at(self, partitions: int, since: float) -> float | None:
        """Wait until the live members hold one generation's full assignment, reported after
        ``since``; the time the last of them got it."""
        deadline = time.monotonic() + SETTLE_S_MAX
        while time.monotonic() < deadline:  # bounded by the deadline
            try:
                pid, generation, tps, t = self.events.get(timeout=0.2)
                self.latest[pid] = (generation, tps, t)
            except Exception:  # queue.Empty
                pass
            done = self._complete(partitions, since)
            if done is not None:
                return done
        return None

    def _complete(self, partitions: int, since: float) -> float | None:
        live = [pid for pid, p in self.procs.items() if p.is_alive()]
        reports = [self.latest.get(pid) for pid in live]
        if not live or any(r is None or r[2] < since for r in reports):
            return None
        if len({r[0] for r in reports}) != 1:
            return None
        owned = [tp for r in reports for tp in r[1]]
        if len(owned) != partitions or len(set(owned)) != partitions:
            return None
        return max(r[2] for r in reports)

    def close(self) -> None:
        self.stop.set()
        for proc in self.procs.values():
            proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def measure(ctx, data_dir: str, size: int, partitions: int, heartbeat_s: float, run: int):
    group = Group(ctx, data_dir, f"g{size}-{run}", heartbeat_s)
    try:
        gos = [group.add()[1] for _ in range(size - 1)]
        for go in gos:
            go.set()
        if group.settled_at(partitions, 0.0) is None:
            raise RuntimeError(f"{size - 1} members never settled")
        proc, go = group.add()
        time.sleep(1.0)  # the new process is up and connected; only its join is timed
        t0 = time.monotonic()
        go.set()
        joined = group.settled_at(partitions, t0)
        victim = next(pid for pid in group.procs if pid != proc.pid)
        t1 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        group.procs[victim].join(5)
        killed = group.settled_at(partitions, t1)
        if joined is None or killed is None:  # say what each member last had, for a bug hunt
            print(f"  group of {size}, run {run}: did not settle; killed pid {victim}; last "
                  f"reports: { {pid: group.latest.get(pid) for pid in group.procs} }",
                  file=sys.stderr)
        return (None if joined is None else (joined - t0) * 1000,
                None if killed is None else (killed - t1) * 1000)
    finally:
        group.close()


# --- consumer mode: real Consumer(group=...) processes and a feeder ------------------------------

def _feeder(data_dir: str, partitions: int, feed_s: float, conn) -> None:
    """One record to every partition every ``feed_s`` until the parent says stop. Says
    "feeding" once every partition acknowledged a first record (its process is up: a new
    topic's 64 partition processes take seconds to start on a small machine)."""
    from shmbroker import Producer

    with Producer(broker=data_dir) as producer:
        futures = [producer.send(TOPIC, b"x", partition=p) for p in range(partitions)]
        for future in futures:
            future.result(FEEDER_START_S_MAX)
        conn.send("feeding")
        tick = time.monotonic()
        while not conn.poll():  # bounded: the parent stops us (or kills us)
            for partition in range(partitions):
                producer.send(TOPIC, b"x", partition=partition)
            tick = max(tick + feed_s, time.monotonic())
            time.sleep(max(0.0, tick - time.monotonic()))


def _consumer_member(data_dir: str, group: str, heartbeat_ms: int, protocols: list,
                     poll_ms: int, conn) -> None:
    """A Consumer group member. Reports over ``conn`` (its own pipe: no lock shared with other
    members, which a kill -9 could leave held): ("assign"|"revoke", partitions, t) and
    ("first", partition, t) when a poll first hands it a record of a partition assigned to it.
    Joins when the parent sends "go"; stops at the parent's next message."""
    from shmbroker import Consumer

    unreported: set[int] = set()

    def on_assign(tps):
        partitions = [tp.partition for tp in tps]
        unreported.update(partitions)
        conn.send(("assign", partitions, time.monotonic()))

    def on_revoke(tps):
        partitions = [tp.partition for tp in tps]
        unreported.difference_update(partitions)
        conn.send(("revoke", partitions, time.monotonic()))

    consumer = Consumer(TOPIC, broker=data_dir, group=group, auto_offset_reset="latest",
                        heartbeat_interval_ms=heartbeat_ms, group_protocols=protocols,
                        on_assign=on_assign, on_revoke=on_revoke)
    try:
        conn.send(("ready", [], time.monotonic()))
        conn.recv()  # go
        while not conn.poll():  # bounded: the parent stops us (or kills us)
            got = consumer.poll(timeout_ms=poll_ms)
            if got and unreported:
                now = time.monotonic()
                for record in got:  # bounded by one poll's records
                    if record.partition in unreported:
                        unreported.discard(record.partition)
                        conn.send(("first", record.partition, now))
    finally:
        consumer.close()


class ConsumerGroup:
    """The Consumer member processes of one group and what they reported: per live member,
    per partition it owns, when it was assigned and when it first consumed a record of it."""

    def __init__(self, ctx, data_dir: str, name: str, heartbeat_ms: int, protocols: list,
                 poll_ms: int):
        self.ctx, self.data_dir, self.name, self.heartbeat_ms = ctx, data_dir, name, heartbeat_ms
        self.protocols, self.poll_ms = protocols, poll_ms
        self.going: set[int] = set()
        self.procs: dict[int, mp.Process] = {}
        self.conns: dict[int, object] = {}
        self.owned: dict[int, dict[int, list]] = {}  # pid -> partition -> [assigned t, first t]
        self.ready: set[int] = set()

    def add(self) -> int:
        """A started member process, ready (its Consumer made) but not joined; its pid."""
        mine, theirs = self.ctx.Pipe()
        proc = self.ctx.Process(target=_consumer_member,
                                args=(self.data_dir, self.name, self.heartbeat_ms,
                                      self.protocols, self.poll_ms, theirs),
                                daemon=True)
        proc.start()
        theirs.close()
        self.procs[proc.pid], self.conns[proc.pid], self.owned[proc.pid] = proc, mine, {}
        deadline = time.monotonic() + SETTLE_S_MAX
        while proc.pid not in self.ready and time.monotonic() < deadline:  # bounded
            self._pump(0.1)
        if proc.pid not in self.ready:
            raise RuntimeError(f"member {proc.pid} never became ready")
        return proc.pid

    def go(self, pid: int) -> None:
        self.conns[pid].send("go")
        self.going.add(pid)

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        self.procs[pid].join(5)
        self.conns.pop(pid).close()
        del self.owned[pid]
        self.going.discard(pid)

    def _pump(self, timeout_s: float) -> None:
        from multiprocessing.connection import wait

        for conn in wait(list(self.conns.values()), timeout_s):  # bounded by the members
            pid = next(p for p, c in self.conns.items() if c is conn)
            try:
                kind, what, t = conn.recv()
            except EOFError:
                self.conns.pop(pid).close()
                continue
            owned = self.owned[pid]
            if kind == "ready":
                self.ready.add(pid)
            elif kind == "assign":
                owned.update({p: [t, None] for p in what})
            elif kind == "revoke":
                for p in what:
                    owned.pop(p, None)
            elif kind == "first" and what in owned and owned[what][1] is None:
                owned[what][1] = t

    def consuming_at(self, partitions: int, since: float, cooperative: bool
                     ) -> tuple[float, float] | None:
        """Wait until every partition is owned by exactly one live member (each joined member
        owning some), assigned after ``since`` and consumed by it since, or (cooperative
        members only) kept by its owner throughout; then (the time the last was assigned,
        the time the last was first consumed). "Assigned" is the member's on_assign, which
        the Consumer calls after it positioned the partition at its committed offset, in the
        poll that reads it next: from then on a waiting record is returned at once."""
        deadline = time.monotonic() + SETTLE_S_MAX
        while time.monotonic() < deadline:  # bounded by the deadline
            self._pump(0.05)
            if any(not self.owned[pid] for pid in self.going):
                continue
            episodes = [e for owned in self.owned.values() for e in owned.values()]
            owned = [p for owned in self.owned.values() for p in owned]
            if len(owned) != partitions or len(set(owned)) != partitions:
                continue
            if any((assigned >= since or not cooperative) and (assigned < since or first is None)
                   for assigned, first in episodes):
                continue
            moved = [(assigned, first) for assigned, first in episodes if assigned >= since]
            return (max([since] + [assigned for assigned, _ in moved]),
                    max([since] + [first for _, first in moved]))
        return None

    def close(self) -> None:
        for conn in self.conns.values():
            try:
                conn.send("stop")
            except OSError:
                pass
        for proc in self.procs.values():
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns.values():
            conn.close()


def measure_consumers(ctx, data_dir: str, size: int, partitions: int, heartbeat_ms: int,
                      run: int, protocols: list, poll_ms: int):
    """Join and kill -9 times (ms) of a group of ``size`` Consumer processes, as documented:
    ((join -> positioned, join -> first record), (kill -> positioned, kill -> first record)),
    None where it did not settle."""
    cooperative = set(protocols) == {"cooperative-sticky"}  # the client's rule
    group = ConsumerGroup(ctx, data_dir, f"c{size}-{run}", heartbeat_ms, protocols, poll_ms)
    try:
        first = [group.add() for _ in range(size - 1)]
        for pid in first:
            group.go(pid)
        if group.consuming_at(partitions, 0.0, cooperative) is None:
            raise RuntimeError(f"{size - 1} consumers never consumed every partition")
        newest = group.add()
        t0 = time.monotonic()
        group.go(newest)
        joined = group.consuming_at(partitions, t0, cooperative)
        victim = first[0]
        t1 = time.monotonic()
        group.kill(victim)
        killed = group.consuming_at(partitions, t1, cooperative)
        if joined is None or killed is None:
            print(f"  consumer group of {size}, run {run}: did not settle; killed pid {victim}; "
                  f"owned: {group.owned}", file=sys.stderr)
        return (None if joined is None else tuple((t - t0) * 1000 for t in joined),
                None if killed is None else tuple((t - t1) * 1000 for t in killed))
    finally:
        group.close()


def _show(xs: list) -> str:
    return f"{statistics.median(xs):,.0f} ({max(xs):,.0f})" if xs else "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("raw", "consumer", "both"), default="both",
                    help="members speaking the raw protocol, real Consumers, or both (default)")
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--sizes", default="2,8,32", help="group sizes (default 2,8,32)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--heartbeat-ms", type=int, default=None,
                    help="members' heartbeat interval (default: raw 20 ms, which is how raw "
                         "members learn of a rebalance; consumer the Consumer's default, "
                         f"{GROUP_HEARTBEAT_INTERVAL_MS_DEFAULT} ms: Consumers learn of it "
                         "from the group's wake word)")
    ap.add_argument("--member-poll-ms", type=int, default=100,
                    help="consumer mode: each member's poll(timeout_ms=) (default 100 ms)")
    ap.add_argument("--protocols", default="cooperative-sticky,range",
                    help="consumer mode: the members' group_protocols (default the Consumer's: "
                         "eager on the client side; 'cooperative-sticky' for incremental)")
    ap.add_argument("--feed-ms", type=float, default=50.0,
                    help="consumer mode: one record per partition this often (default 50 ms)")
    args = ap.parse_args(argv)
    _sigterm_unwinds()
    heartbeat_ms = {"raw": args.heartbeat_ms or 20,
                    "consumer": args.heartbeat_ms or GROUP_HEARTBEAT_INTERVAL_MS_DEFAULT}
    from machine import cpu_model, git_commit

    from shmbroker import Admin

    tmp = os.path.join(HERE, "out", f"bench-groups-{os.getpid()}")
    data_dir = os.path.join(tmp, "data")
    os.makedirs(tmp, exist_ok=True)
    broker = _start_broker(data_dir, os.path.join(tmp, "broker.log"))
    ctx = mp.get_context("spawn")
    feeder = feeder_conn = None
    modes = ("raw", "consumer") if args.mode == "both" else (args.mode,)
    try:
        for _ in range(600):  # bounded: up to 30 s for the broker to come up
            try:
                with Admin(broker=data_dir) as admin:
                    admin.create_topic(TOPIC, args.partitions)
                break
            except Exception:
                time.sleep(0.05)
        # Every partition process up before anything is timed (64 of them take seconds to
        # start on 2 cores, and would load the first runs).
        from shmbroker import Producer
        with Producer(broker=data_dir) as producer:
            for future in [producer.send(TOPIC, b"x", partition=p)
                           for p in range(args.partitions)]:
                future.result(FEEDER_START_S_MAX)
        sizes = [int(s) for s in args.sizes.split(",")]
        results: dict[tuple[str, int], list] = {}
        for mode in modes:  # raw first: the feeder's load must not slow the raw members
            if mode == "consumer":
                feeder_conn, theirs = ctx.Pipe()
                feeder = ctx.Process(target=_feeder, daemon=True, args=(
                    data_dir, args.partitions, args.feed_ms / 1000, theirs))
                feeder.start()
                if not feeder_conn.poll(FEEDER_START_S_MAX):
                    raise RuntimeError(f"the feeder did not start in {FEEDER_START_S_MAX} s")
                feeder_conn.recv()
            for size in sizes:
                results[mode, size] = [
                    measure(ctx, data_dir, size, args.partitions, heartbeat_ms["raw"] / 1000, r)
                    if mode == "raw" else
                    measure_consumers(ctx, data_dir, size, args.partitions,
                                      heartbeat_ms["consumer"], r, args.protocols.split(","),
                                      args.member_poll_ms)
                    for r in range(args.runs)]
                print(f"  {mode}, {size} members: {results[mode, size]}", file=sys.stderr,
                      flush=True)
        print(f"bench_groups: {cpu_model()}, {os.cpu_count()} cores, commit {git_commit()}, "
              f"{args.partitions} partitions, heartbeat "
              + ", ".join(f"{heartbeat_ms[m]} ms ({m})" for m in modes) + ", "
              + (f"consumers offer {args.protocols} and poll({args.member_poll_ms} ms), "
                 f"feed every {args.feed_ms:g} ms, " if feeder else "")
              + f"{args.runs} runs, median (max)")
        # Columns per mode: (header, width, which event, which time of a consumer result).
        # Consumer mode prints the first-record measure (the "consuming" of earlier RESULTS
        # tables) beside the positioned one (see the module doc).
        cols = {"raw": [("join -> assigned (ms)", 22, 0, None),
                        ("kill -9 -> reassigned (ms)", 27, 1, None)],
                "consumer": [("join -> consuming (ms)", 23, 0, 1),
                             ("join -> positioned (ms)", 24, 0, 0),
                             ("kill -9 -> consuming (ms)", 26, 1, 1),
                             ("kill -9 -> positioned (ms)", 27, 1, 0)]}
        kafka = {"raw": (">= heartbeat (3,000)", "session timeout (45,000)"),
                 "consumer": (">= heartbeat (3,000)", ">= heartbeat (3,000)",
                              "session timeout (45,000)", "session timeout (45,000)")}
        print(f"{'members':>8}" + "".join(f"  {h:>{w}}" for m in modes for h, w, _, _ in cols[m]))
        for size in sizes:
            line, incomplete = f"{size:>8}", False
            for mode in modes:
                for _, w, event, which in cols[mode]:
                    xs = [r[event] if which is None else r[event][which]
                          for r in results[mode, size] if r[event] is not None]
                    incomplete |= len(xs) != args.runs
                    line += f"  {_show(xs):>{w}}"
            print(line + ("  (some runs never settled)" if incomplete else ""))
        print(f"{'Kafka':>8}" + "".join(f"  {h:>{c[1]}}" for m in modes
                                        for h, c in zip(kafka[m], cols[m]))
              + "  default settings, reference only")
        print("target: graceful rebalance < 100 ms, dead member < 1,000 ms")
    finally:
        if feeder is not None:
            feeder_conn.send("stop")
            feeder.join(10)
            if feeder.is_alive():
                feeder.kill()
        _stop_broker(broker)
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
