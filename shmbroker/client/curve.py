"""CURVE on the client side: the keys a remote client presents, the socket options that carry
them, and the handshake failures that turn into AuthenticationError (docs/design/router.md,
"Security").

    Producer(broker="tcp://broker.example:7070",
             curve_server_key="keys/server.key",          # the broker's public key (or its Z85)
             curve_secret_key_file="keys/alice.key_secret")  # ours; alice.key is allow-listed

Every remote socket (Admin's, and the remote Producer's and Consumer's connections) is made
by ``dealer()`` here, so the options are set in one place.

A refused client would otherwise wait: ZeroMQ reconnects by itself and queues requests for a
connection that never completes its handshake. So each socket's monitor also reports
handshake failures, and ``HandshakeWatch`` turns them into AuthenticationError at once:

* ``HANDSHAKE_FAILED_AUTH``: the router's ZAP handler said no (key not in the allow-list);
* ``HANDSHAKE_FAILED_PROTOCOL``: a mechanism mismatch (one side uses CURVE, the other not);
* ``HANDSHAKE_FAILED_NO_DETAIL``: what a client with the wrong server public key sees (the
  router cannot decrypt its hello and drops the connection). A router killed in the middle
  of a handshake looks the same once, so this counts only after HANDSHAKE_FAILURES_MAX in a
  row with no success between them (~0.2 s at the reconnect interval).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import zmq
from zmq.utils.monitor import parse_monitor_message

from .. import errors, keys

#: Handshakes that fail without a reason in a row before the client gives up (see above).
HANDSHAKE_FAILURES_MAX = 3
#: The monitor events a remote socket reports besides a dropped connection.
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class CurveClientKeys(NamedTuple):
    """Z85 keys: the server's public key, and this client's pair; plus where they came from
    (so the objects a client makes for itself, e.g. a group's heartbeat Admin, load the same)."""

    server_public: bytes
    public: bytes
    secret: bytes
    secret_key_file: str

    def as_kwargs(self) -> dict:
        return {"curve_server_key": self.server_public,
                "curve_secret_key_file": self.secret_key_file}


def client_keys(curve_server_key, curve_secret_key_file) -> CurveClientKeys | None:
    """The keys of ``Admin/Producer/Consumer(..., curve_server_key=, curve_secret_key_file=)``:
    both or neither (ConfigError). ``curve_server_key``: the server's public key as Z85 text
    or the path of its ``.key`` file; ``curve_secret_key_file``: this client's
    ``.key_secret`` file (mode 0600)."""
    if curve_server_key is None and curve_secret_key_file is None:
        return None
    if curve_server_key is None or curve_secret_key_file is None:
        raise errors.ConfigError(
            "CURVE needs both curve_server_key (the broker's public key: its .key file or Z85 "
            "text) and curve_secret_key_file (this client's .key_secret file)")
    server_public = keys.public_key_or_file(curve_server_key, "curve_server_key")
    path = os.fspath(curve_secret_key_file)
    public, secret = keys.load_secret_key(path, "curve_secret_key_file")
    return CurveClientKeys(server_public, public, secret, path)


def curve_kwargs(curve: CurveClientKeys | None) -> dict:
    """What to pass on to an Admin made for a client with these keys."""
    return curve.as_kwargs() if curve is not None else {}


def dealer(context: zmq.Context, curve: CurveClientKeys | None, events: int,
           remote: bool = True) -> tuple[zmq.Socket, zmq.Socket]:
    """A DEALER with LINGER 0 and, with ``curve``, the CURVE client options; and its monitor
    socket for ``events``, plus HANDSHAKE_EVENTS for a ``remote`` (tcp://) peer with ``curve``
    or without: a client with no keys must learn it met a CURVE router. (A local Admin's
    ``ipc://`` peer is the coordinator, which has no authentication.) Not connected yet."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
    monitor = sock.get_monitor_socket(events | (HANDSHAKE_EVENTS if remote else 0))
    return sock, monitor


class HandshakeWatch:
    """Reads a socket monitor's events; ``poll()`` says whether the connection dropped since
    the last look and raises AuthenticationError on a failed handshake (see the module doc)."""

    def __init__(self, monitor: zmq.Socket, address: str, curve: CurveClientKeys | None):
        self.monitor = monitor
        self.address = address
        self.curve = curve
        self._no_detail = 0

    def poll(self) -> bool:
        dropped = False
        while self.monitor.poll(0, zmq.POLLIN):  # bounded: the events queued so far
            event = parse_monitor_message(self.monitor.recv_multipart())
            kind = event["event"]
            if kind == zmq.EVENT_DISCONNECTED:
                dropped = True
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._no_detail = 0
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self._no_detail += 1
                if self._no_detail >= HANDSHAKE_FAILURES_MAX:
                    raise self._error("the router dropped the connection during the handshake "
                                      f"{self._no_detail} times in a row")
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                raise self._error(self._reason(kind, event["value"]))
        return dropped

    def _reason(self, kind: int, value: int) -> str:
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return f"the router refused our public key (status {value}: not in its allow-list)"
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return "security mechanism mismatch"
        return f"handshake protocol error {value:#x}"

    def _error(self, why: str) -> errors.AuthenticationError:
        if self.curve is None:
            hint = ("this client uses no CURVE keys: if the broker requires them, pass "
                    "curve_server_key and curve_secret_key_file")
        else:
            hint = ("check that curve_server_key is the broker's public key and that this "
                    "client's public key is in the broker's curve_allowed_clients_dir")
        return errors.AuthenticationError(f"{self.address}: {why}; {hint}")
