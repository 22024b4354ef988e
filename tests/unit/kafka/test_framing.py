"""RequestBuffer: request frames cut in place out of the received bytes, moved at most once."""
from __future__ import annotations

import random
import socket
import struct
import threading

import pytest

from shmbroker.kafka import framing
from shmbroker.kafka.framing import RequestBuffer

pytestmark = pytest.mark.timeout(60)


def framed(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def receive_frames(stream: bytes, count: int, pieces: list[int]) -> tuple[list[bytes], RequestBuffer]:
    """Write ``stream`` in pieces of the given sizes (cycled) from a thread; receive and take
    ``count`` frames as the listener does; their bytes, and the buffer."""
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        b.settimeout(30)

        def write() -> None:
            at, i = 0, 0
            while at < len(stream):  # bounded: each step sends at least one byte
                n = pieces[i % len(pieces)]
                a.sendall(stream[at:at + n])
                at, i = at + n, i + 1

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        buf, got = RequestBuffer(), []
        while len(got) < count:  # bounded: every receive brings bytes or fails
            assert buf.receive(b) not in (0, None)
            while (size := buf.frame_size()) is not None:  # bounded by the frames received
                frame = buf.take(size)
                if frame is None:
                    break
                got.append(bytes(frame))
                frame.release()
        writer.join(10)
    return got, buf


def test_frames_split_anywhere_come_out_whole_and_in_order():
    rng = random.Random(3)
    payloads = [rng.randbytes(rng.choice([8, 9, 100, 4_000, 70_000, 300_000, 700_000]))
                for _ in range(120)]
    got, buf = receive_frames(b"".join(map(framed, payloads)), len(payloads),
                              [1, 2, 3, 4, 5, 7, 4096, 65_536, 300_000, 13])
    assert got == payloads
    assert len(buf) == 0


def test_a_stream_of_big_frames_moves_only_the_first_frames_head():
    payloads = [bytes([i]) * (1 << 20) for i in range(24)]
    got, buf = receive_frames(b"".join(map(framed, payloads)), len(payloads), [1 << 22])
    assert got == payloads
    # The first frame's head was received into the 64 KiB start buffer and moved into a big
    # enough one; every later big frame was received from the front of an empty buffer.
    assert buf.moved_bytes <= framing.KAFKA_RECV_BUFFER_BYTES_MIN
    assert len(buf.buf) >= (1 << 20) + 4


def test_of_many_small_frames_only_those_straddling_the_buffers_end_are_moved():
    rng = random.Random(4)
    payloads = [rng.randbytes(rng.randrange(8, 20_000)) for _ in range(400)]
    stream = b"".join(map(framed, payloads))
    got, buf = receive_frames(stream, len(payloads), [5_000, 1, 9_999, 70_000])
    assert got == payloads
    # A frame moves when it straddles the end (once: it then lies at the front of a buffer
    # that holds it); here about 3.5% of the bytes.
    assert 0 < buf.moved_bytes < len(stream) // 10


def test_whole_frames_left_waiting_stop_the_receiving_once_the_buffer_is_full():
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        a.setblocking(False)
        try:
            while True:  # bounded: the socket buffers fill
                a.send(framed(b"x" * 1000))
        except BlockingIOError:
            pass
        buf = RequestBuffer()
        received = 0
        for _ in range(10_000):  # bounded: the buffer fills without frames taken
            n = buf.receive(b)
            if n is None:
                break
            received += n
        assert buf.receive(b) is None  # full of whole frames: no room, no growth
        assert len(buf.buf) <= framing.KAFKA_RECV_BYTES and received == len(buf)


def test_a_size_field_out_of_bounds_leaves_no_room():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">i", framing.KAFKA_REQUEST_BYTES_MAX + 1) + b"abcd")
        buf = RequestBuffer()
        assert buf.receive(b) == 8
        assert buf.frame_size() == framing.KAFKA_REQUEST_BYTES_MAX + 1
        assert buf.room() == 0  # the listener refuses the frame and closes the connection


def test_a_view_kept_past_its_frame_stops_the_next_reuse_of_its_bytes():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(framed(b"first frame"))
        buf = RequestBuffer()
        buf.receive(b)
        kept = buf.take(buf.frame_size())
        assert bytes(kept) == b"first frame"
        with pytest.raises(AssertionError, match="outlived"):
            buf.room()  # the next receive would write over the kept bytes
        kept.release()
        assert buf.room() > 0
