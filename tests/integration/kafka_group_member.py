"""One Kafka-client consumer-group member, run as its own process by test_kafka_groups.py:

    python kafka_group_member.py CLIENT ADDRESS GROUP TOPIC OUT_PATH STOP_PATH

CLIENT is kafka-python, confluent-kafka or aiokafka. The member subscribes, and for every
poll writes ``{"records": [[partition, offset, value], ...]}`` to OUT_PATH and only then commits
those offsets synchronously (auto-commit off), so that a record written down is a record whose
commit was at least attempted. It leaves the group (closes) when STOP_PATH exists, and exits by
itself after LIFETIME_S whatever happens (the test may have died). Short session timeouts so a
kill -9'd member is noticed in seconds.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time

LIFETIME_S = 50.0
SESSION_TIMEOUT_MS = 3_000
HEARTBEAT_MS = 300
#: The rebalance timeout (Kafka clients send max.poll.interval.ms): a join phase waits at most
#: this long for members that do not rejoin.
MAX_POLL_INTERVAL_MS = 10_000


def main() -> None:
    client, address, group, topic, out_path, stop_path = sys.argv[1:7]
    out = open(out_path, "a", buffering=1)

    def emit(kind: str, **fields) -> None:
        out.write(json.dumps({"event": kind, "pid": os.getpid(), "t": round(time.time(), 3),
                              **fields}) + "\n")

    deadline = time.monotonic() + LIFETIME_S
    running = lambda: not os.path.exists(stop_path) and time.monotonic() < deadline  # noqa: E731
    emit("started")
    try:
        {"kafka-python": kafka_python, "confluent-kafka": confluent,
         "aiokafka": lambda *a: asyncio.run(aiokafka_member(*a))}[client](
            address, group, topic, emit, running)
    except BaseException as exc:  # the test's report shows it (stderr may be lost under xdist)
        emit("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    emit("closed")


def kafka_python(address, group, topic, emit, running) -> None:
    from kafka import ConsumerRebalanceListener, KafkaConsumer, OffsetAndMetadata

    class Listener(ConsumerRebalanceListener):  # rebalances go into the test's report
        def on_partitions_revoked(self, revoked):
            emit("revoked", partitions=sorted(tp.partition for tp in revoked))

        def on_partitions_assigned(self, assigned):
            emit("assigned", partitions=sorted(tp.partition for tp in assigned))

    consumer = KafkaConsumer(bootstrap_servers=address, group_id=group,
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             session_timeout_ms=SESSION_TIMEOUT_MS,
                             heartbeat_interval_ms=HEARTBEAT_MS,
                             max_poll_interval_ms=MAX_POLL_INTERVAL_MS)
    consumer.subscribe([topic], listener=Listener())
    try:
        while running():  # bounded by running()'s deadline
            # With 100 ms polls a member sometimes never finished a rejoin nor heartbeated
            # again until its session timeout removed it (three full-suite runs in a row once
            # broker starts got faster; never alone, never with 1 s polls so far). Suspected:
            # kafka-python 3.0's join, which stops waiting at the poll's timeout and resumes
            # at the next poll; not proven (perf/RESULTS.md, nineteenth session).
            batches = consumer.poll(timeout_ms=1000)
            got = [m for b in batches.values() for m in b]
            if got:
                emit("records", records=[[m.partition, m.offset, m.value.decode()] for m in got])
                consumer.commit({tp: OffsetAndMetadata(b[-1].offset + 1, "", -1)
                                 for tp, b in batches.items()})
    finally:
        consumer.close()


def confluent(address, group, topic, emit, running) -> None:
    from confluent_kafka import Consumer
    consumer = Consumer({"bootstrap.servers": address, "group.id": group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "session.timeout.ms": SESSION_TIMEOUT_MS,
                         "heartbeat.interval.ms": HEARTBEAT_MS,
                         "max.poll.interval.ms": MAX_POLL_INTERVAL_MS})
    consumer.subscribe([topic])
    try:
        while running():  # bounded by running()'s deadline
            got = [m for m in consumer.consume(num_messages=100, timeout=0.1) if not m.error()]
            if got:
                emit("records", records=[[m.partition(), m.offset(), m.value().decode()]
                                         for m in got])
                consumer.commit(asynchronous=False)
    finally:
        consumer.close()


async def aiokafka_member(address, group, topic, emit, running) -> None:
    from aiokafka import AIOKafkaConsumer
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=address, group_id=group,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                session_timeout_ms=SESSION_TIMEOUT_MS,
                                heartbeat_interval_ms=HEARTBEAT_MS,
                                max_poll_interval_ms=MAX_POLL_INTERVAL_MS,
                                rebalance_timeout_ms=MAX_POLL_INTERVAL_MS)
    await consumer.start()
    try:
        while running():  # bounded by running()'s deadline
            batches = await consumer.getmany(timeout_ms=100)
            got = [m for b in batches.values() for m in b]
            if got:
                emit("records", records=[[m.partition, m.offset, m.value.decode()] for m in got])
                await consumer.commit({tp: b[-1].offset + 1 for tp, b in batches.items()})
    finally:
        await consumer.stop()


if __name__ == "__main__":
    main()
