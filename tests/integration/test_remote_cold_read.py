"""Cold reads (docs/protocol.md, "Cold reads"): a remote consumer far behind gets its bytes by
os.sendfile on a plain TCP data connection that takes only a valid, unexpired, single-use
token. Real broker processes, real segment files, real sockets on 127.0.0.1."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from broker_harness import WAIT_S_MAX, wait_for

import raw_wire_client
from raw_wire_client import RawClient, cold_read

pytestmark = pytest.mark.timeout(180)
#: Small, so a few MB of log is "far behind" and the test is quick.
HOT_WINDOW_BYTES = 256 * 1024


@pytest.fixture
def routed(make_broker):
    broker = make_broker(serve_args=("--listen", "tcp://127.0.0.1:*", "--hot-window-bytes",
                                     str(HOT_WINDOW_BYTES)))
    broker.address = broker.wait_running()["router_endpoint"]
    return broker


def create_topic(broker, name: str, **config) -> None:
    from shmbroker import Admin

    with Admin(broker=broker.address) as admin:
        admin.create_topic(name, 1, config or None)
    broker.wait_running({(name, 0)} | set(broker.partition_pids(broker.runtime())))


def value_of(i: int) -> bytes:
    return b"value-%08d-" % i + bytes([i % 251]) * (50 + i % 200)


def fill(broker, topic: str, count: int) -> int:
    """``count`` records (key k<i>, value value_of(i)) by a local producer; the log's bytes."""
    from shmbroker import Producer

    with Producer(broker=broker.data_dir, acks=1) as producer:
        for i in range(count):
            producer.send(topic, value_of(i), key=b"k%d" % i, partition=0)
        producer.flush(timeout=60)
    directory = os.path.join(broker.data_dir, f"{topic}-0")
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)
               if n.endswith(".log"))


def router_counters(broker) -> dict:
    from shmbroker.monitor.snapshot import Monitor

    snap = Monitor(broker.data_dir).sample()
    return next(p for p in snap.processes if p.role == "router").counters


def replay(address: str, topic: str, count: int, **options) -> tuple[list, object]:
    from shmbroker import Consumer

    consumer = Consumer(topic, broker=address, auto_offset_reset="earliest", **options)
    got: list = []
    deadline = time.monotonic() + WAIT_S_MAX * 2
    while len(got) < count and time.monotonic() < deadline:  # bounded by the deadline
        got += consumer.poll(timeout_ms=500)
    return got, consumer


def check_every_record(got: list, topic: str, count: int) -> None:
    assert len(got) == count, f"{len(got)} of {count} records"
    for i, record in enumerate(got):
        assert (record.topic, record.partition, record.offset) == (topic, 0, i), record
        assert record.key == b"k%d" % i and record.value == value_of(i), record.offset


def grant_for(client: RawClient, topic: str, offset: int = 0, cold_bytes_max: int = 64 * 1024):
    result, frames, grant = client.cold_fetch(topic, 0, offset, cold_bytes_max)
    assert grant is not None, result
    assert frames == [b""] and result["partitions"][0][6] == 0, "a granted row has no bytes"
    return grant


# -- the replay -----------------------------------------------------------------------------------

def test_a_log_larger_than_the_hot_window_is_replayed_from_0_through_sendfile(routed):
    create_topic(routed, "replay", segment_bytes=1 << 20)
    count = 24_000
    log_bytes = fill(routed, "replay", count)
    assert log_bytes > 10 * HOT_WINDOW_BYTES
    got, consumer = replay(routed.address, "replay", count, group="g",
                           enable_auto_commit=False, cold_read_bytes_max=512 * 1024)
    try:
        check_every_record(got, "replay", count)
        # The sendfile path carried everything but the last hot window's worth.
        assert consumer.cold_read_failures == 0
        assert consumer.cold_reads >= log_bytes // (1 << 20)
        assert log_bytes - HOT_WINDOW_BYTES <= consumer.cold_read_bytes <= log_bytes
        assert consumer.position(("replay", 0)) == count
        consumer.commit()
        assert consumer.committed(("replay", 0)) == count
        cold_reads, cold_bytes = consumer.cold_reads, consumer.cold_read_bytes
    finally:
        consumer.close()
    # The router counted what it sent (stored by its loop: a request makes it go round).
    waker = RawClient(routed.address)
    try:
        def counted():
            waker.call({"type": "list_offsets", "partitions": [["replay", 0]]})
            c = router_counters(routed)
            return c if c["cold_reads"] == cold_reads else None
        c = wait_for(counted, what="the router's cold-read counters")
        assert c["cold_bytes"] == cold_bytes and c["cold_grants"] == cold_reads
        assert c["cold_refused"] == 0
    finally:
        waker.close()
    # The same replay with cold reads off: every byte in fetch replies, the same records.
    got, consumer = replay(routed.address, "replay", count, cold_read_bytes_max=0)
    try:
        check_every_record(got, "replay", count)
        assert consumer.cold_reads == 0
    finally:
        consumer.close()


def test_a_client_written_from_the_protocol_document_does_a_cold_read(routed):
    create_topic(routed, "rawcold", segment_bytes=256 * 1024)
    count = 4_000
    log_bytes = fill(routed, "rawcold", count)
    client = RawClient(routed.address)
    try:
        got, offset, granted = [], 0, 0
        for _ in range(200):  # bounded: every read moves the offset on
            result, frames, grant = client.cold_fetch("rawcold", 0, offset, 64 * 1024)
            row = result["partitions"][0]
            assert row[2] == 0 and row[3] == count, row
            if grant is not None:
                _, token, host, port, base, position, length, first, last = grant
                assert len(token) == 32 and host == "127.0.0.1" and 0 < length
                assert row[5] == first <= offset <= last < count and row[6] == 0
                data = cold_read(grant)
                assert len(data) == length, "every granted byte, then the router closes"
                granted += length
            else:
                data = frames[0]
            recs = [r for r in raw_wire_client.decode_batches(data) if r[0] >= offset]
            if not recs:
                break
            got.extend(recs)
            offset = recs[-1][0] + 1
        assert [r[0] for r in got] == list(range(count))
        assert [(r[1], r[2]) for r in got] == [(b"k%d" % i, value_of(i)) for i in range(count)]
        assert granted >= log_bytes - HOT_WINDOW_BYTES
        # Within the hot window there is no grant: the bytes come in the reply.
        result, frames, grant = client.cold_fetch("rawcold", 0, count - 1, 64 * 1024)
        assert grant is None and result["cold_reads"] == [] and len(frames[0]) > 0
        # A client that does not ask (no cold_bytes_max) never gets a grant.
        row, recs = client.fetch("rawcold", 0, 0)
        assert recs and recs[0][0] == 0
    finally:
        client.close()


# -- the token -----------------------------------------------------------------------------------

def _closed_with_nothing(sock: socket.socket, within_s: float) -> bool:
    """Whether the router closes ``sock`` within ``within_s`` without sending a byte."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True  # closed with our bytes unread: a reset, still nothing sent
    except socket.timeout:
        return False


def test_a_wrong_token_is_closed_with_nothing_sent_and_a_token_works_once(routed):
    create_topic(routed, "tok")
    fill(routed, "tok", 5_000)
    client = RawClient(routed.address)
    try:
        grant = grant_for(client, "tok")
        host, port, length = grant[2], grant[3], grant[6]
        token = grant[1]
        for wrong in (bytes(b ^ 0x5A for b in token),              # all wrong
                      token[:8] + bytes(b ^ 1 for b in token[8:]),  # right grant, wrong secret
                      bytes(32)):
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.sendall(wrong)
                assert _closed_with_nothing(sock, 1.0), wrong
        # The real token still works (a wrong guess does not burn it) ...
        assert len(cold_read(grant)) == length
        # ... once.
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(token)
            assert _closed_with_nothing(sock, 1.0), "a used token was served again"
    finally:
        client.close()


def test_garbage_short_and_silent_data_connections_are_closed_and_hot_fetches_go_on(routed):
    """Eight data connections that never finish their token fill the router's data slots;
    a ninth is closed at once; each of the eight is closed after the token wait (2 s); a
    hot client is served promptly all the while."""
    create_topic(routed, "busy")
    fill(routed, "busy", 5_000)
    client = RawClient(routed.address)
    hot = RawClient(routed.address)
    held: list[socket.socket] = []
    try:
        grant = grant_for(client, "busy")
        host, port = grant[2], grant[3]
        with socket.create_connection((host, port), timeout=5) as sock:  # garbage
            sock.sendall(os.urandom(4_096))
            assert _closed_with_nothing(sock, 1.0)
        time.sleep(0.2)  # its slot is given back
        opened_at = time.monotonic()
        for i in range(8):  # short tokens and silence
            sock = socket.create_connection((host, port), timeout=5)
            if i % 2:
                sock.sendall(grant[1][:10])
            held.append(sock)
        time.sleep(0.2)  # all eight accepted
        with socket.create_connection((host, port), timeout=5) as ninth:
            # Closed well before the 2 s a silent connection is given: refused for room.
            assert _closed_with_nothing(ninth, 1.0), "a ninth connection was not refused"
        # Meanwhile the router's loop serves others at once.
        for i in range(20):
            start = time.monotonic()
            reply, frames = hot.call({"type": "fetch", "max_wait_ms": 0, "min_bytes": 1,
                                      "max_bytes": 4_096,
                                      "partitions": [["busy", 0, i * 100, 4_096]]})
            assert reply["ok"] and len(frames[0]) > 0 and time.monotonic() - start < 0.5
        assert hot.produce("busy", 0, [b"still served"])["ok"]
        assert time.monotonic() - opened_at < 1.9, "too slow to see the token wait"
        for sock in held:  # each closed once its 2 s token wait is over
            assert _closed_with_nothing(sock, max(0.1, opened_at + 4.0 - time.monotonic()))
        assert 1.9 < time.monotonic() - opened_at < 4.0
        # The refused ninth did not burn the grant: the slots are free again and it works.
        assert len(cold_read(grant)) == grant[6]
    finally:
        for sock in held:
            sock.close()
        client.close()
        hot.close()


def test_a_consumer_whose_cold_read_is_refused_fetches_again_and_skips_nothing(routed):
    """With every data slot taken, the consumer's cold reads are refused: it counts a failure,
    fetches the same position again (bytes in the reply) and goes on; once the slots free up,
    its cold reads work. No record is skipped or doubled."""
    create_topic(routed, "refused", segment_bytes=1 << 20)
    count = 12_000
    fill(routed, "refused", count)
    client = RawClient(routed.address)
    held = []
    try:
        grant = grant_for(client, "refused")
        for _ in range(8):
            held.append(socket.create_connection((grant[2], grant[3]), timeout=5))
        time.sleep(0.2)
        from shmbroker import Consumer

        # Small hot fetches, so the log is far from read when the slots free up.
        consumer = Consumer("refused", broker=routed.address, auto_offset_reset="earliest",
                            fetch_max_bytes=16 * 1024, cold_read_bytes_max=256 * 1024)
        try:
            got: list = []
            deadline = time.monotonic() + WAIT_S_MAX
            while not consumer.cold_read_failures and time.monotonic() < deadline:
                got += consumer.poll(timeout_ms=100)  # bounded by the deadline
            assert consumer.cold_read_failures and consumer.cold_reads == 0
            for sock in held:
                sock.close()  # the router frees their slots at once (an empty token)
            time.sleep(0.3)
            while len(got) < count and time.monotonic() < deadline:
                got += consumer.poll(timeout_ms=500)  # bounded by the deadline
            check_every_record(got, "refused", count)
            assert consumer.cold_reads >= 1
        finally:
            consumer.close()
    finally:
        for sock in held:
            sock.close()
        client.close()


# -- the data listener in-process (short expiry, files changed under a grant) ---------------------

@pytest.fixture
def cold_server(tmp_path):
    """A real PartitionLog of ~200 KB in 3 segments and a ColdReads listener on 127.0.0.1 with
    a 300 ms grant expiry."""
    from shmbroker import records
    from shmbroker.config import LogConfig
    from shmbroker.log import PartitionLog
    from shmbroker.log.reader import LogReader, ReadState
    from shmbroker.router.cold_read import ColdReads, GrantTable

    log = PartitionLog.open(str(tmp_path / "p"), LogConfig(segment_bytes=80_000))
    for b in range(200):
        log.append(records.encode_batch([value_of(b * 5 + i) for i in range(5)]))
    active = log.active_segment
    state = ReadState(log.high_watermark, 0, active.base_offset, active.size)
    reader = LogReader(log.directory)
    cold = ColdReads("127.0.0.1", 0, GrantTable(ttl_ms=300))
    cold.state, cold.reader, cold.log = state, reader, log
    yield cold
    cold.close()
    reader.close()
    log.close()


def _receive(cold, row) -> bytes:
    """The remote consumer's reader: every byte it delivered, or its ColdReadError."""
    from shmbroker.client.cold_read import ColdGrant, ColdReader

    out = bytearray()
    reader = ColdReader()
    reader.read(ColdGrant(0, *row), out.extend)
    return bytes(out)


def test_an_expired_token_is_closed_with_nothing_sent(cold_server):
    from shmbroker import errors

    row = cold_server.grant(cold_server.reader, cold_server.state, 0, 1 << 20, "t", 0)
    time.sleep(0.4)
    with pytest.raises(errors.ColdReadError, match="nothing sent"):
        _receive(cold_server, row)
    assert cold_server.table.expired == 1 and len(cold_server.table) == 0


def test_a_segment_deleted_under_a_grant_is_still_sent_whole(cold_server):
    from shmbroker import records

    row = cold_server.grant(cold_server.reader, cold_server.state, 0, 1 << 20, "t", 0)
    path = cold_server.log.segments[0].path
    expected = open(path, "rb").read()[row[4]:row[4] + row[5]]
    os.unlink(path)  # as retention would
    data = _receive(cold_server, row)
    assert bytes(data) == expected
    assert [r.value for r in records.decode_records(data)] == \
        [value_of(i) for i in range(row[6], row[7] + 1)]


def test_a_transfer_cut_short_is_an_error_never_a_short_read(cold_server):
    from shmbroker import errors

    row = cold_server.grant(cold_server.reader, cold_server.state, 0, 1 << 20, "t", 0)
    os.truncate(cold_server.log.segments[0].path, row[5] // 2)  # the file lost its end
    with pytest.raises(errors.ColdReadError, match="cut after"):
        _receive(cold_server, row)


def test_closing_the_listener_closes_its_connections_and_every_grants_fd(cold_server):
    row = cold_server.grant(cold_server.reader, cold_server.state, 0, 1 << 20, "t", 0)
    unused = cold_server.grant(cold_server.reader, cold_server.state, 5, 1 << 20, "t", 0)
    assert unused is not None
    sock = socket.create_connection((row[1], row[2]), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(row[0])  # and never read: the sendfile may block on a full socket
    time.sleep(0.3)
    fds_before = len(os.listdir("/proc/self/fd"))
    done = threading.Event()
    threading.Thread(target=lambda: (cold_server.close(), done.set()), daemon=True).start()
    assert done.wait(5.0), "close() hung on a stalled transfer"
    sock.close()
    # The listener, the connection and two grants' fds are gone.
    assert len(os.listdir("/proc/self/fd")) <= fds_before - 3
