"""LogConfig: defaults, Kafka's dotted names, and limits enforced at the boundary."""
import pytest

from shmbroker.config import BATCH_BYTES_MAX_LIMIT, LogConfig, MiB
from shmbroker.errors import ConfigError


def test_defaults_follow_kafka():
    c = LogConfig()
    assert c.segment_bytes == 1 << 30
    assert c.batch_bytes_max == 1 * MiB
    assert c.index_interval_bytes == 4096
    assert c.retention_bytes == -1


def test_kafka_dotted_names_and_string_values_are_accepted():
    c = LogConfig.from_mapping({"segment.bytes": "4096", "retention.ms": "1000",
                                "max.message.bytes": str(16 * MiB), "flush.messages": "10"})
    assert (c.segment_bytes, c.retention_ms, c.batch_bytes_max, c.flush_messages) == (
        4096, 1000, 16 * MiB, 10)


def test_largest_batch_is_capped_at_64_mib():
    LogConfig(batch_bytes_max=BATCH_BYTES_MAX_LIMIT)
    with pytest.raises(ConfigError, match="batch_bytes_max"):
        LogConfig(batch_bytes_max=BATCH_BYTES_MAX_LIMIT + 1)


@pytest.mark.parametrize("bad", [{"segment_bytes": 10}, {"segment_bytes": 1 << 31},
                                 {"retention_ms": -2}, {"flush_messages": 0},
                                 {"segment_bytes": "lots"}, {"no_such_setting": 1}])
def test_bad_values_are_config_errors_naming_the_setting(bad):
    with pytest.raises(ConfigError) as info:
        LogConfig.from_mapping(bad)
    assert next(iter(bad)).split(".")[0] in str(info.value)
