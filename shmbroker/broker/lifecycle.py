"""What every child of the supervisor does, in one place.

0. :func:`child_parser`: the arguments the supervisor passes every child (its ``_argv``).
1. :func:`start_child`: name itself (ps), ask the kernel for SIGTERM when the supervisor dies
   (``PR_SET_PDEATHSIG``; so a kill -9 of the supervisor stops the children cleanly instead of
   leaving them owning logs), ignore SIGINT (Ctrl-C in a terminal reaches the whole process
   group; the supervisor decides the order of the shutdown and sends SIGTERM itself), and turn
   SIGTERM into a readable byte on a self-pipe that the process's main loop waits on.
2. :func:`report_ready`: write one line to the ready pipe the supervisor passed (``--ready-fd``)
   and close it; the supervisor marks the process "running" in the runtime file.

The supervisor also hands every child a copy of the broker lock's file descriptor (inherited,
never used by the child): an ``flock`` is released only when every descriptor of it is closed,
so a new broker cannot start on the data dir while any process of the old one still runs.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import signal
import sys

from .naming import name_this_process

PR_SET_PDEATHSIG = 1
LOG_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"


class StopSignal:
    """SIGTERM as an fd: readable once a stop was asked for. Owned by the main thread."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)
        # The handler runs in the main thread between bytecodes; the wakeup fd makes a blocking
        # select/poll return at once, so there is no window between "check flag" and "sleep".
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def child_parser(module: str) -> argparse.ArgumentParser:
    """The command line every child takes (``python -m shmbroker.<module> ...``): its data dir,
    the supervisor's pid (for PR_SET_PDEATHSIG) and the ready pipe; a child adds its own."""
    parser = argparse.ArgumentParser(prog=f"python -m shmbroker.{module}")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--supervisor-pid", type=int, default=None)
    parser.add_argument("--ready-fd", type=int, default=None)
    return parser


def configure_logging() -> None:
    logging.basicConfig(level=os.environ.get("SHMBROKER_LOG_LEVEL", "INFO"), format=LOG_FORMAT,
                        stream=sys.stderr)


def start_child(title: str, supervisor_pid: int | None) -> StopSignal:
    name_this_process(title)
    configure_logging()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = StopSignal()
    if supervisor_pid is not None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        # The supervisor may have died before prctl took effect: then nobody will signal us.
        if os.getppid() != supervisor_pid:
            stop.requested = True
    return stop


def report_ready(ready_fd: int | None, line: str = "ready") -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, line.encode() + b"\n")
    except BrokenPipeError:
        pass  # the supervisor is gone; PDEATHSIG will stop us
    finally:
        os.close(ready_fd)
