"""Restart policy: a crash is restarted at once, a crash loop backs off, bounded."""
from shmbroker.broker.backoff import RestartBackoff
from shmbroker.config import BrokerConfig

CONFIG = BrokerConfig(restart_backoff_min_ms=100, restart_backoff_max_ms=1000, restart_stable_ms=5000)


def test_first_crash_restarts_at_once_then_a_crash_loop_doubles_up_to_the_max():
    backoff = RestartBackoff(CONFIG)
    delays = [backoff.delay_ms(started_ms=t * 10, died_ms=t * 10 + 5) for t in range(8)]
    assert delays == [0, 100, 200, 400, 800, 1000, 1000, 1000]
    assert backoff.restarts == 8


def test_a_child_that_lived_long_enough_is_restarted_at_once_again():
    backoff = RestartBackoff(CONFIG)
    for t in range(5):
        backoff.delay_ms(t, t + 1)
    assert backoff.delay_ms(started_ms=100, died_ms=100 + 5000) == 0
    assert backoff.delay_ms(started_ms=6000, died_ms=6001) == 100


def test_the_delay_stays_bounded_after_very_many_crashes():
    backoff = RestartBackoff(CONFIG)
    assert max(backoff.delay_ms(0, 1) for _ in range(10_000)) == 1000
