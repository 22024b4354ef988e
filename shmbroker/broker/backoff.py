"""Restart policy for crashed children: plain logic with an injected clock (unit-tested).

The first crash is restarted at once: issue 3 wants a dead partition back within 1 s. A child
that keeps dying soon after each start (a crash loop: bad config, full disk) waits
``restart_backoff_min_ms``, then twice that, ... up to ``restart_backoff_max_ms``, so the
supervisor neither spins nor floods the log. A child that lived ``restart_stable_ms`` counts as
healthy again and its next crash is restarted at once.
"""
from __future__ import annotations

from ..config import BrokerConfig


class RestartBackoff:
    """Per-child state. Times in ms from any monotonic clock; owned by the supervisor."""

    def __init__(self, config: BrokerConfig):
        self.config = config
        self.quick_crashes = 0
        self.restarts = 0

    def delay_ms(self, started_ms: int, died_ms: int) -> int:
        """Record a death of a child started at ``started_ms``; how long to wait before the restart."""
        assert died_ms >= started_ms, (started_ms, died_ms)
        self.restarts += 1
        if died_ms - started_ms >= self.config.restart_stable_ms:
            self.quick_crashes = 0
        self.quick_crashes += 1
        if self.quick_crashes == 1:
            return 0
        # Bounded: the shift is capped before it could grow without limit.
        delay = self.config.restart_backoff_min_ms << min(self.quick_crashes - 2, 30)
        return min(delay, self.config.restart_backoff_max_ms)
