"""Topic metadata: the rules a topic must satisfy, the registry of topics, and its file.

Plain objects and functions, no processes or sockets (the coordinator process wires them to a
socket, the supervisor reads the file). ``TopicRegistry`` is immutable: every change returns a
new registry, which the caller persists (:func:`save_topics`) before it replaces the old one,
so a failed write leaves memory and disk agreeing.

The file ``<data_dir>/topics.json`` (0600, replaced atomically: tmp, fsync, rename, fsync of the
directory), written only by the coordinator::

    {
      "format": "shmbroker-topics",
      "version": 1,
      "topics": [
        {"name": "orders", "partitions": 4, "topic_id": "9f1c...", "created_ms": 1764000000000,
         "config": {"retention_ms": 3600000}}           # overrides only, our names, ints/null
      ],
      "deleting": [ ...same shape... ]                   # deleted, directories not yet removed
    }

A topic in ``deleting`` has no partition processes; its directories are removed once the
supervisor has confirmed that they stopped, and then it leaves the file. Until then its name
cannot be reused (a new topic must never adopt the old one's data).
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .. import errors
from ..config import (BROKER_PARTITIONS_MAX, BROKER_TOPICS_MAX, TOPIC_NAME_LENGTH_MAX,
                      TOPIC_PARTITIONS_MAX, LogConfig)
from ..log import files

TOPICS_FILE = "topics.json"
TOPICS_FORMAT = "shmbroker-topics"
TOPICS_VERSION = 1
#: topics.json is read whole; one topic takes well under 1 KiB.
TOPICS_FILE_BYTES_MAX = 16 * 1024 * 1024

_LEGAL_NAME = re.compile(r"^[a-zA-Z0-9._-]+$")
#: The committed-offsets log (coordinator/offsets.py) lives in ``<data_dir>/__consumer_offsets-0``,
#: beside the topics' partition directories: no user topic may take the name (Kafka refuses to
#: create its internal topics too).
OFFSETS_TOPIC = "__consumer_offsets"
INTERNAL_TOPICS = frozenset({OFFSETS_TOPIC})


def validate_topic_name(name: Any) -> str:
    """Kafka's rules (``org.apache.kafka.common.internals.Topic.validate``)."""
    if not isinstance(name, str) or not name:
        raise errors.InvalidTopicError(f"topic name must be a non-empty string, got {name!r}")
    if name in (".", ".."):
        raise errors.InvalidTopicError(f"topic name cannot be {name!r}")
    if len(name) > TOPIC_NAME_LENGTH_MAX:
        raise errors.InvalidTopicError(
            f"topic name is {len(name)} characters long; the limit is {TOPIC_NAME_LENGTH_MAX}")
    if not _LEGAL_NAME.match(name):
        raise errors.InvalidTopicError(
            f"topic name {name!r} contains a character other than ASCII letters, digits, "
            f"'.', '_' and '-'")
    if name in INTERNAL_TOPICS:
        raise errors.InvalidTopicError(f"topic name {name!r} is reserved for the broker's "
                                       f"internal offsets log")
    return name


def validate_partitions(partitions: Any) -> int:
    if not isinstance(partitions, int) or isinstance(partitions, bool):
        raise errors.InvalidPartitionsError(f"partitions must be an integer, got {partitions!r}")
    if not 1 <= partitions <= TOPIC_PARTITIONS_MAX:
        raise errors.InvalidPartitionsError(
            f"partitions={partitions} is outside [1, {TOPIC_PARTITIONS_MAX}]")
    return partitions


def partition_dir(data_dir: str, topic: str, partition: int) -> str:
    """``<data_dir>/<topic>-<partition>``, Kafka's directory name. Unambiguous: the part after
    the last '-' is the partition number, and a topic name never ends in a partition suffix
    that could collide because the number is always present."""
    return os.path.join(data_dir, f"{topic}-{partition}")


@dataclass(frozen=True)
class TopicMetadata:
    """One topic. ``config`` holds only the overrides, by our names (see LogConfig)."""

    name: str
    partitions: int
    topic_id: str
    created_ms: int
    config: Mapping[str, int | None] = field(default_factory=dict)

    @property
    def log_config(self) -> LogConfig:
        return LogConfig.from_mapping(self.config)

    def describe(self) -> dict[str, Any]:
        """The coordinator's describe_topic result (docs/design/broker.md)."""
        return {"name": self.name, "partitions": self.partitions, "topic_id": self.topic_id,
                "created_ms": self.created_ms, "overrides": dict(self.config),
                "config": self.log_config.as_dict()}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "partitions": self.partitions, "topic_id": self.topic_id,
                "created_ms": self.created_ms, "config": dict(self.config)}

    @classmethod
    def from_json(cls, value: Any) -> "TopicMetadata":
        if not isinstance(value, dict):
            raise errors.ConfigError(f"a topic entry must be an object, got {value!r}")
        missing = {"name", "partitions", "topic_id", "created_ms", "config"} - value.keys()
        if missing:
            raise errors.ConfigError(f"topic entry {value.get('name')!r} lacks {sorted(missing)}")
        name = validate_topic_name(value["name"])
        config = value["config"]
        if not isinstance(config, dict):
            raise errors.ConfigError(f"topic {name!r}: config must be an object")
        if not isinstance(value["topic_id"], str) or not isinstance(value["created_ms"], int):
            raise errors.ConfigError(f"topic {name!r}: topic_id must be a string, created_ms an integer")
        return cls(name, validate_partitions(value["partitions"]), value["topic_id"],
                   value["created_ms"], LogConfig.canonical_mapping(config))


@dataclass(frozen=True)
class TopicRegistry:
    """All topics of a broker (immutable; each change returns a new registry)."""

    topics: Mapping[str, TopicMetadata] = field(default_factory=dict)
    deleting: Mapping[str, TopicMetadata] = field(default_factory=dict)

    def get(self, name: str) -> TopicMetadata:
        topic = self.topics.get(name)
        if topic is None:
            raise errors.UnknownTopicOrPartitionError(f"unknown topic {name!r}")
        return topic

    def names(self) -> list[str]:
        return sorted(self.topics)

    def partition_count(self) -> int:
        return sum(t.partitions for t in self.topics.values()) + sum(
            t.partitions for t in self.deleting.values())

    def create(self, name: Any, partitions: Any, config: Mapping[str, Any] | None = None,
               now_ms: int | None = None) -> "TopicRegistry":
        name = validate_topic_name(name)
        partitions = validate_partitions(partitions)
        if name in self.topics:
            raise errors.TopicAlreadyExistsError(f"topic {name!r} already exists")
        if name in self.deleting:
            raise errors.TopicAlreadyExistsError(
                f"topic {name!r} is being deleted (its directories are not removed yet); "
                f"try again shortly")
        if len(self.topics) + len(self.deleting) >= BROKER_TOPICS_MAX:
            raise errors.InvalidTopicError(f"this broker already has {BROKER_TOPICS_MAX} topics")
        self._check_broker_partitions(partitions)
        if config is not None and not isinstance(config, Mapping):
            raise errors.ConfigError(f"topic config must be a mapping, got {config!r}")
        topic = TopicMetadata(name, partitions, uuid.uuid4().hex,
                              now_ms if now_ms is not None else time.time_ns() // 1_000_000,
                              LogConfig.canonical_mapping(config))
        return TopicRegistry({**self.topics, name: topic}, self.deleting)

    def alter_partitions(self, name: Any, partitions: Any) -> "TopicRegistry":
        topic = self.get(validate_topic_name(name))
        partitions = validate_partitions(partitions)
        if partitions <= topic.partitions:
            raise errors.InvalidPartitionsError(
                f"topic {name!r} has {topic.partitions} partition(s); the count can only be "
                f"increased (asked for {partitions})")
        self._check_broker_partitions(partitions - topic.partitions)
        changed = TopicMetadata(topic.name, partitions, topic.topic_id, topic.created_ms, topic.config)
        return TopicRegistry({**self.topics, name: changed}, self.deleting)

    def delete(self, name: Any) -> "TopicRegistry":
        """Step 1 of a deletion: the topic moves to ``deleting`` (its processes must stop)."""
        topic = self.get(validate_topic_name(name))
        topics = {k: v for k, v in self.topics.items() if k != name}
        return TopicRegistry(topics, {**self.deleting, name: topic})

    def finish_delete(self, name: str) -> "TopicRegistry":
        """Step 2: the directories are gone; forget the topic."""
        assert name in self.deleting, name
        return TopicRegistry(self.topics, {k: v for k, v in self.deleting.items() if k != name})

    def _check_broker_partitions(self, added: int) -> None:
        if self.partition_count() + added > BROKER_PARTITIONS_MAX:
            raise errors.InvalidPartitionsError(
                f"this broker would have {self.partition_count() + added} partitions; the "
                f"limit is {BROKER_PARTITIONS_MAX} (one process each)")

    def to_json(self) -> dict[str, Any]:
        return {"format": TOPICS_FORMAT, "version": TOPICS_VERSION,
                "topics": [self.topics[n].to_json() for n in sorted(self.topics)],
                "deleting": [self.deleting[n].to_json() for n in sorted(self.deleting)]}

    @classmethod
    def from_json(cls, value: Any) -> "TopicRegistry":
        if not isinstance(value, dict) or value.get("format") != TOPICS_FORMAT:
            raise errors.ConfigError(f"not a {TOPICS_FORMAT} file (format field missing or wrong)")
        if value.get("version") != TOPICS_VERSION:
            raise errors.ConfigError(
                f"{TOPICS_FORMAT} version {value.get('version')!r} is not supported "
                f"(this shmbroker reads version {TOPICS_VERSION})")
        topics = _entries(value.get("topics"), "topics")
        deleting = _entries(value.get("deleting", []), "deleting")
        both = topics.keys() & deleting.keys()
        if both:
            raise errors.ConfigError(f"topics both live and being deleted: {sorted(both)}")
        return cls(topics, deleting)


def _entries(values: Any, key: str) -> dict[str, TopicMetadata]:
    if not isinstance(values, list):
        raise errors.ConfigError(f"{key!r} must be a list")
    out: dict[str, TopicMetadata] = {}
    for value in values:
        topic = TopicMetadata.from_json(value)
        if topic.name in out:
            raise errors.ConfigError(f"topic {topic.name!r} is listed twice in {key!r}")
        out[topic.name] = topic
    return out


def topics_path(data_dir: str) -> str:
    return os.path.join(data_dir, TOPICS_FILE)


def load_topics(data_dir: str) -> TopicRegistry:
    """The registry in ``data_dir``; empty when there is no file yet. A file that is not valid
    is a :class:`ConfigError` naming the file, never a guess."""
    path = topics_path(data_dir)
    try:
        with open(path, "rb") as f:
            raw = f.read(TOPICS_FILE_BYTES_MAX + 1)
    except FileNotFoundError:
        return TopicRegistry()
    try:
        if len(raw) > TOPICS_FILE_BYTES_MAX:
            raise errors.ConfigError(f"larger than {TOPICS_FILE_BYTES_MAX} bytes")
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise errors.ConfigError(f"not valid JSON ({exc})") from None
        return TopicRegistry.from_json(value)
    except errors.ShmbrokerError as exc:
        raise errors.ConfigError(f"{path}: {exc}") from None


def save_topics(data_dir: str, registry: TopicRegistry) -> None:
    data = json.dumps(registry.to_json(), indent=1, sort_keys=True).encode() + b"\n"
    files.write_atomic(topics_path(data_dir), data)


def expected_partitions(registry: TopicRegistry) -> Iterable[tuple[str, int]]:
    """Every (topic, partition) that should have a running process."""
    for name in sorted(registry.topics):
        for partition in range(registry.topics[name].partitions):
            yield name, partition
