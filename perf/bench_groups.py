"""How fast a consumer group hands its partitions out again (issue 4 §5).

For groups of 2, 8 and 32 members over one 64-partition topic it measures, on a real broker:

* **join**: from a new member sending its join to every member holding its part of the new
  assignment (all partitions owned exactly once, every member synced to that generation);
* **kill -9**: from SIGKILL of a member process to the survivors holding every partition.

Members are separate processes speaking the coordinator's protocol directly (join, sync,
heartbeat every --heartbeat-ms, rejoin when told; the "range" assignor, an eager rebalance).
What is measured is therefore the assignment being in the members' hands, not records
flowing again: the client Consumer's group support is not part of this benchmark yet.
Kafka's defaults are printed beside as reference lines: a dead member is noticed after the
session timeout (45 s), a rebalance waits for members' heartbeats (every 3 s).

    .venv/bin/python perf/bench_groups.py [--partitions 64] [--sizes 2,8,32] [--runs 3]
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

from bench_pipeline import HERE, _start_broker, _stop_broker

TOPIC = "bench-groups"
#: How long one measurement may take before it is reported as a failure.
SETTLE_S_MAX = 30.0
REPLY_TIMEOUT_MS = 5_000


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--sizes", default="2,8,32", help="group sizes (default 2,8,32)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--heartbeat-ms", type=float, default=20.0,
                    help="members' heartbeat interval (default 20 ms)")
    args = ap.parse_args(argv)
    from machine import cpu_model, git_commit

    from shmbroker import Admin

    tmp = os.path.join(HERE, "out", f"bench-groups-{os.getpid()}")
    data_dir = os.path.join(tmp, "data")
    os.makedirs(tmp, exist_ok=True)
    broker = _start_broker(data_dir, os.path.join(tmp, "broker.log"))
    ctx = mp.get_context("spawn")
    try:
        for _ in range(600):  # bounded: up to 30 s for the broker to come up
            try:
                with Admin(broker=data_dir) as admin:
                    admin.create_topic(TOPIC, args.partitions)
                break
            except Exception:
                time.sleep(0.05)
        print(f"bench_groups: {cpu_model()}, {os.cpu_count()} cores, commit {git_commit()}, "
              f"{args.partitions} partitions, heartbeat {args.heartbeat_ms:g} ms, "
              f"{args.runs} runs, median")
        print(f"{'members':>8}  {'join -> assigned (ms)':>22}  {'kill -9 -> reassigned (ms)':>27}")
        for size in [int(s) for s in args.sizes.split(",")]:
            results = [measure(ctx, data_dir, size, args.partitions, args.heartbeat_ms / 1000, r)
                       for r in range(args.runs)]
            joins = [j for j, _ in results if j is not None]
            kills = [k for _, k in results if k is not None]
            show = lambda xs: f"{statistics.median(xs):,.0f}" if xs else "n/a"  # noqa: E731
            print(f"{size:>8}  {show(joins):>22}  {show(kills):>27}"
                  + ("" if len(joins) == len(kills) == args.runs else "  (some runs never settled)"))
        print(f"{'Kafka':>8}  {'>= heartbeat (3,000)':>22}  {'session timeout (45,000)':>27}"
              "  default settings, reference only")
        print("target: graceful rebalance < 100 ms, dead member < 1,000 ms")
    finally:
        _stop_broker(broker)
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
