"""RequestBuffer: one Kafka connection's received bytes, cut into request frames in place.

Kafka frames a request as ``[INT32 size][size bytes]``. The listener receives straight into
this buffer (``recv_into``: the kernel's copy) and hands each whole frame to its handler as
a memoryview of it, so a frame's bytes are not copied on their way to the handler::

    buf:  [ handled frames ....... | frame | frame | frame in prog|          room          ]
          0                        start                        end                len(buf)

The frame in progress must fit between ``start`` and the buffer's end; when its size says it
does not, its bytes so far move to the front (``memmove``) or into a bigger buffer, once.
A frame of ``RECV_BYTES`` or more is received up to its own end only, so the frame after it
starts in an empty buffer (``start = end = 0``) and a stream of big produce requests is never
moved. ``moved_bytes`` counts what was moved (tests and benchmarks look at it).

The handler's view is valid only until it returns: the region is received into again
afterwards, so a handler copies what it keeps (``Produce.submit`` writes a batch to the
ring from the view, unchanged, or copies it when it must wait; the decoders make
``bytes``/``str`` of the rest). A view that outlives its frame
stops the listener at the next reuse of the region (an assertion: a bytearray with a live
view cannot change size, which is checked before the region is written over).

Owned by the kafka process's main thread; not thread-safe.
"""
from __future__ import annotations

import socket
import struct

#: Largest request frame (Kafka's socket.request.max.bytes is 100 MiB; a produce request
#: carries at most one 16 MiB batch per partition here, and clients default to 1 MiB).
KAFKA_REQUEST_BYTES_MAX = 32 << 20
#: Smallest request frame: api key, version and correlation id.
KAFKA_REQUEST_BYTES_MIN = 8
#: Bytes received from one socket per wake-up.
KAFKA_RECV_BYTES = 256 << 10
#: A buffer starts this big and grows (doubling) while its connection is busy, up to
#: KAFKA_RECV_BYTES, or to the size of a bigger frame in progress; once empty, one above
#: KAFKA_RECV_BUFFER_BYTES_KEPT is given back, so idle connections hold little memory.
KAFKA_RECV_BUFFER_BYTES_MIN = 64 << 10
KAFKA_RECV_BUFFER_BYTES_KEPT = 4 << 20

_SIZE = struct.Struct(">i")


def unshared(buf: bytearray) -> bool:
    """True when no memoryview of ``buf`` is alive: a bytearray with one cannot change size.
    (The append reallocates only the first time: a new bytearray has no spare byte.)"""
    try:
        buf.append(0)
    except BufferError:
        return False
    del buf[-1]
    return True


class RequestBuffer:
    """See the module doc. ``len()`` is the bytes buffered and not yet handed out."""

    __slots__ = ("buf", "start", "end", "moved_bytes")

    def __init__(self) -> None:
        self.buf = bytearray(KAFKA_RECV_BUFFER_BYTES_MIN)
        self.start = self.end = 0
        self.moved_bytes = 0

    def __len__(self) -> int:
        return self.end - self.start

    def frame_size(self) -> int | None:
        """The size field of the frame at ``start`` (unchecked), or None before 4 bytes."""
        if self.end - self.start < 4:
            return None
        return _SIZE.unpack_from(self.buf, self.start)[0]

    def take(self, size: int) -> memoryview | None:
        """The frame at ``start`` (``size``: its checked size field) as a view, consumed; None
        while it is not whole. The caller releases the view when its handler returns."""
        start = self.start
        if self.end - start < 4 + size:
            return None
        self.start = start + 4 + size
        return memoryview(self.buf)[start + 4:start + 4 + size]

    def receive(self, sock: socket.socket) -> int | None:
        """One ``recv_into`` of at most ``room()`` bytes: how many came (0: the peer closed);
        None when there is no room (``room()``). OSError, BlockingIOError as the socket's."""
        room = self.room()
        if room == 0:
            return None
        view = memoryview(self.buf)[self.end:self.end + room]
        try:
            received = sock.recv_into(view)
        finally:
            view.release()
        self.end += received
        return received

    def room(self) -> int:
        """Bytes the next receive may take, after making room for the frame in progress
        (see the module doc); 0 when whole frames wait to be taken and the buffer is full,
        or when the size field is out of bounds (the caller refuses that frame)."""
        buf, start, end = self.buf, self.start, self.end
        if start == end:
            # Nothing buffered: the next frame starts at 0, over the bytes of frames handed
            # out already, so no view of them may be left.
            assert unshared(buf), "a memoryview of a handled request frame outlived it"
            if len(buf) > KAFKA_RECV_BUFFER_BYTES_KEPT:
                self.buf = buf = bytearray(KAFKA_RECV_BUFFER_BYTES_MIN)
            self.start = self.end = start = end = 0
        held = end - start
        need = 4
        if held >= 4:
            need = 4 + _SIZE.unpack_from(buf, start)[0]
            if not KAFKA_REQUEST_BYTES_MIN + 4 <= need <= KAFKA_REQUEST_BYTES_MAX + 4:
                return 0
        if need <= held:
            return min(len(buf) - end, KAFKA_RECV_BYTES)  # whole frames wait (in-flight)
        if start + need > len(buf):
            if need > len(buf) or len(buf) < KAFKA_RECV_BYTES:  # a busy connection grows
                grown = bytearray(min(max(need, 2 * len(buf)), KAFKA_REQUEST_BYTES_MAX + 4))
                grown[:held] = memoryview(buf)[start:end]
                self.buf = buf = grown
            else:
                assert unshared(buf), "a memoryview of a handled request frame outlived it"
                with memoryview(buf) as whole:
                    whole[:held] = whole[start:end]  # memmove: the ranges may overlap
            self.moved_bytes += held
            self.start, self.end = start, end = 0, held
        if need >= KAFKA_RECV_BYTES:
            return min(start + need - end, KAFKA_RECV_BYTES)
        return min(len(buf) - end, KAFKA_RECV_BYTES)
