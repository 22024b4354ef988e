"""Crash tests that run a real broker reuse the integration tests' harness."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

from broker_harness import broker, broker_dir, make_broker  # noqa: E402,F401  (pytest fixtures)


@pytest.fixture(autouse=True)
def stop_resource_tracker():
    """multiprocessing's spawn starts a resource-tracker process that outlives the test."""
    yield
    from multiprocessing import resource_tracker

    resource_tracker._resource_tracker._stop()
