"""The injectable millisecond clock of the unit tests (imported by name: tests/ is on sys.path
because tests/conftest.py lives there). Logic that takes a clock (the log's retention and
flush policy, the consumer-group state machine) is driven with it, so every run is the same."""
from __future__ import annotations


class FakeClock:
    """Milliseconds that move only when a test says so (monotonic: never backwards)."""

    def __init__(self, now_ms: int = 1_700_000_000_000):
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        assert ms >= 0, "a monotonic clock never goes back"
        self.now_ms += ms
