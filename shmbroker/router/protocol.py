"""The router's own requests (version 1): ``produce``, ``fetch``, ``list_offsets`` and
``offsets_for_times``, shared
by the router and the remote clients. The whole format, field by field, is docs/protocol.md;
the envelope (msgpack map: ``v``, ``id``, ``type``; replies ``ok``/``result``/``error``) is
the coordinator's (coordinator/protocol.py), so one decoder checks both kinds.

Record bytes never travel inside msgpack: they are a frame of their own, Kafka RecordBatch v2
bytes exactly as a segment stores them, so the router can hand a slice of a mapped segment to
ZeroMQ without copying it::

    produce  request [header, one RecordBatch v2]    reply [header] (none for acks=0 unless an error)
    fetch    request [header]                        reply [header, data_1, ..., data_n]
             a partition far behind may get a cold-read grant in the header instead of data:
             its bytes then come on a plain TCP connection by os.sendfile (router/cold_read.py)
    list_offsets     [header]                              [header]
    offsets_for_times [header]                             [header]

Limits here are the wire's: both sides check them.
"""
from __future__ import annotations

from ..coordinator import protocol as coordinator_protocol

PROTOCOL_VERSION = coordinator_protocol.PROTOCOL_VERSION

#: Requests the router serves itself; anything else valid goes to the coordinator.
DATA_REQUEST_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "produce": {"topic": ((str,), True), "partition": ((int,), True),
                "acks": ((int,), True)},
    "fetch": {"max_wait_ms": ((int,), True), "min_bytes": ((int,), True),
              "max_bytes": ((int,), True), "partitions": ((list,), True),
              "cold_bytes_max": ((int,), False)},
    "list_offsets": {"partitions": ((list,), True)},
    "offsets_for_times": {"partitions": ((list,), True)},
}
#: Every request type a router takes (its own and the coordinator's).
ALL_REQUEST_FIELDS = {**coordinator_protocol.REQUEST_FIELDS, **DATA_REQUEST_FIELDS}
assert not DATA_REQUEST_FIELDS.keys() & coordinator_protocol.REQUEST_FIELDS.keys()

#: produce ``acks``: 0 (no reply unless an error), 1 (after the append), -1 (after fsync).
ACKS_LEVELS = (0, 1, -1)
#: The longest a fetch may be held waiting for min_bytes (Kafka: fetch.max.wait.ms, 500 ms by
#: default; a longer wait only delays noticing a broken connection).
FETCH_WAIT_MS_MAX = 30_000
#: Most bytes one fetch reply carries in all, and per partition (a single batch larger than
#: a partition's max still comes whole: Kafka's rule, so a consumer never gets stuck).
FETCH_BYTES_MAX = 64 << 20
#: Partitions named in one fetch, list_offsets or offsets_for_times request.
REQUEST_PARTITIONS_MAX = 1_024
#: The largest produce record frame (one RecordBatch; the topic's max.message.bytes and the
#: router's ring bound it further).
PRODUCE_BATCH_BYTES_MAX = 16 << 20
#: Frames of a request: a header, and for produce one record frame.
REQUEST_FRAMES_MAX = 2

#: fetch/list_offsets per-partition ``error_code`` when there is none.
NO_ERROR = 0
#: ``offset`` values of list_offsets are not requested; a fetch offset is always >= 0.
FETCH_OFFSET_MIN = 0


def produce_request(request_id: int, topic: str, partition: int, acks: int) -> bytes:
    return coordinator_protocol.request(request_id, "produce", topic=topic,
                                        partition=partition, acks=acks)


def fetch_request(request_id: int, partitions: list, max_wait_ms: int, min_bytes: int,
                  max_bytes: int, cold_bytes_max: int = 0) -> bytes:
    """``partitions``: ``[topic, partition, offset, partition_max_bytes]`` each;
    ``cold_bytes_max`` > 0: cold-read grants of at most that many bytes are welcome."""
    extra = {"cold_bytes_max": cold_bytes_max} if cold_bytes_max else {}
    return coordinator_protocol.request(request_id, "fetch", max_wait_ms=max_wait_ms,
                                        min_bytes=min_bytes, max_bytes=max_bytes,
                                        partitions=partitions, **extra)


def list_offsets_request(request_id: int, partitions: list) -> bytes:
    """``partitions``: ``[topic, partition]`` each."""
    return coordinator_protocol.request(request_id, "list_offsets", partitions=partitions)


def offsets_for_times_request(request_id: int, partitions: list) -> bytes:
    """``partitions``: ``[topic, partition, timestamp_ms]`` each."""
    return coordinator_protocol.request(request_id, "offsets_for_times", partitions=partitions)
