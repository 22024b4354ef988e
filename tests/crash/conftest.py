"""Crash tests that run a real broker reuse the integration tests' harness."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

from broker_harness import (broker, broker_dir, make_broker,  # noqa: E402,F401  (pytest fixtures)
                            stop_resource_tracker)


@pytest.fixture(autouse=True)
def _stop_resource_tracker(stop_resource_tracker):
    """Every crash test may spawn: the one definition, used by all of them."""
    yield

