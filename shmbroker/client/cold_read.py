"""The remote consumer's side of a cold read (docs/protocol.md, "Cold reads"): a fetch reply
granted a partition's bytes on a data connection instead of carrying them; this module
connects, sends the token and receives exactly the granted bytes (whole RecordBatch v2
batches, decoded and CRC-checked by the caller as a hot fetch's frame is).

    connect(host, port) -> send token (32 bytes) -> receive `length` bytes -> close

The router closes the connection without sending anything when the token is wrong, used or
expired: that and a transfer cut short are ColdReadError (retriable): the caller fetches
again from the same position, so no record is ever skipped. Owned by one thread.
"""
from __future__ import annotations

import socket
import struct
from typing import Callable, NamedTuple

from .. import errors
from ..config import BATCH_BYTES_MAX_LIMIT
from ..layout import record_batch as layout

#: Bytes of a token (the router's router/cold_read.py COLD_TOKEN_BYTES; on the wire).
TOKEN_BYTES = 32
#: Connecting to the data endpoint gives up after this.
COLD_CONNECT_TIMEOUT_MS = 5_000
#: A receive that gets nothing for this long gives up (the router stops a stalled send after
#: 10 s on its side).
COLD_RECV_STALL_MS = 15_000
_HEAD = struct.Struct(">qi")  # base_offset, batch_length
_LOG_OVERHEAD = layout.LOG_OVERHEAD
_BATCH_LENGTH_MIN = layout.BATCH_LENGTH_MIN


class ColdGrant(NamedTuple):
    """One row of a fetch reply's ``cold_reads`` (docs/protocol.md)."""

    index: int
    token: bytes
    host: str
    port: int
    segment_base_offset: int
    file_position: int
    length: int
    first_offset: int
    last_offset: int


def parse_grants(rows, partitions: int, cold_bytes_max: int) -> dict[int, ColdGrant]:
    """{partition index: grant}; a row that does not check is InvalidRequestError (the reply
    is not what the document says), never a guess."""
    out: dict[int, ColdGrant] = {}
    if not isinstance(rows, list):
        raise _bad(f"cold_reads is a {type(rows).__name__}, not an array")
    # The router may exceed cold_bytes_max by a single larger batch (it never cuts one).
    length_max = max(cold_bytes_max, BATCH_BYTES_MAX_LIMIT)
    for row in rows:  # bounded by the reply's partitions
        if not isinstance(row, list) or len(row) != len(ColdGrant._fields):
            raise _bad(f"cold_reads row {row!r:.200} is not {len(ColdGrant._fields)} fields")
        grant = ColdGrant(*row)
        ints = (grant.index, grant.port, grant.segment_base_offset, grant.file_position,
                grant.length, grant.first_offset, grant.last_offset)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in ints) or \
                not isinstance(grant.token, bytes) or len(grant.token) != TOKEN_BYTES or \
                not isinstance(grant.host, str) or not 0 <= grant.index < partitions or \
                grant.index in out or not 0 < grant.length <= length_max or \
                grant.last_offset < grant.first_offset:
            raise _bad(f"cold_reads row {row!r:.200} does not check")
        out[grant.index] = grant
    return out


class ColdReader:
    """Receives grants into one buffer, reused (grown to the largest grant): a fresh 16 MiB
    buffer per grant cost more in page faults than the transfer itself (perf/RESULTS.md).
    Owned by one consumer."""

    def __init__(self, connect_timeout_ms: int = COLD_CONNECT_TIMEOUT_MS,
                 stall_ms: int = COLD_RECV_STALL_MS):
        self.connect_timeout_s = connect_timeout_ms / 1000.0
        self.stall_s = stall_ms / 1000.0
        self._buf = bytearray()

    def read(self, grant: ColdGrant, deliver: Callable[[memoryview], None]) -> None:
        """Receive the grant's bytes and pass them to ``deliver`` as they come, whole batches
        at a time (decoding overlaps the rest of the transfer). Every granted byte is
        delivered, or ColdReadError is raised after the whole batches that did come (they are
        valid: the caller may keep them; nothing after them was delivered)."""
        where = f"{grant.host}:{grant.port}"
        try:
            sock = socket.create_connection((grant.host, grant.port), self.connect_timeout_s)
        except OSError as exc:
            raise errors.ColdReadError(f"cold read: cannot connect to {where}: {exc}") from None
        try:
            self._receive(sock, grant, where, deliver)
        finally:
            sock.close()

    def _receive(self, sock: socket.socket, grant: ColdGrant, where: str,
                 deliver: Callable[[memoryview], None]) -> None:
        length = grant.length
        if len(self._buf) < length:
            self._buf = bytearray(length)
        view = memoryview(self._buf)
        got = done = 0
        sock.settimeout(self.stall_s)
        try:
            sock.sendall(grant.token)
            while got < length:  # bounded: each round gets > 0 bytes, or ends
                n = sock.recv_into(view[got:length])
                if n == 0:
                    break
                got += n
                end = whole_batches_end(view, done, got)
                if end > done:
                    deliver(view[done:end])
                    done = end
        except OSError as exc:  # socket.timeout included
            raise errors.ColdReadError(
                f"cold read from {where}: {got} of {length} bytes, then {exc}") from None
        if got == 0:
            raise errors.ColdReadError(
                f"cold read from {where}: closed with nothing sent (token refused: expired, "
                f"used already, or too many data connections)")
        if got < length:
            raise errors.ColdReadError(f"cold read from {where}: cut after {got} of {length} "
                                       f"bytes")
        if done < length:
            deliver(view[done:length])  # not whole batches: the decoder says what is wrong

    def close(self) -> None:
        self._buf = bytearray()


def whole_batches_end(view: memoryview, position: int, end: int) -> int:
    """Where the whole RecordBatch v2 batches from ``position`` stop within ``end``, by their
    batch_length fields (a length that cannot be stops the walk; the decoder checks the rest)."""
    while position + _HEAD.size <= end:  # bounded: moves forward by >= one header each round
        batch_length = _HEAD.unpack_from(view, position)[1]
        size = _LOG_OVERHEAD + batch_length
        if batch_length < _BATCH_LENGTH_MIN or position + size > end:
            break
        position += size
    return position


def _bad(message: str) -> errors.InvalidRequestError:
    return errors.InvalidRequestError(f"fetch reply: {message}")
