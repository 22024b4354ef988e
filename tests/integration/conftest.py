"""Fixtures for tests that run a real broker (defined once, in broker_harness.py)."""
from broker_harness import (broker, broker_dir, local_or_remote,  # noqa: F401  (fixtures)
                            make_broker, stop_resource_tracker)
