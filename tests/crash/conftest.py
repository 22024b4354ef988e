"""Crash tests that run a real broker reuse the integration tests' harness."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

from broker_harness import Broker  # noqa: E402


@pytest.fixture
def broker_dir():
    path = tempfile.mkdtemp(prefix="shmb-", dir="/tmp")  # short: a Unix socket path lives there
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_broker(broker_dir, tmp_path):
    """``make_broker()`` -> a started Broker on ``broker_dir``; every one is stopped at teardown."""
    brokers: list[Broker] = []

    def make(start: bool = True) -> Broker:
        broker = Broker(broker_dir, tmp_path / f"broker-{len(brokers)}.log")
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.cleanup()


@pytest.fixture(autouse=True)
def stop_resource_tracker():
    """multiprocessing's spawn starts a resource-tracker process that outlives the test."""
    yield
    from multiprocessing import resource_tracker

    resource_tracker._resource_tracker._stop()
