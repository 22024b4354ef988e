"""`shmbroker profile TARGET`: a py-spy profile of one process of a live broker, without
stopping it (docs/profiling.md).

TARGET is ``partition TOPIC/N``, ``coordinator``, ``router``, ``supervisor`` (their pids come
from ``runtime.json``), or a pid. ``record`` samples for ``duration_s`` and writes a flame graph
(SVG), a speedscope file or py-spy's raw collapsed stacks; ``top`` runs py-spy's live view.

py-spy reads the target's memory with ``process_vm_readv``, which needs ptrace permission over
it; when that is refused the one-line message says how to get it. Exit statuses (also in
``shmbroker profile --help``):

====  ======================================================================================
0     the profile was written (``--top``: py-spy top ended normally)
1     no broker on the data dir, an unknown target, or a target that is not running
2     bad arguments
3     py-spy is not installed (beside this Python, or on PATH)
4     py-spy may not read the target's memory (ptrace permission)
5     py-spy failed otherwise (its last line of error is shown)
====  ======================================================================================

Nothing here writes to the broker: py-spy only reads the target (and, unless
``nonblocking``, pauses it for a few microseconds per sample).
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from .. import errors
from ..broker.runtime import read_runtime

EXIT_OK = 0
EXIT_TARGET = 1
EXIT_NO_PY_SPY = 3
EXIT_PERMISSION = 4
EXIT_PY_SPY_FAILED = 5

DURATION_S_MIN, DURATION_S_MAX = 1, 3600
RATE_HZ_MIN, RATE_HZ_MAX = 1, 1000
FORMATS = {"flamegraph": "svg", "speedscope": "speedscope.json", "raw": "txt"}
#: py-spy record's own bound beyond --duration: it attaches, then writes the file.
_PY_SPY_SLACK_S = 60.0
ROLES = ("coordinator", "router", "supervisor")

PERMISSION_HINT = ("py-spy may not read the memory of {what} (ptrace permission). Run "
                   "`shmbroker profile` as the user that runs the broker, or with sudo, or allow "
                   "ptrace: `sudo sysctl kernel.yama.ptrace_scope=0`, or in a container "
                   "grant CAP_SYS_PTRACE (docker run --cap-add SYS_PTRACE)")
NO_PY_SPY_HINT = ("py-spy is not installed: `pip install py-spy` (or `pip install "
                  "'shmbroker[dev]'`) into the environment of {python}, or put py-spy on PATH")
_PERMISSION_RE = re.compile(r"permission denied|operation not permitted|os error (1|13)\)",
                            re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    pid: int
    title: str  # "partition orders/3", or "pid 1234" for a pid outside runtime.json

    @property
    def slug(self) -> str:
        """For file names: 'partition orders/3' -> 'partition-orders-3'."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.title).strip("-")


def resolve_target(data_dir: str, words: list[str]) -> Target:
    """The process ``words`` name (see the module doc). Raises BrokerNotRunningError (no broker,
    or the process is not running now), UnknownTopicOrPartitionError, ConfigError."""
    if len(words) == 1 and words[0].isdigit():
        return _pid_target(data_dir, int(words[0]))
    doc = read_runtime(data_dir)
    if doc is None:
        raise errors.BrokerNotRunningError(
            f"no broker is running on data dir {data_dir} (no runtime.json; start one with "
            f"`shmbroker serve --data-dir {data_dir}`)")
    processes = doc.get("processes", [])
    if words[:1] == ["partition"] and len(words) == 2:
        topic, _, number = words[1].rpartition("/")
        matches = [p for p in processes if p.get("role") == "partition"
                   and p.get("topic") == topic and str(p.get("partition")) == number]
        if not matches:
            served = ", ".join(sorted(f"{p['topic']}/{p['partition']}" for p in processes
                                      if p.get("role") == "partition")) or "none"
            raise errors.UnknownTopicOrPartitionError(
                f"no partition {words[1]} is served on data dir {data_dir} (served: {served})")
    elif len(words) == 1 and words[0] in ROLES:
        matches = [p for p in processes if p.get("role") == words[0]]
        if not matches:
            hint = " (start the broker with --listen)" if words[0] == "router" else ""
            raise errors.BrokerNotRunningError(f"no {words[0]} is running on data dir "
                                               f"{data_dir}{hint}")
    else:
        raise errors.ConfigError(
            f"unknown target {' '.join(words)!r}: expected `partition TOPIC/N`, "
            f"{', '.join(ROLES)}, or a pid")
    entry = matches[0]
    title = str(entry.get("title", entry.get("role"))).removeprefix("shmbroker: ")
    pid = entry.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        raise errors.BrokerNotRunningError(f"{title} is not running right now (state "
                                           f"{entry.get('state')}); try again in a moment")
    return Target(pid, title)


def _pid_target(data_dir: str, pid: int) -> Target:
    if not _alive(pid):
        raise errors.BrokerNotRunningError(f"no process with pid {pid} is running")
    try:
        doc = read_runtime(data_dir)
    except errors.ShmbrokerError:
        doc = None
    for entry in (doc or {}).get("processes", []):
        if entry.get("pid") == pid:
            return Target(pid, str(entry.get("title", entry.get("role")))
                          .removeprefix("shmbroker: "))
    return Target(pid, f"pid {pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's: py-spy will say whether it may read it
    return True


def find_py_spy() -> str | None:
    """py-spy beside this Python (a virtualenv's bin/), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("py-spy")


def native_supported() -> bool:
    """py-spy unwinds native (C) frames on Linux x86_64 only (its --native)."""
    return sys.platform == "linux" and platform.machine() == "x86_64"


def default_output(target: Target, fmt: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"profile-{target.slug}-{target.pid}-{stamp}.{FORMATS[fmt]}"


def record_command(py_spy: str, target: Target, duration_s: int, output: str, fmt: str,
                   native: bool, rate_hz: int, nonblocking: bool, idle: bool) -> list[str]:
    command = [py_spy, "record", "--pid", str(target.pid), "--duration", str(duration_s),
               "--output", output, "--format", fmt, "--rate", str(rate_hz)]
    command += ["--native"] * native + ["--nonblocking"] * nonblocking + ["--idle"] * idle
    return command


def top_command(py_spy: str, target: Target, native: bool, rate_hz: int, nonblocking: bool,
                idle: bool) -> list[str]:
    command = [py_spy, "top", "--pid", str(target.pid), "--rate", str(rate_hz)]
    return command + ["--native"] * native + ["--nonblocking"] * nonblocking + ["--idle"] * idle


def failure(target: Target, rc: int, stderr: str) -> tuple[int, str]:
    """(exit status, one-line message) for a py-spy run that ended with ``rc`` != 0."""
    if _PERMISSION_RE.search(stderr):
        return EXIT_PERMISSION, PERMISSION_HINT.format(what=f"{target.title} (pid {target.pid})")
    if not _alive(target.pid):
        return EXIT_TARGET, f"{target.title} (pid {target.pid}) exited while being profiled"
    lines = [line.strip() for line in stderr.splitlines()
             if line.strip() and not re.match(r"^\d+:|^at |Stack backtrace", line.strip())]
    last = next((line for line in lines if line.startswith("Error")), lines[-1] if lines else "")
    return EXIT_PY_SPY_FAILED, f"py-spy failed (exit {rc}) on {target.title} (pid " \
                               f"{target.pid}): {last or 'no message'}"


def run(data_dir: str, words: list[str], duration_s: int, output: str | None, fmt: str,
        native: bool | None, live_top: bool, rate_hz: int, nonblocking: bool, idle: bool,
        out=None, err=None) -> int:
    """The command (exit statuses: module doc). ``native`` None: where supported."""
    out, err = out or sys.stdout, err or sys.stderr
    target = resolve_target(data_dir, words)  # our errors: exit 1 through the CLI
    py_spy = find_py_spy()
    if py_spy is None:
        print(f"shmbroker: error: {NO_PY_SPY_HINT.format(python=sys.executable)}", file=err)
        return EXIT_NO_PY_SPY
    if native is None:
        native = native_supported()
    elif native and not native_supported():
        print(f"shmbroker: note: --native needs Linux x86_64 (this is {sys.platform} "
              f"{platform.machine()}); profiling Python frames only", file=err)
        native = False
    if live_top:
        proc = subprocess.run(top_command(py_spy, target, native, rate_hz, nonblocking, idle),
                              stderr=subprocess.PIPE, text=True)  # until the user quits it
        return _finish(target, proc, err)
    output = output or default_output(target, fmt)
    command = record_command(py_spy, target, duration_s, output, fmt, native, rate_hz,
                             nonblocking, idle)
    try:
        proc = subprocess.run(command, capture_output=True, text=True,
                              timeout=duration_s + _PY_SPY_SLACK_S)
    except subprocess.TimeoutExpired:
        print(f"shmbroker: error: py-spy did not finish within {duration_s} s + "
              f"{_PY_SPY_SLACK_S:.0f} s on {target.title} (pid {target.pid})", file=err)
        return EXIT_PY_SPY_FAILED
    status = _finish(target, proc, err)
    if status == EXIT_OK:
        samples = re.search(r"Samples: (\d+)", proc.stdout + proc.stderr)
        print(f"wrote {fmt} of {target.title} (pid {target.pid}, {duration_s} s, "
              f"{samples.group(1) if samples else '?'} samples"
              f"{', native frames' if native else ''}) to {output}", file=out)
    return status


def _finish(target: Target, proc: subprocess.CompletedProcess, err) -> int:
    if proc.returncode == 0:
        return EXIT_OK
    status, message = failure(target, proc.returncode, proc.stderr or "")
    print(f"shmbroker: error: {message}", file=err)
    return status
