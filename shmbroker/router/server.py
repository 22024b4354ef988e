"""RouterServer: the TCP front door. It serves remote produce, fetch and list_offsets itself
(router/produce.py, router/fetch.py: the partitions' rings and mapped segments, as a local
client uses them) and forwards the coordinator's requests (topics, groups, commits) to its
``ipc://`` socket (docs/design/router.md).

    client DEALER --tcp--> ROUTER (this) --DEALER, ipc--> coordinator ROUTER
         [body]          [client id, body]      [router id, client id, body]
                            |  produce/fetch/list_offsets: answered here

The coordinator already answers on whatever envelope a request arrived with, so forwarding is
ZeroMQ's proxy pattern: the client's identity frame travels to the coordinator and back, and
its reply finds the client. The router reads no body on this path but its size: the
coordinator decodes and checks each one (coordinator/protocol.py) and answers bad ones with an
error reply, which the router passes back like any other.

Every request body is decoded and checked here (coordinator/protocol.py's decoder with the
router's and the coordinator's request types); a coordinator request is then forwarded as the
bytes that came. What the router decides itself, always with an error reply (never a silent
drop):

* a message that is not a header frame (plus one record frame for produce), after a REQ
  socket's empty delimiter if there is one; a header that does not decode or check;
* a body larger than COORDINATOR_REQUEST_BYTES_MAX;
* more than ROUTER_INFLIGHT_MAX requests of one client waiting for their replies (a slow or
  greedy client must not fill the coordinator's queue for everyone).

A reply whose client has gone (ROUTER_MANDATORY makes the send fail instead of dropping it
silently) is logged. With CURVE keys the socket is a CURVE server and only allow-listed
clients get this far (router/auth.py); a refusal is logged with the client's address, which
each message's metadata carries. Owned by the router process's main thread; not
thread-safe.
"""
from __future__ import annotations

import ipaddress
import logging
import time
from typing import Callable
from urllib.parse import urlsplit

import zmq

from .. import errors
from ..config import COLD_READ_HOT_WINDOW_BYTES_DEFAULT, COORDINATOR_REQUEST_BYTES_MAX
from ..coordinator import protocol
from ..coordinator.server import attach_counters
from ..coordinator.address import endpoint as coordinator_endpoint
from ..layout import counters as CL
from . import protocol as data_protocol
from .auth import Authenticator, CurveServerKeys, client_label
from .connections import ConnectionWatch
from .cold_read import ColdReads
from .fetch import Fetch, FetchRequest, parse_fetch, parse_list_offsets, parse_offsets_for_times
from .produce import Outcome, Produce

log = logging.getLogger("shmbroker.router")

#: Requests of one client that may wait for their replies at once (Kafka's
#: max.in.flight.requests.per.connection is 5 for a producer; a consumer group member has one
#: or two; admin tools one). Beyond it: an error reply at once.
ROUTER_INFLIGHT_MAX = 64
#: Messages a peer may have queued towards the router (and replies towards one client) before
#: ZeroMQ pushes back; bounds the router's memory per client.
ROUTER_HWM = 1_000
#: A client sending a message larger than this is disconnected by ZeroMQ itself (it cannot be
#: a valid request: a header of at most COORDINATOR_REQUEST_BYTES_MAX and one batch).
ROUTER_MESSAGE_BYTES_MAX = data_protocol.PRODUCE_BATCH_BYTES_MAX + 4 * COORDINATOR_REQUEST_BYTES_MAX
#: While produce requests wait for completions, the loop looks at the rings this often.
ROUTER_ACK_POLL_MS = 1
#: While fetches are parked (or replies' bytes are still queued), the loop looks at the
#: partitions' high-watermark sequences this often.
ROUTER_FETCH_POLL_MS = 2
#: Bytes of fetch replies one client may have queued in ZeroMQ (not yet written to its socket);
#: beyond it its next fetch waits (parked) until they drain: a slow client is throttled, the
#: others are not.
ROUTER_CLIENT_QUEUED_BYTES_MAX = 64 << 20
#: A clean stop waits this long in all for the partitions to take what the router wrote.
ROUTER_CLOSE_DRAIN_MS = 2_000
#: Messages handled per wake-up from each side, so neither side starves the other.
_BATCH = 64
#: Frames of a message from a client: its identity, then one body (a DEALER) or an empty
#: delimiter and one body (a REQ).
_DELIMITER = b""


def check_listen_address(listen: str, authenticated: bool) -> None:
    """``tcp://HOST:PORT``; a non-loopback HOST only with CURVE authentication configured
    (``authenticated``): without it anyone who can reach the port could read and write every
    topic. ConfigError says why and what to do."""
    parts = urlsplit(listen)
    if parts.scheme != "tcp" or not parts.hostname:
        raise errors.ConfigError(f"--listen {listen!r}: expected tcp://HOST:PORT, e.g. "
                                 f"tcp://127.0.0.1:7070 (PORT * picks a free one), or none")
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not authenticated:
        raise errors.ConfigError(
            f"--listen {listen!r}: a non-loopback address needs CURVE authentication: set "
            f"curve_server_secret_key_file and curve_allowed_clients_dir (flags or --config "
            f"file; keys from `shmbroker keys generate`), or listen on 127.0.0.1")


class RouterServer:
    """Binds ``listen``; serves produce/fetch/list_offsets and forwards coordinator requests
    (see the module doc)."""

    def __init__(self, data_dir: str, listen: str, curve: CurveServerKeys | None = None,
                 context: zmq.Context | None = None,
                 hot_window_bytes: int = COLD_READ_HOT_WINDOW_BYTES_DEFAULT):
        check_listen_address(listen, curve is not None)
        self.data_dir = data_dir
        self.context = context or zmq.Context.instance()
        #: CURVE's ZAP handler and handshake monitor; None: no authentication (loopback only).
        self.auth: Authenticator | None = None
        self.frontend = self.context.socket(zmq.ROUTER)
        self.backend = self.context.socket(zmq.DEALER)
        for sock in (self.frontend, self.backend):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, ROUTER_HWM)
            sock.setsockopt(zmq.RCVHWM, ROUTER_HWM)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, ROUTER_MESSAGE_BYTES_MAX)
        try:
            if curve is not None:  # before the bind: no handshake may happen without ZAP
                self.auth = Authenticator(self.context, curve)
                self.auth.secure(self.frontend)
            # Before the bind too: the first connection is counted (and its handshake seen).
            self.connections = ConnectionWatch(
                self.frontend, self.auth.handshake_failed if self.auth is not None else None)
            self.frontend.bind(listen)
        except zmq.ZMQError as exc:
            self.close()
            raise errors.ConfigError(f"--listen {listen!r}: cannot bind ({exc}); is another "
                                     f"broker listening there? pass another --listen") from None
        #: The address bound, with the port a ``*`` picked.
        self.endpoint = self.frontend.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.backend.connect(coordinator_endpoint(data_dir))
        self.produce = Produce(data_dir)
        # Cold reads' data listener: same host as --listen, its own free port (router.md).
        self.cold = ColdReads(urlsplit(listen).hostname or "127.0.0.1", hot_window_bytes)
        self.fetch = Fetch(data_dir, self.cold)
        #: client identity -> requests forwarded and not yet answered.
        self.inflight: dict[bytes, int] = {}
        #: client identity -> [(pyzmq MessageTracker, bytes)] of fetch replies not yet sent.
        self.queued: dict[bytes, list] = {}
        #: Counters for logs and tests (this process's; the counters region adds them to
        #: what a predecessor counted: layout/counters.py, ROUTER table).
        self.forwarded = self.refused = self.replies_undeliverable = 0
        self.produce_requests = self.produce_bytes = self.fetch_replies = self.fetch_bytes = 0
        self.counters = attach_counters(data_dir, "router", CL.KIND_ROUTER)
        self._counted_base = list(self.counters.values)

    # -- the loop ---------------------------------------------------------------------------------

    def serve(self, stop_fd: int | None = None, is_stopped: Callable[[], bool] = lambda: False) -> None:
        """The process main loop: unbounded by design; returns once ``is_stopped()``."""
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        if stop_fd is not None:
            poller.register(stop_fd, zmq.POLLIN)
        for sock in self.auth.sockets() if self.auth is not None else ():
            poller.register(sock, zmq.POLLIN)
        monitor = self.connections.monitor
        poller.register(monitor, zmq.POLLIN)
        while not is_stopped():
            # Idle: sleeps until a message or the stop signal; with work pending, bounded.
            events = dict(poller.poll(self._poll_timeout_ms()))
            if self.auth is not None:  # handshakes first: a client waits on its ZAP answer
                self.auth.handle(events)
            if monitor in events:
                self.connections.handle()
            if self.backend in events:
                self._replies()
            if self.frontend in events:
                self._requests()
            self._tick()
            self._store_counters()

    def _poll_timeout_ms(self) -> float | None:
        timeout = None
        if self.produce.busy:
            timeout = ROUTER_ACK_POLL_MS
        if self.fetch.parked or self.queued:
            timeout = min(timeout or ROUTER_FETCH_POLL_MS, ROUTER_FETCH_POLL_MS)
        return timeout

    def _tick(self) -> None:
        """Work that waits on shared memory rather than sockets: produce completions, parked
        fetches whose partitions published or whose wait is over, drained reply queues."""
        for outcome in self.produce.tick():
            self._produce_reply(outcome)
        if self.queued:
            self._prune_queued()
        if self.fetch.parked:
            for request in self.fetch.due(time.monotonic()):
                self._fetch(request)

    def _store_counters(self) -> None:
        """One C call per pass of the loop."""
        v, base = self.counters.values, self._counted_base
        v[0] = base[0] + self.forwarded
        v[1] = base[1] + self.refused
        v[2] = base[2] + self.replies_undeliverable
        v[3] = len(self.inflight)
        cold = self.cold
        v[4:8] = [base[4] + self.fetch.cold_grants, base[5] + cold.server.sent,
                  base[6] + cold.server.bytes_sent, base[7] + cold.server.refused]
        v[8:14] = [base[8] + self.produce_requests, base[9] + self.produce_bytes,
                   base[10] + self.fetch_replies, base[11] + self.fetch_bytes,
                   base[12] + (self.auth.refused if self.auth is not None else 0),
                   self.connections.connected]
        assert len(v) == len(CL.ROUTER_COUNTERS)  # a table grown without this function
        self.counters.store()

    def _requests(self) -> None:
        for _ in range(_BATCH):  # bounded per wake-up
            try:
                frames = self.frontend.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._request(frames)

    def _request(self, frames: list) -> None:
        identity, rest = frames[0].bytes, frames[1:]
        frame = frames[-1]  # its metadata has the client's address, for refusal logs
        route = [identity]
        if len(rest) >= 2 and len(rest[0]) == 0:  # a REQ socket's delimiter
            route, rest = [identity, _DELIMITER], rest[1:]
        if not 1 <= len(rest) <= data_protocol.REQUEST_FRAMES_MAX:
            self._refuse(route, errors.InvalidRequestError(
                f"a request is one frame (the msgpack body; or an empty delimiter and the body "
                f"from a REQ socket), or two for produce (the body and one RecordBatch), got "
                f"{len(rest)} frame(s)"), None, frame)
            return
        if len(rest[0]) > COORDINATOR_REQUEST_BYTES_MAX:
            self._refuse(route, errors.InvalidRequestError(
                f"request of {len(rest[0])} bytes; the limit is {COORDINATOR_REQUEST_BYTES_MAX}"),
                None, frame)
            return
        body = rest[0].bytes
        try:
            request_id, request_type, fields = protocol.decode_request(
                body, data_protocol.ALL_REQUEST_FIELDS)
        except errors.ShmbrokerError as exc:
            self._refuse(route, exc, getattr(exc, "request_id", None), frame)
            return
        records_frame = rest[1] if len(rest) == 2 else None
        if (request_type == "produce") != (records_frame is not None):
            expected = "two frames (the body, then one RecordBatch)" \
                if request_type == "produce" else "one frame"
            self._refuse(route, errors.InvalidRequestError(
                f"{request_type}: expected {expected}, got {len(rest)}"), request_id, frame)
            return
        waiting = self.inflight.get(identity, 0)
        if waiting >= ROUTER_INFLIGHT_MAX:
            self._refuse(route, errors.InvalidRequestError(
                f"{waiting} requests of this client are waiting for replies already; the limit "
                f"is {ROUTER_INFLIGHT_MAX}: wait for replies before sending more"), request_id,
                frame)
            return
        if request_type in data_protocol.DATA_REQUEST_FIELDS:
            self._data_request(route, request_id, request_type, fields, records_frame, frame)
        else:
            self._forward(route, identity, body, request_id, waiting, frame)

    def _forward(self, route: list, identity: bytes, body: bytes, request_id: int,
                 waiting: int, frame: zmq.Frame) -> None:
        try:
            self.backend.send_multipart([*route, body], zmq.NOBLOCK)
        except zmq.Again:
            self._refuse(route, errors.CoordinatorNotAvailableError(
                "the coordinator is not keeping up (or restarting); try again"), request_id,
                frame)
            return
        self.inflight[identity] = waiting + 1
        self.forwarded += 1

    # -- produce, fetch, list_offsets ---------------------------------------------------------------

    def _data_request(self, route: list, request_id: int, request_type: str, fields: dict,
                      records_frame, frame: zmq.Frame) -> None:
        try:
            if request_type == "produce":
                acks = fields["acks"]
                if acks not in data_protocol.ACKS_LEVELS:
                    raise errors.InvalidRequestError(f"produce: acks {acks} is not 0, 1 or -1")
                self.produce.submit(route, request_id, fields["topic"], fields["partition"],
                                    acks, records_frame.buffer)
                self.produce_requests += 1
                self.produce_bytes += len(records_frame.buffer)
                if acks:
                    self._count(route[0], +1)
            elif request_type == "fetch":
                request = parse_fetch(route, request_id, fields)
                self._count(route[0], +1)
                self._fetch(request)
            elif request_type == "list_offsets":
                result = self.fetch.list_offsets(parse_list_offsets(fields))
                self._send([*route, protocol.ok_reply(request_id, result)])
            else:  # offsets_for_times: reads time indexes and a few batches, inline as above
                result = self.fetch.offsets_for_times(parse_offsets_for_times(fields))
                self._send([*route, protocol.ok_reply(request_id, result)])
        except errors.ShmbrokerError as exc:
            self._refuse(route, exc, request_id, frame)

    def _count(self, identity: bytes, delta: int) -> None:
        left = self.inflight.get(identity, 0) + delta
        if left > 0:
            self.inflight[identity] = left
        else:
            self.inflight.pop(identity, None)

    def _produce_reply(self, outcome: Outcome) -> None:
        request = outcome.request
        if request.acks:
            self._count(request.route[0], -1)
        if outcome.error is not None:
            self._refuse(request.route, outcome.error, request.request_id)
        elif request.acks:
            self._send([*request.route, protocol.ok_reply(
                request.request_id, {"base_offset": outcome.base_offset})])

    def _fetch(self, request: FetchRequest) -> None:
        identity = request.route[0]
        now = time.monotonic()
        final = request.deadline <= now
        if not final and self._queued_bytes(identity) >= ROUTER_CLIENT_QUEUED_BYTES_MAX:
            request.seen = [-1] * len(request.partitions)  # looked at again at the next tick
            self.fetch.parked.append(request)
            return
        answer = self.fetch.answer(request, final)
        if answer is None:
            self.fetch.parked.append(request)
            return
        result, data = answer
        self._count(identity, -1)
        size = sum(len(d) for d in data)
        try:
            tracker = self._send_data([*request.route, protocol.ok_reply(request.request_id,
                                                                         result)], data)
        except zmq.ZMQError as exc:
            self.replies_undeliverable += 1
            log.warning("fetch reply to client %s not delivered: %s", identity.hex(), exc.strerror)
            return
        self.fetch_replies += 1
        self.fetch_bytes += size
        if size:
            self.queued.setdefault(identity, []).append((tracker, size))

    def _send_data(self, head: list[bytes], data: list) -> zmq.MessageTracker:
        """Send ``head`` (copied) and the data frames without copying them: each is a
        memoryview of a segment's mapping, which pyzmq holds until ZeroMQ has sent it. The
        tracker is done once every data frame has been sent. Atomic: once the first frame
        is queued, ZeroMQ takes the rest of the message."""
        sock = self.frontend
        for part in head:
            sock.send(part, zmq.SNDMORE | zmq.NOBLOCK)
        trackers = []
        last = len(data) - 1
        for i, part in enumerate(data):
            flags = zmq.NOBLOCK if i == last else zmq.SNDMORE | zmq.NOBLOCK
            trackers.append(sock.send(part, flags, copy=False, track=True))
        return zmq.MessageTracker(*trackers)

    def _queued_bytes(self, identity: bytes) -> int:
        entries = self.queued.get(identity)
        if not entries:
            return 0
        entries[:] = [(t, n) for t, n in entries if not t.done]
        if not entries:
            del self.queued[identity]
            return 0
        return sum(n for _, n in entries)

    def _prune_queued(self) -> None:
        for identity in list(self.queued):  # bounded by the clients with queued replies
            self._queued_bytes(identity)

    # -- coordinator replies ----------------------------------------------------------------------

    def _replies(self) -> None:
        for _ in range(_BATCH):  # bounded per wake-up
            try:
                frames = self.backend.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._count(frames[0], -1)
            self._send(frames)

    def _refuse(self, route: list[bytes], exc: errors.ShmbrokerError,
                request_id: int | None = None, frame: zmq.Frame | None = None) -> None:
        """Answer a request with an error; the id is echoed when it was read (so the client
        matches the reply), else null. ``frame``, a frame of the request when it is at hand,
        gives the client's address (and CURVE name) for the log."""
        self.refused += 1
        log.warning("refused a request from client %s %s: %s", route[0].hex(),
                    client_label(frame) if frame is not None else "(address not kept)", exc)
        self._send([*route, protocol.error_reply(request_id, exc)])

    def _send(self, frames: list[bytes]) -> None:
        try:
            self.frontend.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (client gone), EAGAIN (its queue is full)
            self.replies_undeliverable += 1
            log.warning("reply to client %s not delivered: %s", frames[0].hex(), exc.strerror)

    def close(self) -> None:
        connections = getattr(self, "connections", None)
        if connections is not None:
            connections.close()
        if self.auth is not None:
            self.auth.close()
        self.frontend.close(linger=0)
        self.backend.close(linger=0)
        produce = getattr(self, "produce", None)
        if produce is not None:
            produce.close(ROUTER_CLOSE_DRAIN_MS)
            self.cold.close()
            self.fetch.close()
        if getattr(self, "counters", None) is not None:
            self._store_counters()
            self.counters.close()
