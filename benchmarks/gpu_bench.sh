#!/usr/bin/env bash
# The GPU bench in one command, on a bare GPU machine (`make gpu-bench` runs this; so can `bash` where make is not):
#
#     bash benchmarks/gpu_bench.sh                    # GPU machine with a package index (aimed at 6 minutes on one
#                                                     # H200; not yet run on a GPU)
#     WHEELS=.whl bash benchmarks/gpu_bench.sh        # offline: exactly the wheels in .whl (benchmarks/offline_wheels.py)
#     SMOKE=1 bash benchmarks/gpu_bench.sh            # no GPU: the same steps on tiny shapes (checks the command only)
#
# 1. A venv of its own, .venv-gpu, over the machine's CUDA torch: GPU_PYTHON's site-packages are read through a .pth
#    file, after the venv's own, so nothing the machine holds is replaced or upgraded in place.
# 2. This project and its pipelines and plot extras: from the index, or WHEELS=DIR installs DIR's wheels with no
#    index and no dependency resolution (DIR holds what the machine lacks), puts this checkout on the path, and then
#    checks every requirement against what the venv imports (benchmarks/offline_wheels.py --check).
# 3. The CUDA tests (tests/test_cuda.py: every device path against the CPU's) before anything is measured.
# 4. benchmarks.gpu_bench with every cell (GPU_BENCH_ARGS) into GPU_OUT: bench.json, bench.md and bench.png.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_PYTHON=${GPU_PYTHON:-python3}
GPU_OUT=${GPU_OUT:-runs/gpu_bench}
GPU_BENCH_ARGS=${GPU_BENCH_ARGS---compiled --ray}  # set and empty: no extra cells
VENV=.venv-gpu
PY=$VENV/bin/python
export PYTHONUNBUFFERED=1

if [ "${SMOKE:-0}" = 1 ]; then
    export GRADMEM_TEST_DEVICE=cpu
    GPU_BENCH_ARGS="$GPU_BENCH_ARGS --smoke --ray-docs 128 --clients 4 --seconds 3"
elif ! "$GPU_PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu-bench: $GPU_PYTHON has no CUDA torch that sees a GPU (GPU_PYTHON=... names another Python; SMOKE=1" \
         "checks the command on a CPU)" >&2
    exit 2
fi
echo "gpu-bench: a venv in $VENV over $GPU_PYTHON's torch, then the CUDA tests, then the bench into $GPU_OUT"
# A venv without pip (system Pythons often lack ensurepip); GPU_PYTHON's own pip installs into it (pip --python)
"$GPU_PYTHON" -m venv --clear --without-pip "$VENV"
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# addsitedir, not a bare path: the base's own .pth files (editable installs and the like) are processed too
"$GPU_PYTHON" -c "import site, sys; dirs = site.getsitepackages() + [site.getusersitepackages()]
print('\n'.join(f'import site; site.addsitedir({d!r})' for d in dirs))" > "$site/gpu_base_python.pth"
pip=("$GPU_PYTHON" -m pip --python "$PY" install -q --disable-pip-version-check)
if [ -n "${WHEELS:-}" ]; then
    "${pip[@]}" --no-index --no-deps "$WHEELS"/*.whl
    pwd > "$site/gradmem_checkout.pth"  # no build backend offline: the checkout itself goes on the path
    "$PY" -m benchmarks.offline_wheels --check "$WHEELS"  # --no-deps checked nothing: every requirement, here
else
    "${pip[@]}" -e ".[pipelines,plot]" pytest  # the machine's own pins stay: its torch is the point
fi
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
# shellcheck disable=SC2086  # the arguments are words on purpose
"$PY" -m benchmarks.gpu_bench --output "$GPU_OUT" $GPU_BENCH_ARGS
