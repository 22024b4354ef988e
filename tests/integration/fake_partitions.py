"""The partition processes' side of the consumer contract, played by the test process.

For each partition: the topic in ``topics.json``, a ``PartitionLog`` in its directory, and a
control region into which every append is published (high watermark, log start, active
segment base and end) exactly as the partition process does. Consumers in this or other
processes find all of it by the data dir, as they would with ``shmbroker serve``.
"""
from __future__ import annotations

import time

from shmbroker import records
from shmbroker.config import LogConfig
from shmbroker.coordinator.topics import TopicRegistry, load_topics, partition_dir, save_topics
from shmbroker.log import PartitionLog
from shmbroker.shm import names
from shmbroker.shm.control import ControlRegion

TIMESTAMP = 1_700_000_000_000


class FakePartitions:
    """Topics whose partitions are written and published by this process. Always close()."""

    def __init__(self, data_dir, clock=None):
        self.data_dir = str(data_dir)
        self.prefix = names.broker_prefix(self.data_dir)
        self.clock = clock
        self.logs: dict[tuple[str, int], PartitionLog] = {}
        self.controls: dict[tuple[str, int], ControlRegion] = {}

    def create_topic(self, topic: str, partitions: int = 1, **config) -> None:
        registry = load_topics(self.data_dir).create(topic, partitions, config or None)
        save_topics(self.data_dir, registry)
        log_config = LogConfig(**config)
        for p in range(partitions):
            key = (topic, p)
            self.logs[key] = PartitionLog.open(partition_dir(self.data_dir, topic, p), log_config,
                                               clock=self.clock)
            control = ControlRegion.create(names.control_name(self.prefix, topic, p), p)
            control.take_ownership(0)
            self.controls[key] = control
            self.publish(topic, p)

    def publish(self, topic: str, partition: int = 0, hw: int | None = None,
                end: int | None = None) -> None:
        log = self.logs[(topic, partition)]
        active = log.active_segment
        self.controls[(topic, partition)].publish(
            log.high_watermark if hw is None else hw, log.log_start_offset, active.base_offset,
            active.size if end is None else end, 0)

    def append(self, topic: str, partition: int, values, keys=None, headers=None,
               publish: bool = True, timestamp: int = TIMESTAMP):
        info = self.logs[(topic, partition)].append(
            records.encode_batch(list(values), keys=keys, headers=headers, timestamp=timestamp))
        if publish:
            self.publish(topic, partition)
        return info

    def fill(self, topic: str, partition: int, count: int, per_batch: int = 10,
             size: int = 20, start: int = 0) -> list[bytes]:
        """Append ``count`` records ``b"<partition>:<n>"`` padded to ``size``; returns values."""
        values = [f"{partition}:{start + i}:".encode().ljust(size, b"x") for i in range(count)]
        for i in range(0, count, per_batch):
            self.append(topic, partition, values[i:i + per_batch])
        return values

    def delete_old_segments(self, topic: str, partition: int = 0) -> list[int]:
        deleted = self.logs[(topic, partition)].delete_old_segments()
        self.publish(topic, partition)
        return deleted

    def close(self) -> None:
        for log in self.logs.values():
            if not log.closed:
                log.close()
        for control in self.controls.values():
            control.unlink()
            control.close()
        self.logs.clear()
        self.controls.clear()


def wait_until(predicate, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:  # bounded by the deadline
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)
