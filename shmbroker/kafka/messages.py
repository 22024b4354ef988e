"""The Kafka API messages served, in their classic (non-flexible) versions: what each request
holds and how each response is laid out (docs/design/kafka.md, "APIs and versions").

One decode function per request and one encode function per response; a field's presence by
version follows Apache Kafka's message specs (clients/src/main/resources/common/message),
written here by hand for the versions in ``SUPPORTED``. Decoders raise
``codec.MalformedRequest``; the server then closes the connection, as Kafka does for a request
it cannot parse.
"""
from __future__ import annotations

from dataclasses import dataclass

from .codec import MalformedRequest, Reader, Writer

PRODUCE, FETCH, LIST_OFFSETS, METADATA = 0, 1, 2, 3
API_VERSIONS, CREATE_TOPICS = 18, 19

#: API key -> (min, max) version served. Every one is below the version where the API turns
#: flexible, so one classic codec serves them all. The maxima are the ones the three clients
#: pick (kafka-protocol brief §1): Produce 8 also makes kafka-python guess a 2.4 broker, which
#: keeps it off flexible InitProducerId; Fetch/Produce minima of 4/3 keep every client on
#: RecordBatch v2 (magic 2), the only format our log stores; Metadata from 1 because v0's
#: "empty list = all topics" is the opposite of v1's.
SUPPORTED: dict[int, tuple[int, int]] = {
    PRODUCE: (3, 8),
    FETCH: (4, 11),
    LIST_OFFSETS: (1, 5),
    METADATA: (1, 8),
    API_VERSIONS: (0, 2),
    CREATE_TOPICS: (0, 4),
}
NAMES = {PRODUCE: "Produce", FETCH: "Fetch", LIST_OFFSETS: "ListOffsets", METADATA: "Metadata",
         API_VERSIONS: "ApiVersions", CREATE_TOPICS: "CreateTopics"}

NONE = 0
UNSUPPORTED_VERSION = 35
#: Kafka's INT32 minimum: "authorized operations not requested" (Metadata v8).
AUTHORIZED_OPERATIONS_OMITTED = -(2 ** 31)


@dataclass(frozen=True)
class Header:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None


def decode_header(r: Reader) -> Header:
    """Request header v1 (v2 adds tagged fields after the client id; only ApiVersions v3+
    sends one here, and its body is never parsed: see api_versions_response)."""
    api_key, api_version, correlation_id = r.int16(), r.int16(), r.int32()
    return Header(api_key, api_version, correlation_id, r.nullable_string())


# -- ApiVersions (18) ----------------------------------------------------------------------------

def api_versions_response(version: int) -> bytes:
    """v0-v2: every API we serve. A higher version gets Kafka's fallback (KIP-511): a v0 body
    with UNSUPPORTED_VERSION and our ApiVersions range only; the client retries lower."""
    w = Writer()
    if version > SUPPORTED[API_VERSIONS][1]:
        low, high = SUPPORTED[API_VERSIONS]
        w.int16(UNSUPPORTED_VERSION).int32(1).int16(API_VERSIONS).int16(low).int16(high)
        return bytes(w.buf)
    w.int16(NONE)
    w.array(sorted(SUPPORTED.items()), lambda w, kv: w.int16(kv[0]).int16(kv[1][0]).int16(kv[1][1]))
    if version >= 1:
        w.int32(0)  # throttle_time_ms
    return bytes(w.buf)


# -- Metadata (3) --------------------------------------------------------------------------------

def decode_metadata(r: Reader, version: int) -> list[str] | None:
    """The topic names asked for; None: all topics."""
    count = r.array_count(nullable=True)
    names = None if count == -1 else [r.string() for _ in range(count)]
    if version >= 4:
        r.boolean()  # allow_auto_topic_creation: we never auto-create (docs/design/kafka.md)
    if version >= 8:
        r.boolean()
        r.boolean()
    return names


@dataclass(frozen=True)
class Broker:
    node_id: int
    host: str
    port: int


def metadata_response(version: int, broker: Broker, cluster_id: str,
                      topics: list[tuple[int, str, int]]) -> bytes:
    """``topics``: (error_code, name, partition count). This broker leads every partition."""
    w = Writer()
    if version >= 3:
        w.int32(0)
    w.int32(1).int32(broker.node_id).string(broker.host).int32(broker.port).string(None)
    if version >= 2:
        w.string(cluster_id)
    w.int32(broker.node_id)  # controller: CreateTopics goes to it

    def partition(w: Writer, index: int) -> None:
        w.int16(NONE).int32(index).int32(broker.node_id)
        if version >= 7:
            w.int32(-1)  # leader epoch unknown: clients skip epoch validation (brief §4.14)
        w.int32(1).int32(broker.node_id).int32(1).int32(broker.node_id)
        if version >= 5:
            w.int32(0)  # offline replicas

    def topic(w: Writer, t: tuple[int, str, int]) -> None:
        error, name, count = t
        w.int16(error).string(name).boolean(False)
        w.array(range(count), partition)
        if version >= 8:
            w.int32(AUTHORIZED_OPERATIONS_OMITTED)

    w.array(topics, topic)
    if version >= 8:
        w.int32(AUTHORIZED_OPERATIONS_OMITTED)
    return bytes(w.buf)


# -- CreateTopics (19) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class NewTopic:
    name: str
    partitions: int
    replication_factor: int
    manual_assignment: bool
    configs: dict


def decode_create_topics(r: Reader, version: int) -> tuple[list[NewTopic], int, bool]:
    topics = []
    for _ in range(r.array_count()):
        name, partitions, replication = r.string(), r.int32(), r.int16()
        assignments = r.array_count()
        for _ in range(assignments):
            r.int32()
            r.int32_array()
        configs = {}
        for _ in range(r.array_count()):
            key = r.string()
            configs[key] = r.nullable_string()
        topics.append(NewTopic(name, partitions, replication, assignments > 0, configs))
    timeout_ms = r.int32()
    validate_only = r.boolean() if version >= 1 else False
    return topics, timeout_ms, validate_only


def create_topics_response(version: int, results: list[tuple[str, int, str | None]]) -> bytes:
    w = Writer()
    if version >= 2:
        w.int32(0)

    def topic(w: Writer, t) -> None:
        w.string(t[0]).int16(t[1])
        if version >= 1:
            w.string(t[2])

    w.array(results, topic)
    return bytes(w.buf)


# -- ListOffsets (2) -----------------------------------------------------------------------------

def decode_list_offsets(r: Reader, version: int) -> list[tuple[str, list[tuple[int, int]]]]:
    """[(topic, [(partition, timestamp)])]; timestamp -2 earliest, -1 latest."""
    r.int32()  # replica id: -1 from clients
    if version >= 2:
        r.int8()  # isolation level: without transactions both read up to the high watermark
    topics = []
    for _ in range(r.array_count()):
        name = r.string()
        parts = []
        for _ in range(r.array_count()):
            index = r.int32()
            if version >= 4:
                r.int32()  # current leader epoch
            parts.append((index, r.int64()))
        topics.append((name, parts))
    return topics


def list_offsets_response(version: int, topics) -> bytes:
    """``topics``: [(name, [(partition, error, timestamp, offset)])]."""
    w = Writer()
    if version >= 2:
        w.int32(0)

    def partition(w: Writer, p) -> None:
        w.int32(p[0]).int16(p[1]).int64(p[2]).int64(p[3])
        if version >= 4:
            w.int32(-1)

    w.array(topics, lambda w, t: w.string(t[0]).array(t[1], partition))
    return bytes(w.buf)


# -- Produce (0) ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProduceData:
    transactional_id: str | None
    acks: int
    timeout_ms: int
    topics: list  # [(name, [(partition, records memoryview | None)])]


def decode_produce(r: Reader, version: int) -> ProduceData:
    transactional_id, acks, timeout_ms = r.nullable_string(), r.int16(), r.int32()
    topics = []
    for _ in range(r.array_count()):
        name = r.string()
        parts = []
        for _ in range(r.array_count()):
            parts.append((r.int32(), r.nullable_bytes()))
        topics.append((name, parts))
    return ProduceData(transactional_id, acks, timeout_ms, topics)


def produce_response(version: int, topics) -> bytes:
    """``topics``: [(name, [(partition, error, base_offset)])]."""
    w = Writer()

    def partition(w: Writer, p) -> None:
        w.int32(p[0]).int16(p[1]).int64(p[2]).int64(-1)  # log append time: CreateTime topics
        if version >= 5:
            w.int64(-1)  # log start offset: clients do not need it on this path
        if version >= 8:
            w.int32(0).string(None)  # record errors, error message

    w.array(topics, lambda w, t: w.string(t[0]).array(t[1], partition))
    w.int32(0)  # throttle time: last in Produce responses
    return bytes(w.buf)


# -- Fetch (1) -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FetchData:
    max_wait_ms: int
    min_bytes: int
    max_bytes: int
    topics: list  # [(name, [(partition, fetch_offset, partition_max_bytes)])]


def decode_fetch(r: Reader, version: int) -> FetchData:
    r.int32()  # replica id
    max_wait_ms, min_bytes, max_bytes = r.int32(), r.int32(), r.int32()
    r.int8()  # isolation level: LastStableOffset = HighWatermark without transactions
    if version >= 7:
        r.int32()  # session id
        r.int32()  # session epoch: we never open a session, so every fetch is a full one
    topics = []
    for _ in range(r.array_count()):
        name = r.string()
        parts = []
        for _ in range(r.array_count()):
            index = r.int32()
            if version >= 9:
                r.int32()  # current leader epoch
            offset = r.int64()
            if version >= 5:
                r.int64()  # follower's log start offset
            parts.append((index, offset, r.int32()))
        topics.append((name, parts))
    if version >= 7:
        for _ in range(r.array_count()):  # forgotten topics: meaningful only in a session
            r.string()
            r.int32_array()
    if version >= 11:
        r.string()  # rack id
    return FetchData(max_wait_ms, min_bytes, max_bytes, topics)


def fetch_response_parts(version: int, topics) -> list:
    """The response body as buffers: encoded headers interleaved with the partitions' record
    bytes (memoryviews of the mapped segments, sent without a copy). ``topics``:
    [(name, [(partition, error, high_watermark, log_start, records)])]."""
    parts: list = []
    w = Writer()
    w.int32(0)
    if version >= 7:
        w.int16(NONE).int32(0)  # session id 0: no session was created
    w.int32(len(topics))
    for name, partitions in topics:  # bounded by the request's partitions
        w.string(name).int32(len(partitions))
        for index, error, hw, start, data in partitions:
            w.int32(index).int16(error).int64(hw).int64(hw)  # last stable = high watermark
            if version >= 5:
                w.int64(start)
            w.int32(0)  # aborted transactions: none
            if version >= 11:
                w.int32(-1)  # preferred read replica
            w.int32(len(data))
            if len(data):
                parts.append(bytes(w.buf))
                parts.append(data)
                w = Writer()
    parts.append(bytes(w.buf))
    return parts


DECODERS = {METADATA: decode_metadata, CREATE_TOPICS: decode_create_topics,
            LIST_OFFSETS: decode_list_offsets, PRODUCE: decode_produce, FETCH: decode_fetch}


def check_consumed(r: Reader) -> None:
    """A request body must end where its layout does: trailing bytes mean we misread it."""
    if r.pos != len(r.buf):
        raise MalformedRequest(f"{len(r.buf) - r.pos} bytes left after the request body")
