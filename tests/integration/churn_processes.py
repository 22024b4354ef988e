"""The processes of the group churn test (test_group_churn.py), run as scripts so that a
``kill -9`` hits a real, independent process:

    python churn_processes.py producer DATA_DIR TOPIC PARTITIONS COUNT DURATION_S OUT
    python churn_processes.py member DATA_DIR TOPIC GROUP OUT STOP_PATH COMMIT_INTERVAL_MS PROTOCOLS

**producer** sends records 0..COUNT-1 (the value is the record's sequence number, 8 bytes big
endian), record i to partition i % PARTITIONS, paced to take about DURATION_S, then flushes
and writes ``done COUNT`` to OUT.

**member** is a ``Consumer(TOPIC, group=GROUP, group_protocols=PROTOCOLS.split(","))``
(eager unless every protocol is cooperative) that polls until STOP_PATH exists, then
``close()``s (a graceful leave). Every event is one JSON line appended to OUT with a single
``write()`` (so a ``kill -9`` never leaves half of one, and every line written before the kill
is in the file): ``assign``/``revoke`` (partitions), ``rec`` (``[partition, offset, sequence]``
of each record, written once the poll's records are processed, which is what "processed"
means here), ``committing`` (``{partition: offset}``, before a commit is sent), then
``commit`` (after it succeeded) or ``commit_failed``, and ``closed``. Each line carries ``t``:
``time.monotonic()``, which is one clock for every process of the host, so the test can
compare it with the time of a kill.

Commits: auto-commit is off; the member commits the positions of its partitions itself every
COMMIT_INTERVAL_MS, and the positions of revoked partitions in ``on_revoke`` (Kafka's pattern
for manual commits; ``close()`` revokes too). So every commit is one this script made and
logged, which makes the test's "duplicates only from the uncommitted window" check exact, and
a kill -9 between two commits leaves a real uncommitted window of up to COMMIT_INTERVAL_MS.

Both exit by themselves after LIFETIME_S (bounded, in case the test that started them died).
"""
from __future__ import annotations

import json
import os
import struct
import sys
import time

from shmbroker import Consumer, Producer, errors
from shmbroker.client.group_membership import REJOIN_ERRORS

LIFETIME_S = 120.0
SEQUENCE = struct.Struct(">Q")
#: The producer sends this many records between two looks at the clock (its pacing step).
PRODUCER_CHUNK = 500


def produce(data_dir: str, topic: str, partitions: int, count: int, duration_s: float,
            out_path: str) -> None:
    start = time.monotonic()
    with Producer(broker=data_dir) as producer:
        for first in range(0, count, PRODUCER_CHUNK):  # bounded by count
            for seq in range(first, min(count, first + PRODUCER_CHUNK)):
                producer.send(topic, SEQUENCE.pack(seq), partition=seq % partitions)
            ahead_s = start + duration_s * (first + PRODUCER_CHUNK) / count - time.monotonic()
            if ahead_s > 0:
                time.sleep(ahead_s)
            if time.monotonic() - start > LIFETIME_S:
                raise SystemExit("producer: lifetime over")
        producer.flush()
    with open(out_path, "w") as out:
        out.write(f"done {count}\n")


class Member:
    def __init__(self, data_dir: str, topic: str, group: str, out_path: str, stop_path: str,
                 commit_interval_ms: int, protocols: list[str]):
        self.fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.stop_path = stop_path
        self.commit_interval_s = commit_interval_ms / 1000
        self.consumer = Consumer(topic, broker=data_dir, group=group,
                                 auto_offset_reset="earliest", enable_auto_commit=False,
                                 group_protocols=protocols,
                                 on_assign=self.on_assign, on_revoke=self.on_revoke)

    def emit(self, event: str, **fields) -> None:
        line = json.dumps({"e": event, "t": time.monotonic(), **fields}) + "\n"
        os.write(self.fd, line.encode())  # one write: whole in the file, or not at all

    def on_assign(self, tps: list) -> None:
        self.emit("assign", p=[tp.partition for tp in tps])

    def on_revoke(self, tps: list) -> None:
        # Commit what was processed before giving the partitions up (lost ones included:
        # that commit fails, and is logged as failed).
        self.commit(tps)
        self.emit("revoke", p=[tp.partition for tp in tps])

    def commit(self, tps) -> None:
        offsets = {tp: self.consumer.position(tp) for tp in tps}
        if not offsets:
            return
        by_partition = {tp.partition: offset for tp, offset in offsets.items()}
        # Said before (a kill -9 may come between the commit and the line saying it succeeded:
        # the test then knows the commit may or may not have happened) and after.
        self.emit("committing", o=by_partition)
        try:
            self.consumer.commit(offsets=offsets)
        except REJOIN_ERRORS as e:
            self.emit("commit_failed", why=type(e).__name__, o=by_partition)
            return
        self.emit("commit", o=by_partition)

    def run(self) -> None:
        self.emit("start", pid=os.getpid())
        deadline = time.monotonic() + LIFETIME_S
        next_commit = time.monotonic() + self.commit_interval_s
        try:
            while not os.path.exists(self.stop_path) and time.monotonic() < deadline:  # bounded
                got = self.consumer.poll(timeout_ms=50)
                if got:
                    self.emit("rec", r=[[r.partition, r.offset, SEQUENCE.unpack(r.value)[0]]
                                        for r in got])
                if time.monotonic() >= next_commit:
                    next_commit = time.monotonic() + self.commit_interval_s
                    self.commit(self.consumer.assignment())
        finally:
            self.consumer.close()  # revokes (on_revoke commits), then leaves the group
            self.emit("closed")
            os.close(self.fd)


def main(argv: list[str]) -> None:
    role, args = argv[0], argv[1:]
    if role == "producer":
        data_dir, topic, partitions, count, duration_s, out_path = args
        produce(data_dir, topic, int(partitions), int(count), float(duration_s), out_path)
    elif role == "member":
        data_dir, topic, group, out_path, stop_path, commit_interval_ms, protocols = args
        Member(data_dir, topic, group, out_path, stop_path, int(commit_interval_ms),
               protocols.split(",")).run()
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except errors.ShmbrokerError as e:  # say what failed in the test's log, then fail
        print(f"{sys.argv[1]}: {type(e).__name__}: {e}", file=sys.stderr)
        raise
