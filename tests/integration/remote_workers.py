"""Remote client processes for tests/integration/test_remote_data.py: the public Producer and
Consumer with ``broker="tcp://..."``, in their own interpreters (no shared memory of the
broker's is reachable from them in spirit: they only get the router's address).

    python remote_workers.py produce --broker ADDR --topic T --count N --acks A --out FILE
    python remote_workers.py consume --broker ADDR --topic T [--group G] --expected N --out FILE

``produce`` appends one JSON line per acknowledged record: [partition, offset, value-hex]
(written only after its future resolved). ``consume`` writes one JSON line per record
received: [partition, offset, value-hex], then "done" once it has seen ``--expected`` records
or ``--idle-s`` passed without any (after at least ``--expected``, or at ``--deadline-s``).
Every run ends by itself within ``--deadline-s``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def produce(args) -> int:
    from shmbroker import Producer

    acks = "all" if args.acks == "all" else int(args.acks)
    deadline = time.monotonic() + args.deadline_s
    with Producer(broker=args.broker, acks=acks, linger_ms=args.linger_ms) as producer, \
            open(args.out, "a", buffering=1) as out:
        for first in range(0, args.count, args.chunk):  # bounded by count
            sent = []
            for seq in range(first, min(args.count, first + args.chunk)):
                value = f"{args.tag}-{seq:07d}".encode()
                sent.append((value, producer.send(args.topic, value, key=str(seq).encode())))
            for value, future in sent:
                left = max(0.1, deadline - time.monotonic())
                meta = future.result(timeout=left)
                out.write(json.dumps([meta.partition, meta.offset, value.hex()]) + "\n")
            if args.pause_ms:
                time.sleep(args.pause_ms / 1000.0)
    return 0


def consume(args) -> int:
    from shmbroker import Consumer

    kwargs = dict(broker=args.broker, auto_offset_reset="earliest")
    if args.group:
        kwargs.update(group=args.group, heartbeat_interval_ms=100, session_timeout_ms=6_000)
    deadline = time.monotonic() + args.deadline_s
    seen = 0
    last_record = time.monotonic()
    with Consumer(args.topic, **kwargs) as consumer, open(args.out, "a", buffering=1) as out:
        while time.monotonic() < deadline:  # bounded by the deadline
            got = consumer.poll(timeout_ms=200)
            for r in got:
                out.write(json.dumps([r.partition, r.offset, r.value.hex()]) + "\n")
            if got:
                seen += len(got)
                last_record = time.monotonic()
                if args.commit:
                    consumer.commit()
            elif seen >= args.expected and time.monotonic() - last_record >= args.idle_s:
                break
        out.write(json.dumps("done") + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("produce", "consume"))
    parser.add_argument("--broker", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--acks", default="1")
    parser.add_argument("--linger-ms", type=float, default=0)
    parser.add_argument("--pause-ms", type=float, default=0)
    parser.add_argument("--tag", default="v")
    parser.add_argument("--group")
    parser.add_argument("--commit", action="store_true")
    parser.add_argument("--expected", type=int, default=0)
    parser.add_argument("--idle-s", type=float, default=1.0)
    parser.add_argument("--deadline-s", type=float, default=60.0)
    args = parser.parse_args()
    return produce(args) if args.role == "produce" else consume(args)


if __name__ == "__main__":
    sys.exit(main())
