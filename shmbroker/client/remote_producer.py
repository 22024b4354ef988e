"""The Producer for a broker on another host: ``Producer(broker="tcp://host:port")`` returns
one (``Producer.__new__``). Same API, futures and errors as the local Producer; the records go
to the broker's router as produce requests (docs/protocol.md) instead of into a ring.

How a record travels::

    send()  ->  accumulator of its partition (C, the local producer's: the record is encoded
                at once; its future points at the batch)
            ->  sealed into one RecordBatch when the batch is full, or when the partition has
                no request in flight and linger_ms has passed (so batches grow by themselves
                under load, as with Kafka and the local producer's idle-ring rule)
            ->  the I/O thread sends it: [header, batch]; up to REMOTE_IN_FLIGHT_MAX requests
                in flight (pipelined), in order
            ->  the reply's base_offset resolves the batch's futures (acks 1/all); acks=0
                futures resolve (offset -1) once the request is handed to ZeroMQ.

The I/O thread owns the socket (ZeroMQ sockets are not thread-safe) and does everything that
must happen without the application calling: sending, reading replies, linger timers, and
reconnecting. When the connection drops (the router was restarted) or a request gets no reply
for ``request_timeout_ms``, it makes a fresh connection and sends every request still in
flight again, in order: a batch whose first copy the router had already written is then
appended twice (at least once, as Kafka without idempotence); an acknowledged batch is never
lost. ``delivery_timeout_ms`` bounds the whole wait of a batch.

Back-pressure: when the batches waiting for replies hold REMOTE_BUFFER_BYTES_MAX, ``send``
waits up to ``send_timeout_ms``, then raises RingFullTimeoutError (the local producer's error
for the same situation; Kafka's buffer.memory).

Thread-safe: one lock guards the accumulators and the queue; futures wait on its condition.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from typing import Any, Sequence

import zmq

from .. import errors, records
from ..config import PRODUCER_BATCH_RECORDS_MAX
from ..layout import record_batch as RB
from ..native import _native
from ..router import protocol as wire
from .producer import (RECORD_OVERHEAD_BYTES_MAX, Producer, RecordFuture, RecordMetadata, _Batch,
                       check_batch_values)
from .curve import client_keys
from . import serde
from .remote_wire import REMOTE_REQUEST_TIMEOUT_MS, Connection, RemoteMetadata, decode_reply

log = logging.getLogger("shmbroker.remote")

#: Produce requests one producer has in flight (Kafka: max.in.flight.requests.per.connection
#: is 5; more here because a request is one partition's batch). Below the router's limit.
REMOTE_IN_FLIGHT_MAX = 32
#: Bytes of sealed batches waiting to be sent or acknowledged (Kafka: buffer.memory).
REMOTE_BUFFER_BYTES_MAX = 32 << 20
#: The largest batch the router takes (its ring's largest frame; docs/protocol.md).
REMOTE_BATCH_BYTES_MAX = 2_097_136
#: The I/O thread wakes at least this often (request and delivery timeouts are checked).
_IO_SLICE_MS = 100
#: At close, how long acks=0 batches still queued on the socket get to go out (they are
#: "delivered" once queued: their futures resolved). Less than close()'s 5 s join.
REMOTE_ACKS0_CLOSE_LINGER_MS = 3_000


class _Request:
    """A sealed batch between the accumulator and its reply."""

    __slots__ = ("batch", "payload", "request_id", "sent_at", "deadline")

    def __init__(self, batch: _Batch, payload: bytes, deadline: float):
        self.batch = batch
        self.payload = payload
        self.request_id = -1
        self.sent_at = 0.0
        self.deadline = deadline


class RemoteProducer(Producer):
    """``Producer`` over TCP (see the module doc). ``ring_bytes`` and ``spin_ns`` are accepted
    and ignored (there is no ring on this side); ``request_timeout_ms``: see the module doc;
    ``curve_server_key`` and ``curve_secret_key_file``: for a router that requires CURVE
    (client/curve.py; a refused handshake is AuthenticationError, from ``send`` or a future)."""

    def __init__(self, broker: str, acks: int | str = 1, linger_ms: float = 0,
                 *args, request_timeout_ms: int = REMOTE_REQUEST_TIMEOUT_MS,
                 curve_server_key: str | bytes | os.PathLike | None = None,
                 curve_secret_key_file: str | os.PathLike | None = None, **kwargs):
        self.address = broker
        self.request_timeout_ms = request_timeout_ms
        self.curve = client_keys(curve_server_key, curve_secret_key_file)
        super().__init__(broker, acks, linger_ms, *args, **kwargs)
        self.data_dir = broker

    def _check_broker(self) -> None:
        pass  # nothing to look at from here: the router answers, or the timeouts decide

    def _init_state(self) -> None:
        self._pid = os.getpid()
        self._closed = False
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._meta = RemoteMetadata(self.address, self.request_timeout_ms, self.curve)
        self._accs: dict[tuple[str, int], Any] = {}
        self._sticky: dict[str, int] = {}
        self._outbox: deque[_Request] = deque()
        self._busy: dict[tuple[str, int], int] = {}  # sealed and unanswered, per partition
        self._buffered = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._io = threading.Thread(target=self._io_main, name="shmbroker-remote-producer",
                                    daemon=True)
        self._io_started = False
        #: Why the I/O thread ended early (refused by the router, or a bug): later batches
        #: fail with it at once.
        self._io_error: errors.ShmbrokerError | None = None

    # -- the API ------------------------------------------------------------------------------

    def send(self, topic: str, value: Any, key: Any = None, partition: int | None = None,
             headers: Sequence[tuple[str, Any]] | None = None,
             timestamp: int | None = None) -> RecordFuture:
        """As Producer.send."""
        if self._serializing:
            key, value = serde.serialize(self.key_serializer, self.value_serializer, key, value)
        with self._lock:
            self._check_open()
            self._wait_buffer()
            if partition is None:
                partition = self._choose(topic, key)
            else:
                self._meta.check_partition(topic, partition)
            acc = self._accs.get((topic, partition)) or self._accumulator(topic, partition)
            future = acc.append(value, key, headers, timestamp)
            if future is None:
                if acc.last_record_bytes > acc.records_bytes_max:
                    raise errors.RecordTooLargeError(
                        f"a record of {acc.last_record_bytes} bytes encoded does not fit in a "
                        f"batch of {topic}/{partition}: at most {acc.records_bytes_max} bytes "
                        f"of records")
                self._seal(topic, partition, acc)
                future = acc.append(value, key, headers, timestamp)
                assert future is not None
            if acc.count >= PRODUCER_BATCH_RECORDS_MAX or self._due(topic, partition, acc):
                self._seal(topic, partition, acc)
            elif self.linger_ms:
                self._wake()  # the I/O thread seals it when the linger is over
            return future

    def send_batch(self, topic: str, values: Any, keys: Sequence[Any] | None = None,
                   partition: int | None = None) -> "_BatchFutures":
        """As Producer.send_batch (the records are sent one by one into the accumulators)."""
        n = len(values)
        if n == 0:
            raise ValueError("send_batch: no values")
        if keys is not None and len(keys) != n:
            raise ValueError(f"send_batch: {len(keys)} keys for {n} values")
        if not self._serializing:
            check_batch_values(values)
        if partition is None and keys is None:
            with self._lock:
                partition = self._choose(topic, None)
        as_is = self._serializing  # else bytes: a numpy row is copied out of the array
        futures = [self.send(topic, values[i] if as_is or values[i] is None else bytes(values[i]),
                             None if keys is None else keys[i], partition) for i in range(n)]
        return _BatchFutures(futures, keyed=partition is None)

    def flush(self, timeout: float | None = None) -> None:
        """Send every accumulated record and wait until every request is answered."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._check_open()
            self._seal_all()
            self._wait_until(lambda: not self._busy, deadline, lambda: (
                f"flush: {sum(self._busy.values())} batches not acknowledged by the router at "
                f"{self.address} within {timeout} s"))

    def close(self, timeout: float | None = None) -> None:
        """Flush (bounded by ``timeout``), stop the I/O thread, fail what is left."""
        if self._closed:
            return
        if self._pid != os.getpid():
            self._forget_after_fork()
        try:
            self.flush(timeout if timeout is not None else self.delivery_timeout_ms / 1000.0)
        except errors.ShmbrokerError:
            pass
        with self._lock:
            self._closed = True
            self._wake()
        if self._io_started:
            self._io.join(timeout=5.0)
        with self._lock:
            error = errors.BrokerNotRunningError(
                f"the producer was closed before the router at {self.address} acknowledged "
                f"this batch")
            for request in self._outbox:
                request.batch.fail(error)
            self._outbox.clear()
            for acc in self._accs.values():
                if acc.count:
                    acc.clear()
                    acc.batch.fail(error)
            self._busy.clear()
            self._cond.notify_all()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._meta.close()

    def __repr__(self) -> str:
        return f"Producer({self.address!r}, acks={self.acks}, remote)"

    # -- futures (called by RecordFuture) -------------------------------------------------------

    def _wait_batch(self, batch: _Batch, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            acc = self._accs.get((batch.topic, batch.partition))
            if acc is not None and acc.batch is batch and acc.count:
                self._seal(batch.topic, batch.partition, acc)
            self._wait_until(lambda: batch.done, deadline, lambda: (
                f"no acknowledgement from the router at {self.address} for "
                f"{batch.topic}/{batch.partition} within {timeout} s"))

    def _wait_until(self, done, deadline: float | None, timed_out) -> None:
        """Wait on the condition (lock held) until ``done()``, or RequestTimeoutError with
        ``timed_out()``'s text at ``deadline`` (None: no deadline; replies wake us)."""
        while not done():  # bounded by the deadline, or by the replies
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise errors.RequestTimeoutError(timed_out())
            self._cond.wait(left)

    def _poll_acks(self, writer) -> None:
        pass  # never called: remote batches have no writer; replies resolve them

    def partitions_for(self, topic: str) -> set[int]:
        with self._lock:
            self._check_open()
            return set(range(self._meta.partitions(topic)))

    # -- accumulating (lock held) ---------------------------------------------------------------

    def _choose(self, topic: str, key: Any) -> int:
        count = self._meta.partitions(topic)
        if key is not None:
            key = key if type(key) is bytes else bytes(key)
            return records.partition_for_key(key, count)
        partition = self._sticky.get(topic)
        if partition is None or partition >= count:
            partition = self._sticky[topic] = random.randrange(count)
        return partition

    def _accumulator(self, topic: str, partition: int):
        limit = self._meta.topic(topic, refresh=False).config["batch_bytes_max"]
        # As Producer._accumulator: batch_bytes_max is when a batch is full; a larger record,
        # up to the topic's limit and the router's largest batch, goes alone in its own.
        bytes_max = min(limit - RB.HEADER_SIZE, REMOTE_BATCH_BYTES_MAX - RB.HEADER_SIZE)
        acc = _native.RecordAccumulator(
            bytes_max, RecordFuture, self.linger_ms, PRODUCER_BATCH_RECORDS_MAX,
            records_bytes_target=min(self.batch_bytes_max + RECORD_OVERHEAD_BYTES_MAX,
                                     bytes_max))
        acc.batch = _Batch(self, topic, partition)
        self._accs[(topic, partition)] = acc
        return acc

    def _due(self, topic: str, partition: int, acc) -> bool:
        """Seal now: nothing of this partition is in flight and the linger is over."""
        if self._busy.get((topic, partition)):
            return False
        return not self.linger_ms or time.monotonic() * 1000.0 - acc.first_ms >= self.linger_ms

    def _seal(self, topic: str, partition: int, acc) -> None:
        count = acc.count
        if not count:
            return
        batch = acc.batch
        batch.count = count
        payload = acc.encode(-1, -1, -1)  # not idempotent: Kafka's -1s, stored as they are
        acc.batch = _Batch(self, topic, partition)
        if self._io_error is not None:  # no I/O thread any more: fail now, never hang
            batch.fail(self._io_error)
            return
        request = _Request(batch, payload,
                           time.monotonic() + self.delivery_timeout_ms / 1000.0)
        self._outbox.append(request)
        key = (topic, partition)
        self._busy[key] = self._busy.get(key, 0) + 1
        self._buffered += len(payload)
        if self._sticky.get(topic) == partition:
            # The cached count: this also runs on the I/O thread, which must not wait on a
            # metadata request.
            count_p = self._meta.topic(topic, refresh=False).partitions
            if count_p > 1:  # Kafka's sticky partitioner: move on once a batch is sealed
                self._sticky[topic] = (partition + 1 + random.randrange(count_p - 1)) % count_p
        self._wake()

    def _seal_all(self) -> None:
        for (topic, partition), acc in list(self._accs.items()):
            self._seal(topic, partition, acc)

    def _wait_buffer(self) -> None:
        if self._buffered < REMOTE_BUFFER_BYTES_MAX:
            return
        deadline = time.monotonic() + (self.send_timeout_ms or 0) / 1000.0
        while self._buffered >= REMOTE_BUFFER_BYTES_MAX:  # bounded by the deadline
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.RingFullTimeoutError(
                    f"{self._buffered} bytes of batches wait for the router at "
                    f"{self.address} (the limit is {REMOTE_BUFFER_BYTES_MAX}) for "
                    f"{self.send_timeout_ms} ms")
            self._cond.wait(left)

    def _wake(self) -> None:
        if not self._io_started:
            self._io_started = True
            self._io.start()
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the thread is woken anyway

    def _forget_after_fork(self) -> None:
        """In a forked child: the parent's socket and thread are the parent's; start over."""
        if self._pid == os.getpid():
            return
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._init_state()

    # -- the I/O thread ---------------------------------------------------------------------------

    def _io_main(self) -> None:
        """Sends, receives, reconnects (see the module doc); ends once the producer is closed
        and nothing is left to send or wait for. Each turn sleeps in poll."""
        conn = Connection(self.address, self.curve)
        inflight: dict[int, _Request] = {}  # id -> request, in send order
        try:
            while True:  # bounded: ends at close (each turn sleeps at most _IO_SLICE_MS)
                if not self._io_turn(conn, inflight):
                    return
        except Exception as exc:  # fail the futures, never hang them
            if isinstance(exc, errors.AuthenticationError):  # refused: nothing more can go
                log.error("remote producer: %s", exc)
                error: errors.ShmbrokerError = exc
            else:  # a bug: fail loudly in the log
                log.exception("remote producer I/O thread failed")
                error = errors.ShmbrokerError("the remote producer's I/O thread failed")
            with self._lock:
                self._io_error = error
                for request in [*inflight.values(), *self._outbox]:
                    request.batch.fail(error)
                self._outbox.clear()
                self._busy.clear()
                self._cond.notify_all()
        finally:
            # acks=0 batches count as delivered once queued on the socket (their futures are
            # resolved): closing must let them go out, not drop them. Others are answered.
            conn.close(REMOTE_ACKS0_CLOSE_LINGER_MS if self.acks == 0 else 0)

    def _io_turn(self, conn: Connection, inflight: dict) -> bool:
        with self._lock:
            if self._closed and not self._outbox and not inflight:
                return False
            to_send = []
            while self._outbox and len(inflight) + len(to_send) < REMOTE_IN_FLIGHT_MAX:
                to_send.append(self._outbox.popleft())
        for request in to_send:
            self._send_request(conn, request, inflight)
        timeout_ms = self._linger_timeout_ms()
        poller = zmq.Poller()
        poller.register(conn.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        events = dict(poller.poll(timeout_ms))
        if self._wake_r in events:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        if conn.sock in events:
            self._read_replies(conn, inflight)
        if conn.dropped():
            log.info("connection to %s dropped; resending %d request(s) on a new one",
                     self.address, len(inflight))
            self._resend(conn, inflight)
        elif inflight:
            oldest = next(iter(inflight.values()))
            if time.monotonic() - oldest.sent_at >= self.request_timeout_ms / 1000.0:
                log.warning("no reply from %s for %d ms; resending %d request(s) on a new "
                            "connection", self.address, self.request_timeout_ms, len(inflight))
                self._resend(conn, inflight)
        self._expire(inflight)
        self._seal_lingered()
        return True

    def _send_request(self, conn: Connection, request: _Request, inflight: dict) -> None:
        batch = request.batch
        request.request_id = conn.next_id()
        request.sent_at = time.monotonic()
        header = wire.produce_request(request.request_id, batch.topic, batch.partition,
                                      self.acks)
        assert conn.sock is not None
        conn.sock.send_multipart([header, request.payload], copy=False)
        if self.acks == 0:
            self._answered(request, base_offset=-1)
        else:
            inflight[request.request_id] = request

    def _read_replies(self, conn: Connection, inflight: dict) -> None:
        assert conn.sock is not None
        for _ in range(REMOTE_IN_FLIGHT_MAX * 2):  # bounded per turn
            try:
                frames = conn.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply_id, result, _ = decode_reply(frames)
            except errors.ShmbrokerError as exc:
                log.warning("unreadable reply from %s: %s", self.address, exc)
                continue
            request = inflight.pop(reply_id, None)
            if request is None:
                if isinstance(result, Exception):  # e.g. an acks=0 batch refused
                    log.warning("router %s refused a batch: %s", self.address, result)
                continue
            if isinstance(result, Exception):
                self._answered(request, error=result)
            else:
                self._answered(request, base_offset=result.get("base_offset", -1))

    def _answered(self, request: _Request, base_offset: int = -1,
                  error: BaseException | None = None) -> None:
        batch = request.batch
        with self._lock:
            if error is not None:
                batch.fail(error)
            else:
                batch.resolve(base_offset)
            key = (batch.topic, batch.partition)
            left = self._busy.get(key, 0) - 1
            if left > 0:
                self._busy[key] = left
            else:
                self._busy.pop(key, None)
                acc = self._accs.get(key)
                if acc is not None and acc.count and self._due(*key, acc):
                    self._seal(*key, acc)  # records sent while it was busy go now
            self._buffered -= len(request.payload)
            self._cond.notify_all()

    def _resend(self, conn: Connection, inflight: dict) -> None:
        conn.reopen()
        pending = list(inflight.values())
        inflight.clear()
        for request in pending:  # in the order they were first sent
            self._send_request(conn, request, inflight)

    def _expire(self, inflight: dict) -> None:
        now = time.monotonic()
        for request_id, request in list(inflight.items()):
            if request.deadline <= now:
                del inflight[request_id]
                self._answered(request, error=errors.RequestTimeoutError(
                    f"no acknowledgement from the router at {self.address} for "
                    f"{request.batch.topic}/{request.batch.partition} within "
                    f"delivery_timeout_ms={self.delivery_timeout_ms}; its records may or may "
                    f"not have been appended"))

    def _linger_timeout_ms(self) -> int:
        if not self.linger_ms:
            return _IO_SLICE_MS
        with self._lock:
            now_ms = time.monotonic() * 1000.0
            waits = [self.linger_ms - (now_ms - acc.first_ms)
                     for key, acc in self._accs.items() if acc.count and not self._busy.get(key)]
        return max(1, min([_IO_SLICE_MS, *waits])) if waits else _IO_SLICE_MS

    def _seal_lingered(self) -> None:
        if not self.linger_ms:
            return
        with self._lock:
            for (topic, partition), acc in list(self._accs.items()):
                if acc.count and self._due(topic, partition, acc):
                    self._seal(topic, partition, acc)


class _BatchFutures:
    """The future of a remote ``send_batch``: ``result()`` (RecordMetadata of the first record,
    or one per record for a keyed batch), ``offsets()`` (numpy int64), ``done()``."""

    def __init__(self, futures: list, keyed: bool):
        self._futures = futures
        self._keyed = keyed

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def _wait(self, timeout: float | None) -> list:
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for future in self._futures:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            out.append(future.result(left))
        return out

    def offsets(self, timeout: float | None = None):
        import numpy as np

        return np.array([m.offset for m in self._wait(timeout)], dtype=np.int64)

    def result(self, timeout: float | None = None):
        metas = self._wait(timeout)
        return metas if self._keyed else RecordMetadata(*metas[0])
