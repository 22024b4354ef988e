#!/usr/bin/env bash
# Issue 3's measurements on a lent many-core machine (the `device` tool), in one call: that
# machine is bare (its own python3, no network), lent for minutes, and each start costs one.
#
#   here:   put cp312 wheels of posix_ipc, pyzmq, faster-fifo, iceoryx2 (+ flatbuffers) in
#           .whl/ (ignored; the device tool's README says how), then run with carry [".whl"]:
#   device: bash perf/device_bench.sh            (results and logs under $OUT, else perf/out)
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
$PY -c 'import shmbroker._native, zmq, posix_ipc; print("native ok")' || exit 1

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
