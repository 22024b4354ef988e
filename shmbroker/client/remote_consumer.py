"""The Consumer for a broker on another host: ``Consumer(*topics, broker="tcp://host:port")``
returns one (``Consumer.__new__``). Same API, records and errors as the local Consumer; groups
work the same way (GroupMembership already speaks through the router). What differs is where
records come from::

    Consumer.poll
      ├─ records fetched earlier and not handed out yet? hand them out (as locally)
      ├─ else one fetch request for every assigned partition (docs/protocol.md): the
      │  router reads the mapped segments and sends whole batches as frames
      │  (a partition far behind gets a cold-read grant instead: its bytes come by
      │  os.sendfile on a plain TCP connection, client/cold_read.py)
      ├─ records.decode_records(frame)   C: CRC + records -> the same Record objects
      └─ nothing? the next fetch is a long poll (max_wait_ms = what is left of the timeout,
         capped so heartbeats and auto-commits stay on time), not a futex sleep

Positions the log does not have (out of range, or none yet) are resolved with
``auto_offset_reset`` from the log start and high watermark the router reports
(``list_offsets``, or the fetch reply's error row).

A request without a reply (the router restarted; the connection dropped) is sent again on a
fresh connection: ``poll`` rides out a router restart (it returns nothing meanwhile) and
``list_offsets`` calls raise RequestTimeoutError only after ``request_timeout_ms``.

Not available remotely (UnsupportedFeatureError): ``value_memoryview``, ``poll_columnar``
(records are decoded from a received frame, not a mapping). Owned by one thread.
"""
from __future__ import annotations

import bisect

import logging
import os
import time
from typing import Iterable, NamedTuple

import zmq

from .. import errors, records
from ..router import protocol as wire
from . import cold_read
from .consumer import _offset_of
from .consumer import Consumer
from .curve import client_keys, curve_kwargs
from .group_membership import GroupMembership
from .remote_wire import REMOTE_REQUEST_TIMEOUT_MS, Connection, RemoteMetadata, decode_reply
from .types import OffsetAndTimestamp, TopicPartition, timestamps_arg

log = logging.getLogger("shmbroker.remote")

#: A fetch reply is due within its max_wait_ms plus this; later, the request is taken as lost.
FETCH_REPLY_SLACK_MS = 5_000
#: Largest cold-read grant taken by default: big enough that a data connection's setup is
#: amortised, small enough that its decoded records stay modest (perf/RESULTS.md).
COLD_READ_BYTES_DEFAULT = 16 << 20
#: After a retriable partition error (not served just now, restarting), poll waits this long
#: before fetching that partition again, so a restart is not a busy loop of requests.
RETRY_BACKOFF_MS = 50


class _Bounds(NamedTuple):
    """What Consumer._resolve needs of a partition's state."""

    log_start_offset: int
    high_watermark: int


class _RemoteFetch:
    """Per assigned partition: position and records fetched, not handed out yet."""

    __slots__ = ("tp", "topic", "partition", "position", "pending", "pending_at", "pending_end",
                 "bounds", "retry_at")

    def __init__(self, tp: TopicPartition):
        self.tp = tp
        self.topic, self.partition = tp
        self.position: int | None = None
        self.pending: list = []
        self.pending_at = 0  # Consumer._fill hands out pending[pending_at:]
        self.pending_end = 0  # as _Fetch.pending_end: after the last batch received
        self.bounds: _Bounds | None = None
        self.retry_at = 0.0

    def set_position(self, offset: int) -> None:
        self.position = offset
        self.pending, self.pending_at, self.pending_end = [], 0, 0

    def close(self) -> None:
        self.pending, self.pending_at = [], 0


class RemoteConsumer(Consumer):
    """``Consumer`` over TCP (see the module doc). ``request_timeout_ms``: how long a
    list_offsets waits; fetches wait their max_wait_ms plus FETCH_REPLY_SLACK_MS.
    ``cold_read_bytes_max``: the largest cold-read grant taken (0: none, every byte comes in
    fetch replies). ``curve_server_key`` and ``curve_secret_key_file``: for a router that
    requires CURVE (client/curve.py; a refused handshake is AuthenticationError)."""

    def __init__(self, *topics: str, broker: str, value_memoryview: bool = False,
                 request_timeout_ms: int = REMOTE_REQUEST_TIMEOUT_MS,
                 cold_read_bytes_max: int = COLD_READ_BYTES_DEFAULT,
                 curve_server_key: str | bytes | os.PathLike | None = None,
                 curve_secret_key_file: str | os.PathLike | None = None, **kwargs):
        if not isinstance(cold_read_bytes_max, int) or \
                not 0 <= cold_read_bytes_max <= wire.FETCH_BYTES_MAX:
            raise errors.ConfigError(f"cold_read_bytes_max={cold_read_bytes_max!r} must be an "
                                     f"int in [0, {wire.FETCH_BYTES_MAX}]")
        if value_memoryview:
            raise errors.UnsupportedFeatureError(
                "value_memoryview: a remote consumer's records come from a received frame, "
                "not a mapping; use a local consumer for zero-copy values")
        self.address = broker
        self.request_timeout_ms = request_timeout_ms
        self.cold_read_bytes_max = cold_read_bytes_max
        #: Cold reads done, their bytes, and failed ones (each was fetched again).
        self.cold_reads = self.cold_read_bytes = self.cold_read_failures = 0
        #: After a failed cold read the next fetch asks for bytes in the reply: progress
        #: never depends on the data connection.
        self._cold_paused = False
        self._cold_reader = cold_read.ColdReader()
        self.curve = client_keys(curve_server_key, curve_secret_key_file)
        self._conn: Connection | None = None
        super().__init__(*topics, broker=broker, **kwargs)

    def _new_metadata(self):
        return RemoteMetadata(self.address, self.request_timeout_ms, self.curve)

    def _admin_kwargs(self) -> dict:
        return curve_kwargs(self.curve)

    def _new_counters(self):
        return None  # no shared memory of the broker's here: the router counts what it sends

    def _local_broker(self) -> bool:
        return False  # no group wake word: rebalances are learnt by heartbeat

    # -- assignment -------------------------------------------------------------------------------

    def _assign(self, partitions: Iterable) -> None:
        wanted = [TopicPartition(*p) for p in partitions]
        fetches = {}
        for tp in wanted:
            if tp in fetches:
                continue
            old = self._fetches.get(tp)
            if old is None:
                self._meta.check_partition(tp.topic, tp.partition)
                old = _RemoteFetch(tp)
            fetches[tp] = old
        self._drop_buffered(set(self._fetches) - set(fetches), rewind=False)
        self._fetches = fetches
        self._set_order()

    # -- positions --------------------------------------------------------------------------------

    def _bounds(self, fetches: list) -> dict:
        """{TopicPartition: _Bounds} from one list_offsets request; a partition error raises."""
        result = self._request([wire.list_offsets_request(
            0, [[f.topic, f.partition] for f in fetches])], self.request_timeout_ms)
        out = {}
        for topic, partition, code, start, hw in result["partitions"]:
            if code:
                raise _partition_error(code, f"list_offsets {topic}/{partition}")
            out[TopicPartition(topic, partition)] = _Bounds(start, hw)
        return out

    def _seek_to(self, tps, beginning: bool) -> None:
        self._check()
        fetches = [self._fetch_for(tp) for tp in tps] if tps else list(self._fetches.values())
        if not fetches:
            return
        self._drop_buffered({f.tp for f in fetches}, rewind=False)
        bounds = self._bounds(fetches)
        for fetch in fetches:
            b = bounds[fetch.tp]
            fetch.set_position(b.log_start_offset if beginning else b.high_watermark)

    def position(self, tp) -> int:
        self._check()
        fetch = self._fetch_for(tp)
        if fetch.position is None:
            self._resolve(fetch, self._bounds([fetch])[fetch.tp], "has no position yet")
        assert fetch.position is not None
        return fetch.position

    def highwater(self, tp) -> int:
        self._check()
        fetch = self._fetch_for(tp)
        return self._bounds([fetch])[fetch.tp].high_watermark

    def beginning_offsets(self, tps) -> dict:
        self._check()
        return {tp: b.log_start_offset for tp, b in
                self._bounds([self._fetch_for(tp) for tp in tps]).items()}

    def end_offsets(self, tps) -> dict:
        self._check()
        return {tp: b.high_watermark for tp, b in
                self._bounds([self._fetch_for(tp) for tp in tps]).items()}

    def offsets_for_times(self, timestamps) -> dict:
        """As Consumer.offsets_for_times, answered by the router (one request)."""
        self._check()
        asked = timestamps_arg(timestamps)
        fetches = [self._fetch_for(tp) for tp in asked]
        if not fetches:
            return {}
        result = self._request([wire.offsets_for_times_request(
            0, [[f.topic, f.partition, asked[f.tp]] for f in fetches])], self.request_timeout_ms)
        out: dict = {}
        for topic, partition, code, offset, timestamp in result["partitions"]:
            if code:
                raise _partition_error(code, f"offsets_for_times {topic}/{partition}")
            out[TopicPartition(topic, partition)] = \
                None if offset < 0 else OffsetAndTimestamp(offset, timestamp)
        return out

    def poll_columnar(self, timeout_ms: float = 0, max_records: int | None = None):
        raise errors.UnsupportedFeatureError(
            "poll_columnar is not available on a remote consumer (yet); use poll()")

    # -- fetching ---------------------------------------------------------------------------------

    _maps_segments = False

    def _recheck_partitions(self) -> None:
        """No control regions here to go stale: the router reads the partitions (and it is
        part of the broker: a restarted broker has a new router to reconnect to)."""

    def _tail_read(self, fetch) -> None:
        """No one-call read of mapped segments here: records come in fetch replies."""
        return None

    def _read(self, fetch):
        return None  # Consumer._fill hands out ``pending``; fetching is _fetch_remote's

    def _collect(self, max_records: int) -> list:
        if not any(f.pending for f in self._order):
            self._fetch_remote(0)
        return super()._collect(max_records)

    def _sleep(self, left_ms: float) -> None:
        """Long-poll instead of a futex sleep; woken for heartbeats and auto-commit as locally."""
        group = self._group
        if group is not None:
            left_ms = min(left_ms, group.ms_until_heartbeat())
            if self.enable_auto_commit:
                left_ms = min(left_ms, max(0.0, (self._next_auto_commit - time.monotonic()) * 1e3))
        if not self._order:
            if group is None and not self._fetches:
                raise errors.IllegalStateError(
                    "this consumer has no partitions assigned: pass topics to Consumer(...) or "
                    "call assign([...]) first")
            time.sleep(left_ms / 1000.0)
            return
        self._fetch_remote(left_ms)

    def _fetch_remote(self, max_wait_ms: float) -> None:
        """One fetch for every assigned partition with a position and nothing pending; the
        records go to each partition's ``pending``."""
        now = time.monotonic()
        unresolved = [f for f in self._order if f.position is None]
        if unresolved:
            bounds = self._bounds(unresolved)
            for fetch in unresolved:
                self._resolve(fetch, bounds[fetch.tp], "has no position yet")
        wanted = [f for f in self._order if not f.pending and f.retry_at <= now]
        if not wanted:
            if max_wait_ms > 0:
                time.sleep(min(max_wait_ms, RETRY_BACKOFF_MS) / 1000.0)
            return
        wait_ms = int(min(max(0.0, max_wait_ms), wire.FETCH_WAIT_MS_MAX))
        per_partition = min(self.fetch_max_bytes, wire.FETCH_BYTES_MAX)
        cold_max = 0 if self._cold_paused else self.cold_read_bytes_max
        self._cold_paused = False
        header = wire.fetch_request(0, [[f.topic, f.partition, f.position, per_partition]
                                        for f in wanted], wait_ms, 1,
                                    min(wire.FETCH_BYTES_MAX, per_partition * len(wanted)),
                                    cold_max)
        try:
            result, frames = self._request([header], wait_ms + FETCH_REPLY_SLACK_MS,
                                           with_data=True)
        except errors.RequestTimeoutError as exc:
            log.warning("fetch from %s: %s; trying again at the next poll", self.address, exc)
            return
        rows = result["partitions"]
        if len(rows) != len(wanted) or len(frames) != len(wanted):
            raise errors.InvalidRequestError(
                f"fetch reply from {self.address} has {len(rows)} rows and {len(frames)} data "
                f"frames for {len(wanted)} partitions")
        grants = cold_read.parse_grants(result.get("cold_reads", []), len(wanted), cold_max)
        for index, (fetch, row, frame) in enumerate(zip(wanted, rows, frames)):
            grant = grants.get(index)
            if grant is None:
                self._take(fetch, row, frame)
            else:
                self._take_cold(fetch, row, grant)

    def _take_cold(self, fetch: _RemoteFetch, row: list, grant: cold_read.ColdGrant) -> None:
        """A partition's bytes by a cold read, decoded batch by batch as they arrive. A read
        cut short keeps the whole batches that came (valid and in order) and nothing after
        them: the next fetch asks from there, with the bytes in the reply."""
        fetch.bounds = _Bounds(row[4], row[3])
        try:
            self._cold_reader.read(grant, lambda data: self._deliver(fetch, data))
        except errors.ColdReadError as exc:
            self.cold_read_failures += 1
            self._cold_paused = True
            log.warning("%s; fetching %s again after offset %d", exc, fetch.tp,
                        fetch.pending[-1].offset if fetch.pending else fetch.position - 1)
            return
        self.cold_reads += 1
        self.cold_read_bytes += grant.length

    def _take(self, fetch: _RemoteFetch, row: list, frame) -> None:
        _, _, code, hw, start, first_offset, size = row
        if code == errors.OffsetOutOfRangeError.code:
            self._resolve(fetch, _Bounds(start, hw), "is out of range")
            return
        if code:
            exc = _partition_error(code, f"fetch {fetch.tp}")
            if not exc.retriable:
                raise exc
            log.info("fetch %s: %s; trying again shortly", fetch.tp, exc)
            fetch.retry_at = time.monotonic() + RETRY_BACKOFF_MS / 1000.0
            return
        fetch.bounds = _Bounds(start, hw)
        if not size:
            return
        self._deliver(fetch, frame.buffer)

    def _deliver(self, fetch: _RemoteFetch, data) -> None:
        """Decode whole batches (CRCs checked unless check_crcs is off) and add the records
        from the next expected offset on to the partition's pending. The first batch may
        start below the position (a batch is never cut); records are copied out of ``data``.
        Offsets may hold no record (an empty batch: offsets a producer reserved and never
        committed, decision 0005): the position moves past the last batch received, not only
        past its last record."""
        got = records.decode_records(data, self.check_crcs, fetch.topic, fetch.partition)
        scan = records.scan_batches(data, verify_crc=False)
        end = scan.batches[-1].last_offset + 1 if scan.batches else 0
        pending = fetch.pending
        expected = max(pending[-1].offset + 1 if pending else fetch.position, fetch.pending_end)
        if got and got[0].offset < expected:
            del got[:bisect.bisect_left(got, expected, key=_offset_of)]
        if pending:
            pending.extend(got)
        elif got:
            fetch.pending, fetch.pending_at = got, 0
        elif end > fetch.position:
            fetch.position = end  # only offsets without records: past them
        fetch.pending_end = max(fetch.pending_end, end)

    # -- requests ---------------------------------------------------------------------------------

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = Connection(self.address, self.curve)
        return self._conn

    def _request(self, frames: list, timeout_ms: float, with_data: bool = False):
        """Send one request (its id is set here) and wait for its reply; a dropped connection
        or no reply within ``timeout_ms`` makes a fresh connection, and the request is sent
        once more within what is left: RequestTimeoutError when that fails too."""
        conn = self._connection()
        deadline = time.monotonic() + timeout_ms / 1000.0
        for attempt in range(2):  # bounded: one resend on a fresh connection
            request_id = conn.next_id()
            header = _with_id(frames[0], request_id)
            assert conn.sock is not None
            conn.sock.send_multipart([header, *frames[1:]])
            reply = self._wait_reply(conn, request_id, deadline if attempt else
                                     time.monotonic() + timeout_ms / 1000.0)
            if reply is not None:
                result, data = reply
                if isinstance(result, Exception):
                    raise result
                return (result, data) if with_data else result
            conn.reopen()
            if time.monotonic() >= deadline:
                break
        raise errors.RequestTimeoutError(
            f"no reply from the router at {self.address} within {timeout_ms:.0f} ms")

    @staticmethod
    def _wait_reply(conn: Connection, request_id: int, deadline: float):
        """(result, data frames), or None: the connection dropped or the deadline passed."""
        assert conn.sock is not None
        while True:  # bounded by the deadline
            left_ms = (deadline - time.monotonic()) * 1000.0
            if left_ms <= 0:
                return None
            if conn.sock.poll(min(left_ms, 100), zmq.POLLIN):
                frames = conn.sock.recv_multipart(copy=False)
                reply_id, result, data = decode_reply(frames)
                if reply_id == request_id or (reply_id is None and isinstance(result, Exception)):
                    return result, data
                continue  # a late reply to a request we gave up on
            if conn.dropped():
                return None

    # -- lifecycle --------------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child: the parent's connection and membership stay the parent's."""
        self._pid = os.getpid()
        self._conn = None
        self._meta = self._new_metadata()
        if self._group_args is not None:
            self._fetches, self._order, self._paused = {}, [], set()
            self._inherited_group = self._group
            self._group = GroupMembership(**self._group_args)
        for fetch in self._fetches.values():
            fetch.pending, fetch.pending_at = [], 0
        self._iter_buffer, self._iter_at = [], 0

    def _release(self) -> None:
        super()._release()
        self._cold_reader.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __repr__(self) -> str:
        return (f"Consumer({self.address!r}, assigned={sorted(map(str, self._fetches))}, "
                f"remote, closed={self._closed})")


def _with_id(header: bytes, request_id: int) -> bytes:
    import msgpack

    message = msgpack.unpackb(header, raw=False)
    message["id"] = request_id
    return msgpack.packb(message, use_bin_type=True)


def _partition_error(code: int, what: str) -> errors.ShmbrokerError:
    cls = errors.ERRORS_BY_CODE.get(code, errors.ShmbrokerError)
    return cls(f"{what}: the router answered {cls.__name__} (code {code})")
