"""shmbroker: Kafka's design (topics, partitions, offsets, a page-cache log) for one large host.

Public API re-exports only. The partition log is :class:`shmbroker.log.PartitionLog`;
records are encoded and decoded by :mod:`shmbroker.records`.
"""
from . import errors

__version__ = "0.1.0"
__all__ = ["errors", "__version__"]
