"""Fixtures for tests that run a real broker (defined once, in broker_harness.py)."""
from broker_harness import (broker, broker_dir, make_broker,  # noqa: F401  (pytest fixtures)
                            stop_resource_tracker)
