"""The partition log: Kafka's storage layering on local files (docs/design/log.md).

``PartitionLog`` (partition_log.py) -> ``LogSegment`` (segment.py) -> ``OffsetIndex`` /
``TimeIndex`` (index.py); ``recovery.py`` validates and repairs files; ``files.py`` names them
and makes changes durable; ``dump.py`` prints them (read-only).

The names below load on first use (PEP 562): ``from ..log import files`` (the supervisor, the
broker lock, the runtime file) must not import the log, its records codec and numpy, which
made every broker process's start ~0.1-0.25 s slower before it did anything.
"""
from typing import Any

__all__ = ["PartitionLog", "LogSlice", "AppendInfo", "RecoveryReport", "SegmentRecovery", "LogSegment"]

_WHERE = {"PartitionLog": "partition_log", "AppendInfo": "partition_log",
          "RecoveryReport": "recovery", "SegmentRecovery": "recovery",
          "LogSegment": "segment", "LogSlice": "segment"}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'shmbroker.log' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
