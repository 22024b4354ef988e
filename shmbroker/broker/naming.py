"""How each broker process names itself, so that ``ps``, ``top`` and py-spy users see roles.

``shmbroker: supervisor``, ``shmbroker: coordinator``, ``shmbroker: partition orders/3``.
The title replaces the process's command line as shown by ps (/proc/PID/cmdline), using the
``setproctitle`` package (docs/decisions/0003-setproctitle-for-process-names.md).
"""
from __future__ import annotations

import setproctitle

TITLE_PREFIX = "shmbroker: "


def process_title(role: str, topic: str | None = None, partition: int | None = None) -> str:
    if role == "partition":
        assert topic is not None and partition is not None
        return f"{TITLE_PREFIX}partition {topic}/{partition}"
    return f"{TITLE_PREFIX}{role}"


def name_this_process(title: str) -> None:
    setproctitle.setproctitle(title)
