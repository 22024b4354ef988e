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

from typing import Any, Callable, NamedTuple

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
    return (_serialized("key", key_serializer, key),
            _serialized("value", value_serializer, value))


def _serialized(what: str, serializer, data: Any) -> Any:
    if serializer is None or data is None:
        return data
    try:
        return serializer(data)
    except Exception as exc:
        raise errors.SerializationError(f"{what}_serializer raised for {what} {data!r:.80}: "
                                        f"{type(exc).__name__}: {exc}") from exc


class DeserializedRecord(NamedTuple):
    """A consumed record whose key and value went through the consumer's deserializers:
    the fields of ConsumerRecord (a named tuple, as kafka-python's ConsumerRecord is)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: Any
    value: Any
    headers: tuple

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


def deserialize(records: list, key_deserializer,
                value_deserializer) -> tuple[list, int, Exception | None]:
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
