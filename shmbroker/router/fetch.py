"""Remote fetch: whole committed batches read from the partitions' mapped segments with the
consumer's own LogReader, sent as ZeroMQ frames that point into the mapping (no copy).

A fetch names partitions with their offsets; the reply has one header row and one data frame
per partition, in the request's order. It is answered at once when the partitions hold at
least ``min_bytes`` past the offsets, an error needs telling, or ``max_wait_ms`` is 0;
otherwise it is *parked* (Kafka's long poll) and looked at again whenever the high-watermark
sequence of one of its partitions moves (one atomic load per partition per router tick), and
answered at its deadline with whatever there is then (possibly nothing).

Zero copy: a LogSlice's ``data`` is a memoryview of the segment's read-only mapping
(``_native.FileMap``); ZeroMQ is given it with ``copy=False``, and pyzmq keeps a reference to
the view until ZeroMQ has sent it, which keeps the mapping alive even if the reader remaps or
retention unlinks the file meanwhile. (pyzmq copies frames under its copy threshold, 64 KiB by
default: for those a copy is cheaper than the bookkeeping.)

Owned by the router process's main thread; not thread-safe.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from .. import errors
from ..client.metadata import LocalMetadata
from ..coordinator.topics import partition_dir
from ..log import files
from ..log.reader import LogReader
from .cold_read import ColdReads
from .protocol import FETCH_BYTES_MAX, FETCH_WAIT_MS_MAX, NO_ERROR, REQUEST_PARTITIONS_MAX

log = logging.getLogger("shmbroker.router")

#: Partitions the router keeps a reader (file descriptors, mappings) open for; the least
#: recently used beyond it are closed (a reader reopens on the next fetch).
ROUTER_READERS_MAX = 1_024
#: Sealed segment sizes cached per partition.
SEALED_SIZES_MAX = 4_096
_EMPTY = b""


@dataclass(eq=False)
class FetchRequest:
    """One fetch between arrival and reply."""

    route: list
    request_id: int
    partitions: list          # (topic, partition, offset, partition_max_bytes)
    min_bytes: int
    max_bytes: int
    deadline: float           # monotonic
    #: Largest cold-read grant the client takes (0: it takes none; docs/protocol.md).
    cold_bytes_max: int = 0
    #: hw_seq of each partition when it was last looked at (-1: unknown): parked fetches are
    #: looked at again only when one of them moved.
    seen: list = field(default_factory=list)


def parse_fetch(route: list, request_id: int, fields: dict) -> FetchRequest:
    """The request's fields checked beyond their types; InvalidRequestError says what is wrong."""
    wait_ms, min_bytes, max_bytes = fields["max_wait_ms"], fields["min_bytes"], fields["max_bytes"]
    if not 0 <= wait_ms <= FETCH_WAIT_MS_MAX:
        raise _invalid(f"fetch: max_wait_ms {wait_ms} is outside [0, {FETCH_WAIT_MS_MAX}]")
    if not 0 <= min_bytes <= FETCH_BYTES_MAX or not 1 <= max_bytes <= FETCH_BYTES_MAX:
        raise _invalid(f"fetch: min_bytes {min_bytes} must be in [0, {FETCH_BYTES_MAX}] and "
                       f"max_bytes {max_bytes} in [1, {FETCH_BYTES_MAX}]")
    cold_bytes_max = fields.get("cold_bytes_max", 0)
    if not 0 <= cold_bytes_max <= FETCH_BYTES_MAX:
        raise _invalid(f"fetch: cold_bytes_max {cold_bytes_max} is outside [0, "
                       f"{FETCH_BYTES_MAX}]")
    return FetchRequest(route, request_id, _partitions(fields["partitions"], "fetch", 4),
                        min_bytes, max_bytes, time.monotonic() + wait_ms / 1000.0,
                        cold_bytes_max)


def parse_list_offsets(fields: dict) -> list:
    return _partitions(fields["partitions"], "list_offsets", 2)


def parse_offsets_for_times(fields: dict) -> list:
    rows = _partitions(fields["partitions"], "offsets_for_times", 3)
    for row in rows:  # bounded by REQUEST_PARTITIONS_MAX
        if not 0 <= row[2] < 1 << 63:
            raise _invalid(f"offsets_for_times: timestamp {row[2]} of {row[0]}/{row[1]} must be "
                           f">= 0 (ms since the epoch)")
    return rows


def _partitions(rows, what: str, width: int) -> list:
    if not 1 <= len(rows) <= REQUEST_PARTITIONS_MAX:
        raise _invalid(f"{what}: {len(rows)} partitions; send 1 to {REQUEST_PARTITIONS_MAX}")
    out = []
    for row in rows:  # bounded by REQUEST_PARTITIONS_MAX
        ok = isinstance(row, list) and len(row) == width and isinstance(row[0], str) and \
            all(isinstance(x, int) and not isinstance(x, bool) for x in row[1:])
        if not ok:
            more = {2: "", 3: ", timestamp", 4: ", offset, max_bytes"}[width]
            raise _invalid(f"{what}: each partition is [topic, partition{more}], got "
                           f"{row!r:.100}")
        if width == 4 and (row[2] < 0 or not 1 <= row[3] <= FETCH_BYTES_MAX):
            raise _invalid(f"{what}: offset {row[2]} must be >= 0 and max_bytes {row[3]} in "
                           f"[1, {FETCH_BYTES_MAX}]")
        out.append(tuple(row))
    return out


def _invalid(message: str) -> errors.InvalidRequestError:
    return errors.InvalidRequestError(message)


class _Partition:
    """A partition as the router reads it: control region (published state), reader, and the
    sizes of its sealed segments (they never change) for the hot/cold switch."""

    __slots__ = ("control", "reader", "sizes")

    def __init__(self, control, reader: LogReader):
        self.control = control
        self.reader = reader
        self.sizes: dict[int, int] = {}

    def sealed_size(self, base: int) -> int:
        size = self.sizes.get(base)
        if size is None:
            if len(self.sizes) >= SEALED_SIZES_MAX:
                self.sizes.clear()  # segments gone by retention would pile up otherwise
            try:
                size = os.stat(files.segment_path(self.reader.directory, base,
                                                  files.LOG_SUFFIX)).st_size
            except FileNotFoundError:
                return 0  # deleted by retention: not cached, it will not be asked again
            self.sizes[base] = size
        return size


class Fetch:
    """Readers of every partition fetched from, and the parked fetches (see the module doc)."""

    def __init__(self, data_dir: str, cold: ColdReads | None = None, slices: bool = False):
        self.meta = LocalMetadata(data_dir)
        #: Cold reads (None: every fetch is answered with its bytes).
        self.cold = cold
        #: True: a partition's data in ``answer`` is its ``LogSlice`` (the Kafka listener
        #: sends it from the file, see ``pin``); False: the slice's memoryview (the router).
        self.slices = slices
        self._partitions: dict[tuple[str, int], _Partition] = {}
        self.parked: list[FetchRequest] = []
        #: Counters for logs and tests.
        self.replies = self.bytes_sent = self.cold_grants = 0

    def _partition(self, topic: str, partition: int) -> _Partition:
        key = (topic, partition)
        found = self._partitions.pop(key, None)
        if found is None:
            control = self.meta.control(topic, partition)  # checks the partition exists
            found = _Partition(control, LogReader(partition_dir(self.meta.data_dir, topic,
                                                                partition)))
            while len(self._partitions) >= ROUTER_READERS_MAX:  # bounded: one per extra
                old_key = next(iter(self._partitions))
                self._partitions.pop(old_key).reader.close()
                self.meta.forget(*old_key)
        self._partitions[key] = found  # most recently used last
        return found

    def forget(self, topic: str, partition: int) -> None:
        found = self._partitions.pop((topic, partition), None)
        if found is not None:
            found.reader.close()
        self.meta.forget(topic, partition)

    # -- answering --------------------------------------------------------------------------------

    def answer(self, request: FetchRequest, final: bool) -> tuple[dict, list] | None:
        """(result, data frames) of the reply, or None: not enough yet, keep it parked. A
        data frame is a memoryview of the mapping, or its ``LogSlice`` with ``slices``."""
        rows, frames, grants = [], [], []
        total = 0
        must_answer = final
        cold_max = request.cold_bytes_max if self.cold is not None else 0
        for index, (topic, partition, offset, partition_max) in enumerate(request.partitions):
            left = request.max_bytes - total
            row, data, grant = self._read(topic, partition, offset,
                                          min(partition_max, left) if left > 0 else 0,
                                          cold_max)
            rows.append(row)
            frames.append(data)
            total += len(data)
            if row[2] != NO_ERROR:
                must_answer = True
            if grant is not None:
                grants.append([index, *grant])
                must_answer = True
        if total >= max(1, request.min_bytes) or must_answer:
            self.replies += 1
            self.bytes_sent += total
            self.cold_grants += len(grants)
            result = {"partitions": rows}
            if request.cold_bytes_max:
                result["cold_reads"] = grants
            return result, frames
        request.seen = [self._hw_seq(t, p) for t, p, _, _ in request.partitions]
        return None

    def _read(self, topic: str, partition: int, offset: int, max_bytes: int, cold_max: int):
        """(row, data, grant) for one partition: [topic, partition, error_code,
        high_watermark, log_start_offset, first_offset, bytes]; data a memoryview of the
        segment or b""; grant a cold-read grant row (then data is empty) or None."""
        try:
            found = self._partition(topic, partition)
            state = found.control.read_state()
        except errors.ShmbrokerError as exc:
            return [topic, partition, exc.code, -1, -1, -1, 0], _EMPTY, None
        hw, start = state.high_watermark, state.log_start_offset
        if offset > hw and found.control.offset_taken(offset):
            # A producer took it and the log has not reached it yet: a local consumer read it
            # from a ring and committed past it (decision 0005). Nothing yet, not an error
            # (which would make a Kafka client reset its position).
            return [topic, partition, NO_ERROR, hw, start, offset, 0], _EMPTY, None
        if not start <= offset <= hw:
            return [topic, partition, errors.OffsetOutOfRangeError.code, hw, start, -1, 0], \
                _EMPTY, None
        if offset == hw or max_bytes <= 0:
            return [topic, partition, NO_ERROR, hw, start, offset, 0], _EMPTY, None
        try:
            piece = found.reader.read(offset, max_bytes, state, verify_crc=False)
        except errors.ShmbrokerError as exc:
            if isinstance(exc, errors.CorruptSegmentError):
                log.error("fetch %s/%d at %d: %s", topic, partition, offset, exc)
            return [topic, partition, exc.code, hw, start, -1, 0], _EMPTY, None
        if piece.length == 0:
            return [topic, partition, NO_ERROR, hw, start, offset, 0], _EMPTY, None
        if cold_max:
            grant = self._cold_grant(found, state, offset, piece, cold_max, topic, partition)
            if grant is not None:
                return [topic, partition, NO_ERROR, hw, start, grant[6], 0], _EMPTY, grant
        return [topic, partition, NO_ERROR, hw, start, piece.first_offset, piece.length], \
            piece if self.slices else piece.data, None

    def _cold_grant(self, found: _Partition, state, offset: int, piece, cold_max: int,
                    topic: str, partition: int) -> list | None:
        """A grant when ``piece`` starts more than the hot window behind the end. The hot
        read came first because it finds the position cheaply (the reader's hint, then its
        index); a cold fetch reads the headers of one partition_max_bytes more, no data."""
        cold = self.cold
        assert cold is not None
        parsed = files.parse_segment_name(piece.path)
        assert parsed is not None, piece.path
        if not cold.is_cold(found.reader, state, parsed[0], piece.file_position,
                            found.sealed_size):
            return None
        try:
            return cold.grant(found.reader, state, offset, cold_max, topic, partition)
        except errors.ShmbrokerError as exc:  # e.g. retention between the two reads
            log.info("cold read of %s/%d at %d not granted (%s); served hot", topic,
                     partition, offset, exc)
            return None

    def pin(self, topic: str, partition: int, piece) -> int | None:
        """A descriptor of the segment file ``piece`` (a ``LogSlice`` of ``answer``) lies in,
        owned by the caller, or None: send ``piece.data`` (``LogReader.pin``)."""
        found = self._partitions.get((topic, partition))
        return None if found is None else found.reader.pin(piece)

    def list_offsets(self, partitions: list) -> dict:
        rows = []
        for topic, partition in partitions:  # bounded by REQUEST_PARTITIONS_MAX
            try:
                state = self._partition(topic, partition).control.read_state()
                rows.append([topic, partition, NO_ERROR, state.log_start_offset,
                             state.high_watermark])
            except errors.ShmbrokerError as exc:
                rows.append([topic, partition, exc.code, -1, -1])
        return {"partitions": rows}

    def offsets_for_times(self, partitions: list) -> dict:
        """Rows [topic, partition, error_code, offset, timestamp] (-1, -1: no record at or
        after the time, or an error) for ``partitions`` of (topic, partition, timestamp)."""
        rows = []
        for topic, partition, timestamp in partitions:  # bounded by REQUEST_PARTITIONS_MAX
            try:
                found = self.offset_for_timestamp(topic, partition, timestamp)
                rows.append([topic, partition, NO_ERROR, *(found or (-1, -1))])
            except errors.ShmbrokerError as exc:
                rows.append([topic, partition, exc.code, -1, -1])
        return {"partitions": rows}

    def offset_for_timestamp(self, topic: str, partition: int, timestamp: int) -> tuple[int, int] | None:
        """(offset, timestamp) of the first committed record at or after ``timestamp``, or
        None (``LogReader.offset_for_timestamp``); typed errors for an unknown partition."""
        found = self._partition(topic, partition)
        return found.reader.offset_for_timestamp(timestamp, found.control.read_state())

    def read_tail(self, topic: str, partition: int, scan) -> object:
        """``scan(reader, state)`` on the partition's reader and published state (the Kafka
        listener rebuilds producer state from the log's tail this way); typed errors for an
        unknown partition."""
        found = self._partition(topic, partition)
        return scan(found.reader, found.control.read_state())

    # -- parked fetches ---------------------------------------------------------------------------

    def _hw_seq(self, topic: str, partition: int) -> int:
        found = self._partitions.get((topic, partition))
        return -1 if found is None else found.control.hw_seq

    def due(self, now: float) -> list[FetchRequest]:
        """Parked fetches to look at again: past their deadline, or a partition published."""
        out, keep = [], []
        for request in self.parked:  # bounded by the parked fetches
            if request.deadline <= now or any(
                    self._hw_seq(t, p) != seen
                    for (t, p, _, _), seen in zip(request.partitions, request.seen)):
                out.append(request)
            else:
                keep.append(request)
        self.parked = keep
        return out

    def next_deadline(self) -> float | None:
        return min((r.deadline for r in self.parked), default=None)

    def close(self) -> None:
        for found in self._partitions.values():
            found.reader.close()
        self._partitions.clear()
        self.parked.clear()
        self.meta.close()
