"""Load for the live tests of `shmbroker top` and `shmbroker profile`: a producer process and a
consumer-group member that commits, run as scripts (real client processes, as an operator's
would be). Each stops when the stop file appears or at its deadline, whichever comes first,
and closes its client (no shared memory left behind).

    python top_load.py produce DATA_DIR TOPIC STOP_FILE SECONDS
    python top_load.py consume DATA_DIR TOPIC GROUP STOP_FILE SECONDS

The consumer is slow on purpose (at most ``CONSUME_PER_S_MAX`` records a second, committing
after each poll) so that its group's lag is there to see while the producer runs.
"""
from __future__ import annotations

import os
import sys
import time

SEND_CHUNK = 200
VALUE = b"v" * 100
CONSUME_RECORDS_PER_POLL = 20
CONSUME_PAUSE_S = 0.1
CONSUME_PER_S_MAX = CONSUME_RECORDS_PER_POLL / CONSUME_PAUSE_S


def produce(data_dir: str, topic: str, stop_file: str, seconds: float) -> None:
    from shmbroker import Producer

    deadline = time.monotonic() + seconds
    with Producer(broker=data_dir, acks=1) as producer:
        while not os.path.exists(stop_file) and time.monotonic() < deadline:  # bounded
            for _ in range(SEND_CHUNK):
                producer.send(topic, VALUE)
            producer.flush()
            time.sleep(0.005)


def consume(data_dir: str, topic: str, group: str, stop_file: str, seconds: float) -> None:
    from shmbroker import Consumer

    deadline = time.monotonic() + seconds
    with Consumer(topic, broker=data_dir, group=group, enable_auto_commit=False,
                  auto_offset_reset="earliest") as consumer:
        while not os.path.exists(stop_file) and time.monotonic() < deadline:  # bounded
            if consumer.poll(timeout_ms=50, max_records=CONSUME_RECORDS_PER_POLL):
                consumer.commit()
            time.sleep(CONSUME_PAUSE_S)


if __name__ == "__main__":
    kind, args = sys.argv[1], sys.argv[2:]
    if kind == "produce":
        produce(args[0], args[1], args[2], float(args[3]))
    elif kind == "consume":
        consume(args[0], args[1], args[2], args[3], float(args[4]))
    else:
        raise SystemExit(f"unknown load {kind!r}")
