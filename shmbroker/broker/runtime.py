"""The runtime file ``<data_dir>/runtime.json``: who is running, for ``shmbroker top``, py-spy
and operators. Written only by the supervisor (0600, replaced atomically), removed on a clean
stop. Readers must treat it as a hint (pids may be stale after a kill -9 of the supervisor).

Format (version 1)::

    {"format": "shmbroker-runtime", "version": 1, "data_dir": "/abs/dir",
     "state": "starting" | "running" | "stopping",
     "coordinator_endpoint": "ipc:///abs/dir/coordinator.sock",
     "router_endpoint": "tcp://127.0.0.1:7070" | null (no --listen),
     "metrics_endpoint": "127.0.0.1:9644" | null (no --metrics-listen; GET /metrics),
     "kafka_endpoint": "127.0.0.1:9092" | null (no --kafka-listen; Kafka's wire protocol),
     "processes": [
       {"role": "supervisor", "pid": 100, "started_at": 1764000000.12, "state": "running",
        "title": "shmbroker: supervisor"},
       {"role": "coordinator", "pid": 101, ...same fields..., "restarts": 0},
       {"role": "partition", "topic": "orders", "partition": 3, "pid": 102, "started_at": ...,
        "state": "starting" | "running" | "stopping" | "restarting", "restarts": 0,
        "title": "shmbroker: partition orders/3", "directory": "/abs/dir/orders-3"}]}

``started_at`` is wall-clock seconds since the epoch (for people); ``pid`` is null while a
process waits for its restart.
"""
from __future__ import annotations

import json
import os
from typing import Any

from .. import errors
from ..log import files

RUNTIME_FILE = "runtime.json"
RUNTIME_FORMAT = "shmbroker-runtime"
RUNTIME_VERSION = 1
_RUNTIME_FILE_BYTES_MAX = 16 * 1024 * 1024


def runtime_path(data_dir: str) -> str:
    return os.path.join(data_dir, RUNTIME_FILE)


def write_runtime(data_dir: str, state: str, endpoint: str, processes: list[dict[str, Any]],
                  router_endpoint: str | None = None, metrics_endpoint: str | None = None,
                  kafka_endpoint: str | None = None) -> None:
    document = {"format": RUNTIME_FORMAT, "version": RUNTIME_VERSION,
                "data_dir": os.path.abspath(data_dir), "state": state,
                "coordinator_endpoint": endpoint, "router_endpoint": router_endpoint,
                "metrics_endpoint": metrics_endpoint, "kafka_endpoint": kafka_endpoint,
                "processes": processes}
    # No directory fsync: the file describes this boot only and is meaningless after a crash.
    files.write_atomic(runtime_path(data_dir), json.dumps(document, indent=1).encode() + b"\n",
                       sync_dir=False)


def read_runtime(data_dir: str) -> dict[str, Any] | None:
    """The runtime document, None if there is none; ConfigError if it is not one of ours."""
    path = runtime_path(data_dir)
    try:
        with open(path, "rb") as f:
            raw = f.read(_RUNTIME_FILE_BYTES_MAX)
    except FileNotFoundError:
        return None
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise errors.ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != RUNTIME_FORMAT:
        raise errors.ConfigError(f"{path}: not a {RUNTIME_FORMAT} file")
    if document.get("version") != RUNTIME_VERSION:
        raise errors.ConfigError(f"{path}: version {document.get('version')!r} is not supported")
    return document


def remove_runtime(data_dir: str) -> None:
    files.remove_files([runtime_path(data_dir)], sync_dir=False)
