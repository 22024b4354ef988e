"""PartitionOwner: what the partition process does, without the process.

Owned by the partition process's main thread; not thread-safe. Takes a clock so tests can
drive retention without sleeping.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from ..config import BrokerConfig, LogConfig
from ..coordinator.topics import partition_dir
from ..log import PartitionLog
from ..log.partition_log import wall_clock_ms

log = logging.getLogger("shmbroker.partition")


class PartitionOwner:
    """Opens the log of ``topic``/``partition`` in ``data_dir`` (recovering it) and closes it
    cleanly. :meth:`step` is where the data plane will run."""

    def __init__(self, data_dir: str, topic: str, partition: int, log_config: LogConfig,
                 broker_config: BrokerConfig = BrokerConfig(),
                 clock_ms: Callable[[], int] = wall_clock_ms,
                 monotonic_ms: Callable[[], int] = lambda: time.monotonic_ns() // 1_000_000):
        self.topic = topic
        self.partition = partition
        self.directory = partition_dir(data_dir, topic, partition)
        self.broker_config = broker_config
        self._monotonic_ms = monotonic_ms
        self.log = PartitionLog.open(self.directory, log_config, clock=clock_ms)
        self._next_retention_ms = monotonic_ms() + broker_config.retention_check_interval_ms
        report = self.log.recovery_report
        log.info("partition %s/%d open at %s: log_start=%d log_end=%d; %s", topic, partition,
                 self.directory, self.log.log_start_offset, self.log.log_end_offset,
                 report.summary() if report is not None else "no recovery report")

    def step(self) -> int:
        """Do the work that is due; returns how much was done (0: nothing, the loop may sleep).

        NEXT (issue 3, section 3, data plane): drain this partition's shared-memory ingress
        rings (shmbroker/shm/ring.py, built separately) here:

            frames = ring.read_committed(max_bytes)      # claim/commit protocol of the ring
            info = self.log.append(frames)               # offsets assigned, writev to the log
            ring.release(frames); watermark.publish(info.last_offset + 1)  # then wake readers

        and apply acks=all (flush) before publishing. Nothing else in this class changes.
        """
        done = 0
        if self.log.maybe_flush():
            done += 1
        if self._monotonic_ms() >= self._next_retention_ms:
            self._next_retention_ms = self._monotonic_ms() + self.broker_config.retention_check_interval_ms
            deleted = self.log.delete_old_segments()
            if deleted:
                log.info("partition %s/%d: retention deleted segments %s", self.topic,
                         self.partition, deleted)
            done += len(deleted)
        return done

    def ms_until_due(self) -> int:
        """How long the loop may sleep before :meth:`step` has work (retention, flush.ms)."""
        due = self._next_retention_ms - self._monotonic_ms()
        flush_ms = self.log.config.flush_ms
        if flush_ms is not None:
            due = min(due, flush_ms)
        return max(0, due)

    def close(self) -> None:
        """Flush and close the log (writes its .clean-shutdown marker).

        NEXT: before closing, drain the rings one last time so every committed frame is in
        the log, then unlink this partition's shared-memory objects.
        """
        self.log.close()
        log.info("partition %s/%d closed cleanly at log_end=%d", self.topic, self.partition,
                 self.log.log_end_offset)
