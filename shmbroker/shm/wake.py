"""Futex wait and wake on 32-bit words of shared regions (the C core does the syscalls).

A wait sleeps in the kernel, not in a poll loop: an idle waiter uses no CPU. Every wait is
bounded by a timeout (monotonic clock) and re-checks signals, so Ctrl-C works while blocked.
The wake-up protocol that makes "check, then sleep" race-free is in docs/design/shm.md.
"""
from __future__ import annotations

import time

from ..layout.shm import WAIT_STATUS
from ..native import _native

WOKEN = WAIT_STATUS["WOKEN"]
TIMEOUT = WAIT_STATUS["TIMEOUT"]
CHANGED = WAIT_STATUS["CHANGED"]
INTERRUPTED = WAIT_STATUS["INTERRUPTED"]


def wait(buf, offset: int, expected: int, timeout_ms: float | None = None,
         spin_ns: int = 0) -> int:
    """Sleeps while the u32 at ``offset`` equals ``expected``; WOKEN, CHANGED or TIMEOUT.

    WOKEN may be spurious: callers re-check their condition. EINTR is handled here (signal
    handlers run; the wait resumes for the time left).
    """
    if timeout_ms is None:
        while True:
            r = _native.futex_wait(buf, offset, expected, -1, spin_ns)
            if r != INTERRUPTED:
                return r
    deadline = time.monotonic() + timeout_ms / 1000.0
    while True:
        left_ms = int((deadline - time.monotonic()) * 1000.0 + 0.999)
        if left_ms <= 0:
            return TIMEOUT if _native.atomic_load_u32(buf, offset) == expected else CHANGED
        r = _native.futex_wait(buf, offset, expected, left_ms, spin_ns)
        if r != INTERRUPTED:
            return r


def wake(buf, offset: int, count: int = 0x7FFFFFFF) -> int:
    """Wakes up to ``count`` waiters on the u32 at ``offset``; returns how many woke."""
    return _native.futex_wake(buf, offset, count)


def wait_any(words: list, timeout_ms: float | None = None, spin_ns: int = 0) -> int | None:
    """One sleep on several u32 words ``[(buf, offset, expected), ...]`` (Linux 5.16
    ``futex_waitv``): returns WOKEN, CHANGED or TIMEOUT as soon as any word differs from its
    expected value or is woken. None when the kernel has no futex_waitv: the caller waits on
    one word at a time instead. EINTR is handled here, as in :func:`wait`."""
    deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0
    while True:  # bounded by the deadline; without one, by a wake-up
        left_ms = -1 if deadline is None else int((deadline - time.monotonic()) * 1000.0 + 0.999)
        if deadline is not None and left_ms <= 0:
            return TIMEOUT
        r = _native.futex_waitv(words, left_ms, spin_ns)
        if r is None:
            return None
        if r[0] != INTERRUPTED:
            return r[0]
