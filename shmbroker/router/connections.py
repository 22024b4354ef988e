"""The router's view of its TCP connections: ZeroMQ's socket monitor on the frontend, read
in the router's loop. It counts the connections open now (a gauge in the router's counters
region: `shmbroker top`, Prometheus) and hands CURVE handshake failures to the authenticator,
which logs them (router/auth.py).

*Why one object:* a ZeroMQ socket has at most one monitor (a second ``zmq_socket_monitor``
replaces the first), so connection counting and the authenticator's handshake watch share it.
*Why the monitor:* a ROUTER socket does not say when a peer connects or goes; the monitor does,
per TCP connection (a client that reconnects is counted again, one that was refused is
counted until its connection is closed).
"""
from __future__ import annotations

import logging
from typing import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("shmbroker.router")

#: Monitor events read per wake-up (the rest wait for the next pass of the loop).
_EVENTS_BATCH = 256
_EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


class ConnectionWatch:
    """Reads ``sock``'s monitor; ``connected`` is the number of TCP connections open."""

    def __init__(self, sock: zmq.Socket,
                 on_handshake_failure: Callable[[dict], None] | None = None):
        self.sock = sock
        self.monitor: zmq.Socket | None = sock.get_monitor_socket(_EVENTS)
        self.on_handshake_failure = on_handshake_failure
        self.connected = 0
        #: Connections accepted since start (a counter, for tests and logs).
        self.accepted = 0

    def handle(self) -> None:
        assert self.monitor is not None
        for _ in range(_EVENTS_BATCH):  # bounded per wake-up
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_ACCEPTED:
                self.connected += 1
                self.accepted += 1
            elif kind == zmq.EVENT_DISCONNECTED:
                self.connected = max(0, self.connected - 1)
            elif self.on_handshake_failure is not None:
                self.on_handshake_failure(event)

    def close(self) -> None:
        if self.monitor is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass  # the socket is closed already
            self.monitor.close(linger=0)
            self.monitor = None
