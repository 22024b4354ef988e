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
OFFSET_COMMIT, OFFSET_FETCH, FIND_COORDINATOR, JOIN_GROUP = 8, 9, 10, 11
HEARTBEAT, LEAVE_GROUP, SYNC_GROUP, DESCRIBE_GROUPS, LIST_GROUPS = 12, 13, 14, 15, 16
API_VERSIONS, CREATE_TOPICS, INIT_PRODUCER_ID = 18, 19, 22

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
    # The group APIs, classic versions. The maxima are what the clients pick (kafka-protocol
    # brief §1); LeaveGroup stops at 1 because v3 batches members, which only kafka-python
    # could send. OffsetCommit from 2: v0/v1 carry per-partition timestamps no client sends.
    OFFSET_COMMIT: (2, 7),
    OFFSET_FETCH: (1, 5),
    FIND_COORDINATOR: (0, 2),
    JOIN_GROUP: (0, 5),
    HEARTBEAT: (0, 3),
    LEAVE_GROUP: (0, 1),
    SYNC_GROUP: (0, 3),
    # What admin tools ask (kafka-consumer-groups, AdminClient): the last classic versions
    # (DescribeGroups v5 and ListGroups v3 turn flexible).
    DESCRIBE_GROUPS: (0, 4),
    LIST_GROUPS: (0, 2),
    # v0-1 only: v2 turns flexible, v3+ is an epoch bump kafka-python tries only when it
    # guesses a broker >= 2.5, which our maxima keep it from guessing.
    INIT_PRODUCER_ID: (0, 1),
}
NAMES = {PRODUCE: "Produce", FETCH: "Fetch", LIST_OFFSETS: "ListOffsets", METADATA: "Metadata",
         API_VERSIONS: "ApiVersions", CREATE_TOPICS: "CreateTopics",
         OFFSET_COMMIT: "OffsetCommit", OFFSET_FETCH: "OffsetFetch",
         FIND_COORDINATOR: "FindCoordinator", JOIN_GROUP: "JoinGroup", HEARTBEAT: "Heartbeat",
         LEAVE_GROUP: "LeaveGroup", SYNC_GROUP: "SyncGroup", INIT_PRODUCER_ID: "InitProducerId",
         DESCRIBE_GROUPS: "DescribeGroups", LIST_GROUPS: "ListGroups"}

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
    bytes (anything with a length: the listener's FilePart, sent with sendfile, or a
    memoryview of the mapped segment). ``topics``:
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


# -- FindCoordinator (10) ------------------------------------------------------------------------

def decode_find_coordinator(r: Reader, version: int) -> tuple[str, int]:
    """(key, key type): 0 a group, 1 a transactional id."""
    key = r.string()
    return key, (r.int8() if version >= 1 else 0)


def find_coordinator_response(version: int, error: int, message: str | None,
                              broker: Broker | None) -> bytes:
    w = Writer()
    if version >= 1:
        w.int32(0)
    w.int16(error)
    if version >= 1:
        w.string(message)
    if broker is None:
        w.int32(-1).string("").int32(-1)
    else:
        w.int32(broker.node_id).string(broker.host).int32(broker.port)
    return bytes(w.buf)


# -- JoinGroup (11) ------------------------------------------------------------------------------

@dataclass(frozen=True)
class JoinGroupData:
    group_id: str
    session_timeout_ms: int
    rebalance_timeout_ms: int
    member_id: str
    group_instance_id: str | None
    protocol_type: str
    protocols: list  # [(name, metadata bytes)]


def decode_join_group(r: Reader, version: int) -> JoinGroupData:
    group_id, session_timeout_ms = r.string(), r.int32()
    # v0 has no rebalance timeout: Kafka uses the session timeout for both.
    rebalance_timeout_ms = r.int32() if version >= 1 else session_timeout_ms
    member_id = r.string()
    instance_id = r.nullable_string() if version >= 5 else None
    protocol_type = r.string()
    protocols = []
    for _ in range(r.array_count()):
        name = r.string()
        metadata = r.nullable_bytes()
        protocols.append((name, bytes(metadata) if metadata is not None else b""))
    return JoinGroupData(group_id, session_timeout_ms, rebalance_timeout_ms, member_id,
                         instance_id, protocol_type, protocols)


def join_group_response(version: int, error: int, generation_id: int, protocol: str,
                        leader: str, member_id: str, members: list) -> bytes:
    """``members``: [(member id, group instance id, metadata bytes)], the leader's only."""
    w = Writer()
    if version >= 2:
        w.int32(0)
    w.int16(error).int32(generation_id).string(protocol).string(leader).string(member_id)

    def member(w: Writer, m) -> None:
        w.string(m[0])
        if version >= 5:
            w.string(m[1])
        w.bytes_(m[2])

    w.array(members, member)
    return bytes(w.buf)


# -- SyncGroup (14), Heartbeat (12), LeaveGroup (13) ----------------------------------------------

@dataclass(frozen=True)
class MemberRef:
    """Who a SyncGroup/Heartbeat/LeaveGroup comes from (generation -1 for LeaveGroup)."""

    group_id: str
    generation_id: int
    member_id: str
    group_instance_id: str | None


def decode_sync_group(r: Reader, version: int) -> MemberRef:
    group_id, generation_id, member_id = r.string(), r.int32(), r.string()
    instance_id = r.nullable_string() if version >= 3 else None
    # The leader's assignments are read and dropped: our coordinator assigns (the design
    # note's "Groups" says why); every member gets the coordinator's share for it.
    for _ in range(r.array_count()):
        r.string()
        r.nullable_bytes()
    return MemberRef(group_id, generation_id, member_id, instance_id)


def sync_group_response(version: int, error: int, assignment: bytes) -> bytes:
    w = Writer()
    if version >= 1:
        w.int32(0)
    return bytes(w.int16(error).bytes_(assignment).buf)


def decode_heartbeat(r: Reader, version: int) -> MemberRef:
    group_id, generation_id, member_id = r.string(), r.int32(), r.string()
    return MemberRef(group_id, generation_id, member_id,
                     r.nullable_string() if version >= 3 else None)


def decode_leave_group(r: Reader, version: int) -> MemberRef:
    return MemberRef(r.string(), -1, r.string(), None)


def error_only_response(version: int, error: int, throttle_from: int = 1) -> bytes:
    """Heartbeat and LeaveGroup: [ThrottleTimeMs (v1+)] ErrorCode."""
    w = Writer()
    if version >= throttle_from:
        w.int32(0)
    return bytes(w.int16(error).buf)


# -- DescribeGroups (15), ListGroups (16) --------------------------------------------------------

def decode_describe_groups(r: Reader, version: int) -> list[str]:
    """The group ids asked for."""
    groups = [r.string() for _ in range(r.array_count())]
    if version >= 3:
        r.boolean()  # include authorized operations: answered "omitted" (there are no ACLs)
    return groups


def decode_list_groups(r: Reader, version: int) -> None:
    """v0-2 have no fields (v4's states filter comes with the flexible versions)."""
    return None


@dataclass(frozen=True)
class DescribedMember:
    member_id: str
    group_instance_id: str | None
    client_id: str
    client_host: str
    metadata: bytes       # ConsumerProtocolSubscription (empty unless the group is Stable)
    assignment: bytes     # ConsumerProtocolAssignment (likewise)


@dataclass(frozen=True)
class DescribedGroup:
    error: int
    group_id: str
    state: str            # Kafka's names: Empty, PreparingRebalance, ..., Dead
    protocol_type: str    # "consumer", or "" for a group that only has committed offsets
    protocol_data: str    # the assignor chosen, or ""
    members: tuple[DescribedMember, ...] = ()


def describe_groups_response(version: int, groups: list[DescribedGroup]) -> bytes:
    w = Writer()
    if version >= 1:
        w.int32(0)  # throttle_time_ms

    def member(w: Writer, m: DescribedMember) -> None:
        w.string(m.member_id)
        if version >= 4:
            w.string(m.group_instance_id)
        w.string(m.client_id).string(m.client_host).bytes_(m.metadata).bytes_(m.assignment)

    def group(w: Writer, g: DescribedGroup) -> None:
        w.int16(g.error).string(g.group_id).string(g.state).string(g.protocol_type)
        w.string(g.protocol_data).array(g.members, member)
        if version >= 3:
            w.int32(AUTHORIZED_OPERATIONS_OMITTED)

    return bytes(w.array(groups, group).buf)


def list_groups_response(version: int, error: int, groups: list[tuple[str, str]]) -> bytes:
    """``groups``: [(group id, protocol type)]."""
    w = Writer()
    if version >= 1:
        w.int32(0)  # throttle_time_ms
    w.int16(error)
    return bytes(w.array(groups, lambda w, g: w.string(g[0]).string(g[1])).buf)


# -- OffsetCommit (8), OffsetFetch (9) -----------------------------------------------------------

@dataclass(frozen=True)
class OffsetCommitData:
    member: MemberRef
    topics: list  # [(name, [(partition, offset, metadata | None)])]


def decode_offset_commit(r: Reader, version: int) -> OffsetCommitData:
    group_id, generation_id, member_id = r.string(), r.int32(), r.string()
    instance_id = r.nullable_string() if version >= 7 else None
    if version <= 4:
        r.int64()  # retention time: committed offsets are kept until the group is deleted
    topics = []
    for _ in range(r.array_count()):
        name = r.string()
        parts = []
        for _ in range(r.array_count()):
            index, offset = r.int32(), r.int64()
            if version >= 6:
                r.int32()  # committed leader epoch: we report -1 everywhere (no epochs)
            parts.append((index, offset, r.nullable_string()))
        topics.append((name, parts))
    return OffsetCommitData(MemberRef(group_id, generation_id, member_id, instance_id), topics)


def offset_commit_response(version: int, topics) -> bytes:
    """``topics``: [(name, [(partition, error)])]."""
    w = Writer()
    if version >= 3:
        w.int32(0)
    w.array(topics, lambda w, t: w.string(t[0]).array(
        t[1], lambda w, p: w.int32(p[0]).int16(p[1])))
    return bytes(w.buf)


def decode_offset_fetch(r: Reader, version: int) -> tuple[str, list | None]:
    """(group id, [(topic, [partition])] or None: every committed partition, v2+)."""
    group_id = r.string()
    count = r.array_count(nullable=version >= 2)
    if count == -1:
        return group_id, None
    return group_id, [(r.string(), r.int32_array()) for _ in range(count)]


def offset_fetch_response(version: int, topics, error: int) -> bytes:
    """``topics``: [(name, [(partition, offset, metadata, error)])]."""
    w = Writer()
    if version >= 3:
        w.int32(0)

    def partition(w: Writer, p) -> None:
        w.int32(p[0]).int64(p[1])
        if version >= 5:
            w.int32(-1)  # leader epoch: none (brief §4.14)
        w.string(p[2]).int16(p[3])

    w.array(topics, lambda w, t: w.string(t[0]).array(t[1], partition))
    if version >= 2:
        w.int16(error)
    return bytes(w.buf)


# -- InitProducerId (22) -------------------------------------------------------------------------

def decode_init_producer_id(r: Reader, version: int) -> tuple[str | None, int]:
    return r.nullable_string(), r.int32()


def init_producer_id_response(version: int, error: int, producer_id: int, epoch: int) -> bytes:
    return bytes(Writer().int32(0).int16(error).int64(producer_id).int16(epoch).buf)


# -- The "consumer" protocol's embedded bytes (opaque to Kafka's broker, read by ours) -------------

def decode_subscription_topics(metadata: bytes) -> list[str]:
    """The topics of a ConsumerProtocolSubscription (any version: they all start with
    Version INT16, Topics ARRAY of STRING; later fields are not needed and not read)."""
    r = Reader(memoryview(metadata))
    r.int16()
    return [r.string() for _ in range(r.array_count())]


def encode_subscription(topics: list[str]) -> bytes:
    """ConsumerProtocolSubscription v0 (topics, null user data): what a Kafka leader is
    given for each member, Kafka or native, so its own assignor sees the whole group."""
    w = Writer().int16(0)
    w.array(sorted(topics), lambda w, t: w.string(t))
    return bytes(w.bytes_(None).buf)


def encode_assignment(partitions) -> bytes:
    """ConsumerProtocolAssignment v0 of ``partitions`` ([(topic, partition)]), empty user data."""
    by_topic: dict[str, list[int]] = {}
    for topic, index in sorted(partitions):  # bounded by the member's assignment
        by_topic.setdefault(topic, []).append(index)
    w = Writer().int16(0)
    w.array(sorted(by_topic.items()),
            lambda w, t: w.string(t[0]).array(t[1], lambda w, p: w.int32(p)))
    return bytes(w.bytes_(b"").buf)


DECODERS = {METADATA: decode_metadata, CREATE_TOPICS: decode_create_topics,
            LIST_OFFSETS: decode_list_offsets, PRODUCE: decode_produce, FETCH: decode_fetch,
            FIND_COORDINATOR: decode_find_coordinator, JOIN_GROUP: decode_join_group,
            SYNC_GROUP: decode_sync_group, HEARTBEAT: decode_heartbeat,
            LEAVE_GROUP: decode_leave_group, OFFSET_COMMIT: decode_offset_commit,
            OFFSET_FETCH: decode_offset_fetch, INIT_PRODUCER_ID: decode_init_producer_id,
            DESCRIBE_GROUPS: decode_describe_groups, LIST_GROUPS: decode_list_groups}


def check_consumed(r: Reader) -> None:
    """A request body must end where its layout does: trailing bytes mean we misread it."""
    if r.pos != len(r.buf):
        raise MalformedRequest(f"{len(r.buf) - r.pos} bytes left after the request body")
