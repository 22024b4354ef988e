"""One broker per data dir: ``<data_dir>/broker.lock``, an ``flock`` with the owner's pid inside.

``flock`` (not a pid file alone, not ``fcntl`` record locks) because the kernel drops it when the
last descriptor of the open file goes, so a kill -9 can never leave a data dir locked, and
because it is shared by descriptors inherited across exec: the supervisor hands a copy to every
child, so the lock is held until the *last* process of a broker exits. The pid inside is only
for the message a second broker prints; the lock itself is the truth.

The file is never deleted (deleting a lock file races with a second opener, who would then
lock a different inode); on a clean stop its content is emptied.
"""
from __future__ import annotations

import fcntl
import os
import time

from .. import errors
from ..log import files

LOCK_FILE = "broker.lock"
#: How often `serve` retries while the previous broker's processes exit (bounded by lock_wait_ms).
_RETRY_INTERVAL_S = 0.05
#: Even a live-looking owner is retried this long: a client probing the lock
#: (:func:`broker_pid`) holds it for microseconds, and the recorded pid may be a reused one.
_LIVE_OWNER_GRACE_S = 0.2


def lock_path(data_dir: str) -> str:
    return os.path.join(data_dir, LOCK_FILE)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BrokerLock:
    """Held by the supervisor (and, inherited, by its children). Not thread-safe."""

    def __init__(self, data_dir: str, fd: int):
        self.data_dir = data_dir
        self.fd = fd

    @classmethod
    def acquire(cls, data_dir: str, wait_ms: int) -> "BrokerLock":
        """Take the lock or raise BrokerAlreadyRunningError naming the owner and the data dir.

        A live owner is refused at once. If the recorded owner is dead but the lock is still
        held (its children are finishing their shutdown after a kill -9), wait up to
        ``wait_ms`` for them.
        """
        data_dir = os.path.abspath(data_dir)
        fd = os.open(lock_path(data_dir), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, files.FILE_MODE)
        started = time.monotonic()
        deadline = started + wait_ms / 1000
        try:
            while True:  # bounded by the deadline
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    owner = _read_pid(fd)
                    now = time.monotonic()
                    if (_alive(owner) and now - started >= _LIVE_OWNER_GRACE_S) or now >= deadline:
                        raise errors.BrokerAlreadyRunningError(
                            f"another broker (pid {owner if owner is not None else 'unknown'}) "
                            f"is running on data dir {data_dir}"
                            + ("" if _alive(owner) else " (its processes are still exiting)"))
                    time.sleep(_RETRY_INTERVAL_S)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(data_dir, fd)

    def release(self) -> None:
        if self.fd < 0:
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # children's copies are gone by now: they have exited
        self.fd = -1


def broker_pid(data_dir: str) -> int | None:
    """The pid of the broker serving ``data_dir``, or None if no broker holds its lock.

    Takes the lock for an instant to test it (a shared flock would block a starting broker
    just as long); a starting broker retries, see :meth:`BrokerLock.acquire`.
    """
    try:
        fd = os.open(lock_path(os.path.abspath(data_dir)), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
