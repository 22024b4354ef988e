"""Topic rules, the registry, and topics.json: pure logic and files, no processes."""
from __future__ import annotations

import json
import os

import pytest

from shmbroker import errors
from shmbroker.config import BROKER_PARTITIONS_MAX, TOPIC_PARTITIONS_MAX
from shmbroker.coordinator.topics import (TopicRegistry, expected_partitions, load_topics,
                                          partition_dir, save_topics, topics_path,
                                          validate_topic_name)


@pytest.mark.parametrize("name", ["orders", "a", "A.b_c-D9", "x" * 249, "__private", "..."])
def test_kafka_legal_topic_names_are_accepted(name):
    assert validate_topic_name(name) == name


@pytest.mark.parametrize("name,message", [
    ("", "non-empty"), (".", "cannot be '.'"), ("..", "cannot be '..'"), ("x" * 250, "limit is 249"),
    ("a b", "character other than"), ("a/b", "character other than"), ("é", "character other than"),
    ("a\x00", "character other than"), (None, "non-empty string"), (3, "non-empty string"),
    ("__consumer_offsets", "reserved for the broker's internal offsets log"),
])
def test_illegal_topic_names_are_refused_with_the_rule_broken(name, message):
    with pytest.raises(errors.InvalidTopicError, match=message):
        validate_topic_name(name)


def test_create_stores_only_overrides_by_our_names_and_values_as_integers():
    registry = TopicRegistry().create("t", 2, {"retention.ms": "1000", "segment_bytes": 4096,
                                               "flush.messages": "none"}, now_ms=5)
    topic = registry.get("t")
    assert topic.config == {"retention_ms": 1000, "segment_bytes": 4096, "flush_messages": None}
    assert topic.log_config.retention_ms == 1000 and topic.log_config.segment_bytes == 4096
    assert topic.created_ms == 5 and len(topic.topic_id) == 32
    assert topic.describe()["config"]["retention_bytes"] == -1  # defaults filled in


def test_registry_changes_are_checked_and_never_mutate_the_old_registry():
    empty = TopicRegistry()
    one = empty.create("t", 2)
    assert empty.names() == [] and one.names() == ["t"]
    with pytest.raises(errors.TopicAlreadyExistsError):
        one.create("t", 1)
    with pytest.raises(errors.UnknownTopicOrPartitionError):
        one.alter_partitions("u", 3)
    with pytest.raises(errors.InvalidPartitionsError, match="can only be increased"):
        one.alter_partitions("t", 2)
    assert one.alter_partitions("t", 3).get("t").partitions == 3
    assert one.get("t").partitions == 2
    for bad in (0, -1, TOPIC_PARTITIONS_MAX + 1, True, "2", 2.0):
        with pytest.raises(errors.InvalidPartitionsError):
            empty.create("t", bad)
    with pytest.raises(errors.ConfigError, match="unknown topic config"):
        empty.create("t", 1, {"nope": 1})
    with pytest.raises(errors.ConfigError, match="outside"):
        empty.create("t", 1, {"max.message.bytes": 1})


def test_broker_wide_partition_limit_counts_topics_being_deleted():
    registry = TopicRegistry()
    for i in range(BROKER_PARTITIONS_MAX // TOPIC_PARTITIONS_MAX):
        registry = registry.create(f"t{i}", TOPIC_PARTITIONS_MAX)
    registry = registry.delete("t0")
    with pytest.raises(errors.InvalidPartitionsError, match="one process each"):
        registry.create("more", 1)


def test_delete_is_two_steps_and_blocks_the_name_until_directories_are_gone():
    registry = TopicRegistry().create("t", 2).delete("t")
    assert registry.names() == [] and list(registry.deleting) == ["t"]
    assert list(expected_partitions(registry)) == []
    with pytest.raises(errors.TopicAlreadyExistsError, match="being deleted"):
        registry.create("t", 1)
    with pytest.raises(errors.UnknownTopicOrPartitionError):
        registry.delete("t")
    assert registry.finish_delete("t").create("t", 1).names() == ["t"]


def test_topics_json_round_trips_and_is_replaced_atomically_with_mode_0600(tmp_path):
    registry = TopicRegistry().create("a", 3, {"retention.ms": 5}).create("b", 1).delete("b")
    save_topics(str(tmp_path), registry)
    assert os.stat(topics_path(str(tmp_path))).st_mode & 0o777 == 0o600
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))
    loaded = load_topics(str(tmp_path))
    assert loaded == registry
    assert list(expected_partitions(loaded)) == [("a", 0), ("a", 1), ("a", 2)]


def test_a_missing_topics_file_is_an_empty_registry(tmp_path):
    assert load_topics(str(tmp_path)) == TopicRegistry()


@pytest.mark.parametrize("content,message", [
    (b"{not json", "not valid JSON"),
    (b"[]", "not a shmbroker-topics file"),
    (b'{"format": "shmbroker-topics", "version": 2, "topics": []}', "version 2 is not supported"),
    (b'{"format": "shmbroker-topics", "version": 1}', "'topics' must be a list"),
    (b'{"format": "shmbroker-topics", "version": 1, "topics": [{"name": "a/b", "partitions": 1, '
     b'"topic_id": "x", "created_ms": 0, "config": {}}]}', "character other than"),
    (b'{"format": "shmbroker-topics", "version": 1, "topics": [{"name": "a", "partitions": 0, '
     b'"topic_id": "x", "created_ms": 0, "config": {}}]}', "partitions=0"),
    (b'{"format": "shmbroker-topics", "version": 1, "topics": [{"name": "a", "partitions": 1, '
     b'"topic_id": "x", "created_ms": 0, "config": {"segment.bytes": 1}}]}', "segment_bytes=1"),
    (b'{"format": "shmbroker-topics", "version": 1, "topics": [{"name": "a", "partitions": 1}]}', "lacks"),
])
def test_an_invalid_topics_file_is_a_clear_error_naming_the_file(tmp_path, content, message):
    (tmp_path / "topics.json").write_bytes(content)
    with pytest.raises(errors.ConfigError, match=message) as info:
        load_topics(str(tmp_path))
    assert str(tmp_path / "topics.json") in str(info.value)


def test_duplicate_topics_in_the_file_are_refused(tmp_path):
    entry = {"name": "a", "partitions": 1, "topic_id": "x", "created_ms": 0, "config": {}}
    (tmp_path / "topics.json").write_text(json.dumps(
        {"format": "shmbroker-topics", "version": 1, "topics": [entry, entry]}))
    with pytest.raises(errors.ConfigError, match="listed twice"):
        load_topics(str(tmp_path))


def test_partition_directories_use_kafkas_names():
    assert partition_dir("/d", "orders", 3) == "/d/orders-3"
    assert partition_dir("/d", "a-1", 0) != partition_dir("/d", "a", 10)
