"""RouterServer: the TCP front door. Today it carries the coordinator's requests (topics,
groups, commits, metadata) for clients that cannot reach its ``ipc://`` socket; produce and
fetch come next (docs/design/router.md, "Not done").

    client DEALER --tcp--> ROUTER (this) --DEALER, ipc--> coordinator ROUTER
         [body]          [client id, body]      [router id, client id, body]

The coordinator already answers on whatever envelope a request arrived with, so forwarding is
ZeroMQ's proxy pattern: the client's identity frame travels to the coordinator and back, and
its reply finds the client. The router reads no body on this path but its size: the
coordinator decodes and checks each one (coordinator/protocol.py) and answers bad ones with an
error reply, which the router passes back like any other.

What the router decides itself, always with an error reply (never a silent drop):

* a message that is not exactly one body frame (or a REQ socket's empty delimiter and one body);
* a body larger than COORDINATOR_REQUEST_BYTES_MAX;
* more than ROUTER_INFLIGHT_MAX requests of one client waiting for their replies (a slow or
  greedy client must not fill the coordinator's queue for everyone).

A reply whose client has gone (ROUTER_MANDATORY makes the send fail instead of dropping it
silently) is logged. Owned by the router process's main thread; not thread-safe.
"""
from __future__ import annotations

import ipaddress
import logging
from typing import Callable
from urllib.parse import urlsplit

import zmq

from .. import errors
from ..config import COORDINATOR_REQUEST_BYTES_MAX
from ..coordinator import protocol
from ..coordinator.server import attach_counters
from ..coordinator.server import endpoint as coordinator_endpoint
from ..layout import counters as CL

log = logging.getLogger("shmbroker.router")

#: Requests of one client that may wait for their replies at once (Kafka's
#: max.in.flight.requests.per.connection is 5 for a producer; a consumer group member has one
#: or two; admin tools one). Beyond it: an error reply at once.
ROUTER_INFLIGHT_MAX = 64
#: Messages a peer may have queued towards the router (and replies towards one client) before
#: ZeroMQ pushes back; bounds the router's memory per client.
ROUTER_HWM = 1_000
#: A client sending a message larger than this is disconnected by ZeroMQ itself (it cannot be
#: a valid request: see COORDINATOR_REQUEST_BYTES_MAX).
ROUTER_MESSAGE_BYTES_MAX = 4 * COORDINATOR_REQUEST_BYTES_MAX
#: Messages handled per wake-up from each side, so neither side starves the other.
_BATCH = 64
#: Frames of a message from a client: its identity, then one body (a DEALER) or an empty
#: delimiter and one body (a REQ).
_DELIMITER = b""


def check_listen_address(listen: str) -> None:
    """Only ``tcp://`` on a loopback address for now: there is no authentication yet (issue 5
    asks for CURVE before a non-loopback bind), so a broker must not be reachable from other
    hosts. ConfigError says why."""
    parts = urlsplit(listen)
    if parts.scheme != "tcp" or not parts.hostname:
        raise errors.ConfigError(f"--listen {listen!r}: expected tcp://HOST:PORT, e.g. "
                                 f"tcp://127.0.0.1:7070 (PORT * picks a free one)")
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise errors.ConfigError(
            f"--listen {listen!r}: only loopback addresses (127.0.0.1, ::1, localhost) for "
            f"now; listening on other interfaces needs CURVE authentication, which is not "
            f"built yet")


class RouterServer:
    """Binds ``listen`` and forwards coordinator requests (see the module doc)."""

    def __init__(self, data_dir: str, listen: str, context: zmq.Context | None = None):
        check_listen_address(listen)
        self.data_dir = data_dir
        self.context = context or zmq.Context.instance()
        self.frontend = self.context.socket(zmq.ROUTER)
        self.backend = self.context.socket(zmq.DEALER)
        for sock in (self.frontend, self.backend):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, ROUTER_HWM)
            sock.setsockopt(zmq.RCVHWM, ROUTER_HWM)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, ROUTER_MESSAGE_BYTES_MAX)
        try:
            self.frontend.bind(listen)
        except zmq.ZMQError as exc:
            self.close()
            raise errors.ConfigError(f"--listen {listen!r}: cannot bind ({exc}); is another "
                                     f"broker listening there? pass another --listen") from None
        #: The address bound, with the port a ``*`` picked.
        self.endpoint = self.frontend.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.backend.connect(coordinator_endpoint(data_dir))
        #: client identity -> requests forwarded and not yet answered.
        self.inflight: dict[bytes, int] = {}
        #: Counters for logs and tests (this process's; the counters region adds them to
        #: what a predecessor counted: layout/counters.py, ROUTER table).
        self.forwarded = self.refused = self.replies_undeliverable = 0
        self.counters = attach_counters(data_dir, "router", CL.KIND_ROUTER)
        self._counted_base = list(self.counters.values[:3])

    # -- the loop ---------------------------------------------------------------------------------

    def serve(self, stop_fd: int | None = None, is_stopped: Callable[[], bool] = lambda: False) -> None:
        """The process main loop: unbounded by design; returns once ``is_stopped()``."""
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        if stop_fd is not None:
            poller.register(stop_fd, zmq.POLLIN)
        while not is_stopped():
            events = dict(poller.poll(None))  # idle: sleeps until a message or the stop signal
            if self.backend in events:
                self._replies()
            if self.frontend in events:
                self._requests()
            self._store_counters()

    def _store_counters(self) -> None:
        """One C call per pass of the loop."""
        v, base = self.counters.values, self._counted_base
        v[0] = base[0] + self.forwarded
        v[1] = base[1] + self.refused
        v[2] = base[2] + self.replies_undeliverable
        v[3] = len(self.inflight)
        self.counters.store()

    def _requests(self) -> None:
        for _ in range(_BATCH):  # bounded per wake-up
            try:
                frames = self.frontend.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._request(frames)

    def _request(self, frames: list[bytes]) -> None:
        identity, rest = frames[0], frames[1:]
        if len(rest) == 2 and rest[0] == _DELIMITER:
            route, body = [identity, _DELIMITER], rest[1]
        elif len(rest) == 1:
            route, body = [identity], rest[0]
        else:
            self._refuse([identity], errors.InvalidRequestError(
                f"a request is one frame (the msgpack body; or an empty delimiter and the body "
                f"from a REQ socket), got {len(rest)} frame(s)"))
            return
        if len(body) > COORDINATOR_REQUEST_BYTES_MAX:
            self._refuse(route, errors.InvalidRequestError(
                f"request of {len(body)} bytes; the limit is {COORDINATOR_REQUEST_BYTES_MAX}"),
                body)
            return
        waiting = self.inflight.get(identity, 0)
        if waiting >= ROUTER_INFLIGHT_MAX:
            self._refuse(route, errors.InvalidRequestError(
                f"{waiting} requests of this client are waiting for replies already; the limit "
                f"is {ROUTER_INFLIGHT_MAX}: wait for replies before sending more"), body)
            return
        try:
            self.backend.send_multipart([*route, body], zmq.NOBLOCK)
        except zmq.Again:
            self._refuse(route, errors.CoordinatorNotAvailableError(
                "the coordinator is not keeping up (or restarting); try again"), body)
            return
        self.inflight[identity] = waiting + 1
        self.forwarded += 1

    def _replies(self) -> None:
        for _ in range(_BATCH):  # bounded per wake-up
            try:
                frames = self.backend.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity = frames[0]
            left = self.inflight.get(identity, 0) - 1
            if left > 0:
                self.inflight[identity] = left
            else:
                self.inflight.pop(identity, None)
            self._send(frames)

    def _refuse(self, route: list[bytes], exc: errors.ShmbrokerError, body: bytes | None = None) -> None:
        """Answer a request the router will not forward; the id is echoed when the body
        says it (so the client matches the reply), else null."""
        self.refused += 1
        log.warning("refused a request from client %s: %s", route[0].hex(), exc)
        self._send([*route, protocol.error_reply(_request_id(body), exc)])

    def _send(self, frames: list[bytes]) -> None:
        try:
            self.frontend.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (client gone), EAGAIN (its queue is full)
            self.replies_undeliverable += 1
            log.warning("reply to client %s not delivered: %s", frames[0].hex(), exc.strerror)

    def close(self) -> None:
        self.frontend.close(linger=0)
        self.backend.close(linger=0)
        self._store_counters()
        self.counters.close()


def _request_id(body: bytes | None) -> int | None:
    """The ``id`` of a request body, if it is a readable msgpack map with an integer id."""
    if body is None or len(body) > COORDINATOR_REQUEST_BYTES_MAX:
        return None
    try:
        request_id, _, _ = protocol.decode_request(body)
        return request_id
    except errors.ShmbrokerError as exc:
        return getattr(exc, "request_id", None)
