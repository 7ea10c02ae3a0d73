#!/usr/bin/env bash
# Every accelerator measurement in one call: versions and device speeds, then the train
# step, per-class k-means, the backbone step, the top-k of one retrieval block and
# retrieval at a GPU's sizes, each result JSON in one folder with the device named inside
# it, and one log.
#
#   benchmarks/device.sh [--quick] [OUTPUT_DIR]
#
# OUTPUT_DIR: default $OUT if set (a lent machine's return folder), else
# benchmarks/results/device. --quick runs every part at tiny sizes (the CPU rehearsal that
# tests/test_benchmarks.py runs). Each part runs under its own time limit (PART_LIMIT_SCALE
# scales them all) and the script goes on when one fails or runs out of time: a part's JSON
# is rewritten as its rows finish, so a stopped part keeps what it measured.
#
# Environment: PARTS, the names of the parts to run (default all; e.g. PARTS="info top_k
# retrieval_1m"); PYTHON (default python3); DATA_DIR, the folder holding fashion-mnist/
# (default ../shared/datasets); WHEELS, a folder of wheels to install first for packages
# the machine lacks (pytorch-metric-learning and efficientnet-lite-pytorch: pure Python,
# `pip download --no-deps` them here). The exit status is the number of parts that failed.
set -uo pipefail
cd "$(dirname "$0")/.."

quick=()
if [[ ${1:-} == --quick ]]; then
    quick=(--quick)
    shift
fi
out=${1:-${OUT:-benchmarks/results/device}}
mkdir -p "$out"
log="$out/log.txt"
python=${PYTHON:-python3}
data_dir=${DATA_DIR:-../shared/datasets}
scale=${PART_LIMIT_SCALE:-1}

if [[ -n ${WHEELS:-} ]]; then
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site" "$WHEELS"/*.whl 2>&1 | tee -a "$log"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MAGNET_JAX_RESULTS="$out"
# JAX and PyTorch share the GPU in the backbone and retrieval parts.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}

failed=0
# part NAME SECONDS SCRIPT ARGS...: one benchmark under a time limit, logged; skipped when
# PARTS is set and does not name it.
part() {
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    if [[ -n ${PARTS:-} && " $PARTS " != *" $name "* ]]; then
        return
    fi
    limit=$(awk -v l="$limit" -v s="$scale" 'BEGIN { printf "%d", l * s }')
    echo "device.sh: ${name}: start (limit ${limit} s)" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$python" "$@" 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    echo "device.sh: ${name}: $((SECONDS - start)) s, exit ${status}" | tee -a "$log"
    [[ $status == 0 ]] || failed=$((failed + 1))
}

if [[ ${#quick[@]} == 1 ]]; then
    part info 120 benchmarks/device_info.py --quick
    part train_step 300 benchmarks/train_step.py --quick --repeats 2 --eval-chunk-sizes 64
    part kmeans 300 benchmarks/kmeans.py --quick --cases de --restarts 1
    part backbone 300 benchmarks/backbone.py --quick
    part top_k 120 benchmarks/top_k.py --quick
    part retrieval 120 benchmarks/retrieval.py --quick --peak-num 0 --knn-only --peer torch
else
    # Each limit is the part's time in the last GPU runs (benchmarks/results/gpu_h100/log*.txt,
    # gpu_h200/log*.txt) with room to spare; the whole run (about 8 minutes) fits in one
    # lent-machine call of 10.
    part info 45 benchmarks/device_info.py
    part train_step 90 benchmarks/train_step.py --data-dir "$data_dir" \
        --eval-chunk-sizes 1024 4096
    part kmeans 150 benchmarks/kmeans.py --cases abcde --restarts 1
    part backbone 180 benchmarks/backbone.py --cases efficientnet_lite0@224 resnet50@224 \
        --batch-sizes 256 --steps 20 --repeats 3
    part top_k 60 benchmarks/top_k.py
    part retrieval 45 benchmarks/retrieval.py --num 100000 --classes 1000 --peak-num 0 \
        --knn-only --peer torch
    # pml's label counting needs a 10,000 x 1,000,000 array at this size (it ran out of
    # the H100's memory): ours runs alone.
    part retrieval_1m 120 benchmarks/retrieval.py --num 1000000 --classes 10000 --peak-num 0 \
        --knn-only --peer none --output "$out/retrieval_1m.json"
    # Again at the bin size top_k.py measured fastest, when that is not the library's.
    best=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("best_bin"))' \
        "$out/top_k.json" 2>/dev/null)
    default=$("$python" -c 'from magnet_jax import evaluation; print(evaluation._GPU_TOP_K_BIN)')
    if [[ $best =~ ^[0-9]+$ && $best != "$default" ]]; then
        part retrieval_1m_bin 120 benchmarks/retrieval.py --num 1000000 --classes 10000 \
            --peak-num 0 --knn-only --peer none --top-k-bin "$best" \
            --output "$out/retrieval_1m_bin${best}.json"
    fi
fi
echo "device.sh: done, ${failed} part(s) failed; results in ${out}" | tee -a "$log"
exit "$failed"
