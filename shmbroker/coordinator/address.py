"""Where the coordinator listens: ``ipc://<data_dir>/coordinator.sock``. Its own light module:
the supervisor, the router and clients need the address, not the coordinator's server (which
imports ZeroMQ, the offsets log and numpy)."""
from __future__ import annotations

import os

from .. import errors
from ..config import UNIX_SOCKET_PATH_BYTES_MAX

SOCKET_FILE = "coordinator.sock"


def socket_path(data_dir: str) -> str:
    return os.path.join(os.path.abspath(data_dir), SOCKET_FILE)


def endpoint(data_dir: str) -> str:
    """``ipc://<data_dir>/coordinator.sock``; a path too long for a Unix socket is an error."""
    path = socket_path(data_dir)
    if len(path.encode()) > UNIX_SOCKET_PATH_BYTES_MAX:
        raise errors.ConfigError(
            f"data dir {os.path.abspath(data_dir)!r} is too deep: {path!r} is "
            f"{len(path.encode())} bytes, a Unix socket path holds at most "
            f"{UNIX_SOCKET_PATH_BYTES_MAX}; use a shorter --data-dir")
    return "ipc://" + path
