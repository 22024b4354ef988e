"""What the remote Producer and Consumer share: a connection to the router that is remade when
it drops, and topic metadata asked of the coordinator through the router.

Wire format: docs/protocol.md. Both are owned by one thread; not thread-safe.
"""
from __future__ import annotations

import itertools
import logging
import time

import zmq

from .. import errors
from ..config import PRODUCER_METADATA_MAX_AGE_MS
from ..coordinator import protocol
from .admin import Admin, TopicDescription
from .curve import CurveClientKeys, HandshakeWatch, curve_kwargs, dealer

log = logging.getLogger("shmbroker.remote")

#: A request with no reply after this long is taken to be lost (Kafka's request.timeout.ms):
#: the connection is remade and the request sent again.
REMOTE_REQUEST_TIMEOUT_MS = 30_000
#: Messages ZeroMQ queues towards the router at most (requests in flight are far fewer).
REMOTE_HWM = 1_000
#: Pause between tries of a metadata request that failed for a retriable reason.
_METADATA_RETRY_MS = 100


def is_remote(broker) -> bool:
    """Whether ``broker`` names a router (``tcp://host:port``) rather than a data dir."""
    return isinstance(broker, str) and broker.startswith("tcp://")


class Connection:
    """One DEALER to the router. ``dropped()`` says (once) that the TCP connection went away:
    replies to what was in flight will not come; ``reopen()`` makes a fresh socket, so nothing
    queued on the old one goes out twice and no late reply arrives for a resent request.
    ``dropped()`` raises AuthenticationError when the router refused the handshake
    (client/curve.py): a refused client fails at once instead of waiting for its timeouts."""

    def __init__(self, address: str, curve: CurveClientKeys | None = None):
        self.address = address
        self.curve = curve
        self.context = zmq.Context.instance()
        self.ids = itertools.count(1)
        self.sock: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.watch: HandshakeWatch | None = None
        #: How often the connection was remade (for tests and logs).
        self.reopened = 0
        self._open()

    def _open(self) -> None:
        sock, self.monitor = dealer(self.context, self.curve, zmq.EVENT_DISCONNECTED)
        self.watch = HandshakeWatch(self.monitor, self.address, self.curve)
        sock.setsockopt(zmq.SNDHWM, REMOTE_HWM)
        sock.setsockopt(zmq.RCVHWM, REMOTE_HWM)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1_000)
        sock.connect(self.address)
        self.sock = sock

    def next_id(self) -> int:
        return next(self.ids)

    def dropped(self) -> bool:
        assert self.watch is not None
        return self.watch.poll()

    def reopen(self) -> None:
        self._close_sockets()
        self._open()
        self.reopened += 1

    def _close_sockets(self, linger_ms: int = 0) -> None:
        if self.sock is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self.sock.close(linger=linger_ms)
            self.sock = None
        if self.monitor is not None:
            self.monitor.close(linger=0)
            self.monitor = None
            self.watch = None

    def close(self, linger_ms: int = 0) -> None:
        """``linger_ms``: how long messages still queued may take to go out (0: dropped; a
        reopen after a drop wants that, requests in flight are resent on the new socket)."""
        self._close_sockets(linger_ms)


def decode_reply(frames: list) -> tuple[int | None, dict | errors.ShmbrokerError, list]:
    """(id, result or exception, data frames) of a reply's frames."""
    header = frames[0].bytes if isinstance(frames[0], zmq.Frame) else frames[0]
    reply_id, result = protocol.decode_reply(header)
    return reply_id, result, frames[1:]


class RemoteMetadata:
    """Topics as the coordinator describes them (through the router), cached for
    PRODUCER_METADATA_MAX_AGE_MS so partitions added meanwhile are seen (Kafka's
    metadata.max.age.ms)."""

    def __init__(self, address: str, request_timeout_ms: int = REMOTE_REQUEST_TIMEOUT_MS,
                 curve: CurveClientKeys | None = None):
        self.address = address
        self.curve = curve
        self.data_dir = address
        self.request_timeout_ms = request_timeout_ms
        self._admin: Admin | None = None
        self._topics: dict[str, tuple[TopicDescription, float]] = {}

    def topic(self, name: str, refresh: bool = True) -> TopicDescription:
        """The topic's description; UnknownTopicOrPartitionError if there is none. A refresh
        that fails for a retriable reason (the router or the coordinator is restarting) keeps
        the description it had, as Kafka's clients keep stale metadata; without one it tries
        again for up to ``request_timeout_ms``."""
        cached = self._topics.get(name)
        now = time.monotonic()
        if cached is not None and (not refresh or now < cached[1]):
            return cached[0]
        deadline = now + self.request_timeout_ms / 1000.0
        while True:  # bounded by the deadline
            try:
                description = self._describe(name)
                break
            except errors.ShmbrokerError as exc:
                if not exc.retriable or isinstance(exc, errors.UnknownTopicOrPartitionError):
                    raise
                if cached is not None:
                    log.info("metadata of %r not refreshed (%s); using what we had", name, exc)
                    self._topics[name] = (cached[0], now + PRODUCER_METADATA_MAX_AGE_MS / 1000.0)
                    return cached[0]
                if time.monotonic() >= deadline:
                    raise
                time.sleep(_METADATA_RETRY_MS / 1000.0)
        self._topics[name] = (description, now + PRODUCER_METADATA_MAX_AGE_MS / 1000.0)
        return description

    def _describe(self, name: str) -> TopicDescription:
        if self._admin is None:
            self._admin = Admin(broker=self.address, request_timeout_ms=self.request_timeout_ms,
                                **curve_kwargs(self.curve))
        return self._admin.describe_topic(name)

    def partitions(self, name: str) -> int:
        return self.topic(name).partitions

    def check_partition(self, name: str, partition: int) -> None:
        count = self.partitions(name)
        if not isinstance(partition, int) or isinstance(partition, bool) or \
                not 0 <= partition < count:
            raise errors.UnknownTopicOrPartitionError(
                f"topic {name!r} has partitions 0..{count - 1}; there is no partition "
                f"{partition!r}")

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        self._topics.clear()
