"""Small value types shared by the clients (Kafka's names, so kafka-python habits carry over)."""
from __future__ import annotations

from typing import NamedTuple


class TopicPartition(NamedTuple):
    """One partition of a topic. A plain ``(topic, partition)`` tuple compares equal to it."""

    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}"


def topic_names(topics) -> tuple[str, ...]:
    """Consumer's topics: names given one by one (``Consumer("a", "b")``, kafka-python) or in
    a list, tuple or set (``Consumer(["a", "b"])``, confluent-kafka's subscribe); TypeError
    for anything else, naming it."""
    out: list[str] = []
    for item in topics:
        names = [item] if isinstance(item, str) else \
            list(item) if isinstance(item, (list, tuple, set, frozenset)) else None
        if names is None or not all(isinstance(n, str) for n in names):
            raise TypeError(f"topics must be names (str), one by one or in a list, got "
                            f"{item!r:.100}")
        out.extend(names)
    return tuple(out)


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


class OffsetAndTimestamp(NamedTuple):
    """``offsets_for_times``' answer for one partition: the first record at or after the
    asked time, its ``offset`` and its ``timestamp`` (ms since the epoch; Kafka's
    OffsetAndTimestamp)."""

    offset: int
    timestamp: int


#: The largest timestamp offsets_for_times takes: Kafka's are int64 ms.
TIMESTAMP_MAX = (1 << 63) - 1


def timestamps_arg(timestamps) -> dict[TopicPartition, int]:
    """``offsets_for_times``' argument checked: a mapping of partition (a TopicPartition or a
    ``(topic, partition)`` pair) to ms since the epoch (an int >= 0)."""
    from .. import errors

    if not hasattr(timestamps, "items"):
        raise errors.ConfigError(f"offsets_for_times takes a mapping {{TopicPartition: "
                                 f"timestamp_ms}}, got {type(timestamps).__name__}")
    out = {}
    for tp, ts in timestamps.items():
        if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts <= TIMESTAMP_MAX:
            raise errors.ConfigError(f"offsets_for_times: the timestamp of {tp} must be an int "
                                     f">= 0 (ms since the epoch), got {ts!r}")
        out[as_topic_partition(tp)] = ts
    return out
