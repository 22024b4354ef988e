"""Is the process that owns a region still alive? pid plus start time, so pid reuse cannot
fool us (Linux /proc/<pid>/stat, field 22: start time in clock ticks since boot)."""
from __future__ import annotations

import os


def pid_start_time(pid: int) -> int | None:
    """Start time of ``pid``, or None when there is no such process or it is a zombie."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):  # exited: a zombie holds nothing
        return None
    return int(fields[19])


def process_alive(pid: int, start_time: int = 0) -> bool:
    """Whether ``pid`` runs and, if ``start_time`` is non-zero, is the process that had it."""
    found = pid_start_time(pid)
    if found is None:
        return False
    return start_time == 0 or found == start_time


def my_start_time() -> int:
    t = pid_start_time(os.getpid())
    assert t is not None
    return t
