"""The `shmbroker top` command: one snapshot (``--once``, ``--json``), the full-screen live view
with keys (screen.py, when stdin and stdout are a terminal), or plain snapshots one after
another every ``--interval`` seconds until Ctrl-C (stdout not a terminal, or ``--plain``)."""
from __future__ import annotations

import json
import os
import sys
import time

from .snapshot import Monitor
from .text import render

#: ANSI: cursor home, clear screen (a tty only).
_CLEAR = "\x1b[H\x1b[2J"
INTERVAL_S_MIN = 0.05
INTERVAL_S_MAX = 3600.0


def run(data_dir: str, once: bool, as_json: bool, interval_s: float, out=None,
        plain: bool = False) -> int:
    out = out or sys.stdout
    monitor = Monitor(data_dir)
    try:
        first = monitor.sample()  # starts the CPU and rate clocks; no broker: an error here
        if once:
            time.sleep(interval_s)
            _show(monitor.sample(), as_json, False, out)
            return 0
        if not (plain or as_json) and _full_screen_possible(out):
            from . import screen

            return screen.run(monitor, first, interval_s)
        tty = out.isatty() and not as_json
        while True:  # until Ctrl-C (main() turns it into exit status 0)
            time.sleep(interval_s)
            _show(monitor.sample(), as_json, tty, out)
    except KeyboardInterrupt:
        return 0
    finally:
        monitor.close()


def _full_screen_possible(out) -> bool:
    """curses needs our stdout and stdin to be the terminal, and a terminal it knows."""
    if out is not sys.stdout or not (sys.stdout.isatty() and sys.stdin.isatty()):
        return False
    if os.environ.get("TERM", "dumb") in ("", "dumb"):
        return False
    import curses

    try:
        curses.setupterm()
    except curses.error:  # no terminfo entry for $TERM: plain snapshots instead
        return False
    return True


def _show(snap, as_json: bool, tty: bool, out) -> None:
    if as_json:
        out.write(json.dumps(snap.to_json(), sort_keys=True) + "\n")
    else:
        out.write((_CLEAR if tty else "") + render(snap) + ("" if tty else "\n"))
    out.flush()
