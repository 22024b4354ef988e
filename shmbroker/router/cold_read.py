"""Cold reads: a consumer far behind the end of a partition gets its bytes on a plain TCP
connection with ``os.sendfile`` straight from the segment file, not through the router's
ZeroMQ loop (docs/design/router.md, "Cold reads"; bytes: docs/protocol.md).

::

    client                         router process
      fetch {cold_bytes_max: N} ---> main thread: Fetch._read finds the offset more than
                                     hot_window_bytes behind the end -> plan a grant: whole
                                     batches of one segment, <= N bytes; open the segment
                                     (fd kept until sent or expired); GrantTable.issue
      <--- reply: row with bytes 0, cold_reads: [[index, token, host, port, ...]]
      TCP connect host:port ------->  data thread (ColdReadServer): accept (<= connections_max)
      32-byte token ---------------->  GrantTable.take: known, unexpired, unused? (constant-time
                                     compare of the secret; removed on first use)
      <--- exactly `length` bytes      os.sendfile(socket, segment fd, position, length), close
      (or: closed, nothing sent)

Why a thread and not the loop: ``os.sendfile`` blocks on a slow client and releases the GIL,
so it runs beside the ZeroMQ loop without holding it up; connections, their wait for a token
and their stalls are all bounded.

A token is 8 bytes of grant id (which grant; not secret) then 24 random bytes of secret,
both from ``secrets``. Looking a grant up by its id and comparing only the secret with
``hmac.compare_digest`` keeps the check constant-time in what an attacker must guess.

Owned by the router process. ``GrantTable`` is shared by the main thread (issue) and the data
threads (take), under one in-process lock (no other process can hold it).
"""
from __future__ import annotations

import errno
import hmac
import logging
import os
import secrets
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from ..log import files
from ..log.reader import LogReader

log = logging.getLogger("shmbroker.router")

#: Bytes of a token: GRANT_ID_BYTES of grant id, then the secret.
COLD_TOKEN_BYTES = 32
GRANT_ID_BYTES = 8
#: A grant not used within this is dropped (its fd closed); the client fetches again.
COLD_GRANT_TTL_MS = 30_000
#: Grants outstanding at once (each holds an open fd). Beyond it, fetches are served hot.
COLD_GRANTS_MAX = 256
#: Data connections served at once; more are closed at once (the client fetches again).
COLD_CONNECTIONS_MAX = 8
#: A data connection must have sent its whole token within this.
COLD_TOKEN_WAIT_MS = 2_000
#: A send that makes no progress for this long ends the connection (a client that stopped
#: reading).
COLD_SEND_STALL_MS = 10_000
#: A whole transfer takes at most this long (64 MiB at ~1 MB/s).
COLD_TRANSFER_MS_MAX = 60_000
#: Bytes per sendfile call: the stall and stop checks run between calls.
_SENDFILE_CHUNK_BYTES = 8 << 20
_ACCEPT_POLL_MS = 200
#: Bytes of a batch's start compared to make sure the opened file is the one read: base
#: offset, length, epoch, magic and CRC.
_HEAD_CHECK_BYTES = 21


@dataclass
class Grant:
    """What one token lets its holder receive: ``length`` bytes of whole batches from
    ``file_position`` of the segment open as ``fd`` (the table owns ``fd`` until ``take``
    hands the grant over; then the data connection closes it)."""

    topic: str
    partition: int
    segment_base_offset: int
    file_position: int
    length: int
    first_offset: int
    last_offset: int
    fd: int
    expires_at: float = 0.0
    secret: bytes = b""


def bytes_behind(bases: Iterable[int], active_base: int, active_end: int, base: int,
                 position: int, size_of: Callable[[int], int], limit: int) -> int:
    """Bytes of log from ``position`` of segment ``base`` to the published end, counted up to
    a little past ``limit`` (the answer is only compared with it, so a partition with a
    thousand segments costs a few ``size_of`` calls, not a thousand).

    ``bases``: every segment base offset, ascending; ``size_of(base)``: a sealed segment's
    size; the active one ends at ``active_end``. Segments are whole (sealed ones were
    complete before the next began), so the sum is exact.
    """
    if base == active_base:
        return max(0, active_end - position)
    behind = size_of(base) - position
    for later in bases:  # ascending; bounded: stops once past the limit
        if later <= base:
            continue
        if later >= active_base:
            return behind + active_end
        behind += size_of(later)
        if behind > limit:
            return behind
    return behind + active_end


def plan_grant(reader: LogReader, state, offset: int, bytes_max: int, topic: str,
               partition: int) -> Grant | None:
    """The range a grant covers from ``offset``, with the segment opened: whole committed
    batches of one segment starting with the one holding ``offset``, at most ``bytes_max``
    (but always the first batch whole), never past the segment's end or the high watermark
    (``LogReader.read`` gives exactly that). None when there is nothing to grant or the
    segment is gone meanwhile (retention): the caller serves the fetch hot.

    The fd is opened here and kept until the bytes are sent, so a segment deleted by
    retention meanwhile is still sent whole. It is checked to be the file the reader read
    (the first batch's header bytes), since a path is looked up anew.
    """
    piece = reader.read(offset, bytes_max, state, verify_crc=False)
    if piece.length == 0:
        return None
    try:
        fd = os.open(piece.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        head = os.pread(fd, _HEAD_CHECK_BYTES, piece.file_position)
        if head != bytes(piece.data[:_HEAD_CHECK_BYTES]) or \
                os.fstat(fd).st_size < piece.file_position + piece.length:
            os.close(fd)
            return None
    except OSError:
        os.close(fd)
        raise
    parsed = files.parse_segment_name(os.path.basename(piece.path))
    assert parsed is not None, piece.path
    return Grant(topic, partition, parsed[0], piece.file_position, piece.length,
                 piece.first_offset, piece.last_offset, fd)


class GrantTable:
    """Outstanding grants by grant id: single use, expiring, bounded (``grants_max``)."""

    def __init__(self, ttl_ms: int = COLD_GRANT_TTL_MS, grants_max: int = COLD_GRANTS_MAX,
                 clock: Callable[[], float] = time.monotonic):
        assert ttl_ms > 0 and grants_max > 0
        self.ttl_s = ttl_ms / 1000.0
        self.grants_max = grants_max
        self.clock = clock
        self._grants: dict[bytes, Grant] = {}
        self._lock = threading.Lock()
        #: Counters for logs, tests and the router's counters region.
        self.issued = self.taken = self.expired = self.rejected = 0

    def __len__(self) -> int:
        return len(self._grants)

    def issue(self, grant: Grant) -> bytes | None:
        """The grant's token, or None when grants_max are outstanding (the caller keeps the
        fd then). The table owns ``grant.fd`` from here."""
        with self._lock:
            self._expire_locked()
            if len(self._grants) >= self.grants_max:
                return None
            grant_id = secrets.token_bytes(GRANT_ID_BYTES)
            while grant_id in self._grants:  # bounded: a 64-bit collision is never twice
                grant_id = secrets.token_bytes(GRANT_ID_BYTES)
            grant.secret = secrets.token_bytes(COLD_TOKEN_BYTES - GRANT_ID_BYTES)
            grant.expires_at = self.clock() + self.ttl_s
            self._grants[grant_id] = grant
            self.issued += 1
            return grant_id + grant.secret

    def take(self, token: bytes) -> Grant | None:
        """The grant of a valid token, removed (single use); None for a wrong, used or
        expired token (an expired grant's fd is closed here)."""
        if len(token) != COLD_TOKEN_BYTES:
            with self._lock:
                self.rejected += 1
            return None
        grant_id, secret = token[:GRANT_ID_BYTES], token[GRANT_ID_BYTES:]
        with self._lock:
            grant = self._grants.get(grant_id)
            if grant is None or not hmac.compare_digest(grant.secret, secret):
                self.rejected += 1
                return None
            del self._grants[grant_id]  # used once, right or not in time
            if grant.expires_at <= self.clock():
                os.close(grant.fd)
                self.expired += 1
                self.rejected += 1
                return None
            self.taken += 1
            return grant

    def expire(self) -> int:
        """Drop grants past their time; how many."""
        with self._lock:
            return self._expire_locked()

    def _expire_locked(self) -> int:
        now = self.clock()
        gone = [k for k, g in self._grants.items() if g.expires_at <= now]
        for key in gone:  # bounded by grants_max
            os.close(self._grants.pop(key).fd)
        self.expired += len(gone)
        return len(gone)

    def close(self) -> None:
        with self._lock:
            for grant in self._grants.values():
                os.close(grant.fd)
            self._grants.clear()


class ColdReadServer:
    """The data listener: a thread accepting on ``host`` (port picked free), one thread per
    data connection (at most ``connections_max``). ``endpoint``: (host, port)."""

    def __init__(self, host: str, table: GrantTable,
                 connections_max: int = COLD_CONNECTIONS_MAX,
                 token_wait_ms: int = COLD_TOKEN_WAIT_MS,
                 send_stall_ms: int = COLD_SEND_STALL_MS,
                 transfer_ms_max: int = COLD_TRANSFER_MS_MAX):
        self.table = table
        self.connections_max = connections_max
        self.token_wait_s = token_wait_ms / 1000.0
        self.send_stall_ms = send_stall_ms
        self.transfer_s_max = transfer_ms_max / 1000.0
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, 0), family=family, backlog=64)
        self.endpoint = self.listener.getsockname()[:2]
        self._active: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        #: Counters (bytes and connections by outcome).
        self.bytes_sent = self.sent = self.refused = self.failed = 0
        self._thread = threading.Thread(target=self._accept_loop, name="cold-read-accept",
                                        daemon=True)
        self._thread.start()

    # -- accepting --------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        """The data thread's main loop: unbounded by design, ends on close()."""
        while not self._stop.is_set():
            ready, _, _ = select.select([self.listener], [], [], _ACCEPT_POLL_MS / 1000.0)
            if ready:
                try:
                    conn, peer = self.listener.accept()
                except OSError:
                    continue  # the peer gave up already, or we are closing
                self._admit(conn, peer)
            self.table.expire()

    def _admit(self, conn: socket.socket, peer) -> None:
        with self._lock:
            full = len(self._active) >= self.connections_max
            if not full:
                self._active.add(conn)
        if full:
            self.refused += 1
            log.warning("cold read from %s refused: %d data connections busy", _peer(peer),
                        self.connections_max)
            conn.close()
            return
        threading.Thread(target=self._serve_one, args=(conn, peer), name="cold-read",
                         daemon=True).start()

    # -- one connection ---------------------------------------------------------------------------

    def _serve_one(self, conn: socket.socket, peer) -> None:
        grant = None
        try:
            token = self._read_token(conn)
            grant = self.table.take(token) if token is not None else None
            if grant is None:
                self.refused += 1
                log.warning("cold read from %s refused: %s", _peer(peer),
                            "no whole token in time" if token is None
                            else "unknown, used or expired token")
                return
            self._send(conn, grant)
            self.sent += 1
        except OSError as exc:
            self.failed += 1
            log.warning("cold read to %s cut: %s", _peer(peer), exc)
        finally:
            if grant is not None:
                os.close(grant.fd)
            with self._lock:
                self._active.discard(conn)
            conn.close()

    def _read_token(self, conn: socket.socket) -> bytes | None:
        deadline = time.monotonic() + self.token_wait_s
        buf = bytearray(COLD_TOKEN_BYTES)
        view, got = memoryview(buf), 0
        while got < COLD_TOKEN_BYTES:  # bounded by the deadline
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.is_set():
                return None
            conn.settimeout(left)
            try:
                n = conn.recv_into(view[got:])
            except (socket.timeout, BlockingIOError):
                return None
            if n == 0:
                return None
            got += n
        return bytes(buf)

    def _send(self, conn: socket.socket, grant: Grant) -> None:
        """``os.sendfile`` the granted range; blocking, with SO_SNDTIMEO so that a call that
        makes no progress returns (EAGAIN) instead of hanging the thread."""
        conn.settimeout(None)
        stall = self.send_stall_ms
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", stall // 1000, (stall % 1000) * 1000))
        deadline = time.monotonic() + self.transfer_s_max
        position, left = grant.file_position, grant.length
        while left > 0:  # bounded: each call sends > 0 bytes or raises; and the deadline
            if self._stop.is_set() or time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, "transfer took too long or the router stops")
            try:
                n = os.sendfile(conn.fileno(), grant.fd, position,
                                min(left, _SENDFILE_CHUNK_BYTES))
            except BlockingIOError:
                raise OSError(errno.ETIMEDOUT, f"no progress for {stall} ms") from None
            if n == 0:
                raise OSError(errno.EIO, f"segment ends {left} bytes before the granted range")
            position += n
            left -= n
            self.bytes_sent += n

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting, cut transfers in progress, drop outstanding grants."""
        self._stop.set()
        self._thread.join(timeout=2 * _ACCEPT_POLL_MS / 1000.0 + 1.0)
        self.listener.close()
        with self._lock:
            active = list(self._active)
        for conn in active:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # a blocked sendfile returns at once
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        while self._active and time.monotonic() < deadline:  # bounded: 2 s
            time.sleep(0.01)
        self.table.close()


def _peer(peer) -> str:
    try:
        return f"{peer[0]}:{peer[1]}"
    except (TypeError, IndexError):
        return repr(peer)


class ColdReads:
    """What the router's fetch path uses: the hot/cold switch, the grants, the listener.

    ``hot_window_bytes``: a fetch (that allows cold reads) from an offset more than this many
    bytes of log behind the published end gets a grant instead of the bytes.
    """

    def __init__(self, host: str, hot_window_bytes: int, table: GrantTable | None = None,
                 **server_limits):
        assert hot_window_bytes >= 0
        self.hot_window_bytes = hot_window_bytes
        self.table = table if table is not None else GrantTable()  # an empty one is falsy
        self.server = ColdReadServer(host, self.table, **server_limits)
        self.host, self.port = self.server.endpoint

    def is_cold(self, reader: LogReader, state, segment_base: int, position: int,
                size_of: Callable[[int], int]) -> bool:
        limit = self.hot_window_bytes
        return bytes_behind(reader.segment_bases, state.active_segment_base_offset,
                            state.active_segment_end_position, segment_base, position,
                            size_of, limit) > limit

    def grant(self, reader: LogReader, state, offset: int, bytes_max: int, topic: str,
              partition: int) -> list | None:
        """The reply's grant row without its index: [token, host, port, segment_base_offset,
        file_position, length, first_offset, last_offset]; None: serve it hot (nothing to
        grant, the segment just went, or grants_max outstanding)."""
        grant = plan_grant(reader, state, offset, bytes_max, topic, partition)
        if grant is None:
            return None
        token = self.table.issue(grant)
        if token is None:
            os.close(grant.fd)
            return None
        return [token, self.host, self.port, grant.segment_base_offset, grant.file_position,
                grant.length, grant.first_offset, grant.last_offset]

    def close(self) -> None:
        self.server.close()
