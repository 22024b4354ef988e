"""shmbroker: Kafka's design (topics, partitions, offsets, a page-cache log) for one large host.

Public API re-exports only. The partition log is :class:`shmbroker.log.PartitionLog`;
records are encoded and decoded by :mod:`shmbroker.records`; topics are managed with
:class:`Admin` against a running broker (`shmbroker serve`).
"""
from typing import Any

from . import errors

__version__ = "0.1.0"
__all__ = ["Admin", "Consumer", "OffsetAndMetadata", "OffsetAndTimestamp", "Producer",
           "TopicPartition", "errors", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import shmbroker` (done by every broker process) does not load ZeroMQ.
    if name == "Admin":
        from .client.admin import Admin

        return Admin
    if name == "Consumer":
        from .client.consumer import Consumer

        return Consumer
    if name == "Producer":
        from .client.producer import Producer

        return Producer
    if name == "TopicPartition":
        from .client.types import TopicPartition

        return TopicPartition
    if name == "OffsetAndMetadata":
        from .client.types import OffsetAndMetadata

        return OffsetAndMetadata
    if name == "OffsetAndTimestamp":
        from .client.types import OffsetAndTimestamp

        return OffsetAndTimestamp
    raise AttributeError(f"module 'shmbroker' has no attribute {name!r}")
