"""The worker processes of perf/bench_ipc.py: one producer, consumer, pinger or ponger each.

Every case of the benchmark runs its producers and consumers as separate processes started
with multiprocessing's *spawn* method; each runs :func:`worker_main` with the name of a system
(``SYSTEMS``), a role and a picklable channel made by the parent. The protocol, the same for
every system:

1. set up (connect, bind, open the topic) and put ``("ready", ...)`` on the control queue;
2. wait for the start event (the parent takes its start time just before setting it), take
   this process's CPU time (``getrusage(RUSAGE_SELF)``, all threads), run the timed loop and
   put ``("done", ..., result)``;
3. wait for the stop event (set once every consumer is done, so that a producer's background
   thread has finished delivering), put ``("cpu", ..., seconds)`` and tear down.

Any exception becomes ``("error", ..., traceback)``: the row then says FAILED, never a number.

Messages are cycled from a small pool of distinct random payloads whose *last* byte is the
index in the pool (``pool_message``); a consumer adds up the last byte of every message it
receives and counts them, and the parent compares both with what the producers sent. A
consumer that sees nothing for ``stall_s`` seconds stops and reports what it has, so a system
that loses messages shows a short count instead of hanging.

This module imports only the standard library at the top (spawned children import it); each
system imports its own package when a worker first needs it.
"""
from __future__ import annotations

import ctypes
import os
import queue
import random
import resource
import time
import traceback
from typing import Any, Callable

#: Longest a worker waits for the start or the stop event before giving up (parent died).
EVENT_WAIT_S_MAX = 600.0
#: A polling consumer looks at the clock once per this many empty polls.
POLLS_PER_CLOCK_CHECK = 4096


def die_with_parent(sig: int = 9) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (prctl
    PR_SET_PDEATHSIG), so that a benchmark killed with SIGKILL leaves nothing running.
    Also used as the ``preexec_fn`` of the servers the parent starts."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pool_message(msg_bytes: int, k: int) -> bytes:
    rng = random.Random(msg_bytes * 1000 + k)
    return rng.randbytes(msg_bytes - 1) + bytes([k])


def message_pool(msg_bytes: int, pool_n: int) -> list[bytes]:
    """``pool_n`` distinct payloads; message i of a stream is ``pool[i % pool_n]``."""
    assert 0 < pool_n <= 256 and pool_n & (pool_n - 1) == 0, pool_n
    return [pool_message(msg_bytes, k) for k in range(pool_n)]


def expected_checksum(count: int, pool_n: int) -> int:
    """The sum of last bytes of messages 0..count-1 (last byte of message i is i % pool_n)."""
    full, rest = divmod(count, pool_n)
    return full * (pool_n * (pool_n - 1) // 2) + rest * (rest - 1) // 2


def consumed(n: int, s: int, t_end: float) -> dict[str, Any]:
    return {"count": n, "checksum": s, "t_end": t_end}


# --- the worker protocol ---------------------------------------------------------------------


def worker_main(system: str, role: str, idx: int, chan: Any, params: dict[str, Any],
                ctl: Any, start_ev: Any, stop_ev: Any) -> None:
    """Entry point of every spawned worker (see the module docstring)."""
    impl = None
    die_with_parent()
    try:
        impl = system_class(system)()
        impl.stop_ev = stop_ev
        run = getattr(impl, role)(chan, params)
        ctl.put(("ready", role, idx, os.getpid()))
        if not start_ev.wait(EVENT_WAIT_S_MAX):
            return
        c0 = cpu_s()
        result = run()
        ctl.put(("done", role, idx, result))
        stop_ev.wait(EVENT_WAIT_S_MAX)
        ctl.put(("cpu", role, idx, cpu_s() - c0))
    except BaseException:  # noqa: BLE001 - reported to the parent, which prints FAILED
        ctl.put(("error", role, idx, traceback.format_exc(limit=8)))
    finally:
        if impl is not None:
            try:
                impl.close()
            except Exception:  # noqa: BLE001 - teardown of a benchmark worker
                pass


class System:
    """Base of every system: roles return the zero-argument timed loop after their setup."""

    stop_ev: Any = None

    def close(self) -> None:
        pass


# --- multiprocessing.Queue -------------------------------------------------------------------


class MpQueue(System):
    """multiprocessing.Queue (unbounded, pickles each object; a feeder thread writes a pipe)."""

    def producer(self, q, p):
        pool, count, mask = message_pool(p["msg_bytes"], p["pool_n"]), p["count"], p["pool_n"] - 1
        self.q = q

        def run():
            put = q.put
            for i in range(count):
                put(pool[i & mask])
            q.close()
            q.join_thread()  # the feeder thread has written everything into the pipe
            return {"t_end": time.perf_counter()}
        return run

    def consumer(self, q, p):
        count, stall = p["count"], p["stall_s"]

        def run():
            get, s, n = q.get, 0, 0
            try:
                for n in range(count):
                    s += get(True, stall)[-1]
                n = count
            except queue.Empty:
                pass
            return consumed(n, s, time.perf_counter())
        return run

    def _pingpong(self, chan, p, first: bool):
        send_q, recv_q = (chan[0], chan[1]) if first else (chan[1], chan[0])
        if p["spin"]:
            def recv(get=recv_q.get_nowait, Empty=queue.Empty):
                while True:
                    try:
                        return get()
                    except Empty:
                        pass
        else:
            def recv(get=recv_q.get):
                return get(True, p["stall_s"])
        return send_q.put, recv

    def ping(self, chan, p):
        return pinger(*self._pingpong(chan, p, True), p)

    def pong(self, chan, p):
        return ponger(*self._pingpong(chan, p, False), p)


# --- faster-fifo -----------------------------------------------------------------------------


class FasterFifo(System):
    """faster_fifo.Queue: a shared-memory ring with a process-shared mutex; pickles each object."""

    def producer(self, q, p):
        pool, count, mask, batch = message_pool(p["msg_bytes"], p["pool_n"]), p["count"], p["pool_n"] - 1, p["batch"]
        stall = p["stall_s"]

        def run():
            if batch:
                put_many, chunk = q.put_many, pool * (batch // len(pool))
                for _ in range(count // batch):
                    put_many(chunk, True, stall)
            else:
                put = q.put
                for i in range(count):
                    put(pool[i & mask], True, stall)
            return {"t_end": time.perf_counter()}
        return run

    def consumer(self, q, p):
        count, stall, batch = p["count"], p["stall_s"], p["batch"]

        def run():
            s = n = 0
            try:
                if batch:
                    get_many = q.get_many
                    while n < count:
                        msgs = get_many(True, stall, batch)
                        n += len(msgs)
                        for m in msgs:
                            s += m[-1]
                else:
                    get = q.get
                    for n in range(count):
                        s += get(True, stall)[-1]
                    n = count
            except queue.Empty:
                pass
            return consumed(n, s, time.perf_counter())
        return run

    def _pingpong(self, chan, p, first: bool):
        send_q, recv_q = (chan[0], chan[1]) if first else (chan[1], chan[0])
        if p["spin"]:
            def recv(get=recv_q.get_nowait, Empty=queue.Empty):
                while True:
                    try:
                        return get()
                    except Empty:
                        pass
        else:
            def recv(get=recv_q.get, stall=p["stall_s"]):
                return get(True, stall)
        return send_q.put, recv

    def ping(self, chan, p):
        return pinger(*self._pingpong(chan, p, True), p)

    def pong(self, chan, p):
        return ponger(*self._pingpong(chan, p, False), p)


# --- pyzmq PUSH/PULL over ipc:// -----------------------------------------------------------


class Zmq(System):
    """pyzmq PUSH -> PULL over ipc:// (default high-water marks: 1000 messages each side)."""

    def _socket(self, kind, stall_s: float | None = None):
        import zmq
        self.ctx = zmq.Context()
        sock = self.ctx.socket(kind)
        sock.linger = 5000
        if stall_s is not None:
            sock.rcvtimeo = int(stall_s * 1000)
        self.socks = getattr(self, "socks", []) + [sock]
        return sock

    def producer(self, endpoint, p):
        import zmq
        pool, count, mask, batch = message_pool(p["msg_bytes"], p["pool_n"]), p["count"], p["pool_n"] - 1, p["batch"]
        sock = self._socket(zmq.PUSH)
        sock.connect(endpoint)

        def run():
            if batch:
                send_multipart, chunk = sock.send_multipart, pool * (batch // len(pool))
                for _ in range(count // batch):
                    send_multipart(chunk)
            else:
                send = sock.send
                for i in range(count):
                    send(pool[i & mask])
            return {"t_end": time.perf_counter()}
        return run

    def consumer(self, endpoint, p):
        import zmq
        count, batch = p["count"], p["batch"]
        sock = self._socket(zmq.PULL, p["stall_s"])
        sock.bind(endpoint)

        def run():
            s = n = 0
            try:
                if batch:
                    recv_multipart = sock.recv_multipart
                    while n < count:
                        frames = recv_multipart()
                        n += len(frames)
                        for m in frames:
                            s += m[-1]
                else:
                    recv = sock.recv
                    for n in range(count):
                        s += recv()[-1]
                    n = count
            except zmq.Again:
                pass
            return consumed(n, s, time.perf_counter())
        return run

    def _pingpong(self, chan, p, first: bool):
        import zmq
        out_ep, in_ep = (chan[0], chan[1]) if first else (chan[1], chan[0])
        # Each side binds the socket it reads from and connects the one it writes to.
        pull = self._socket(zmq.PULL, p["stall_s"])
        pull.bind(in_ep)
        push = self.ctx.socket(zmq.PUSH)
        push.linger = 1000
        self.socks.append(push)
        push.connect(out_ep)
        if p["spin"]:
            def recv(rcv=pull.recv, NOBLOCK=zmq.NOBLOCK, Again=zmq.Again):
                while True:
                    try:
                        return rcv(NOBLOCK)
                    except Again:
                        pass
        else:
            recv = pull.recv
        return push.send, recv

    def ping(self, chan, p):
        return pinger(*self._pingpong(chan, p, True), p)

    def pong(self, chan, p):
        return ponger(*self._pingpong(chan, p, False), p)

    def close(self):
        for s in getattr(self, "socks", []):
            s.close()
        if hasattr(self, "ctx"):
            self.ctx.term()


# --- iceoryx2 publish-subscribe over shared memory -----------------------------------------


#: Samples a subscriber buffers before the publisher's RetryUntilDelivered back-pressure waits.
ICEORYX2_SUBSCRIBER_BUFFER = 256


class Iceoryx2(System):
    """iceoryx2 publish-subscribe (ServiceType.Ipc), a fixed-size ctypes payload of msg_bytes.

    No message is dropped: safe overflow off, the publisher's back-pressure strategy is
    RetryUntilDelivered. The subscriber polls ``receive()`` (iceoryx2's native mode); the
    blocking ping-pong adds an event service per direction (notify after send, the receiver
    waits on its Listener), which is iceoryx2's documented event-based pattern.
    A channel is ``(root_path, prefix, service_name)``: the parent gives every run its own
    root directory and shared-memory prefix so that it can clean up after them.
    """

    def _node(self, chan):
        import iceoryx2 as iox2
        iox2.set_log_level(iox2.LogLevel.Error)
        cfg = iox2.config.default()
        cfg.global_cfg.root_path = iox2.Path.new(chan[0])
        cfg.global_cfg.prefix = iox2.FileName.new(chan[1])
        self.node = iox2.NodeBuilder.new().config(cfg).create(iox2.ServiceType.Ipc)
        self.keep = []
        return iox2

    def _service(self, iox2, name: str, msg_bytes: int):
        class Payload(ctypes.Structure):
            _fields_ = [("data", ctypes.c_uint8 * msg_bytes)]
        svc = (self.node.service_builder(iox2.ServiceName.new(name)).publish_subscribe(Payload)
               .enable_safe_overflow(False).history_size(0)
               .subscriber_max_buffer_size(ICEORYX2_SUBSCRIBER_BUFFER).open_or_create())
        self.keep.append(svc)
        return svc

    def _publisher(self, iox2, name, msg_bytes):
        pub = (self._service(iox2, name, msg_bytes).publisher_builder()
               .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered).create())
        self.keep.append(pub)
        loan, memmove, update = pub.loan_uninit, ctypes.memmove, pub.update_connections

        def send(m):
            # send() returns how many subscribers got the sample. Right after the subscriber
            # connected it can return 0 (seen here for the first few thousand samples of
            # some runs): the sample went nowhere. A sender that must not lose data retries.
            while True:
                sample = loan()
                memmove(sample.payload_ptr, m, msg_bytes)
                if sample.assume_init().send():
                    return
                update()
        return pub, send

    def _subscriber(self, iox2, name, msg_bytes):
        sub = self._service(iox2, name, msg_bytes).subscriber_builder().create()
        self.keep.append(sub)
        return sub

    def producer(self, chan, p):
        iox2 = self._node(chan)
        pool, count, mask = message_pool(p["msg_bytes"], p["pool_n"]), p["count"], p["pool_n"] - 1
        pub, send = self._publisher(iox2, chan[2], p["msg_bytes"])

        def run():
            pub.update_connections()
            for i in range(count):
                send(pool[i & mask])
            return {"t_end": time.perf_counter()}
        return run

    def consumer(self, chan, p):
        iox2 = self._node(chan)
        count, stall, size = p["count"], p["stall_s"], p["msg_bytes"]
        sub = self._subscriber(iox2, chan[2], size)

        def run():
            receive, string_at, clock = sub.receive, ctypes.string_at, time.perf_counter
            n = s = empty = 0
            waiting_since = None
            while n < count:
                sample = receive()
                if sample is None:
                    empty += 1
                    if empty == POLLS_PER_CLOCK_CHECK:
                        empty, now = 0, clock()
                        if waiting_since is None:
                            waiting_since = now
                        elif now - waiting_since > stall:
                            break
                    continue
                value = string_at(sample.payload_ptr, size)  # copy out, release the sample
                sample.delete()
                s += value[-1]
                n += 1
                waiting_since = None
            return consumed(n, s, clock())
        return run

    def _pingpong(self, chan, p, first: bool):
        iox2 = self._node(chan)
        size = p["msg_bytes"]
        out_name, in_name = (chan[2] + "/ping", chan[2] + "/pong")
        if not first:
            out_name, in_name = in_name, out_name
        sub = self._subscriber(iox2, in_name, size)
        pub, send_sample = self._publisher(iox2, out_name, size)
        receive, string_at = sub.receive, ctypes.string_at
        if p["spin"]:
            def recv():
                while True:
                    sample = receive()
                    if sample is not None:
                        value = string_at(sample.payload_ptr, size)
                        sample.delete()
                        return value
            send = send_sample
        else:
            events_out = self.node.service_builder(iox2.ServiceName.new(out_name + "/ev")).event().open_or_create()
            events_in = self.node.service_builder(iox2.ServiceName.new(in_name + "/ev")).event().open_or_create()
            notifier = events_out.notifier_builder().create()
            listener = events_in.listener_builder().create()
            self.keep += [events_out, events_in, notifier, listener]
            notify, wait = notifier.notify, listener.timed_wait
            stall_s = p["stall_s"]
            timeout = iox2.Duration.from_secs_f64(stall_s)
            monotonic = time.monotonic

            def send(m):
                send_sample(m)
                notify()

            def recv():
                # A wait may return no event before its timeout (seen once in a full run: the
                # round trip failed with no stall at all): only the stall time itself fails.
                deadline = None
                while True:  # bounded by the deadline
                    sample = receive()
                    if sample is not None:
                        value = string_at(sample.payload_ptr, size)
                        sample.delete()
                        return value
                    if not wait(timeout):
                        now = monotonic()
                        if deadline is None:
                            deadline = now + stall_s
                        elif now > deadline:
                            raise TimeoutError("iceoryx2: no event within the stall time")
        self._pub = pub
        return send, recv

    def ping(self, chan, p):
        send, recv = self._pingpong(chan, p, True)
        self._pub.update_connections()
        return pinger(send, recv, p, before=self._wait_for_peer)

    def pong(self, chan, p):
        send, recv = self._pingpong(chan, p, False)
        return ponger(send, recv, p, before=self._pub.update_connections)

    def _wait_for_peer(self):
        # The ponger creates its subscriber before it says ready, but our publisher only
        # sees subscribers that existed when it connected: refresh the connections once.
        self._pub.update_connections()

    def close(self):
        for obj in reversed(getattr(self, "keep", [])):
            try:
                obj.delete()
            except Exception:  # noqa: BLE001
                pass
        if getattr(self, "node", None) is not None:
            self.node.delete()


# --- Redis Streams --------------------------------------------------------------------------


#: Entries a Redis consumer asks for per XREAD.
REDIS_READ_COUNT = 1024


def _redis_entries(resp, key: bytes):
    """The entries of ``key`` in an XREAD reply (RESP2: list of [key, entries]; RESP3: dict)."""
    if not resp:
        return None
    if isinstance(resp, dict):
        return resp.get(key) or next(iter(resp.values()))[0]
    return resp[0][1]


class Redis(System):
    """Redis Streams through redis-py (hiredis parser when installed): XADD and XREAD."""

    def _client(self, chan):
        import redis
        self.r = redis.Redis(host="127.0.0.1", port=chan[0], socket_timeout=120)
        self.r.ping()
        return self.r

    def producer(self, chan, p):
        r, key = self._client(chan), chan[1]
        pool, count, mask, batch = message_pool(p["msg_bytes"], p["pool_n"]), p["count"], p["pool_n"] - 1, p["batch"]

        def run():
            if batch:
                pipe, chunk = r.pipeline(transaction=False), pool * (batch // len(pool))
                for _ in range(count // batch):
                    for m in chunk:
                        pipe.xadd(key, {b"v": m})
                    pipe.execute()
            else:
                xadd = r.xadd
                for i in range(count):
                    xadd(key, {b"v": pool[i & mask]})
            return {"t_end": time.perf_counter()}
        return run

    def consumer(self, chan, p):
        r, key = self._client(chan), chan[1]
        count, stall_ms = p["count"], int(p["stall_s"] * 1000)
        read_count = max(REDIS_READ_COUNT, p["batch"])

        def run():
            xread, last, n, s = r.xread, b"0-0", 0, 0
            while n < count:
                entries = _redis_entries(xread({key: last}, count=read_count, block=stall_ms), key)
                if not entries:
                    break
                for _, fields in entries:
                    s += fields[b"v"][-1]
                n += len(entries)
                last = entries[-1][0]
            return consumed(n, s, time.perf_counter())
        return run

    def _pingpong(self, chan, p, first: bool):
        r = self._client(chan)
        out_key, in_key = (chan[1] + b".ping", chan[1] + b".pong")
        if not first:
            out_key, in_key = in_key, out_key
        xadd, xread = r.xadd, r.xread
        state = {"last": b"0-0"}
        block = None if p["spin"] else int(p["stall_s"] * 1000)

        def send(m):
            xadd(out_key, {b"v": m})

        def recv():
            while True:
                entries = _redis_entries(xread({in_key: state["last"]}, count=1, block=block), in_key)
                if entries:
                    state["last"] = entries[-1][0]
                    return entries[-1][1][b"v"]
                if block is not None:
                    raise TimeoutError("redis: nothing within the stall time")
        return send, recv

    def ping(self, chan, p):
        return pinger(*self._pingpong(chan, p, True), p)

    def pong(self, chan, p):
        return ponger(*self._pingpong(chan, p, False), p)

    def close(self):
        if getattr(self, "r", None) is not None:
            self.r.close()


# --- raw os.pipe and a shared-memory spin: the references -----------------------------------


class Pipe(System):
    """Two os.pipe()s (from multiprocessing.Pipe(duplex=False)), raw os.read/os.write."""

    def _pingpong(self, chan, p, first: bool):
        (r1, w1), (r2, w2) = chan
        rfd, wfd = (r2.fileno(), w1.fileno()) if first else (r1.fileno(), w2.fileno())
        size = p["msg_bytes"]
        read, write = os.read, os.write
        if p["spin"]:
            os.set_blocking(rfd, False)

            def recv():
                while True:
                    try:
                        return read(rfd, size)
                    except BlockingIOError:
                        pass
        else:
            def recv():
                return read(rfd, size)

        def send(m):
            write(wfd, m)
        return send, recv

    def ping(self, chan, p):
        return pinger(*self._pingpong(chan, p, True), p)

    def pong(self, chan, p):
        return ponger(*self._pingpong(chan, p, False), p)


class ShmSpin(System):
    """Two processes spinning on two 8-byte counters in shared memory (multiprocessing.RawArray).

    The floor of a Python round trip through shared memory: no payload, no syscall, no wake-up.
    """

    def ping(self, cells, p):
        warm, rounds = p["warm"], p["rounds"]

        def run():
            clock, lat = time.perf_counter_ns, [0] * rounds
            for i in range(1, warm + rounds + 1):
                t0 = clock()
                cells[0] = i
                while cells[8] != i:
                    pass
                t1 = clock()
                if i > warm:
                    lat[i - warm - 1] = t1 - t0
            return {"lat_ns": lat}
        return run

    def pong(self, cells, p):
        total = p["warm"] + p["rounds"]

        def run():
            for i in range(1, total + 1):
                while cells[0] != i:
                    pass
                cells[8] = i
            return {"count": total}
        return run


# --- ping-pong loops shared by the systems --------------------------------------------------


def pinger(send: Callable[[bytes], Any], recv: Callable[[], bytes], p: dict[str, Any],
           before: Callable[[], Any] | None = None):
    """Round trips of one ``msg_bytes`` message: ``warm`` untimed, then ``rounds`` timed."""
    msg, warm, rounds = pool_message(p["msg_bytes"], 7), p["warm"], p["rounds"]

    def run():
        if before is not None:
            before()
        clock, lat = time.perf_counter_ns, [0] * rounds
        for _ in range(warm):
            send(msg)
            recv()
        for i in range(rounds):
            t0 = clock()
            send(msg)
            reply = recv()
            lat[i] = clock() - t0
        assert len(reply) == len(msg) and reply[-1] == msg[-1], "ping-pong reply corrupted"
        return {"lat_ns": lat}
    return run


def ponger(send: Callable[[bytes], Any], recv: Callable[[], bytes], p: dict[str, Any],
           before: Callable[[], Any] | None = None):
    total = p["warm"] + p["rounds"]

    def run():
        if before is not None:
            before()
        for _ in range(total):
            send(recv())
        return {"count": total}
    return run


SYSTEMS: dict[str, type[System]] = {
    "mpqueue": MpQueue,
    "fasterfifo": FasterFifo,
    "zmq": Zmq,
    "iceoryx2": Iceoryx2,
    "redis": Redis,
    "pipe": Pipe,
    "shmspin": ShmSpin,
}


def system_class(name: str) -> type[System]:
    if name == "shmbroker":  # its own module: written against the client API (perf/ipc_shmbroker.py)
        from ipc_shmbroker import Shmbroker
        return Shmbroker
    return SYSTEMS[name]
