"""Issue 4's churn test: while 200k records are produced, group members join, leave gracefully
and are kill -9'd, and the group still processes every record, with duplicates only where a
dead member had processed records it had not committed yet.

Everything is a real process: the broker (`shmbroker serve`, started by the harness), one
producer, and member processes running ``Consumer(topic, group=...)``; the last two are
``churn_processes.py`` (see its docstring for what each writes, and why members commit by
hand: that makes the duplicate check exact). The test drives the churn, then reads the
members' files and the partitions' segment files (the truth of what was produced).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest
from broker_harness import WAIT_S_MAX, wait_for
from produce_helpers import read_topic

from shmbroker import Admin

pytestmark = pytest.mark.timeout(180)

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "churn_processes.py")
TOPIC = "churn"
PARTITIONS = 8
RECORDS = 200_000
#: The producer paces itself to take about this long, so the churn happens during production.
PRODUCE_S = 14.0
#: Members commit their positions this often (and when partitions are revoked).
COMMIT_INTERVAL_MS = 200
#: The loose bound on "a kill -9'd member's partitions are consumed elsewhere again" (the
#: issue's target is 1 s; a loaded 2-core CI machine gets slack; the test prints the actual).
RESUME_S_MAX = 5.0
#: Longest wait for the group to settle before a kill (every partition owned exactly once).
SETTLE_S_MAX = 20.0
#: Longest wait, once the group settled, for a victim to be inside an uncommitted window.
WINDOW_WAIT_S = 1.0
#: Longest wait, once production is over, for the survivors to process the last records.
DRAIN_S_MAX = 30.0


class Proc:
    """One member or producer process, its output file and its stderr log."""

    def __init__(self, tmp_path, name: str, args: list[str]):
        self.name = name
        self.out_path = str(tmp_path / f"{name}.jsonl")
        self.stop_path = str(tmp_path / f"{name}.stop")
        self.log_path = str(tmp_path / f"{name}.log")
        self.killed_at: float | None = None
        self.stopped = False
        self._events: list[dict] = []
        self._read_bytes = 0
        args = [a.format(out=self.out_path, stop=self.stop_path) for a in args]
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def events(self) -> list[dict]:
        """Every event written so far (read incrementally: the files grow to megabytes, and
        the test looks at them every few milliseconds on a 2-core machine)."""
        try:
            with open(self.out_path, "rb") as f:
                f.seek(self._read_bytes)
                data = f.read()
        except FileNotFoundError:
            return self._events
        end = data.rfind(b"\n") + 1  # whole lines only: a member may be writing one now
        self._events.extend(json.loads(line) for line in data[:end].splitlines())
        self._read_bytes += end
        return self._events

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def kill9(self) -> None:
        self.killed_at = time.monotonic()
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=WAIT_S_MAX)

    def stop(self) -> None:
        """Graceful: the member closes its consumer (commit, revoke, leave) and exits."""
        self.stopped = True
        open(self.stop_path, "w").close()

    def wait_exit(self, timeout_s: float = WAIT_S_MAX) -> int:
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout_s} s; its log:\n"
                                 f"{self.log()}") from None

    def cleanup(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=WAIT_S_MAX)


def owned(events: list[dict], before: float = float("inf")) -> set[int]:
    """The partitions a member owned at time ``before``, by its own assign/revoke events."""
    current: set[int] = set()
    for e in events:
        if e["t"] > before:
            break
        if e["e"] == "assign":
            current |= set(e["p"])
        elif e["e"] == "revoke":
            current -= set(e["p"])
    return current


def settled(members: list[Proc]) -> bool:
    """Every live member owns something and together they own each partition exactly once."""
    shares = [owned(m.events()) for m in members if m.popen.poll() is None]
    together = [p for share in shares for p in share]
    return all(shares) and sorted(together) == list(range(PARTITIONS))


@pytest.fixture
def procs(tmp_path):
    started: list[Proc] = []

    def start(name: str, *args: str) -> Proc:
        proc = Proc(tmp_path, name, list(args))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.popen.poll() is None and not proc.stopped:
            proc.stop()
    for proc in started:
        try:
            proc.popen.wait(timeout=WAIT_S_MAX)
        except subprocess.TimeoutExpired:
            pass
        proc.cleanup()


@pytest.mark.parametrize("protocols", ["cooperative-sticky,range", "cooperative-sticky"],
                         ids=["eager", "cooperative"])
def test_churn_during_production_loses_no_record_and_repeats_only_dead_members_uncommitted_windows(
        broker, procs, protocols):
    """Two members, then joins, a kill -9, a graceful leave, a join and a kill -9 while the
    producer runs; then every record, the duplicates and the dead members' takeover times."""
    data_dir = broker.data_dir
    with Admin(broker=data_dir) as admin:
        admin.create_topic(TOPIC, PARTITIONS)
    broker.wait_running(partitions={(TOPIC, p) for p in range(PARTITIONS)})

    def member(name: str) -> Proc:
        return procs(name, "member", data_dir, TOPIC, "g", "{out}", "{stop}",
                     str(COMMIT_INTERVAL_MS), protocols)

    members = [member("m0"), member("m1")]
    wait_for(lambda: settled(members), what="the first two members to share the partitions")
    producer = procs("producer", "producer", data_dir, TOPIC, str(PARTITIONS), str(RECORDS),
                     str(PRODUCE_S), "{out}")
    t0 = time.monotonic()

    def at(seconds: float) -> None:
        time.sleep(max(0.0, t0 + seconds - time.monotonic()))

    def kill(victim: Proc) -> None:
        # Kill a member of a settled group, so that it owns partitions to be taken over;
        # preferably (for at most WINDOW_WAIT_S) just after it processed records it has not
        # committed yet (its last line is records), so that it leaves an uncommitted window.
        wait_for(lambda: settled(members), timeout_s=SETTLE_S_MAX,
                 what=f"the group to settle before killing {victim.name}")
        deadline = time.monotonic() + WINDOW_WAIT_S
        while victim.events()[-1]["e"] != "rec" and time.monotonic() < deadline:  # bounded
            time.sleep(0.002)
        victim.kill9()

    at(1.5)
    members.append(member("m2"))      # join
    at(3.0)
    members.append(member("m3"))      # join
    at(5.0)
    kill(members[0])                  # kill -9 of m0
    at(7.0)
    members[1].stop()                 # graceful leave of m1
    assert members[1].wait_exit() == 0, members[1].log()
    at(8.0)
    members.append(member("m4"))      # join
    at(10.0)
    kill(members[2])                  # kill -9 of m2
    churn_done_s = time.monotonic() - t0
    assert producer.wait_exit(PRODUCE_S + WAIT_S_MAX) == 0, producer.log()
    production_s = time.monotonic() - t0
    assert open(producer.out_path).read() == f"done {RECORDS}\n"

    # The truth: what the log holds. The producer sent each sequence once, so each is there once.
    log = read_topic(data_dir, TOPIC, PARTITIONS)
    truth = {(p, r.offset): int.from_bytes(r.value, "big") for p, rs in log.items() for r in rs}
    assert sorted(truth.values()) == list(range(RECORDS))

    def processed() -> set:
        return {(p, o) for m in members for e in m.events() if e["e"] == "rec"
                for p, o, _ in e["r"]}

    drain_start = time.monotonic()
    missing = set(truth)
    while missing and time.monotonic() < drain_start + DRAIN_S_MAX:  # bounded by the deadline
        missing = truth.keys() - processed()
        time.sleep(0.05)
    assert not missing, \
        f"{len(missing)} records never processed (lost), e.g. {sorted(missing)[:10]}"
    drained_s = time.monotonic() - drain_start
    survivors = [m for m in members if m.killed_at is None and not m.stopped]
    for m in survivors:
        m.stop()
    for m in survivors:
        assert m.wait_exit() == 0, m.log()

    # Every record processed at least once, with the value that the log holds at its offset.
    runs: dict[tuple[int, int], list[Proc]] = defaultdict(list)
    for m in members:
        for e in m.events():
            if e["e"] == "rec":
                for p, o, seq in e["r"]:
                    assert truth[(p, o)] == seq, f"{m.name}: partition {p} offset {o}"
                    runs[(p, o)].append(m)
    assert runs.keys() == truth.keys()

    # Duplicates. A kill -9'd member may have processed records after its last commit of their
    # partition (its uncommitted window); the partition's next owner starts at that commit and
    # processes them again. Every other processing is "the" one: each record has exactly one
    # processing outside a dead member's uncommitted window (none lost, no other duplicate:
    # graceful leaves and rebalances commit before they give partitions up), and no member
    # processes a record twice.
    windows = {m: uncommitted_window(m.events()) for m in members if m.killed_at is not None}
    duplicates = {tp: ms for tp, ms in runs.items() if len(ms) > 1}
    bad = []
    for (p, o), ms in duplicates.items():
        if len(set(ms)) < len(ms):
            bad.append(((p, o), [m.name for m in ms], "processed twice by one member"))
    for (p, o), ms in runs.items():
        outside, maybe_committed = 0, False
        for m in ms:
            if m not in windows:
                outside += 1
                continue
            committed, uncertain = windows[m]
            if o < committed.get(p, -1):
                outside += 1  # the dead member committed it: nobody may process it again
            elif o < uncertain.get(p, -1):
                maybe_committed = True  # killed during a commit that may have covered it
        if outside > 1 or (outside == 0 and not maybe_committed):
            bad.append(((p, o), [m.name for m in ms], f"{outside} processings outside a dead "
                                                      f"member's uncommitted window"))
    assert not bad, f"{len(bad)} records processed wrongly, e.g. {sorted(bad)[:10]}; last " \
                    f"commits of the killed members: { {m.name: w for m, w in windows.items()} }"
    failed = {m.name: [e for e in m.events() if e["e"] == "commit_failed"] for m in members
              if m.killed_at is None}
    assert not any(failed.values()), f"commits of live members failed: {failed}"

    # A kill -9'd member's partitions are consumed elsewhere again within RESUME_S_MAX.
    report = []
    for victim in (m for m in members if m.killed_at is not None):
        lost = owned(victim.events(), before=victim.killed_at)
        assert lost, f"{victim.name} owned nothing when killed"
        resumed_ms = {}
        for p in sorted(lost):
            first = min((e["t"] for m in members if m is not victim for e in m.events()
                         if e["e"] == "rec" and e["t"] > victim.killed_at
                         and any(r[0] == p for r in e["r"])), default=None)
            assert first is not None, f"partition {p} of {victim.name} never resumed"
            resumed_ms[p] = (first - victim.killed_at) * 1000
        committed = windows[victim][0]
        again = sum(1 for (p, o), ms in duplicates.items()
                    if victim in ms and o >= committed.get(p, -1))
        report.append(f"kill -9 {victim.name}: partitions {sorted(lost)} consumed again after "
                      + ", ".join(f"{p}: {ms:.0f} ms" for p, ms in resumed_ms.items())
                      + f"; {again} records of its uncommitted window processed again")
        slow = {p: ms for p, ms in resumed_ms.items() if ms > RESUME_S_MAX * 1000}
        assert not slow, f"{victim.name}'s partitions resumed late: {slow} ({report[-1]})"
    print(f"churn: {RECORDS} records over {PARTITIONS} partitions, production {production_s:.1f} s "
          f"(churn until {churn_done_s:.1f} s), drained {drained_s:.1f} s after; "
          f"{len(duplicates)} duplicates")
    for line in report:
        print(line)


def uncommitted_window(events: list[dict]) -> tuple[dict[int, int], dict[int, int]]:
    """Where a member's uncommitted window starts, per partition: the last offset it committed
    (the next offset to read); and, if it died during a commit, the offsets of that commit
    (records below them may or may not be committed)."""
    committed: dict[int, int] = {}
    uncertain: dict[int, int] = {}
    for e in events:
        if e["e"] == "committing":
            uncertain = {int(p): offset for p, offset in e["o"].items()}
        elif e["e"] == "commit":
            committed.update({int(p): offset for p, offset in e["o"].items()})
            uncertain = {}
        elif e["e"] == "commit_failed":
            uncertain = {}
    return committed, uncertain
