"""The full-screen `shmbroker top`, for real: it runs in a detached tmux session (a real
terminal, 100x30) against a live broker with a producer process and a slow consumer group
member that commits; the test types keys with `tmux send-keys` and reads the screen with
`tmux capture-pane`. Every wait polls the screen up to a deadline."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from broker_harness import WAIT_S_MAX, wait_for

from shmbroker import Admin

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("tmux") is None,
                       reason="tmux is not installed (apt-get install tmux): the full-screen "
                              "view needs a real terminal to be tested"),
]

HERE = os.path.dirname(os.path.abspath(__file__))
WIDTH, HEIGHT = 100, 30
#: A screen is polled this often while a test waits for it to show something.
POLL_S = 0.2
LOAD_S_MAX = 150.0  # the load processes stop by themselves at the latest after this


class Tmux:
    """A private tmux server (its own socket), killed by close()."""

    def __init__(self) -> None:
        self.socket = f"shmb-top-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:
        proc = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, timeout=10)
        assert proc.returncode == 0, f"tmux {args}: {proc.stderr}"
        return proc.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top")

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", "top", *keys)

    def wait_screen(self, predicate, what: str, timeout_s: float = WAIT_S_MAX) -> str:
        """The first screen for which ``predicate(screen)`` holds; on timeout an assertion
        that shows the last screen seen."""
        last = [""]

        def check():
            last[0] = self.screen()
            return last[0] if predicate(last[0]) else None
        try:
            return wait_for(check, timeout_s, what, interval_s=POLL_S)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the screen was:\n{last[0]}") from None

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=10)


def count(text: str) -> float:
    """A number as top prints it: '15.0k' -> 15000; '-' (not known yet, such as a rate before
    its second sample) is NaN, which no comparison accepts."""
    if text == "-":
        return float("nan")
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:], 1)
    return float(text.rstrip("kMG")) * scale


def row(screen: str, first_cell: str) -> list[str] | None:
    """The cells of the screen line whose first cell is ``first_cell``."""
    for line in screen.splitlines():
        cells = line.split()
        if cells and cells[0] == first_cell:
            return cells
    return None


def start_load(data_dir: str, stop_file: str) -> list[subprocess.Popen]:
    script = os.path.join(HERE, "top_load.py")
    return [subprocess.Popen([sys.executable, script, *args], stdin=subprocess.DEVNULL)
            for args in (("produce", data_dir, "busy", stop_file, str(LOAD_S_MAX)),
                         ("consume", data_dir, "busy", "slow", stop_file, str(LOAD_S_MAX)))]


def stop_load(procs: list[subprocess.Popen], stop_file: str) -> None:
    open(stop_file, "w").close()
    for proc in procs:
        try:
            assert proc.wait(timeout=WAIT_S_MAX) == 0, f"load process exited {proc.returncode}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=WAIT_S_MAX)


def start_top(tmux: Tmux, data_dir: str, status_file: str) -> None:
    env = " ".join(f"{name}={shlex.quote(os.environ[name])}"
                   for name in ("PYTHONPATH", "SHMBROKER_SHM_TAG") if name in os.environ)
    command = (f"env {env} {shlex.quote(sys.executable)} -m shmbroker top --data-dir "
               f"{shlex.quote(data_dir)} --interval 0.5; echo $? > {shlex.quote(status_file)}")
    tmux("new-session", "-d", "-s", "top", "-x", str(WIDTH), "-y", str(HEIGHT), command)


def test_top_full_screen_under_load_shows_rates_and_lag_and_answers_keys(broker, tmp_path):
    with Admin(broker=broker.data_dir) as admin:
        admin.create_topic("busy", 2)
        admin.create_topic("quiet", 1)
    broker.wait_running({("busy", 0), ("busy", 1), ("quiet", 0)})
    stop_file, status_file = str(tmp_path / "stop"), str(tmp_path / "top-status")
    load = start_load(broker.data_dir, stop_file)
    tmux = Tmux()
    try:
        start_top(tmux, broker.data_dir, status_file)
        # The overview: both topics, records/s on busy's partitions, the member and its lag.
        def loaded(screen: str) -> bool:
            rows = [row(screen, name) for name in ("busy/0", "busy/1", "quiet/0", "slow")]
            if None in rows:
                return False
            busy0, busy1, _, slow = rows
            return (count(busy0[1]) > 0 and count(busy1[1]) > 0 and slow[1] == "Stable"
                    and slow[3] == "1" and count(slow[4]) > 0)
        screen = tmux.wait_screen(loaded, "records/s on busy/* and the group's lag")
        assert "[1 Overview]" in screen and "partition busy/0" in screen
        assert count(row(screen, "quiet/0")[1]) == 0  # nobody writes to quiet

        # 4: the groups view, with the lag of each partition under the group.
        tmux.keys("4")
        screen = tmux.wait_screen(lambda s: "[4 Groups]" in s and " - busy/1 " in s,
                                  "the groups view")
        assert " - busy/0 " in screen and "committed" in screen
        assert "coordinator" not in screen and "PARTITION" not in screen

        # / quiet Enter, then 3: only quiet's partition is left.
        tmux.keys("/", "q", "u", "i", "e", "t", "Enter", "3")
        # (Its row too: once, under a full suite, the header was drawn before the table.)
        screen = tmux.wait_screen(lambda s: "[3 Partitions]" in s and "filter quiet" in s
                                  and row(s, "quiet/0") is not None,
                                  "the partitions view filtered to quiet")
        assert row(screen, "quiet/0") is not None and "busy/" not in screen

        # Load stopped: the screen's lag is exactly what the coordinator says it is.
        stop_load(load, stop_file)
        with Admin(broker=broker.data_dir) as admin:
            described = admin.describe_group("slow")
        # A partition the slow member never committed has no lag (None); top sums the others.
        lags = {f"{r['topic']}/{r['partition']}": r["lag"] for r in described["partitions"]
                if r["lag"] is not None}
        total = sum(lags.values())
        assert total > 0, described
        tmux.keys("/", *["BSpace"] * 5, "Enter", "4")
        screen = tmux.wait_screen(
            lambda s: (row(s, "slow") or [""])[1:2] == ["Empty"] and "filter quiet" not in s,
            "the group without its member")
        slow = row(screen, "slow")
        assert abs(count(slow[4]) - total) <= max(0.05 * total, 1), (slow, lags)

        tmux.keys("q")
        wait_for(lambda: os.path.exists(status_file) and open(status_file).read().strip(),
                 WAIT_S_MAX, "top to quit after q")
        assert open(status_file).read().strip() == "0"
    finally:
        tmux.close()
        if not os.path.exists(stop_file):
            stop_load(load, stop_file)
