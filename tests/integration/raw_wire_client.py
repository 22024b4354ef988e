"""A remote client written from docs/protocol.md alone: pyzmq, msgpack and the standard
library, no shmbroker import (tests/integration/test_remote_data.py checks that). If this
client and the broker disagree, the document is wrong or the broker is.

Pure Python and slow on purpose: it is the document's reading, not a product.
"""
from __future__ import annotations

import itertools
import socket
import struct
import time

import msgpack
import zmq

# -- CRC-32C (Castagnoli, reflected polynomial 0x82F63B78 = 0x1EDC6F41 reversed) --------------

_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- varints (zigzag) ---------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        if z < 0x80:
            out.append(z)
            return bytes(out)
        out.append((z & 0x7F) | 0x80)
        z >>= 7


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = z = 0
    for _ in range(10):
        byte = buf[pos]
        pos += 1
        z |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (z >> 1) ^ -(z & 1), pos
        shift += 7
    raise ValueError("varint too long")


# -- RecordBatch v2 -----------------------------------------------------------------------------

_HEADER = struct.Struct(">qiibIhiqqqhii")


def encode_batch(values: list[bytes], keys: list | None = None, timestamp_ms: int | None = None) -> bytes:
    """One batch as the document says a produce must send it."""
    timestamp_ms = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    body = bytearray()
    for i, value in enumerate(values):
        key = None if keys is None else keys[i]
        rec = bytearray(b"\x00")  # attributes
        rec += _varint(0)         # timestamp delta
        rec += _varint(i)         # offset delta
        rec += _varint(-1) if key is None else _varint(len(key)) + key
        rec += _varint(-1) if value is None else _varint(len(value)) + value
        rec += _varint(0)         # no headers
        body += _varint(len(rec)) + rec
    after_crc = struct.pack(">hiqqqhii", 0, len(values) - 1, timestamp_ms, timestamp_ms,
                            -1, -1, -1, len(values)) + bytes(body)
    batch_length = 4 + 1 + 4 + len(after_crc)  # leader epoch, magic, crc, rest
    return struct.pack(">qiibI", 0, batch_length, -1, 2, crc32c(after_crc)) + after_crc


def decode_batches(data: bytes) -> list[tuple[int, bytes | None, bytes | None]]:
    """(offset, key, value) of every record in whole batches, checking each CRC."""
    out, pos = [], 0
    while pos < len(data):
        (base_offset, batch_length, _epoch, magic, crc, _attrs, _last_delta, _base_ts, _max_ts,
         _pid, _pepoch, _seq, count) = _HEADER.unpack_from(data, pos)
        end = pos + 12 + batch_length
        assert magic == 2, magic
        assert crc32c(data[pos + 21:end]) == crc, "CRC mismatch"
        rpos = pos + 61
        for _ in range(count):
            length, rpos = _read_varint(data, rpos)
            rec_end = rpos + length
            rpos += 1  # attributes
            _, rpos = _read_varint(data, rpos)  # timestamp delta
            delta, rpos = _read_varint(data, rpos)
            klen, rpos = _read_varint(data, rpos)
            key = None if klen < 0 else data[rpos:rpos + klen]
            rpos += max(klen, 0)
            vlen, rpos = _read_varint(data, rpos)
            value = None if vlen < 0 else data[rpos:rpos + vlen]
            out.append((base_offset + delta, key, value))
            rpos = rec_end
        pos = end
    return out


# -- the connection -----------------------------------------------------------------------------

class RawClient:
    """One DEALER; requests one at a time or pipelined; replies matched by id."""

    def __init__(self, address: str, timeout_ms: int = 10_000):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.timeout_ms = timeout_ms
        self._ids = itertools.count(1)

    def send(self, fields: dict, *extra: bytes) -> int:
        request_id = next(self._ids)
        header = msgpack.packb({"v": 1, "id": request_id, **fields}, use_bin_type=True)
        self.sock.send_multipart([header, *extra])
        return request_id

    def recv(self) -> tuple[dict, list[bytes]]:
        assert self.sock.poll(self.timeout_ms), "no reply"
        frames = self.sock.recv_multipart()
        return msgpack.unpackb(frames[0], raw=False), frames[1:]

    def call(self, fields: dict, *extra: bytes) -> tuple[dict, list[bytes]]:
        request_id = self.send(fields, *extra)
        reply, data = self.recv()
        assert reply["id"] == request_id, (reply, request_id)
        return reply, data

    def partitions(self, topic: str) -> int:
        reply, _ = self.call({"type": "describe_topic", "name": topic})
        assert reply["ok"], reply
        return reply["result"]["partitions"]

    def produce(self, topic: str, partition: int, values: list[bytes], acks: int = 1) -> dict:
        reply, _ = self.call({"type": "produce", "topic": topic, "partition": partition,
                              "acks": acks}, encode_batch(values))
        return reply

    def fetch(self, topic: str, partition: int, offset: int, max_wait_ms: int = 0,
              min_bytes: int = 1) -> tuple[list, list]:
        """(row, records at or after ``offset``)."""
        reply, frames = self.call({"type": "fetch", "max_wait_ms": max_wait_ms,
                                   "min_bytes": min_bytes, "max_bytes": 1 << 20,
                                   "partitions": [[topic, partition, offset, 1 << 20]]})
        assert reply["ok"], reply
        row = reply["result"]["partitions"][0]
        assert len(frames) == 1 and len(frames[0]) == row[6], (row, len(frames))
        return row, [r for r in decode_batches(frames[0]) if r[0] >= offset]

    def cold_fetch(self, topic: str, partition: int, offset: int, cold_bytes_max: int
                   ) -> tuple[dict, list, list | None]:
        """A fetch that takes a cold-read grant: (result, data frames, grant row or None)."""
        reply, frames = self.call({"type": "fetch", "max_wait_ms": 0, "min_bytes": 1,
                                   "max_bytes": 1 << 20, "cold_bytes_max": cold_bytes_max,
                                   "partitions": [[topic, partition, offset, 1 << 20]]})
        assert reply["ok"], reply
        grants = reply["result"]["cold_reads"]
        assert len(grants) <= 1 and all(g[0] == 0 for g in grants), grants
        return reply["result"], frames, grants[0] if grants else None

    def close(self) -> None:
        self.sock.close(linger=0)


def cold_read(grant: list, timeout_s: float = 10.0) -> bytes:
    """The bytes of a grant ``[index, token, host, port, segment_base_offset, file_position,
    length, first_offset, last_offset]``: connect, send the token, read until the router
    closes. b"" when it refused the token."""
    _, token, host, port = grant[:4]
    out = bytearray()
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(token)
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return bytes(out)
            out += chunk
