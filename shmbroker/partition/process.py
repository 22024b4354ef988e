"""The partition process's main loop: a thin wiring of PartitionOwner to signals and the
supervisor (docs/design/broker.md, "Partition process")."""
from __future__ import annotations

import argparse
import gc
import os
import logging
import signal
import sys

from .. import errors
from ..broker import lifecycle
from ..broker.naming import process_title
from ..config import PARTITION_SCHED_BATCH, SPIN_NS_MAX
from ..coordinator.topics import load_topics
from .owner import PartitionOwner

log = logging.getLogger("shmbroker.partition")

#: Exit status when the topic is gone from topics.json (deleted while we started): no restart
#: would help, and the supervisor stops wanting us once it reads the same file.
EXIT_TOPIC_GONE = 3
#: Exit status when the log's file system refused a write (full, read-only, failing): the
#: supervisor restarts us with its backoff, and the frames stay in the producers' rings
#: until a restarted process can append them (nothing acknowledged is lost; the restart's
#: recovery also drops a torn tail).
EXIT_STORAGE = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = lifecycle.child_parser("partition")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--partition", type=int, required=True)
    parser.add_argument("--spin-us", type=int, default=0,
                        help="busy-wait on the doorbell before sleeping (BrokerConfig)")
    return parser.parse_args(argv)


def _sched_batch(topic: str, partition: int) -> None:
    """SCHED_BATCH for this process (config.PARTITION_SCHED_BATCH; docs/design/partition.md,
    "Scheduling"). A kernel that refuses it leaves the default policy: only latency differs."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (OSError, AttributeError) as exc:
        log.warning("partition %s/%d: SCHED_BATCH refused (%s); default scheduling", topic,
                    partition, exc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = lifecycle.start_child(process_title("partition", args.topic, args.partition),
                                 args.supervisor_pid)
    try:
        topic = load_topics(args.data_dir).topics.get(args.topic)
        if topic is None or not 0 <= args.partition < topic.partitions:
            log.error("partition %s/%d is not in %s/topics.json; exiting", args.topic,
                      args.partition, args.data_dir)
            return EXIT_TOPIC_GONE
        owner = PartitionOwner(args.data_dir, args.topic, args.partition, topic.log_config,
                               spin_ns=max(0, min(args.spin_us, SPIN_NS_MAX // 1000)) * 1000)
    except errors.ShmbrokerError as exc:
        log.error("partition %s/%d cannot start: %s", args.topic, args.partition, exc)
        return 1
    if owner.spin_ns:
        log.info("partition %s/%d: busy-waits %d us on its doorbell before sleeping",
                 args.topic, args.partition, owner.spin_ns // 1000)
    # What start-up made (modules, the log's segments and indexes) lives as long as the
    # process: out of the collector's way, so that a collection triggered by a round's
    # short-lived objects does not walk all of it (py-spy of bench_roundtrip: 15-29% of the
    # partition process's samples were in gc_collect_main before).
    gc.collect()
    gc.freeze()
    if PARTITION_SCHED_BATCH:
        _sched_batch(args.topic, args.partition)
    clean = False
    try:
        lifecycle.report_ready(args.ready_fd, f"ready {owner.log.log_end_offset}")
        run_loop(owner, stop)
        owner.shutdown()
        clean = True
    except errors.LogError as exc:
        cause = exc.__cause__
        if not isinstance(cause, OSError) or cause.errno not in errors.STORAGE_ERRNOS:
            raise
        log.error("partition %s/%d cannot append: %s; exiting (restarted with backoff; "
                  "unacknowledged records wait in the producers' rings)", args.topic,
                  args.partition, exc)
        return EXIT_STORAGE
    finally:
        owner.close(stopped=clean)
    return 0


def run_loop(owner: PartitionOwner, stop: lifecycle.StopSignal) -> None:
    """The process main loop: unbounded by design, it ends on SIGTERM (or supervisor death)."""
    def on_sigterm(signum, frame):
        stop._handle(signum, frame)
        owner.interrupt()  # a doorbell sleep returns at once

    signal.signal(signal.SIGTERM, on_sigterm)
    step = True
    while not stop.requested:
        if step:
            owner.step()
        # Sleep on the doorbell futex until a producer commits frames, a signal, or the next
        # periodic duty (dead producers, retention, flush.ms). It returns at once when a ring
        # is readable (it looks after raising the sleeping flag), so a busy partition goes
        # from round to round without an empty step between them (measured: every 1-frame
        # round used to be followed by a step that polled every ring for nothing). When the
        # wake-up itself ran the round (drain_sleep_round), the step after it would find
        # nothing unless a duty is due, a rolled segment's background fsync may have ended,
        # or more came: the next look tells (it returns at once if a ring is readable, and
        # then the step runs).
        woke_with_round = owner.wait_for_work(owner.ms_until_due(), lambda: stop.requested)
        step = not woke_with_round or owner.ms_until_due() == 0 \
            or owner.log.roll_flushes_pending  # the flusher's wake-up: step collects it


if __name__ == "__main__":
    sys.exit(main())
