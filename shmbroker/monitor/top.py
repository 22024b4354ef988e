"""The `shmbroker top` command: one snapshot (``--once``, ``--json``) or a live view that
redraws every ``--interval`` seconds until Ctrl-C. Keys (view, sort, filter, pause) and the
full-screen curses view are not built yet (docs/design/monitor.md)."""
from __future__ import annotations

import json
import sys
import time

from .snapshot import Monitor
from .text import render

#: ANSI: cursor home, clear screen (a tty only).
_CLEAR = "\x1b[H\x1b[2J"
INTERVAL_S_MIN = 0.05
INTERVAL_S_MAX = 3600.0


def run(data_dir: str, once: bool, as_json: bool, interval_s: float, out=None) -> int:
    out = out or sys.stdout
    monitor = Monitor(data_dir)
    try:
        monitor.sample()  # the first sample starts the CPU and rate clocks
        if once:
            time.sleep(interval_s)
            _show(monitor.sample(), as_json, False, out)
            return 0
        tty = out.isatty() and not as_json
        while True:  # until Ctrl-C (main() turns it into exit status 0)
            time.sleep(interval_s)
            _show(monitor.sample(), as_json, tty, out)
    except KeyboardInterrupt:
        return 0
    finally:
        monitor.close()


def _show(snap, as_json: bool, tty: bool, out) -> None:
    if as_json:
        out.write(json.dumps(snap.to_json(), sort_keys=True) + "\n")
    else:
        out.write((_CLEAR if tty else "") + render(snap) + ("" if tty else "\n"))
    out.flush()
