"""Kafka's classic primitive encodings (big-endian ints, INT16-length strings, INT32-length
bytes and arrays; docs/design/kafka.md, "Framing").

``Reader`` decodes one request body and raises ``MalformedRequest`` on anything short, negative
where it must not be, or larger than what is left of the frame: every length is checked
against the bytes actually present, so an absurd length costs nothing. ``Writer`` builds a
response in one bytearray. Owned by the kafka process's loop; not thread-safe.
"""
from __future__ import annotations

import struct

from .. import errors

_I8, _I16, _I32, _I64 = (struct.Struct(f) for f in (">b", ">h", ">i", ">q"))
#: Elements of one array in a request; Kafka's own bound is the frame size, ours is tighter
#: so a 4-byte count cannot make a loop of two billion steps even over empty elements.
ARRAY_ITEMS_MAX = 100_000


#: The codec's name for errors.MalformedKafkaRequestError.
MalformedRequest = errors.MalformedKafkaRequestError


class Reader:
    """Cursor over one request body (a memoryview of the frame, not copied)."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview, pos: int = 0):
        self.buf = buf
        self.pos = pos

    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise MalformedRequest(f"request truncated: {n} bytes wanted at {self.pos}, the "
                                   f"frame has {len(self.buf)}")
        view = self.buf[self.pos:end]
        self.pos = end
        return view

    def int8(self) -> int:
        return _I8.unpack(self._take(1))[0]

    def int16(self) -> int:
        return _I16.unpack(self._take(2))[0]

    def int32(self) -> int:
        return _I32.unpack(self._take(4))[0]

    def int64(self) -> int:
        return _I64.unpack(self._take(8))[0]

    def boolean(self) -> bool:
        return self._take(1)[0] != 0

    def nullable_string(self) -> str | None:
        n = self.int16()
        if n == -1:
            return None
        if n < 0:
            raise MalformedRequest(f"string length {n}")
        try:
            return str(self._take(n), "utf-8")
        except UnicodeDecodeError:
            raise MalformedRequest("string is not UTF-8") from None

    def string(self) -> str:
        value = self.nullable_string()
        if value is None:
            raise MalformedRequest("null where a string is required")
        return value

    def nullable_bytes(self) -> memoryview | None:
        n = self.int32()
        if n == -1:
            return None
        if n < 0:
            raise MalformedRequest(f"bytes length {n}")
        return self._take(n)

    def array_count(self, nullable: bool = False) -> int:
        """Element count; -1 (null) only where ``nullable``. Bounded by ARRAY_ITEMS_MAX and by
        the bytes left (every element takes at least one byte)."""
        n = self.int32()
        if n == -1 and nullable:
            return -1
        if n < 0 or n > ARRAY_ITEMS_MAX or n > len(self.buf) - self.pos:
            raise MalformedRequest(f"array of {n} elements in {len(self.buf) - self.pos} bytes")
        return n

    def int32_array(self) -> list[int]:
        return [self.int32() for _ in range(self.array_count())]


class Writer:
    """A response body under construction."""

    __slots__ = ("buf",)

    def __init__(self):
        self.buf = bytearray()

    def int8(self, v: int) -> "Writer":
        self.buf += _I8.pack(v)
        return self

    def int16(self, v: int) -> "Writer":
        self.buf += _I16.pack(v)
        return self

    def int32(self, v: int) -> "Writer":
        self.buf += _I32.pack(v)
        return self

    def int64(self, v: int) -> "Writer":
        self.buf += _I64.pack(v)
        return self

    def boolean(self, v: bool) -> "Writer":
        self.buf.append(1 if v else 0)
        return self

    def string(self, v: str | None) -> "Writer":
        if v is None:
            return self.int16(-1)
        data = v.encode()
        self.int16(len(data))
        self.buf += data
        return self

    def bytes_(self, v) -> "Writer":
        if v is None:
            return self.int32(-1)
        self.int32(len(v))
        self.buf += v
        return self

    def array(self, items, each) -> "Writer":
        """``each(writer, item)`` per item; ``items`` None writes a null array."""
        if items is None:
            return self.int32(-1)
        self.int32(len(items))
        for item in items:  # bounded by the items
            each(self, item)
        return self
