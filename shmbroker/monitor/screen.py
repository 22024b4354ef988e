"""The full-screen `shmbroker top` (curses, from the standard library): samples the broker every
``interval_s``, draws what ``views.layout`` says, and turns keys into ``ViewState.on_key``
calls. Everything about *what* is shown lives in views.py; this module only talks to the
terminal.

Sampling runs on the same thread as the keys: between refreshes the loop waits for a key at
most ``KEY_WAIT_MS`` at a time, so a key is answered within that (a sample itself takes a few
milliseconds, up to the coordinator's 2 s request timeout when the coordinator is down).
"""
from __future__ import annotations

import curses
import time

from .. import errors
from .snapshot import Monitor, Snapshot
from .views import LagTrend, Line, ViewState, layout

#: Longest wait for a key before the loop looks at the clock again.
KEY_WAIT_MS = 100

_KEY_NAMES = {
    curses.KEY_UP: "up", curses.KEY_DOWN: "down", curses.KEY_PPAGE: "pgup",
    curses.KEY_NPAGE: "pgdn", curses.KEY_HOME: "home", curses.KEY_END: "end",
    curses.KEY_ENTER: "enter", 10: "enter", 13: "enter", 27: "esc",
    curses.KEY_BACKSPACE: "backspace", 127: "backspace", 8: "backspace",
    9: "tab", curses.KEY_BTAB: "btab", curses.KEY_RESIZE: "resize",
}


def key_name(code: int) -> str | None:
    """A curses key code as views.ViewState.on_key wants it; None for keys we do not use."""
    if code in _KEY_NAMES:
        return _KEY_NAMES[code]
    if 32 <= code < 127:
        return chr(code)
    return None


def run(monitor: Monitor, first: Snapshot, interval_s: float) -> int:
    """The live view until 'q' (exit status 0). ``first``: a sample already taken, which
    started the CPU and rate clocks. Ctrl-C leaves through KeyboardInterrupt, after curses
    has restored the terminal."""
    return curses.wrapper(_loop, monitor, first, interval_s)


def _loop(stdscr, monitor: Monitor, first: Snapshot, interval_s: float) -> int:
    _setup(stdscr)
    styles = _styles()
    state, trend = ViewState(), LagTrend()
    snap: Snapshot | None = first  # None only if a later sample fails before any succeeded
    message = ""
    trend.add(first, time.monotonic())
    next_at = time.monotonic() + interval_s
    dirty = True
    while True:  # the process main loop: until 'q' or Ctrl-C
        if not state.paused and time.monotonic() >= next_at:
            snap, message = _sample(monitor, snap, trend)
            next_at = time.monotonic() + interval_s
            dirty = True
        if dirty:
            _draw(stdscr, layout(snap, state, trend, *_size(stdscr), message), styles)
            dirty = False
        name = key_name(stdscr.getch())  # waits at most KEY_WAIT_MS
        if name is None:
            continue
        action = state.on_key(name)
        if action == "quit":
            return 0
        if action == "sample":  # resumed: fresh figures now, not an interval later
            next_at = 0.0
        dirty = dirty or action is not None


def _sample(monitor: Monitor, last: Snapshot | None, trend: LagTrend
            ) -> tuple[Snapshot | None, str]:
    try:
        snap = monitor.sample()
    except errors.ShmbrokerError as exc:  # e.g. the broker stopped: say so, keep trying
        return last, f"! {exc}"
    trend.add(snap, time.monotonic())
    return snap, ""


def _setup(stdscr) -> None:
    try:
        curses.curs_set(0)
    except curses.error:
        pass  # a terminal that cannot hide the cursor
    stdscr.timeout(KEY_WAIT_MS)
    stdscr.keypad(True)


def _styles() -> dict[str, int]:
    warn = curses.A_BOLD
    if curses.has_colors():
        try:
            curses.use_default_colors()
            curses.init_pair(1, curses.COLOR_RED, -1)
            curses.init_pair(2, curses.COLOR_BLACK, curses.COLOR_CYAN)
            warn |= curses.color_pair(1)
        except curses.error:
            pass
    return {"normal": curses.A_NORMAL, "title": curses.A_BOLD, "tabs": curses.A_NORMAL,
            "header": curses.A_REVERSE, "dim": curses.A_DIM, "warn": warn,
            "footer": curses.A_REVERSE, "mark": curses.A_REVERSE | curses.A_BOLD
            | curses.A_UNDERLINE}


def _size(stdscr) -> tuple[int, int]:
    height, width = stdscr.getmaxyx()
    return width, height


def _draw(stdscr, lines: list[Line], styles: dict[str, int]) -> None:
    """Draw ``lines`` (already cut to the window). curses raises for a write into the last
    cell of the window, and for any write after a shrink it has not seen yet; both only cut
    what is drawn, so they are ignored."""
    stdscr.erase()
    height, width = stdscr.getmaxyx()
    for y, line in enumerate(lines[:height]):
        attr = styles.get(line.style, curses.A_NORMAL)
        text = line.text[:width]
        if line.style in ("header", "footer"):
            text = text.ljust(width)  # a full-width bar, like htop's
        try:
            stdscr.addnstr(y, 0, text, width - 1 if y == height - 1 else width, attr)
            if line.mark is not None:
                start, end = line.mark
                count = min(end, width - 1) - start  # never <= 0: curses reads -1 as "all"
                if count > 0:
                    stdscr.addnstr(y, start, text[start:end], count, styles["mark"])
        except curses.error:
            pass
    stdscr.refresh()
