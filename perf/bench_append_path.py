"""64 KiB appends into the page cache, three ways, one process (issue 3's 64 KiB row): os.write,
memcpy into a MAP_SHARED mapping of a file sized with ftruncate (pages faulted in on first
touch), and the same mapping made with MAP_POPULATE (pages faulted in by mmap, timed too).
Prints GB/s of wall time and CPU per 64 KiB for each, twice, alternating. It answers whether a
partition that appended by copying into a mapped segment could beat write(): the kernel's page
allocation is paid either way.

    .venv/bin/python perf/bench_append_path.py [--mib 1024]
"""
from __future__ import annotations

import argparse
import mmap
import os
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CHUNK = 64 * 1024


def run(kind: str, chunks: int, src: np.ndarray, directory: str) -> str:
    path = os.path.join(directory, f"append_path_{kind}.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    total = chunks * CHUNK
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        if kind == "write":
            data = src.tobytes()
            for _ in range(chunks):  # bounded by chunks
                os.write(fd, data)
        else:
            os.ftruncate(fd, total)
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if kind == "mmap-populate" else 0)
            m = mmap.mmap(fd, total, flags=flags)
            dst = np.frombuffer(m, dtype=np.uint8)
            for i in range(chunks):  # bounded by chunks
                dst[i * CHUNK:(i + 1) * CHUNK] = src
            del dst
            m.close()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        os.close(fd)
        os.unlink(path)
    return f"{kind:14s} {total / wall / 1e9:6.2f} GB/s wall  {cpu / chunks * 1e6:6.1f} us CPU per 64 KiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024, help="MiB written per way (default 1024)")
    args = ap.parse_args()
    directory = os.path.join(HERE, "out")
    os.makedirs(directory, exist_ok=True)
    src = np.frombuffer(os.urandom(CHUNK), dtype=np.uint8)
    chunks = args.mib * 1024 * 1024 // CHUNK
    for kind in ("write", "mmap", "mmap-populate") * 2:
        print(run(kind, chunks, src, directory), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
