"""The partition log: Kafka's storage layering on local files (docs/design/log.md).

``PartitionLog`` (partition_log.py) -> ``LogSegment`` (segment.py) -> ``OffsetIndex`` /
``TimeIndex`` (index.py); ``recovery.py`` validates and repairs files; ``files.py`` names them
and makes changes durable; ``dump.py`` prints them (read-only).
"""
from .partition_log import AppendInfo, PartitionLog
from .recovery import RecoveryReport, SegmentRecovery
from .segment import LogSegment, LogSlice

__all__ = ["PartitionLog", "LogSlice", "AppendInfo", "RecoveryReport", "SegmentRecovery", "LogSegment"]
