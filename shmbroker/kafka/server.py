"""KafkaServer: the Kafka listener's socket loop (docs/design/kafka.md).

    Kafka client --TCP, [INT32 size][header][body]--> KafkaServer (this, one thread, selectors)
        Produce  -> router/produce.py's Produce: checked, written unchanged to the ingress ring;
                    answered from the ring's completions (acks 1/-1; acks 0: no response)
        Fetch    -> router/fetch.py's Fetch: whole batches of the segments, long poll; the
                    record bytes go out with sendfile from the segment file (a FilePart),
                    the encoded headers around them with sendmsg
        Metadata, ListOffsets, ApiVersions: answered from topics.json and the control regions
        CreateTopics -> the coordinator (client/admin.py)

Responses leave each connection in request order (Kafka clients match them against their
oldest outstanding request): a connection keeps a FIFO of response slots, and a slot filled
late (a produce waiting for its completion, a parked fetch) holds back the ones behind it.

What a client can do wrong, and what it gets: a frame size below a header or above
KAFKA_REQUEST_BYTES_MAX, a header or body that does not decode, an API key or version we do
not serve (except ApiVersions, which gets Kafka's fallback answer): the connection is closed,
as Kafka closes it, and logged (rate-limited). More than KAFKA_CONNECTIONS_MAX connections: the
newest is closed at once. A client that pipelines more than KAFKA_INFLIGHT_MAX requests, or
does not read its responses (KAFKA_QUEUED_BYTES_MAX), is simply not read from until it
catches up: back-pressure, not an error. Owned by the kafka process's main thread; not
thread-safe.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import selectors
import socket
import struct
import time
from collections import deque
from typing import Callable

from .. import errors
from ..broker.listen_address import parse_host_port
from ..layout import record_batch as RB
from ..log.segment import LogSlice
from ..client.metadata import LocalMetadata
from ..router.fetch import Fetch, FetchRequest
from ..router.produce import Outcome, Produce
from ..router.protocol import FETCH_BYTES_MAX, FETCH_WAIT_MS_MAX, REQUEST_PARTITIONS_MAX
from . import messages as M
from .codec import Reader
from .framing import KAFKA_REQUEST_BYTES_MAX, KAFKA_REQUEST_BYTES_MIN, RequestBuffer
from .groups import CoordinatorLink, KafkaGroups
from .idempotence import ProducerStates, batch_ids, idempotent_batches_in_tail

log = logging.getLogger("shmbroker.kafka")

#: Open client connections; a further one is closed at once.
KAFKA_CONNECTIONS_MAX = 1_024
#: Requests of one connection awaiting their responses; beyond it the connection is not read
#: until responses go out (librdkafka pipelines up to 1,000,000; Kafka itself reads one request
#: per connection at a time).
KAFKA_INFLIGHT_MAX = 64
#: Response bytes queued for one connection before it is no longer read from.
KAFKA_QUEUED_BYTES_MAX = 64 << 20
#: Buffers handed to one sendmsg call (the kernel's IOV_MAX is 1024).
_IOV_MAX = 512
#: Segment file descriptors held open by Fetch responses not yet sent (one per partition
#: with records); beyond it record bytes go out as memoryviews of the mapping instead. With
#: KAFKA_CONNECTIONS_MAX sockets and the readers' own descriptors that is about 4,096 at
#: most; under a lower RLIMIT_NOFILE, a dup that fails (EMFILE) takes the same fallback.
KAFKA_SENDFILE_FDS_MAX = 2_048
#: Bytes per sendfile call (the loop's other connections get a turn between calls).
KAFKA_SENDFILE_BYTES_MAX = 4 << 20
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
#: While produce requests wait for completions / fetches are parked, the loop ticks this often.
KAFKA_ACK_POLL_MS = 1
KAFKA_FETCH_POLL_MS = 2
#: Connection refusals logged per second (a fuzzing client must not fill the disk); the rest
#: are counted.
_REFUSALS_LOGGED_PER_S = 20
#: The cluster id reported in Metadata v2+: any stable string (single node).
CLUSTER_ID = "shmbroker"
NODE_ID = 0
#: Kafka error codes used here beyond the typed errors' own codes.
INVALID_REQUIRED_ACKS = 21
INVALID_REPLICATION_FACTOR = 38
INVALID_PARTITIONS = 37
UNKNOWN_SERVER_ERROR = -1
#: While coordinator requests are out, the loop looks at their deadlines at least this often
#: (replies themselves wake it through the coordinator socket's descriptor).
KAFKA_COORDINATOR_POLL_MS = 100
#: The selector's mark for the coordinator socket's descriptor.
_COORDINATOR = "coordinator"
_HEAD = struct.Struct(">ii")  # frame size, correlation id


def parse_kafka_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (port 0: a free one) -> (host, port); loopback only for now: this
    listener has no authentication yet. ConfigError says why."""
    host, port, loopback = parse_host_port(listen, "--kafka-listen",
                                           "127.0.0.1:9092 (port 0 picks a free one)")
    if not loopback:
        raise errors.ConfigError(
            f"--kafka-listen {listen!r}: only loopback addresses (127.0.0.1, ::1, localhost) "
            f"for now: the Kafka listener has no authentication yet, so anyone who could reach "
            f"it could read and write every topic")
    return host, port


class Slot:
    """One request's place in its connection's response order; ``parts`` once answered."""

    __slots__ = ("conn", "correlation_id", "parts")

    def __init__(self, conn: "Connection", correlation_id: int):
        self.conn = conn
        self.correlation_id = correlation_id
        self.parts: list | None = None


class FilePart:
    """Record bytes of a Fetch response still to send from a segment file: ``left`` bytes
    from ``position`` of ``fd`` (a descriptor owned by this part, ``LogReader.pin``; closed
    through ``KafkaServer._unpin`` once sent or dropped)."""

    __slots__ = ("fd", "position", "left")

    def __init__(self, fd: int, position: int, length: int):
        self.fd = fd
        self.position = position
        self.left = length

    def __len__(self) -> int:
        return self.left


class Connection:
    """One client: its received bytes (``inbuf``: frames are handed to the handlers as views
    of it, valid until they return; framing.py), its response slots and its queued output."""

    __slots__ = ("sock", "peer", "inbuf", "pending", "out", "out_bytes", "closed", "events",
                 "parsing")

    def __init__(self, sock: socket.socket, peer: str):
        self.sock = sock
        self.peer = peer
        self.inbuf = RequestBuffer()
        self.pending: deque[Slot] = deque()
        self.out: deque[memoryview | FilePart] = deque()
        self.out_bytes = 0
        self.closed = False
        self.events = selectors.EVENT_READ
        self.parsing = False


#: zstd batches are refused below Produce v7 (Kafka's rule, KIP-110).
ZSTD_PRODUCE_VERSION_MIN = 7
ZSTD = RB.COMPRESSION_ZSTD


def _codec(batch) -> int:
    """The compression codec of a produced batch (attributes' low bits), 0 if too short."""
    if len(batch) < RB.HEADER_SIZE:
        return 0
    return batch[RB.OFFSETS["attributes"] + 1] & RB.COMPRESSION_MASK


class ProduceWait:
    """A produce request whose partitions' outcomes are still arriving."""

    __slots__ = ("slot", "version", "topics", "left", "idempotent")

    def __init__(self, slot: Slot | None, version: int, topics: list):
        self.slot = slot          # None: acks=0, nothing is answered
        self.version = version
        self.topics = topics      # [(name, [[partition, error, base_offset]])]
        self.left = 0
        #: (topic index, partition index) -> batch_ids of an idempotent batch being appended
        self.idempotent: dict | None = None


class FetchWait:
    """What a parked fetch needs to become a response (FetchRequest.route)."""

    __slots__ = ("slot", "version", "shape")

    def __init__(self, slot: Slot, version: int, shape: list):
        self.slot = slot
        self.version = version
        self.shape = shape        # [(name, partition count)] in request order


class KafkaServer:
    def __init__(self, data_dir: str, listen: str):
        host, port = parse_kafka_listen(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((host, port))
            self.listener.listen(128)
        except OSError as exc:
            self.listener.close()
            raise errors.ConfigError(f"--kafka-listen {listen!r}: cannot bind ({exc.strerror}); "
                                     f"is another broker listening there?") from None
        self.listener.setblocking(False)
        #: What Metadata and clients' next connections use: the bound address.
        self.broker = M.Broker(NODE_ID, host, self.listener.getsockname()[1])
        self.data_dir = data_dir
        self.meta = LocalMetadata(data_dir)
        self.produce = Produce(data_dir)
        self.fetch = Fetch(data_dir, slices=True)
        self.admin = None  # client/admin.Admin, made on the first CreateTopics
        #: Idempotent producers' sequences per partition (idempotence.py).
        self.producers = ProducerStates()
        #: Group APIs: the coordinator's groups, asked without blocking the loop (groups.py).
        self.link = CoordinatorLink(data_dir)
        self.groups = KafkaGroups(self.link, self.broker,
                                  lambda slot, body: self._respond(slot, [body]),
                                  self._partitions_of)
        self.selector = selectors.DefaultSelector()
        self.connections: dict[int, Connection] = {}
        #: Counters for logs and tests: record bytes of Fetch responses sent with sendfile,
        #: and queued as memoryviews (copied by sendmsg) when no descriptor could be pinned.
        self.requests = self.refused = 0
        self.sendfile_bytes = self.record_bytes_copied = 0
        #: FileParts alive (queued or in answered slots not yet at the head).
        self.sendfile_fds = 0
        self._pin_failure_logged_at = float("-inf")
        self._refusal_window = (0.0, 0)

    @property
    def endpoint(self) -> str:
        host = self.broker.host
        return f"[{host}]:{self.broker.port}" if ":" in host else f"{host}:{self.broker.port}"

    # -- the loop ---------------------------------------------------------------------------------

    def serve(self, stop_fd: int | None = None, is_stopped: Callable[[], bool] = lambda: False) -> None:
        """The process main loop: unbounded by design; returns once ``is_stopped()``."""
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        if stop_fd is not None:
            self.selector.register(stop_fd, selectors.EVENT_READ, False)
        self.selector.register(self.link.fd, selectors.EVENT_READ, _COORDINATOR)
        while not is_stopped():
            for key, mask in self.selector.select(self._timeout_s()):
                conn = key.data
                if conn is None:
                    self._accept()
                elif conn is False or conn is _COORDINATOR:
                    continue  # the stop pipe (is_stopped() says so now); replies: _tick
                elif not conn.closed:
                    if mask & selectors.EVENT_WRITE:
                        self._write(conn)
                    if mask & selectors.EVENT_READ and not conn.closed:
                        self._read(conn)
            self._tick()

    def _timeout_s(self) -> float | None:
        if self.produce.busy:
            return KAFKA_ACK_POLL_MS / 1000.0
        if self.fetch.parked:
            return KAFKA_FETCH_POLL_MS / 1000.0
        if self.link.pending:
            return KAFKA_COORDINATOR_POLL_MS / 1000.0
        return None  # idle: sleeps until a socket or the stop signal

    def _tick(self) -> None:
        # Every turn, not only when its descriptor fired: ZeroMQ's descriptor is
        # edge-triggered, and draining each turn is what keeps it from going quiet.
        self.link.poll()
        for outcome in self.produce.tick():
            self._produce_outcome(outcome)
        if self.fetch.parked:
            now = time.monotonic()
            for request in self.fetch.due(now):
                self._answer_fetch(request, request.deadline <= now)

    # -- connections ------------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):  # bounded per wake-up
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again at the next wake-up
                log.warning("accept failed: %s", exc)
                return
            peer = f"{addr[0]}:{addr[1]}"
            if len(self.connections) >= KAFKA_CONNECTIONS_MAX:
                self._refusal(peer, f"{KAFKA_CONNECTIONS_MAX} connections are open already")
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, peer)
            self.connections[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _close(self, conn: Connection, why: str | None = None) -> None:
        if conn.closed:
            return
        if why is not None:
            self._refusal(conn.peer, why)
        conn.closed = True
        self.connections.pop(conn.sock.fileno(), None)
        if conn.events:
            self.selector.unregister(conn.sock)
        conn.sock.close()
        for slot in conn.pending:  # bounded by KAFKA_INFLIGHT_MAX
            for part in slot.parts or ():
                if type(part) is FilePart:
                    self._unpin(part)
        conn.pending.clear()
        for part in conn.out:  # bounded by the queued responses' parts
            if type(part) is FilePart:
                self._unpin(part)
        conn.out.clear()
        if self.fetch.parked:
            self.fetch.parked = [r for r in self.fetch.parked if r.route.slot.conn is not conn]

    def _refusal(self, peer: str, why: str) -> None:
        self.refused += 1
        now = time.monotonic()
        start, logged = self._refusal_window
        if now - start >= 1.0:
            start, logged = now, 0
        if logged < _REFUSALS_LOGGED_PER_S:
            log.warning("closed the connection of %s: %s", peer, why)
        self._refusal_window = (start, logged + 1)

    def _interest(self, conn: Connection) -> None:
        """Read while the client is within its limits; write while responses wait."""
        events = 0
        # Below the in-flight limit every whole frame has been handled, so the buffer holds
        # at most one frame in progress, and RequestBuffer.room always makes room for it.
        if len(conn.pending) < KAFKA_INFLIGHT_MAX and conn.out_bytes < KAFKA_QUEUED_BYTES_MAX:
            events |= selectors.EVENT_READ
        if conn.out:
            events |= selectors.EVENT_WRITE
        if events == conn.events:
            return
        if conn.events == 0:
            self.selector.register(conn.sock, events, conn)
        elif events == 0:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, events, conn)
        conn.events = events

    def _read(self, conn: Connection) -> None:
        """Receive straight into the connection's buffer (the kernel's copy is the only one
        before a frame reaches its handler; framing.py), then handle the whole frames."""
        try:
            received = conn.inbuf.receive(conn.sock)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(conn, f"receive failed: {exc.strerror}")
            return
        if received is None:
            return  # no room: whole frames wait for the in-flight limit (READ is off by now)
        if not received:
            self._close(conn)
            return
        self._frames(conn)

    def _frames(self, conn: Connection) -> None:
        """Handle the complete frames in the input buffer, up to the in-flight limit. Not
        re-entered: a response sent while a frame is handled asks for more frames again."""
        if conn.parsing:
            return
        conn.parsing = True
        inbuf = conn.inbuf
        try:
            # Bounded: each step consumes a frame, and at most KAFKA_INFLIGHT_MAX wait.
            while len(conn.pending) < KAFKA_INFLIGHT_MAX and not conn.closed:
                size = inbuf.frame_size()
                if size is None:
                    break
                if not KAFKA_REQUEST_BYTES_MIN <= size <= KAFKA_REQUEST_BYTES_MAX:
                    self._close(conn, f"request frame of {size} bytes; frames are "
                                      f"{KAFKA_REQUEST_BYTES_MIN}..{KAFKA_REQUEST_BYTES_MAX} bytes")
                    return
                frame = inbuf.take(size)
                if frame is None:
                    break
                try:
                    self._request(conn, frame)
                finally:
                    frame.release()
        finally:
            conn.parsing = False
        if not conn.closed:
            self._interest(conn)

    # -- requests ---------------------------------------------------------------------------------

    def _request(self, conn: Connection, frame: memoryview) -> None:
        r = Reader(frame)
        try:
            head = M.decode_header(r)
        except errors.InvalidRequestError as exc:
            self._close(conn, f"unreadable request header: {exc}")
            return
        self.requests += 1
        key, version = head.api_key, head.api_version
        if log.isEnabledFor(logging.DEBUG):  # which APIs each client asks for (design note)
            log.debug("request %s v%d from %s (%s)", M.NAMES.get(key, key), version,
                      head.client_id, conn.peer)
        if key == M.API_VERSIONS:
            # Answered whatever the version: a higher one gets the fallback (body not read).
            self._respond(self._slot(conn, head), [M.api_versions_response(version)])
            return
        served = M.SUPPORTED.get(key)
        if served is None or not served[0] <= version <= served[1]:
            self._close(conn, f"API key {key} version {version} is not served (see "
                              f"ApiVersions); client {head.client_id!r}")
            return
        try:
            body = M.DECODERS[key](r, version)
            M.check_consumed(r)
        except errors.InvalidRequestError as exc:
            self._close(conn, f"{M.NAMES[key]} v{version} request does not decode: {exc}")
            return
        if key == M.PRODUCE:
            self._produce(conn, head, body)
        elif key == M.FETCH:
            self._fetch(conn, head, body)
        else:
            slot = self._slot(conn, head)
            if key == M.METADATA:
                self._respond(slot, [self._metadata(version, body)])
            elif key == M.LIST_OFFSETS:
                self._respond(slot, [self._list_offsets(version, body)])
            elif key == M.CREATE_TOPICS:
                self._respond(slot, [self._create_topics(version, *body)])
            elif key == M.JOIN_GROUP:
                self.groups.join_group(slot, version, body, head.client_id, conn.peer)
            else:  # answered when the coordinator replies (or at once): groups.py
                getattr(self.groups, _GROUP_HANDLERS[key])(slot, version, body)

    def _slot(self, conn: Connection, head: M.Header) -> Slot:
        slot = Slot(conn, head.correlation_id)
        conn.pending.append(slot)
        return slot

    def _respond(self, slot: Slot, body: list) -> None:
        """Fill ``slot``; send every answered response at the head of its connection."""
        conn = slot.conn
        if conn.closed:
            for part in body:  # bounded by the response's parts
                if type(part) is FilePart:
                    self._unpin(part)
            return
        size = 4 + sum(len(p) for p in body)
        slot.parts = [_HEAD.pack(size, slot.correlation_id), *body]
        while conn.pending and conn.pending[0].parts is not None:  # bounded by pending
            for part in conn.pending.popleft().parts:
                if len(part):
                    conn.out.append(part if type(part) is FilePart else memoryview(part))
                    conn.out_bytes += len(part)
        self._write(conn)
        if not conn.closed and conn.inbuf:
            self._frames(conn)  # requests held back by the in-flight limit
        elif not conn.closed:
            self._interest(conn)

    def _write(self, conn: Connection) -> None:
        """Send what the socket takes: runs of buffers with sendmsg, a FilePart with sendfile
        (either may send less than asked; the rest waits for EVENT_WRITE). A run followed by
        a FilePart is sent with MSG_MORE, so the headers and the records after them leave in
        the same TCP segments despite TCP_NODELAY."""
        out = conn.out
        for _ in range(64):  # bounded per wake-up; the rest when the socket is writable again
            if not out:
                break
            head = out[0]
            try:
                if type(head) is FilePart:
                    sent = os.sendfile(conn.sock.fileno(), head.fd, head.position,
                                       min(head.left, KAFKA_SENDFILE_BYTES_MAX))
                    if sent == 0:  # the file ends early: only a broken invariant does that
                        log.error("segment file ends %d bytes before the fetched range "
                                  "(position %d); closing %s", head.left, head.position,
                                  conn.peer)
                        self._close(conn)
                        return
                    self.sendfile_bytes += sent
                else:
                    run = []
                    flags = 0
                    for part in itertools.islice(out, _IOV_MAX):  # bounded by _IOV_MAX
                        if type(part) is FilePart:
                            flags = _MSG_MORE
                            break
                        run.append(part)
                    sent = conn.sock.sendmsg(run, (), flags)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._close(conn, None if exc.errno in (errno.EPIPE, errno.ECONNRESET)
                            else f"send failed: {exc.strerror}")
                return
            conn.out_bytes -= sent
            while sent:  # bounded by the buffers sent
                head = out[0]
                if len(head) > sent:
                    if type(head) is FilePart:
                        head.position += sent
                        head.left -= sent
                    else:
                        out[0] = head[sent:]
                    break
                sent -= len(head)
                out.popleft()
                if type(head) is FilePart:
                    self._unpin(head)
        self._interest(conn)

    def _unpin(self, part: FilePart) -> None:
        os.close(part.fd)
        part.left = 0
        self.sendfile_fds -= 1

    # -- APIs answered at once --------------------------------------------------------------------

    def _metadata(self, version: int, names: list[str] | None) -> bytes:
        try:
            topics = self.meta.topics()
        except errors.ShmbrokerError as exc:
            log.warning("metadata: cannot read the topics: %s", exc)
            topics = {}
        if names is None:
            rows = [(M.NONE, name, t.partitions) for name, t in sorted(topics.items())]
        else:
            rows = []
            for name in names:  # bounded by the request's array
                t = topics.get(name)
                rows.append((M.NONE, name, t.partitions) if t is not None else
                            (errors.UnknownTopicOrPartitionError.code, name, 0))
        return M.metadata_response(version, self.broker, CLUSTER_ID, rows)

    def _list_offsets(self, version: int, topics) -> bytes:
        out = []
        for name, parts in topics:  # bounded by the request's arrays
            rows = []
            for index, timestamp in parts:
                code, start, end = self.fetch.list_offsets([(name, index)])["partitions"][0][2:]
                if code != M.NONE:
                    rows.append((index, code, -1, -1))
                elif timestamp == -2:
                    rows.append((index, M.NONE, -1, start))
                elif timestamp == -1:
                    rows.append((index, M.NONE, -1, end))
                elif timestamp < 0:  # -3 (max timestamp) is v7+, which we do not serve
                    rows.append((index, errors.InvalidRequestError.code, -1, -1))
                else:  # by time, from the time index (Kafka: -1/-1 when no record is as new)
                    try:
                        found = self.fetch.offset_for_timestamp(name, index, timestamp)
                    except errors.ShmbrokerError as exc:
                        rows.append((index, exc.code if exc.code != -1 else UNKNOWN_SERVER_ERROR, -1, -1))
                        continue
                    offset, at = found if found is not None else (-1, -1)
                    rows.append((index, M.NONE, at, offset))
            out.append((name, rows))
        return M.list_offsets_response(version, out)

    def _create_topics(self, version: int, topics, timeout_ms: int, validate_only: bool) -> bytes:
        """Blocks the loop while the coordinator creates (and the supervisor starts the
        partitions of) each topic: rare, admin-only, and simple; docs/design/kafka.md."""
        results = []
        for t in topics:  # bounded by the request's array
            partitions = 1 if t.partitions == -1 else t.partitions
            if t.replication_factor not in (-1, 1) or t.manual_assignment:
                results.append((t.name, INVALID_REPLICATION_FACTOR,
                                "one broker: replication factor 1 (or -1), no manual assignment"))
                continue
            if partitions <= 0:
                results.append((t.name, INVALID_PARTITIONS, f"{t.partitions} partitions"))
                continue
            if validate_only:
                results.append((t.name, M.NONE, None))
                continue
            try:
                self._admin().create_topic(t.name, partitions,
                                           {k: v for k, v in t.configs.items() if v is not None})
                results.append((t.name, M.NONE, None))
            except errors.ShmbrokerError as exc:
                code = exc.code if exc.code not in (None, -1) else UNKNOWN_SERVER_ERROR
                results.append((t.name, code, str(exc)[:500]))
        self.meta.topics()  # the next Metadata sees the new topics
        return M.create_topics_response(version, results)

    def _partitions_of(self, topic: str) -> int | None:
        try:
            t = self.meta.topics().get(topic)
        except errors.ShmbrokerError:
            return None
        return None if t is None else t.partitions

    def _admin(self):
        if self.admin is None:
            from ..client.admin import Admin
            self.admin = Admin(self.data_dir)
        return self.admin

    # -- Produce ----------------------------------------------------------------------------------

    def _produce(self, conn: Connection, head: M.Header, data: M.ProduceData) -> None:
        acks = data.acks
        slot = self._slot(conn, head) if acks != 0 else None
        wait = ProduceWait(slot, head.api_version,
                           [(name, [[index, M.NONE, -1] for index, _ in parts])
                            for name, parts in data.topics])
        for ti, (name, parts) in enumerate(data.topics):  # bounded by the request's arrays
            for pi, (index, records) in enumerate(parts):
                row = wait.topics[ti][1][pi]
                if acks not in (0, 1, -1):
                    row[1] = INVALID_REQUIRED_ACKS
                    continue
                if data.transactional_id is not None:
                    row[1] = errors.InvalidRequestError.code  # transactions: not served
                    continue
                if records is None:
                    row[1] = errors.InvalidRecordError.code
                    continue
                if head.api_version < ZSTD_PRODUCE_VERSION_MIN and _codec(records) == ZSTD:
                    # Kafka's rule (KIP-110): a client that asks for zstd must say so with
                    # Produce v7+, which tells the broker its consumers can fetch zstd too.
                    row[1] = errors.UnsupportedCompressionError.code
                    continue
                try:
                    ids = batch_ids(records) if acks == -1 else None
                    if ids is not None:
                        if not self.producers.restored(name, index):
                            self._restore_producers(name, index)
                        first_offset = self.producers.check(name, index, ids)
                        if first_offset is not None:  # a retry of an appended batch
                            row[2] = first_offset
                            continue
                    try:
                        # The batch is a view of the receive buffer, ours until this
                        # returns: written from there when the ring has room.
                        self.produce.submit(wait, (ti, pi), name, index, acks, records,
                                            borrowed=True)
                    except BaseException:
                        if ids is not None:
                            self.producers.done(name, index, ids, None)
                        raise
                    if ids is not None:
                        if wait.idempotent is None:
                            wait.idempotent = {}
                        wait.idempotent[(ti, pi)] = (name, index, ids)
                    wait.left += 1
                except errors.ShmbrokerError as exc:
                    row[1] = exc.code if exc.code != -1 else UNKNOWN_SERVER_ERROR
                    if acks == 0:
                        log.info("acks=0 produce to %s/%d from %s refused: %s", name, index,
                                 conn.peer, exc)
        if wait.left == 0:
            self._produce_done(wait)

    def _restore_producers(self, topic: str, partition: int) -> None:
        """Idempotent producers' sequences of one partition from its log's tail, once per
        listener process, before its first idempotent batch is checked (idempotence.py)."""
        batches = self.fetch.read_tail(topic, partition, idempotent_batches_in_tail)
        self.producers.restore(topic, partition, batches)
        if batches:
            log.info("%s/%d: sequences of %d idempotent producer(s) rebuilt from the last %d "
                     "batches of the log", topic, partition, len({b[0] for b in batches}),
                     len(batches))

    def _produce_outcome(self, outcome: Outcome) -> None:
        request = outcome.request
        wait: ProduceWait = request.route
        ti, pi = request.request_id
        row = wait.topics[ti][1][pi]
        if outcome.error is not None:
            row[1] = outcome.error.code if outcome.error.code != -1 else UNKNOWN_SERVER_ERROR
        else:
            row[2] = outcome.base_offset
        if wait.idempotent is not None and (ti, pi) in wait.idempotent:
            name, index, ids = wait.idempotent.pop((ti, pi))
            self.producers.done(name, index, ids,
                                outcome.base_offset if outcome.error is None else None)
        wait.left -= 1
        if wait.left == 0:
            self._produce_done(wait)

    def _produce_done(self, wait: ProduceWait) -> None:
        if wait.slot is not None:
            self._respond(wait.slot, [M.produce_response(wait.version, wait.topics)])

    # -- Fetch ------------------------------------------------------------------------------------

    def _fetch(self, conn: Connection, head: M.Header, data: M.FetchData) -> None:
        slot = self._slot(conn, head)
        flat = [(name, index, offset, max(0, min(pmax, FETCH_BYTES_MAX)))
                for name, parts in data.topics for index, offset, pmax in parts]
        shape = [(name, len(parts)) for name, parts in data.topics]
        if len(flat) > REQUEST_PARTITIONS_MAX:
            self._close(conn, f"fetch of {len(flat)} partitions; at most "
                              f"{REQUEST_PARTITIONS_MAX}")
            return
        wait_ms = max(0, min(data.max_wait_ms, FETCH_WAIT_MS_MAX))
        request = FetchRequest(FetchWait(slot, head.api_version, shape), 0, flat,
                               max(0, data.min_bytes),
                               max(1, min(data.max_bytes, FETCH_BYTES_MAX)),
                               time.monotonic() + wait_ms / 1000.0)
        self._answer_fetch(request, wait_ms == 0 or data.min_bytes <= 0 or not flat)

    def _answer_fetch(self, request: FetchRequest, final: bool) -> None:
        wait: FetchWait = request.route
        if wait.slot.conn.closed:
            return
        answer = self.fetch.answer(request, final)
        if answer is None:
            self.fetch.parked.append(request)
            return
        result, frames = answer
        rows = iter(zip(result["partitions"], frames))
        topics = []
        for name, count in wait.shape:  # bounded by the request's partitions
            parts = []
            for _ in range(count):
                row, data = next(rows)
                _, index, code, hw, start = row[:5]
                if type(data) is LogSlice:
                    data = self._records_part(name, index, data)
                parts.append((index, code, hw, start, data))
            topics.append((name, parts))
        self._respond(wait.slot, M.fetch_response_parts(wait.version, topics))

    def _records_part(self, topic: str, partition: int, piece: LogSlice):
        """How a partition's records go out: a FilePart (sendfile from the segment file)
        whenever a descriptor can be pinned; else the slice's memoryview of the mapping
        (sendmsg copies it): KAFKA_SENDFILE_FDS_MAX descriptors pinned already, the reader
        closed the segment since (several reads of one partition in one request), or no
        descriptor left (EMFILE)."""
        fd = None
        if self.sendfile_fds < KAFKA_SENDFILE_FDS_MAX:
            try:
                fd = self.fetch.pin(topic, partition, piece)
            except OSError as exc:
                now = time.monotonic()
                if now - self._pin_failure_logged_at >= 1.0:  # at most one line a second
                    self._pin_failure_logged_at = now
                    log.warning("fetch of %s/%d: no descriptor for sendfile (%s); sending "
                                "from the mapping", topic, partition, exc)
        if fd is None:
            self.record_bytes_copied += piece.length
            return piece.data
        self.sendfile_fds += 1
        return FilePart(fd, piece.file_position, piece.length)

    def close(self) -> None:
        for conn in list(self.connections.values()):
            self._close(conn)
        self.selector.close()
        self.listener.close()
        self.produce.close(2_000)
        self.fetch.close()
        self.meta.close()
        if self.admin is not None:
            self.admin.close()
        self.link.close()


#: API key -> KafkaGroups method (JoinGroup is dispatched apart: it also takes the client id).
_GROUP_HANDLERS = {M.FIND_COORDINATOR: "find_coordinator", M.SYNC_GROUP: "sync_group",
                   M.HEARTBEAT: "heartbeat", M.LEAVE_GROUP: "leave_group",
                   M.OFFSET_COMMIT: "offset_commit", M.OFFSET_FETCH: "offset_fetch",
                   M.INIT_PRODUCER_ID: "init_producer_id", M.DESCRIBE_GROUPS: "describe_groups",
                   M.LIST_GROUPS: "list_groups"}
