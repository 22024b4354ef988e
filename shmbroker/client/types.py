"""Small value types shared by the clients (Kafka's names, so kafka-python habits carry over)."""
from __future__ import annotations

from typing import NamedTuple


class TopicPartition(NamedTuple):
    """One partition of a topic. A plain ``(topic, partition)`` tuple compares equal to it."""

    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}"


def as_topic_partition(value) -> TopicPartition:
    """``TopicPartition`` from one, or from a ``(topic, partition)`` pair; TypeError otherwise."""
    if isinstance(value, TopicPartition):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str) \
            and isinstance(value[1], int) and not isinstance(value[1], bool):
        return TopicPartition(value[0], value[1])
    raise TypeError(f"expected a TopicPartition or a (topic, partition) tuple, got {value!r}")


class OffsetAndMetadata(NamedTuple):
    """A committed position: ``offset`` (the next record to read) and free-form ``metadata``
    (at most GROUP_OFFSET_METADATA_BYTES_MAX bytes of UTF-8, stored with the offset; Kafka's
    OffsetAndMetadata). ``commit()`` takes it where it takes an int offset."""

    offset: int
    metadata: str = ""
