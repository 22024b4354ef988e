"""Idempotent Kafka producers: the sequence checks Kafka's partition leader makes, made by the
listener, since every Kafka produce passes through it (docs/design/kafka.md, "Idempotence").

An idempotent producer (InitProducerId gave it an id) numbers its batches per partition:
batch N carries BaseSequence s and holds c records, so batch N+1 carries s+c. After a lost
response it sends the same batch again, same sequence. What we do with a batch of producer id
``pid >= 0`` and epoch ``e`` (Kafka's rules, ProducerStateManager/ProducerAppendInfo):

    same (first, last) sequence as one of the last 5 appended  -> duplicate: not appended, the
                                                                  first append's offset answered
    same as one still on its way to the partition             -> REQUEST_TIMED_OUT (retriable:
                                                                  the retry after it is a duplicate)
    epoch below the one we know                               -> INVALID_PRODUCER_EPOCH
    first sequence != the previous batch's last + 1            -> OUT_OF_ORDER_SEQUENCE_NUMBER
    otherwise (or a new epoch, or a producer we have no state of) -> appended; remembered

Worked example: batches (seq 0, 3 records) and (seq 3, 2 records) are appended at offsets 10
and 13; the response to the second is lost and the client sends it again: (3, 4) matches the
remembered (3, 4, offset 13), so nothing is appended and the answer is offset 13.

After a restart the state is rebuilt from the log, as Kafka's ProducerStateManager rebuilds
it: the partition stores a client's batch as it is (producer id, epoch, base sequence and
record count intact), so before the first idempotent batch to a partition is checked, the
last KAFKA_PRODUCER_STATE_SCAN_BYTES_MAX of that partition's log are read
(``LogReader.tail_offset``) and every idempotent batch there is replayed into the state in
log order (:meth:`ProducerStates.restore`): the last 5 batches of each producer, its epoch,
its last sequence. A retry that straddles a listener restart is then a duplicate, answered
with the first append's offset.

Limits, said plainly: a producer whose last batch lies further back than the scanned tail
(4 MiB; more than that written to the partition since, by others) is not found and starts
afresh, accepting whatever sequence comes next; so does one evicted past
KAFKA_PRODUCER_STATES_MAX. A batch still in the dead listener's ring when a retry arrives
(it is appended as soon as the partition process drains the ring, microseconds after the
write, long before a client's retry) would be missed too. Batches from acks 0/1 producers are
not checked (Kafka clients allow idempotence only with acks=all). Owned by the kafka
process's loop; not thread-safe.
"""
from __future__ import annotations

import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from .. import errors

#: (producer id, topic, partition) states kept; the least recently used is forgotten beyond.
KAFKA_PRODUCER_STATES_MAX = 100_000
#: Appended batches remembered per state: Kafka's, matching the clients' 5 in flight.
KAFKA_PRODUCER_BATCHES_KEPT = 5
#: Bytes at the end of a partition's log read to rebuild its producers' state after a restart
#: (at most one index interval more): a few ms of reading, once per partition.
KAFKA_PRODUCER_STATE_SCAN_BYTES_MAX = 4 << 20
#: Bytes per read of that scan.
_SCAN_READ_BYTES = 1 << 20
#: RecordBatch v2: producerId INT64 at 43, producerEpoch INT16 at 51, baseSequence INT32 at 53,
#: recordsCount INT32 at 57 (brief §5.1); the header is 61 bytes.
_IDS = struct.Struct(">qhii")
_IDS_AT = 43
BATCH_HEADER_BYTES = 61
#: Sequences wrap at INT32's maximum, as Kafka's do.
_SEQUENCE_MOD = 1 << 31

OUT_OF_ORDER_SEQUENCE_NUMBER = 45
INVALID_PRODUCER_EPOCH = 47


def batch_ids(data) -> tuple[int, int, int, int] | None:
    """(producer id, epoch, first sequence, last sequence) of an idempotent batch; None for a
    batch without a producer id (or too short to say: the batch check refuses it anyway)."""
    if len(data) < BATCH_HEADER_BYTES:
        return None
    pid, epoch, first, count = _IDS.unpack_from(data, _IDS_AT)
    if pid < 0 or count <= 0 or first < 0:
        return None
    return pid, epoch, first, (first + count - 1) % _SEQUENCE_MOD


@dataclass
class _State:
    epoch: int
    #: (first, last, base offset) of the last appended batches, oldest first.
    appended: deque = field(default_factory=lambda: deque(maxlen=KAFKA_PRODUCER_BATCHES_KEPT))
    #: (first, last) of batches accepted and not yet answered by the partition, in order.
    in_flight: list = field(default_factory=list)

    def last_sequence(self) -> int | None:
        if self.in_flight:
            return self.in_flight[-1][1]
        return self.appended[-1][1] if self.appended else None


class ProducerStates:
    def __init__(self, states_max: int = KAFKA_PRODUCER_STATES_MAX):
        assert states_max > 0
        self.states_max = states_max
        self._states: OrderedDict[tuple, _State] = OrderedDict()
        #: (topic, partition) whose log tail has been read into the state (restore).
        self._restored: set[tuple[str, int]] = set()
        #: For logs and tests.
        self.duplicates = 0
        self.restored_batches = 0

    def restored(self, topic: str, partition: int) -> bool:
        """Whether the partition's log tail was read already (call ``restore`` if not)."""
        return (topic, partition) in self._restored

    def restore(self, topic: str, partition: int, batches) -> None:
        """Rebuild the state of ``topic``/``partition`` from its log's tail, before any batch
        to it is checked: ``batches`` are (producer id, epoch, first sequence, last sequence,
        base offset) of the idempotent batches there, in log order. A producer the listener
        already knows keeps what it knows (it produced since; the log has nothing newer)."""
        self._restored.add((topic, partition))
        for pid, epoch, first, last, base_offset in batches:  # bounded by the scanned tail
            key = (pid, topic, partition)
            state = self._states.get(key)
            if state is not None and state.in_flight:
                continue
            if state is None or epoch > state.epoch:
                state = self._states[key] = _State(epoch)
                if len(self._states) > self.states_max:
                    self._states.popitem(last=False)
            elif epoch < state.epoch:
                continue
            state.appended.append((first, last, base_offset))
            self.restored_batches += 1

    def check(self, topic: str, partition: int, ids: tuple[int, int, int, int]) -> int | None:
        """Before an append. Returns the base offset of an earlier append of the same batch
        (do not append; answer with it), or None (append; call ``done`` with its outcome).
        Raises the typed error that refuses it."""
        pid, epoch, first, last = ids
        key = (pid, topic, partition)
        state = self._states.get(key)
        if state is not None:
            self._states.move_to_end(key)
            if epoch < state.epoch:
                raise errors.InvalidProducerEpochError(
                    f"producer {pid}: epoch {epoch} is older than {state.epoch}")
            if epoch == state.epoch:
                for a_first, a_last, offset in state.appended:  # bounded: 5
                    if (a_first, a_last) == (first, last):
                        self.duplicates += 1
                        return offset
                if (first, last) in state.in_flight:
                    raise errors.RequestTimeoutError(
                        f"producer {pid}: sequence {first} is still being appended; retry")
                previous = state.last_sequence()
                if previous is not None and first != (previous + 1) % _SEQUENCE_MOD:
                    raise errors.OutOfOrderSequenceError(
                        f"producer {pid} on {topic}/{partition}: sequence {first} after {previous}")
            else:  # a new epoch starts its sequences afresh
                state = None
        if state is None:
            state = self._states[key] = _State(epoch)
            if len(self._states) > self.states_max:
                self._states.popitem(last=False)
        state.in_flight.append((first, last))
        return None

    def done(self, topic: str, partition: int, ids: tuple[int, int, int, int],
             base_offset: int | None) -> None:
        """The partition's answer to a checked batch: its base offset, or None (refused)."""
        pid, epoch, first, last = ids
        state = self._states.get((pid, topic, partition))
        if state is None or state.epoch != epoch or (first, last) not in state.in_flight:
            return  # forgotten meanwhile (evicted, or a newer epoch): nothing to record
        state.in_flight.remove((first, last))
        if base_offset is not None:
            state.appended.append((first, last, base_offset))


def idempotent_batches_in_tail(reader, state, bytes_max: int = KAFKA_PRODUCER_STATE_SCAN_BYTES_MAX):
    """(producer id, epoch, first sequence, last sequence, base offset) of every idempotent
    batch in the last ``bytes_max`` committed bytes of a partition's log, in log order:
    ``reader`` a LogReader of it, ``state`` its published state (what ``restore`` takes)."""
    from .. import records

    out = []
    offset = reader.tail_offset(state, bytes_max)
    hw = state.high_watermark
    # bytes_max, the index interval before it, and a short read at each segment end.
    reads_max = bytes_max // _SCAN_READ_BYTES + 2 + 64
    for _ in range(reads_max):  # bounded: each read moves past at least one batch
        if offset >= hw:
            break
        piece = reader.read(offset, _SCAN_READ_BYTES, state, verify_crc=False)
        if piece.length == 0:
            break
        data = piece.data
        for b in records.scan_batches(data, verify_crc=False).batches:
            ids = batch_ids(data[b.position:b.position + BATCH_HEADER_BYTES])
            if ids is not None:
                out.append((*ids, b.base_offset))
        offset = piece.last_offset + 1
        del data, piece
    return out
