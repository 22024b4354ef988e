"""Shared fixtures: every test gets a timeout (pytest.ini), a private data dir, and a check
that it left nothing behind in /dev/shm and no child processes running."""
from __future__ import annotations

import os

import psutil
import pytest

SHM_DIR = "/dev/shm"
#: Every shared-memory object of ours starts with this (shmbroker/shm/names.py).
SHM_PREFIX = "shmb"
# Under pytest-xdist each worker tags its objects' names (shmb-<worker>.<hash>., read by
# shmbroker/shm/names.py; inherited by the processes a test starts), so that the leak check of
# one worker never blames a test for what a test running in another worker has open.
# The tag also carries a piece of the run's id, so two pytest runs on one machine stay apart.
# Without xdist the run's pid serves, so a plain `pytest` run is isolated the same way.
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _XDIST_WORKER:
    _TAG = (os.environ.get("PYTEST_XDIST_TESTRUNUID", "")[:6] + _XDIST_WORKER)[:16]
else:
    _TAG = f"p{os.getpid()}"
os.environ["SHMBROKER_SHM_TAG"] = _TAG
SHM_PREFIX = f"shmb-{_TAG}."


def _our_shm() -> set[str]:
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX)}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves shared memory or child processes behind."""
    shm_before = _our_shm()
    yield
    me = psutil.Process()
    children = [c for c in me.children(recursive=True) if c.is_running()
                and c.status() != psutil.STATUS_ZOMBIE]
    leaked_shm = _our_shm() - shm_before
    assert not leaked_shm, f"test left shared memory behind: {sorted(leaked_shm)}"
    assert not children, f"test left child processes running: {[c.pid for c in children]}"


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "data"
    path.mkdir(mode=0o700)
    return path
