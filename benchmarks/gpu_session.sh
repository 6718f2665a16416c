#!/usr/bin/env bash
# Everything issue 16 still needs a GPU machine for, in one call of at most 10 minutes on a bare, offline one:
#
#     python -m benchmarks.offline_wheels --out .whl --python-version 3.12 \
#         --have benchmarks/configs/gpu_image_packages.txt --max-mib 58      # first, here, with an index
#     OUT=/some/dir bash benchmarks/gpu_session.sh                          # there, with .whl beside the checkout
#
# 1. `make gpu-bench` (benchmarks/gpu_bench.sh) from the wheels: the CUDA tests, then every GPU cell, compiled and
#    Ray ones included, into $OUT/gpu_bench (bench.json, bench.md), its log in $OUT/gpu_bench.log. Capped at 7 min.
# 2. The compression pipeline's 1 -> 2 writer-actor scaling on that machine's CPU cores (16 there: two free cores,
#    which the 2-core development machine never has): benchmarks.compress --scaling-only, into $OUT/compress_cpu.*.
#    Capped at what is left of 9.5 minutes.
# Each step's exit status is printed; a step that fails or runs out of time leaves the other's results intact.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
started=$(date +%s)
WHEELS=${WHEELS:-.whl} GPU_OUT="$OUT/gpu_bench" timeout 420 bash benchmarks/gpu_bench.sh > "$OUT/gpu_bench.log" 2>&1
echo "gpu_session: gpu-bench exit $? after $(( $(date +%s) - started )) s"
tail -40 "$OUT/gpu_bench.log"
left=$(( 570 - ($(date +%s) - started) ))
if [ "$left" -gt 60 ] && [ -x .venv-gpu/bin/python ]; then
    timeout "$left" .venv-gpu/bin/python -m benchmarks.compress --scaling-only --docs "${COMPRESS_DOCS:-2048}" \
        --json "$OUT/compress_cpu.json" > "$OUT/compress_cpu.log" 2>&1
    echo "gpu_session: compress --scaling-only exit $? after $(( $(date +%s) - started )) s"
    grep -E "ctx_s|ratio|cpus" "$OUT/compress_cpu.log" || tail -20 "$OUT/compress_cpu.log"
else
    echo "gpu_session: ${left} s left: the CPU scaling cells are skipped"
fi
