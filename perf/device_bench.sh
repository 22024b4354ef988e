#!/usr/bin/env bash
# Issue 3's measurements on a lent many-core machine (the `device` tool), in one call: that
# machine is bare (its own python3, no network), lent for minutes, and each start costs one.
#
#   here:   put cp312 wheels of posix_ipc, pyzmq, setproctitle, faster-fifo, iceoryx2 and
#           its flatbuffers in .whl/ (ignored; the device tool's README says how), then run
#           with carry [".whl"]:
#   device: bash perf/device_bench.sh [rtt|probes]  (results, logs under $OUT, else perf/out)
#
# Without an argument: bench_ipc's round trips, the spin tail, and throughput with 1, 4, 8 and
# 16 producer -> partition -> consumer pairs. `rtt`: the round trips alone (bench_ipc's, the
# spin tail, send and poll apart, a blocking trip split). `probes`: what the misses are made
# of (a futex against a pipe wake-up, where a blocking round trip goes, the 64 KiB path's
# page-cache floor and per-process CPU). An A/B there carries the other tree too (an ignored
# folder named in carry) and alternates the two (perf/RESULTS.md, seventeenth session).
#
# Each step has its own timeout so that a slow one costs its own numbers only, and each
# bench writes its JSON as soon as it ends: what finished comes back even if the call is cut.
set -u -o pipefail
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
OUT=${OUT:-perf/out/device}
mkdir -p "$OUT"
step() { echo "=== $(date -u +%T) $*"; }

step machine
nproc; grep -m1 'model name' /proc/cpuinfo; uname -r; $PY --version
WHEELS=${WHEELS-.whl}  # WHEELS= (empty) where the deps are installed already
if [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step build
$PY setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
$PY -c 'import shmbroker._native, shmbroker.broker.supervisor, zmq; print("native ok")' || exit 1

if [ "${1:-}" = rtt ]; then  # the round trips alone, and a hop's own work
    step round trips
    timeout 150 $PY perf/bench_ipc.py --only shmbroker,pipe,iceoryx2 --cases rtt-spin,rtt-block \
        --json "$OUT/rtt.json" 2>&1 | tee "$OUT/rtt.txt"
    step spin tail
    timeout 60 $PY perf/bench_pingpong_tail.py --spin-us 1000 --rounds 200000 2>&1 | tee "$OUT/tail.txt"
    step send and poll
    timeout 60 $PY perf/bench_send_poll.py 2>&1 | tee "$OUT/send_poll.txt"
    step roundtrip split
    timeout 90 $PY perf/bench_roundtrip.py --rounds 20000 2>&1 | tee "$OUT/roundtrip.txt"
    step done
    exit 0
fi
if [ "${1:-}" = probes ]; then
    step wakes
    timeout 60 $PY perf/bench_wakes.py --rounds 20000 --reps 3 2>&1 | tee "$OUT/wakes.txt"
    step roundtrip split
    timeout 90 $PY perf/bench_roundtrip.py --rounds 20000 2>&1 | tee "$OUT/roundtrip.txt"
    step page-cache floor
    timeout 90 $PY perf/bench_append_path.py --mib 4096 2>&1 | tee "$OUT/append.txt"
    step 64 KiB pipeline
    timeout 90 $PY perf/bench_pipeline.py --value-bytes 65536 --count 60000 --runs 2 2>&1 \
        | tee "$OUT/pipeline64k.txt"
    step done
    exit 0
fi

# Round trips first, while nothing else has run: the targets compare them to a pipe's.
step round trips
timeout 150 $PY perf/bench_ipc.py --only shmbroker,pipe,iceoryx2 --cases rtt-spin,rtt-block \
    --json "$OUT/rtt.json" 2>&1 | tee "$OUT/rtt.txt"

step spin tail
timeout 60 $PY perf/bench_pingpong_tail.py --spin-us 1000 --rounds 50000 2>&1 | tee "$OUT/tail.txt"

# Throughput and how it scales with partitions (N producers -> N partitions -> N consumers).
step throughput
timeout ${TPUT_S:-300} $PY perf/bench_ipc.py --only shmbroker,zmq,fasterfifo,iceoryx2 \
    --cases msg,batch,fan1,fan4,fan8,fan16,big --fan-pairs 1,8,16 \
    --json "$OUT/tput.json" 2>&1 | tee "$OUT/tput.txt"

step done
ls /dev/shm | grep -c shmb || true
