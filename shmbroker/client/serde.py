"""Key and value serializers and deserializers: kafka-python's ``key_serializer``,
``value_serializer`` (Producer) and ``key_deserializer``, ``value_deserializer`` (Consumer)
arguments, plain callables of one argument (docs/design/consumer.md, "Serializers").

None is never passed to them: a null key or value stays None both ways (a tombstone stays a
tombstone; kafka-python calls them with None, which a JSON serializer turns into b"null").
What a serializer returns must be bytes-like or None, as a value given to ``send``.

Records are built in C and hold only bytes; a consumer with a deserializer hands out
:class:`DeserializedRecord` objects instead (the same fields).
"""
from __future__ import annotations

from typing import Any, Callable

from .. import errors
from .types import TopicPartition


def checked(name: str, function: Any) -> Callable[[Any], Any] | None:
    """``function`` if it is None or callable, else ConfigError naming the argument."""
    if function is not None and not callable(function):
        raise errors.ConfigError(f"{name} must be a callable of one argument or None, got "
                                 f"{type(function).__name__}")
    return function


def serialize(key_serializer, value_serializer, key: Any, value: Any) -> tuple[Any, Any]:
    """(key, value) through the serializers; SerializationError names which one raised."""
    try:
        if key_serializer is not None and key is not None:
            key = key_serializer(key)
    except Exception as exc:
        raise errors.SerializationError(f"key_serializer raised for key {key!r:.80}: "
                                        f"{type(exc).__name__}: {exc}") from exc
    try:
        if value_serializer is not None and value is not None:
            value = value_serializer(value)
    except Exception as exc:
        raise errors.SerializationError(f"value_serializer raised for value {value!r:.80}: "
                                        f"{type(exc).__name__}: {exc}") from exc
    return key, value


class DeserializedRecord:
    """A consumed record whose key and value went through the consumer's deserializers:
    topic, partition, offset, timestamp, key, value, headers (as ConsumerRecord)."""

    __slots__ = ("topic", "partition", "offset", "timestamp", "key", "value", "headers")

    def __init__(self, topic, partition, offset, timestamp, key, value, headers):
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.timestamp = timestamp
        self.key = key
        self.value = value
        self.headers = headers

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def _fields(self) -> tuple:
        return (self.topic, self.partition, self.offset, self.timestamp, self.key, self.value,
                self.headers)

    def __eq__(self, other) -> bool:
        if not isinstance(other, DeserializedRecord):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"DeserializedRecord(topic={self.topic!r}, partition={self.partition}, "
                f"offset={self.offset}, timestamp={self.timestamp}, key={self.key!r}, "
                f"value={self.value!r}, headers={self.headers!r})")


def deserialize(records: list, key_deserializer, value_deserializer) -> tuple[list, int, Exception | None]:
    """(the records deserialized, up to the first that failed; its index or -1; the error)."""
    out = []
    for i, r in enumerate(records):  # bounded by one poll's records
        try:
            key, value = r.key, r.value
            if key_deserializer is not None and key is not None:
                key = key_deserializer(key)
            if value_deserializer is not None and value is not None:
                value = value_deserializer(value)
        except Exception as exc:
            return out, i, exc
        out.append(DeserializedRecord(r.topic, r.partition, r.offset, r.timestamp, key, value,
                                      r.headers))
    return out, -1, None
