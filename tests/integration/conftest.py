"""Fixtures for tests that run a real broker: a short data dir (a Unix socket path holds only
107 bytes, pytest's tmp_path is long) and brokers that are always stopped."""
from __future__ import annotations

import shutil
import tempfile

import pytest
from broker_harness import Broker


@pytest.fixture
def broker_dir(tmp_path):
    path = tempfile.mkdtemp(prefix="shmb-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_broker(broker_dir, tmp_path):
    """``make_broker()`` -> a started Broker on ``broker_dir``; every one is stopped at teardown."""
    brokers: list[Broker] = []

    def make(start: bool = True, data_dir: str | None = None) -> Broker:
        broker = Broker(data_dir or broker_dir, tmp_path / f"broker-{len(brokers)}.log")
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.cleanup()


@pytest.fixture
def broker(make_broker):
    return make_broker()
