"""The one exception tree of shmbroker.

Every failure a user or operator can meet is a subclass of :class:`ShmbrokerError` with

* ``code``: an integer shared with every wire protocol we speak. Where Kafka has an error
  code for the same condition we use Kafka's number, so a Kafka client sees the error it knows;
* ``retriable``: whether trying the same call again later can succeed (Kafka's meaning).

Programmer errors (a broken invariant) are ``AssertionError`` and are not caught. Operating
errors (bad bytes, a full disk, an unknown topic) are typed here. Hot paths report
full/empty/would-block as return values, never as exceptions.

Add new classes here, never elsewhere, so that ``ERRORS_BY_CODE`` stays complete.
"""
from __future__ import annotations

import errno as _errno


class ShmbrokerError(Exception):
    """Base of every error shmbroker raises on purpose.

    ``position``: the byte offset of the problem inside the buffer or file concerned, when the
    error is about bytes (None otherwise).
    """

    code: int = -1  # Kafka's UNKNOWN_SERVER_ERROR
    retriable: bool = False

    def __init__(self, message: str = "", position: int | None = None):
        super().__init__(message)
        self.position = position


# --- setup ---------------------------------------------------------------------------------

class NativeExtensionMissing(ShmbrokerError, ImportError):
    """shmbroker._native was not built; we never fall back silently to slow Python."""

    code = -1


class ConfigError(ShmbrokerError, ValueError):
    """A setting is unknown, of the wrong type, or outside its declared limits."""

    code = 40  # INVALID_CONFIG


# --- records (RecordBatch v2 bytes) -------------------------------------------------------

class CorruptRecordError(ShmbrokerError):
    """Bytes that are not a valid RecordBatch v2. Base of every decoding failure.

    ``position`` is the byte offset of the problem inside the buffer that was decoded (or the
    file, when raised by the log), when known.
    """

    code = 2  # CORRUPT_MESSAGE


class TruncatedBatchError(CorruptRecordError):
    """A length field points past the end of the bytes we were given."""


class InvalidMagicError(CorruptRecordError):
    """The magic byte is not 2 (only RecordBatch v2 is supported)."""


class CrcMismatchError(CorruptRecordError):
    """The CRC-32C stored in the batch header does not match its contents."""


class InvalidRecordError(CorruptRecordError):
    """A record inside a batch is malformed (bad varint, lengths that do not add up, ...)."""

    code = 87  # INVALID_RECORD


class UnsupportedCompressionError(ShmbrokerError):
    """The batch is compressed with a codec we cannot decode here."""

    code = 76  # UNSUPPORTED_COMPRESSION_TYPE


class CompressionLibraryMissingError(UnsupportedCompressionError):
    """A batch is compressed with a codec whose optional package is not installed.

    The message names the package (``pip install lz4``); gzip needs none.
    """


class RecordTooLargeError(ShmbrokerError):
    """A record or batch is larger than the configured limit (``batch_bytes_max``)."""

    code = 10  # MESSAGE_TOO_LARGE


# --- the log --------------------------------------------------------------------------------

class LogError(ShmbrokerError):
    """A partition log cannot do what was asked (I/O error, closed log, ...)."""

    code = 56  # KAFKA_STORAGE_ERROR


#: OS errors that are the storage's state, not a bug of ours (full, over quota, read-only,
#: failing): a broker process reports them in one line as a LogError, without a traceback.
STORAGE_ERRNOS = frozenset({_errno.ENOSPC, _errno.EDQUOT, _errno.EROFS, _errno.EIO})


class CorruptSegmentError(LogError, CorruptRecordError):
    """Corruption found inside a sealed segment. Never served; names the file and position."""

    code = 2  # CORRUPT_MESSAGE

    def __init__(self, message: str, path: str | None = None, position: int | None = None):
        super().__init__(message, position)
        self.path = path


class OffsetOutOfRangeError(LogError):
    """The offset asked for is below the log start offset or above the end offset."""

    code = 1  # OFFSET_OUT_OF_RANGE


class LogClosedError(LogError):
    """The log (or segment) was closed."""


class InvalidOffsetError(LogError):
    """Offsets in an append do not fit the log (e.g. would overflow a segment's relative range)."""

    code = 87  # INVALID_RECORD


# --- topics and requests (used by the broker; declared here so codes stay in one place) -----

class UnknownTopicOrPartitionError(ShmbrokerError):
    code = 3  # UNKNOWN_TOPIC_OR_PARTITION
    retriable = True


class TopicAlreadyExistsError(ShmbrokerError):
    code = 36  # TOPIC_ALREADY_EXISTS


class InvalidTopicError(ShmbrokerError, ValueError):
    code = 17  # INVALID_TOPIC_EXCEPTION


class RequestTimeoutError(ShmbrokerError, TimeoutError):
    code = 7  # REQUEST_TIMED_OUT
    retriable = True


class InvalidPartitionsError(ShmbrokerError, ValueError):
    """A partition count that is not allowed (below 1, above the limit, or a decrease)."""

    code = 37  # INVALID_PARTITIONS


class UnsupportedVersionError(ShmbrokerError):
    """A request in a protocol version this process does not speak."""

    code = 35  # UNSUPPORTED_VERSION


class InvalidRequestError(ShmbrokerError):
    """A request that cannot be decoded or has missing / mistyped fields."""

    code = 42  # INVALID_REQUEST


class MalformedKafkaRequestError(InvalidRequestError):
    """A Kafka-protocol request (shmbroker/kafka) whose bytes do not decode as the layout its
    header names: truncated, a negative or oversized length, bytes left over. The listener
    closes the connection, as Kafka does for a request it cannot parse."""


# --- clients ----------------------------------------------------------------------------------

class IllegalStateError(ShmbrokerError):
    """A client call that does not fit the client's state: seeking a partition that is not
    assigned, polling with nothing assigned, using a closed client."""

    code = -1  # never on the wire: raised by the client library itself


class SerializationError(ShmbrokerError):
    """The application's key or value (de)serializer raised for a record (kafka-python's
    serializer/deserializer arguments); the cause is chained. A consumer stays at the record
    (its position is that record's offset: ``seek`` past it to skip it)."""

    code = -1  # never on the wire: the application's own functions


class UnsupportedFeatureError(ShmbrokerError, NotImplementedError):
    """A feature this version does not have yet (e.g. consumer groups before issue 4). Raised
    rather than silently ignored, so code written for it does not run with other semantics."""

    code = -1  # never on the wire


class AuthenticationError(ShmbrokerError):
    """The router refused this client at the CURVE handshake: its public key is not in the
    broker's allow-list, it does not use CURVE while the router requires it (or the other way
    round), or it has the wrong server public key. Not retriable: the same keys fail again.
    Raised by the client library from ZeroMQ's handshake events (never a reply on the wire:
    a refused client gets no connection to send a request on)."""

    code = 58  # SASL_AUTHENTICATION_FAILED: Kafka's "the credentials were refused"


# --- the broker's processes -------------------------------------------------------------------

class BrokerNotRunningError(ShmbrokerError):
    """No broker is serving the data dir a client was pointed at; the message names the dir."""

    code = 8  # BROKER_NOT_AVAILABLE
    retriable = True


class BrokerAlreadyRunningError(ShmbrokerError):
    """`shmbroker serve` found another broker holding the data dir's lock (pid named)."""

    code = -1  # never on the wire: raised only by `serve` before anything is served


class ColdReadError(ShmbrokerError):
    """A cold read's data connection (docs/protocol.md, "Cold reads") failed: refused (the
    grant expired or was used already), cut before every granted byte came, or stalled.
    Nothing was handed out from it; fetching again from the same position gets a new grant
    (or the bytes in a fetch reply)."""

    code = 13  # NETWORK_EXCEPTION
    retriable = True


# --- shared memory (shmbroker/shm) ----------------------------------------------------------

class SharedMemoryError(ShmbrokerError):
    """A shared-memory region cannot be created, attached or used. Base of the shm errors."""

    code = -1


class RegionNotFoundError(SharedMemoryError):
    """No shared-memory object of that name (the broker or the producer that owns it is gone)."""

    retriable = True


class RegionExistsError(SharedMemoryError):
    """A shared-memory object of that name already exists (creation is O_EXCL)."""


class RegionHeaderError(SharedMemoryError):
    """A region's header is not what its reader expects: bad magic, another layout version,
    a size that does not match the object, or a corrupted field. Never guessed around."""


class RegionNotReadyError(RegionHeaderError):
    """A region exists but its creator has not finished it (not sized yet, or its magic, which
    is written last, still 0): it is being created this moment, or its creator died while
    creating it. Worth a retry for a while; a region that stays so is stale."""

    retriable = True


class RingCorruptError(RegionHeaderError):
    """An ingress ring's header or frames break an invariant (positions out of range, a frame
    length that cannot be, a sequence out of order). ``position``: where, when known."""


class RingFullTimeoutError(SharedMemoryError, RequestTimeoutError):
    """A producer waited ``timeout_ms`` for room in a full ring (the partition process is not
    draining fast enough, or not at all). Nothing was dropped: the payload was not written."""

    code = 7  # REQUEST_TIMED_OUT
    retriable = True


class RegistryFullError(SharedMemoryError):
    """Every producer slot of a partition's registry is taken by a live process."""

    retriable = True


class PartitionStateUnavailableError(SharedMemoryError):
    """The partition's published state stayed mid-update (odd seqlock) for too long: its
    process died while publishing and has not been restarted yet."""

    code = 5  # LEADER_NOT_AVAILABLE
    retriable = True


# --- consumer groups (shmbroker/coordinator/group.py; docs/design/groups.md) ------------------

class CoordinatorNotAvailableError(ShmbrokerError):
    """The coordinator could not answer: it restarted while the request was in flight (the
    client sees its socket bound anew), or the group was deleted (state Dead) while the
    request was on its way. Asking again reaches the new coordinator, or finds or creates the
    group anew."""

    code = 15  # COORDINATOR_NOT_AVAILABLE
    retriable = True


class IllegalGenerationError(ShmbrokerError):
    """A sync, heartbeat or offset commit names a generation that is not the group's current
    one: the member missed a rebalance and must rejoin before it may commit."""

    code = 22  # ILLEGAL_GENERATION


class InconsistentGroupProtocolError(ShmbrokerError):
    """A joining member supports none of the assignors that every other member supports."""

    code = 23  # INCONSISTENT_GROUP_PROTOCOL


class InvalidGroupIdError(ShmbrokerError, ValueError):
    """A group id that is empty, too long or not a string."""

    code = 24  # INVALID_GROUP_ID


class UnknownMemberIdError(ShmbrokerError):
    """The member id is not (or no longer) in the group: it left, its session expired, its
    process died, or the coordinator restarted. The member rejoins with an empty id."""

    code = 25  # UNKNOWN_MEMBER_ID


class InvalidSessionTimeoutError(ShmbrokerError, ValueError):
    """A session timeout outside the coordinator's [min, max] (docs/design/groups.md)."""

    code = 26  # INVALID_SESSION_TIMEOUT


class RebalanceInProgressError(ShmbrokerError):
    """The group is rebalancing: the member must (re)join, or sync first, then try again.
    Retriable in Kafka's sense: the same call succeeds once the member has caught up (Kafka's
    Java class is not a RetriableException; its clients treat the code as 'rejoin')."""

    code = 27  # REBALANCE_IN_PROGRESS
    retriable = True


class NonEmptyGroupError(ShmbrokerError):
    """A group with live members cannot be deleted."""

    code = 68  # NON_EMPTY_GROUP


class GroupIdNotFoundError(ShmbrokerError):
    """No group of that id (describe, delete, reset offsets)."""

    code = 69  # GROUP_ID_NOT_FOUND


class GroupMaxSizeReachedError(ShmbrokerError):
    """The group already has ``members_max`` members; the new member is refused."""

    code = 81  # GROUP_MAX_SIZE_REACHED


class FencedInstanceIdError(ShmbrokerError):
    """Another process joined with the same ``group_instance_id`` and took this member's place
    (static membership). Fatal for the fenced client: two live processes share one identity."""

    code = 82  # FENCED_INSTANCE_ID


class OutOfOrderSequenceError(ShmbrokerError):
    """An idempotent Kafka producer's batch does not follow its previous one on the partition
    (a batch between them was lost or refused): appending it would reorder or skip records.
    Not retriable as is; the client resets its producer state (kafka/idempotence.py)."""

    code = 45  # OUT_OF_ORDER_SEQUENCE_NUMBER


class InvalidProducerEpochError(ShmbrokerError):
    """An idempotent Kafka producer's batch carries an epoch older than one already seen for
    its producer id: a zombie instance of a producer that has moved on."""

    code = 47  # INVALID_PRODUCER_EPOCH


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


#: The most general class for each code, for turning a wire error code back into an exception.
ERRORS_BY_CODE: dict[int, type[ShmbrokerError]] = {}
for _cls in [ShmbrokerError, *_all_subclasses(ShmbrokerError)]:
    ERRORS_BY_CODE.setdefault(_cls.code, _cls)
del _cls
