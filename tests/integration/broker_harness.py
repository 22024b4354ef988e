"""Run `shmbroker serve` as a user would, and wait for it with bounded timeouts."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import pytest

#: Every wait in these tests is bounded by this unless the test says otherwise.
WAIT_S_MAX = 30.0


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmbroker", *args], capture_output=True,
                          text=True, timeout=timeout)


def wait_for(predicate: Callable[[], Any], timeout_s: float = WAIT_S_MAX, what: str = "condition",
             interval_s: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:  # bounded by the deadline
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def no_default_listen(serve_args: tuple[str, ...]) -> tuple[str, ...]:
    """`serve` binds tcp://127.0.0.1:7070 by default; tests run many brokers at once, so one
    that does not ask for a router (``--listen``, or a ``--config`` file) gets none."""
    if any(a in ("--listen", "--config") or a.startswith(("--listen=", "--config="))
           for a in serve_args):
        return tuple(serve_args)
    return (*serve_args, "--listen", "none")


class Broker:
    """One `shmbroker serve` process (in its own session, so kill -9 can take its whole tree)."""

    def __init__(self, data_dir: str, log_path: str, serve_args: tuple[str, ...] = ()):
        self.data_dir = str(data_dir)
        self.log_path = str(log_path)
        self.serve_args = tuple(serve_args)
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "Broker":
        assert self.proc is None or self.proc.poll() is not None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shmbroker", "serve", "--data-dir", self.data_dir,
                 *no_default_listen(self.serve_args)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        if wait:
            self.wait_running()
        return self

    def runtime(self) -> dict | None:
        try:
            with open(os.path.join(self.data_dir, "runtime.json")) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None

    def wait_running(self, partitions: set[tuple[str, int]] | None = None,
                     timeout_s: float = WAIT_S_MAX) -> dict:
        """Wait until every process is up (and, if given, exactly these partitions run)."""
        def ready():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
            doc = self.runtime()
            if doc is None or doc["state"] != "running" or doc["processes"][0]["pid"] != self.proc.pid:
                return None
            if partitions is not None and set(self.partition_pids(doc)) != partitions:
                return None
            return doc
        return wait_for(ready, timeout_s, f"broker on {self.data_dir} to be running")

    @staticmethod
    def partition_pids(doc: dict) -> dict[tuple[str, int], int]:
        return {(p["topic"], p["partition"]): p["pid"] for p in doc["processes"]
                if p["role"] == "partition"}

    def stop(self, timeout_s: float = WAIT_S_MAX) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=timeout_s)
        if status != 0:
            print(f"broker exited with status {status}; its log:\n{self.log()}")
        return status

    def kill9(self) -> None:
        """kill -9 of the supervisor and every process of the broker at once."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=WAIT_S_MAX)

    def group_alive(self) -> bool:
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        """Teardown: whatever the test did, nothing of this broker survives."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        if self.group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=WAIT_S_MAX)
        wait_for(lambda: not self.group_alive(), 10, "the broker's processes to be gone")


# --- fixtures (imported by tests/integration/conftest.py and tests/crash/conftest.py) ------------

@pytest.fixture
def broker_dir():
    """A short data dir: a Unix socket path holds only 107 bytes, pytest's tmp_path is long."""
    path = tempfile.mkdtemp(prefix="shmb-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_broker(broker_dir, tmp_path):
    """``make_broker()`` -> a started Broker on ``broker_dir``; every one is stopped at teardown."""
    brokers: list[Broker] = []

    def make(start: bool = True, data_dir: str | None = None,
             serve_args: tuple[str, ...] = ()) -> Broker:
        broker = Broker(data_dir or broker_dir, tmp_path / f"broker-{len(brokers)}.log",
                        serve_args)
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.cleanup()


@pytest.fixture
def broker(make_broker):
    return make_broker()


@pytest.fixture(params=["local", "remote"])
def local_or_remote(request, make_broker):
    """A broker with a router on a free loopback port: (its data dir, what a client is given
    as ``broker=``): the data dir (local clients) or the router's tcp:// address (remote
    clients), so that one test proves a behaviour both ways."""
    broker = make_broker(serve_args=("--listen", "tcp://127.0.0.1:*"))
    endpoint = broker.wait_running()["router_endpoint"]
    return broker.data_dir, broker.data_dir if request.param == "local" else endpoint


def create_topic(data_dir: str, name: str, partitions: int, config: dict | None = None) -> None:
    """The topic made through the broker's coordinator (Admin on the data dir)."""
    from shmbroker import Admin

    with Admin(broker=data_dir) as admin:
        admin.create_topic(name, partitions, config)


def poll_until(consumer, count: int, timeout_s: float = WAIT_S_MAX) -> list:
    """Records from ``consumer.poll`` until ``count`` came (or the timeout: fewer)."""
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:  # bounded by the deadline
        got += consumer.poll(timeout_ms=200)
    return got


@pytest.fixture
def stop_resource_tracker():
    """multiprocessing's spawn starts a resource-tracker process that outlives the test; stop
    it so the leak check sees only the processes the test itself started. Test modules that
    spawn ask for it with ``pytestmark = pytest.mark.usefixtures("stop_resource_tracker")``."""
    yield
    from multiprocessing import resource_tracker

    resource_tracker._resource_tracker._stop()
