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
from typing import NamedTuple

from .. import errors
from ..config import BATCH_BYTES_MAX_LIMIT

#: Bytes of a token (the router's router/cold_read.py COLD_TOKEN_BYTES; on the wire).
TOKEN_BYTES = 32
#: Connecting to the data endpoint gives up after this.
COLD_CONNECT_TIMEOUT_MS = 5_000
#: A receive that gets nothing for this long gives up (the router stops a stalled send after
#: 10 s on its side).
COLD_RECV_STALL_MS = 15_000


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


def receive(grant: ColdGrant, connect_timeout_ms: int = COLD_CONNECT_TIMEOUT_MS,
            stall_ms: int = COLD_RECV_STALL_MS) -> bytearray:
    """The granted bytes, all of them; ColdReadError otherwise (nothing partial is returned)."""
    where = f"{grant.host}:{grant.port}"
    try:
        sock = socket.create_connection((grant.host, grant.port), connect_timeout_ms / 1000.0)
    except OSError as exc:
        raise errors.ColdReadError(f"cold read: cannot connect to {where}: {exc}") from None
    try:
        sock.settimeout(stall_ms / 1000.0)
        buf = bytearray(grant.length)
        view, got = memoryview(buf), 0
        try:
            sock.sendall(grant.token)
            while got < grant.length:  # bounded: each round gets > 0 bytes, or raises
                n = sock.recv_into(view[got:])
                if n == 0:
                    break
                got += n
        except OSError as exc:  # socket.timeout included
            raise errors.ColdReadError(
                f"cold read from {where}: {got} of {grant.length} bytes, then {exc}") from None
        finally:
            view.release()
        if got == 0:
            raise errors.ColdReadError(
                f"cold read from {where}: closed with nothing sent (token refused: expired, "
                f"used already, or too many data connections)")
        if got < grant.length:
            raise errors.ColdReadError(
                f"cold read from {where}: cut after {got} of {grant.length} bytes")
        return buf
    finally:
        sock.close()


def _bad(message: str) -> errors.InvalidRequestError:
    return errors.InvalidRequestError(f"fetch reply: {message}")
