"""CURVE authentication of the router's clients (docs/design/router.md, "Security").

ZeroMQ does the cryptography (CurveZMQ: the router's socket is a CURVE server with the
broker's secret key; every connection is encrypted and the client proves it holds the secret
key of the public key it presents). Who may connect is decided here, by a ZAP handler (ZeroMQ
RFC 27): libzmq asks it, over ``inproc://zeromq.zap.01`` in the router's context, about every
handshake, with the client's IP address and public key; it answers 200 for a public key in the
allow-list directory, 400 otherwise. The handler is a socket in the router's own poll loop
(no thread): a handshake waits at most one pass of the loop.

    client --CURVE HELLO/INITIATE--> router socket --ZAP request--> Authenticator (this)
           <---- READY, or ERROR ---              <--- 200 "alice" | 400 -----

Decision: the allow-list is a directory of ``NAME.key`` files (pyzmq's certificate format,
shmbroker/keys.py), read again when the directory changes (one ``stat`` per handshake), so
adding or removing a client is a file copy or delete, without a restart. The file's NAME is
the client's User-Id: the router's logs name the client. Connections already made stay when
a key is removed (as with Kafka's credentials: they are checked at connection time).

Every refusal is logged with the client's address. A client that does not speak CURVE at all,
or has the wrong server key, fails before ZAP is asked; ZeroMQ's monitor reports those
without the peer's address (libzmq 4.3 gives the listening endpoint only), and they are
logged so. Logging is bounded (REFUSAL_LOG_LINES_PER_S_MAX), so a client retrying in a loop
cannot fill the disk.

Owned by the router process's main thread; not thread-safe.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import zmq
from zmq.utils import z85

from .. import keys
from ..errors import ConfigError

log = logging.getLogger("shmbroker.router")

#: Where libzmq sends ZAP requests (RFC 27); bound in the router socket's context.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
#: The ZAP domain of the router socket (in the router's logs; one domain per process).
ZAP_DOMAIN = b"shmbroker"
#: Public keys an allow-list directory may hold.
ALLOWED_CLIENTS_MAX = 10_000
#: Refusal lines logged per second at most; beyond it they are counted and summed up.
REFUSAL_LOG_LINES_PER_S_MAX = 20
#: ZAP requests answered per wake-up (the rest wait for the next pass of the loop).
_ZAP_BATCH = 64
#: Handshake failures the router logs besides ZAP's refusals: protocol errors (no CURVE, a
#: wrong server key). Not HANDSHAKE_FAILED_NO_DETAIL: that is a peer that went away during
#: its handshake (e.g. a refused client closing its socket), not a refusal.
_HANDSHAKE_FAILURES = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


@dataclass(frozen=True)
class CurveServerKeys:
    """The router's key pair (Z85) and where its allow-list lives."""

    public: bytes
    secret: bytes
    allowed_clients_dir: str


def load_server_keys(secret_key_file: str, allowed_clients_dir: str) -> CurveServerKeys:
    """Read and check both settings (ConfigError naming the setting): the secret key file
    exists, holds a secret key and is not readable by others; the directory holds at least
    one readable public key (an empty allow-list would refuse every client: a mistake)."""
    public, secret = keys.load_secret_key(secret_key_file, "curve_server_secret_key_file")
    AllowList(allowed_clients_dir)  # raises on a bad or empty directory
    return CurveServerKeys(public, secret, os.path.abspath(allowed_clients_dir))


class AllowList:
    """The public keys of ``directory``'s ``*.key`` files, raw (32 bytes) -> file name."""

    def __init__(self, directory: str):
        self.directory = directory
        self.keys: dict[bytes, str] = {}
        self._stamp: tuple[int, int] | None = None
        self.keys = self._read()

    def _read(self) -> dict[bytes, str]:
        what = "curve_allowed_clients_dir"
        try:
            st = os.stat(self.directory)
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(keys.PUBLIC_SUFFIX))
        except OSError as exc:
            raise ConfigError(f"{what} {self.directory}: {exc.strerror}") from None
        if not names:
            raise ConfigError(f"{what} {self.directory}: no client public keys (*.key files) "
                              f"in it, so every client would be refused; copy each client's "
                              f"NAME.key there (`shmbroker keys generate` makes them)")
        if len(names) > ALLOWED_CLIENTS_MAX:
            raise ConfigError(f"{what} {self.directory}: {len(names)} keys; the limit is "
                              f"{ALLOWED_CLIENTS_MAX}")
        found = {}
        for name in names:  # bounded by ALLOWED_CLIENTS_MAX
            public = keys.load_public_key(os.path.join(self.directory, name), what)
            found[z85.decode(public)] = name[:-len(keys.PUBLIC_SUFFIX)]
        self._stamp = (st.st_mtime_ns, st.st_ino)
        return found

    def lookup(self, public_key: bytes) -> str | None:
        """The client's name if ``public_key`` (raw) is allowed. Reads the directory again if
        it changed since; a directory that became unreadable or bad keeps the last good list
        (logged): a typo while editing must not lock every client out."""
        try:
            st = os.stat(self.directory)
            changed = (st.st_mtime_ns, st.st_ino) != self._stamp
        except OSError:
            changed = True
        if changed:
            try:
                self.keys = self._read()
                log.info("allow-list %s read again: %d client key(s)", self.directory,
                         len(self.keys))
            except ConfigError as exc:
                log.error("allow-list not reloaded, the previous %d key(s) stay: %s",
                          len(self.keys), exc)
                self._stamp = None  # try again at the next handshake
        return self.keys.get(public_key)


class _RefusalLog:
    """At most REFUSAL_LOG_LINES_PER_S_MAX warnings a second; the rest are counted."""

    def __init__(self):
        self.window = 0
        self.lines = 0
        self.suppressed = 0

    def warning(self, message: str, *args) -> None:
        now = int(time.monotonic())
        if now != self.window:
            if self.suppressed:
                log.warning("... and %d more refused client(s) not logged", self.suppressed)
            self.window, self.lines, self.suppressed = now, 0, 0
        if self.lines < REFUSAL_LOG_LINES_PER_S_MAX:
            self.lines += 1
            log.warning(message, *args)
        else:
            self.suppressed += 1


class Authenticator:
    """The ZAP handler and the handshake-failure monitor of one CURVE router socket.

    ``secure(sock)`` must run before ``sock`` binds: a ZAP handler must be there before the
    first handshake, and ``ZAP_ENFORCE_DOMAIN`` makes libzmq refuse clients (fail closed)
    should it ever be missing, instead of letting them in (libzmq's default for CURVE)."""

    def __init__(self, context: zmq.Context, server: CurveServerKeys):
        self.server = server
        self.allow = AllowList(server.allowed_clients_dir)
        self.zap = context.socket(zmq.ROUTER)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)
        self._log = _RefusalLog()
        #: Counters for logs and tests: handshakes accepted and refused (ZAP), and handshakes
        #: that failed before ZAP was asked.
        self.accepted = self.refused = self.failed = 0

    def secure(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.server.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def sockets(self) -> list[zmq.Socket]:
        """What the router's loop polls for this object (then calls ``handle``). Handshake
        failures come from the router's connection monitor (router/connections.py), which
        calls ``handshake_failed``."""
        return [self.zap]

    def handle(self, ready) -> None:
        if self.zap in ready:
            self._zap_requests()

    def _zap_requests(self) -> None:
        for _ in range(_ZAP_BATCH):  # bounded per wake-up
            try:
                frames = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._answer(frames)

    def _answer(self, frames: list[bytes]) -> None:
        # [zap peer, "", version, request id, domain, address, identity, mechanism, creds...]
        if len(frames) < 8 or frames[1] != b"":
            log.error("malformed ZAP request (%d frames) ignored", len(frames))
            return
        version, request_id, _domain, address, _identity, mechanism = frames[2:8]
        credentials = frames[8:]
        where = address.decode(errors="replace") or "an unknown address"
        if version != b"1.0":
            self._reply(frames[0], version, request_id, b"500", b"ZAP version not supported")
            return
        name = None
        if mechanism == b"CURVE" and len(credentials) == 1 and len(credentials[0]) == 32:
            name = self.allow.lookup(credentials[0])
        if name is None:
            self.refused += 1
            shown = z85.encode(credentials[0]).decode() if mechanism == b"CURVE" and \
                credentials and len(credentials[0]) == 32 else mechanism.decode(errors="replace")
            self._log.warning("refused a client from %s: CURVE public key %s is not in the "
                              "allow-list %s", where, shown, self.allow.directory)
            self._reply(frames[0], version, request_id, b"400", b"public key not allowed")
            return
        self.accepted += 1
        log.info("client %r authenticated from %s", name, where)
        self._reply(frames[0], version, request_id, b"200", b"OK", name.encode())

    def _reply(self, peer: bytes, version: bytes, request_id: bytes, status: bytes,
               text: bytes, user_id: bytes = b"") -> None:
        try:
            self.zap.send_multipart([peer, b"", version, request_id, status, text, user_id, b""],
                                    zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the connection went meanwhile
            log.warning("ZAP reply not delivered: %s", exc.strerror)

    def handshake_failed(self, event: dict) -> None:
        """A handshake failed before ZAP was asked (a monitor event, parsed)."""
        if event["event"] not in (_HANDSHAKE_FAILURES,):
            return
        self.failed += 1
        value = event["value"]
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            why = "it does not use CURVE"
        elif value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            why = "it has the wrong server public key (or sent a corrupt handshake)"
        else:
            why = f"ZeroMQ event {event['event']!s}, value {value}"
        self._log.warning("refused a client at the CURVE handshake on %s: %s (ZeroMQ does "
                          "not report the client's address for this)",
                          event["endpoint"].decode(errors="replace"), why)

    def close(self) -> None:
        self.zap.close(linger=0)


def client_label(frame: zmq.Frame) -> str:
    """Who sent ``frame`` (a message's body frame, received with copy=False), for refusal
    logs: ``'alice' at 10.0.0.7``, or ``at 127.0.0.1`` without CURVE. ZeroMQ's ROUTER gives each connection
    an identity, not an address; the message's metadata has the peer's address and, with
    CURVE, the User-Id the ZAP handler gave it."""
    def prop(name: str) -> str | None:
        try:
            return frame.get(name)
        except (zmq.ZMQError, AttributeError, TypeError):  # no such property (ipc, old libzmq)
            return None

    address, user = prop("Peer-Address"), prop("User-Id")
    if user and address:
        return f"{user!r} at {address}"
    return f"at {address}" if address else "at an unknown address"
