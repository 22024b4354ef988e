"""Fixtures for the log unit tests: an injected clock and logs that are always closed."""
from __future__ import annotations

import pytest
from log_helpers import FakeClock

from shmbroker.config import LogConfig
from shmbroker.log import PartitionLog


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def open_log(tmp_path, clock):
    """``open_log(name="p0", **config_fields)`` -> PartitionLog in tmp_path, closed at teardown."""
    opened: list[PartitionLog] = []

    def _open(name: str = "p0", leader_epoch: int = 0, **config) -> PartitionLog:
        log = PartitionLog.open(str(tmp_path / name), LogConfig(**config), clock=clock,
                                leader_epoch=leader_epoch)
        opened.append(log)
        return log

    yield _open
    for log in opened:
        log.close()
