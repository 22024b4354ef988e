"""Cold reads: os.sendfile against read()+sendall() of the same file bytes, and the remote
consumer's hot path (bytes in ZeroMQ fetch replies) against its cold path (the same bytes by
sendfile on a data connection), to place the router's hot/cold switch.

1. transfer: ``--gib`` of a file (page cache warm: it was just written) to a receiver in
   another process on 127.0.0.1, by ``os.sendfile`` (8 MiB per call, as the router) and by
   ``readinto`` + ``sendall`` (1 MiB buffer); the receiver ``recv_into``s a 1 MiB buffer and
   acknowledges EOF with one byte, which ends the sender's clock. Rounds alternate the modes.
2. replay: a broker (``serve --listen``, hot window 0) with ``--replay-mib`` of 1,000-byte
   records in one partition; a remote Consumer replays it all from offset 0 with cold reads
   off (hot) and on (cold); MB/s, records/s and the router's CPU seconds for each.
3. switch: replays of the last 1..64 MiB of that log, hot and cold, ms each: where the cold
   path's extra connection stops costing.

    PYTHONPATH=. .venv/bin/python perf/bench_cold_read.py [--gib 1] [--rounds 3]
        [--replay-mib 256] [--quick] [--same-cpu] [--skip-consumer]
    --quick: 0.25 GiB, 64 MiB, 1 round; --same-cpu: sender and receiver of the transfer on
    one CPU (what the copy costs when no core is idle)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20
_SENDFILE_CHUNK = 8 * MiB
_COPY_BUFFER = 1 * MiB
_RECORD_VALUE_BYTES = 1_000


# -- 1. transfer ------------------------------------------------------------------------------------

def receiver_main() -> None:
    """A process: accept connections one by one, read each to EOF, answer one byte."""
    server = socket.create_server(("127.0.0.1", 0))
    print(server.getsockname()[1], flush=True)
    buf = bytearray(_COPY_BUFFER)
    view = memoryview(buf)
    while True:  # ends when the parent closes our stdin (then accept fails)
        conn, _ = server.accept()
        with conn:
            total = 0
            while True:  # until EOF
                n = conn.recv_into(view)
                if not n:
                    break
                total += n
            conn.sendall(b"k")


def send_sendfile(sock: socket.socket, fd: int, size: int) -> None:
    position = 0
    while position < size:  # bounded: each call sends > 0 bytes
        n = os.sendfile(sock.fileno(), fd, position, min(_SENDFILE_CHUNK, size - position))
        assert n > 0
        position += n


def send_copy(sock: socket.socket, fd: int, size: int) -> None:
    buf = bytearray(_COPY_BUFFER)
    view = memoryview(buf)
    with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
        f.seek(0)
        while True:  # bounded by the file
            n = f.readinto(view)
            if not n:
                break
            sock.sendall(view[:n])


def timed_transfer(port: int, path: str, size: int, send) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            send(sock, fd, size)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b"k"
        return time.perf_counter() - start
    finally:
        os.close(fd)


def bench_transfer(work: str, gib: float, rounds: int, same_cpu: bool = False) -> dict:
    size = int(gib * (1 << 30))
    path = os.path.join(work, "segment.bin")
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
    size = os.path.getsize(path)
    receiver = subprocess.Popen([sys.executable, __file__, "--receiver"], stdout=subprocess.PIPE,
                                stdin=subprocess.PIPE)
    saved = os.sched_getaffinity(0)
    try:
        if same_cpu:  # a busy host: the copy costs throughput, not just an idle core
            cpu = min(saved)
            os.sched_setaffinity(0, {cpu})
            os.sched_setaffinity(receiver.pid, {cpu})
        port = int(receiver.stdout.readline())
        timed_transfer(port, path, min(size, 64 * MiB), send_sendfile)  # warm up both ends
        results: dict[str, list[float]] = {"sendfile": [], "read+sendall": []}
        for _ in range(rounds):
            for name, send in (("sendfile", send_sendfile), ("read+sendall", send_copy)):
                cpu0 = os.times()
                seconds = timed_transfer(port, path, size, send)
                cpu1 = os.times()
                results[name].append((size / seconds / 1e6,
                                      (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)))
    finally:
        os.sched_setaffinity(0, saved)
        receiver.kill()
        receiver.wait()
        os.unlink(path)
    out = {"bytes": size, "rounds": rounds}
    for name, runs in results.items():
        mbs = [r[0] for r in runs]
        out[name] = {"mb_s_best": max(mbs), "mb_s_median": statistics.median(mbs),
                     "sender_cpu_s_median": statistics.median(r[1] for r in runs)}
    out["ratio_median"] = out["sendfile"]["mb_s_median"] / out["read+sendall"]["mb_s_median"]
    return out


# -- 2. and 3. the remote consumer --------------------------------------------------------------------

def start_broker(work: str):
    data_dir = os.path.join(work, "data")
    proc = subprocess.Popen([sys.executable, "-m", "shmbroker", "serve", "--data-dir", data_dir,
                             "--listen", "tcp://127.0.0.1:*", "--hot-window-bytes", "0"],
                            stdout=open(os.path.join(work, "broker.log"), "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # bounded by the deadline
        try:
            with open(os.path.join(data_dir, "runtime.json")) as f:
                doc = json.load(f)
            if doc["state"] == "running" and doc.get("router_endpoint"):
                return proc, data_dir, doc
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("broker did not start; see " + os.path.join(work, "broker.log"))


def fill(data_dir: str, address: str, mib: int) -> int:
    from shmbroker import Admin, Producer

    with Admin(broker=address) as admin:
        admin.create_topic("replay", 1)
    time.sleep(1.0)
    count = mib * MiB // (_RECORD_VALUE_BYTES + 70)
    value = os.urandom(_RECORD_VALUE_BYTES)
    with Producer(broker=data_dir, acks=1) as producer:
        for _ in range(count):
            producer.send("replay", value, partition=0)
        producer.flush(timeout=600)
    return count


def replay(address: str, start: int, count: int, cold: bool) -> tuple[float, int, int]:
    """(seconds, records, cold reads) of reading offsets [start, count)."""
    from shmbroker import Consumer

    consumer = Consumer(broker=address, cold_read_bytes_max=(16 * MiB) if cold else 0)
    try:
        consumer.assign([("replay", 0)])
        consumer.seek(("replay", 0), start)
        got = 0
        t0 = time.perf_counter()
        while got < count - start:  # bounded: the log is there
            got += len(consumer.poll(timeout_ms=1_000, max_records=100_000))
        return time.perf_counter() - t0, got, consumer.cold_reads
    finally:
        consumer.close()


def bench_consumer(work: str, mib: int) -> dict:
    import psutil

    proc, data_dir, doc = start_broker(work)
    try:
        address = doc["router_endpoint"]
        router = psutil.Process(next(p["pid"] for p in doc["processes"] if p["role"] == "router"))
        count = fill(data_dir, address, mib)
        log_bytes = sum(os.path.getsize(os.path.join(data_dir, "replay-0", n))
                        for n in os.listdir(os.path.join(data_dir, "replay-0"))
                        if n.endswith(".log"))
        out: dict = {"records": count, "log_bytes": log_bytes, "replay": {}, "switch": []}
        for cold in (False, True, False, True):  # twice each, alternating
            cpu0 = router.cpu_times()
            seconds, got, cold_reads = replay(address, 0, count, cold)
            cpu1 = router.cpu_times()
            key = "cold" if cold else "hot"
            out["replay"].setdefault(key, []).append({
                "mb_s": log_bytes / seconds / 1e6, "records_s": got / seconds,
                "router_cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
                "cold_reads": cold_reads})
        per_record = log_bytes / count
        for tail_mib in (1, 4, 16, 64):
            if tail_mib > mib:
                break
            start = max(0, count - int(tail_mib * MiB / per_record))
            row = {"tail_mib": tail_mib}
            for cold in (False, True):
                runs = [replay(address, start, count, cold)[0] for _ in range(3)]
                row["cold_ms" if cold else "hot_ms"] = statistics.median(runs) * 1e3
            out["switch"].append(row)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gib", type=float, default=1.0, help="bytes of the transfer test")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replay-mib", type=int, default=256)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-consumer", action="store_true")
    parser.add_argument("--same-cpu", action="store_true",
                        help="transfer: sender and receiver pinned to one CPU")
    args = parser.parse_args()
    if args.receiver:
        receiver_main()
        return
    if args.quick:
        args.gib, args.replay_mib, args.rounds = 0.25, 64, 1
    sys.path.insert(0, HERE)
    import machine

    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench-cold-", dir=os.path.join(HERE, "out"))
    try:
        print(f"# {machine.cpu_model()}, {os.cpu_count()} cpus, {machine.memory_total()}, "
              f"{machine.filesystem_of(work)}, load {os.getloadavg()[0]:.1f}, "
              f"commit {machine.git_commit()}", flush=True)
        t = bench_transfer(work, args.gib, args.rounds, args.same_cpu)
        print(f"transfer of {t['bytes'] / 2**30:.2f} GiB x {t['rounds']} rounds (page cache "
              f"warm, loopback, receiver in another process"
              f"{', both on one CPU' if args.same_cpu else ''}):")
        for name in ("sendfile", "read+sendall"):
            r = t[name]
            print(f"  {name:13s} {r['mb_s_median']:8.0f} MB/s median  {r['mb_s_best']:8.0f} "
                  f"best  sender CPU {r['sender_cpu_s_median']:.2f} s")
        print(f"  sendfile / read+sendall (median): {t['ratio_median']:.2f}x", flush=True)
        if args.skip_consumer:
            return
        c = bench_consumer(work, args.replay_mib)
        print(f"remote consumer replay of {c['log_bytes'] / MiB:.0f} MiB ({c['records']:,} "
              f"records of {_RECORD_VALUE_BYTES} B) from offset 0:")
        for key, runs in c["replay"].items():
            for r in runs:
                print(f"  {key:4s} {r['mb_s']:7.0f} MB/s {r['records_s']:10,.0f} rec/s  router "
                      f"CPU {r['router_cpu_s']:.2f} s  cold reads {r['cold_reads']}")
        print("replay of the log's last N MiB (median of 3):")
        for row in c["switch"]:
            print(f"  {row['tail_mib']:3d} MiB  hot {row['hot_ms']:7.1f} ms  cold "
                  f"{row['cold_ms']:7.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
