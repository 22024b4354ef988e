"""The data dir lock: one owner, a clear refusal, released by the kernel with its holder."""
import os
import subprocess
import sys

import pytest

from shmbroker import errors
from shmbroker.broker.lock import BrokerLock, broker_pid, lock_path


def test_a_second_acquire_is_refused_naming_the_owner_pid_and_data_dir(tmp_path):
    lock = BrokerLock.acquire(str(tmp_path), wait_ms=0)
    try:
        assert broker_pid(str(tmp_path)) == os.getpid()
        with pytest.raises(errors.BrokerAlreadyRunningError,
                           match=f"another broker \\(pid {os.getpid()}\\) is running on data dir {tmp_path}"):
            BrokerLock.acquire(str(tmp_path), wait_ms=1000)
    finally:
        lock.release()
    assert broker_pid(str(tmp_path)) is None
    assert os.stat(lock_path(str(tmp_path))).st_mode & 0o777 == 0o600
    BrokerLock.acquire(str(tmp_path), wait_ms=0).release()


def test_the_lock_of_a_killed_holder_is_free(tmp_path):
    code = ("import os, sys; from shmbroker.broker.lock import BrokerLock; "
            f"BrokerLock.acquire({str(tmp_path)!r}, 0); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -9
    assert broker_pid(str(tmp_path)) is None
    BrokerLock.acquire(str(tmp_path), wait_ms=0).release()
