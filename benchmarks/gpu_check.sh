#!/usr/bin/env bash
# One command for a lent GPU (H100/H200): build the extension, time the InfoNCE kernels one by one
# (benchmarks/gpu_kernels.py: forward and backward separately, TFLOP/s against DESIGN.md's counts),
# run the test suite on CUDA tensors, time the distributed losses over NCCL when more than one GPU
# is lent (benchmarks/dist_bench.py), then benchmark every loss and backend. Written for the device tool's image (system
# python3 with a CUDA torch, Triton, nvcc, pytest; no internet); see benchmarks/README.md.
#
#   device tool:  run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
#
# Writes into $OUT (the device tool's folder; benchmarks/results/gpu when unset), 8 files (11 with
# more than one GPU):
#   env.log  build.log  kernels.log  tests.log  bench.log  bench_gpu.csv  bench_gpu.md  bench_gpu.png
#   dist.log  dist_gpu.csv  dist_gpu.md
# Each step runs under `timeout` with its own limit, all within TOTAL_LIMIT (default 470 s, so the
# whole check ends inside 8 minutes); a failing step does not stop the later ones, and the exit
# status is non-zero when any step failed. Knobs (environment): PYTHON, TOTAL_LIMIT, BUILD_LIMIT,
# KERNELS_LIMIT, KERNELS_ARGS (arguments of gpu_kernels.py), TEST_LIMIT, TEST_TIMEOUT (per test),
# DIST_LIMIT, DIST_ARGS (arguments of dist_bench.py), BENCH_LIMIT, STEPS (default
# "env build kernels tests dist bench"),
# BENCH_ARGS (replaces the benchmark's op/size/dtype arguments), BENCH_DEVICE (default cuda; cpu
# for a dry run of this script on a machine without a GPU).
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
TOTAL_LIMIT="${TOTAL_LIMIT:-470}"
BUILD_LIMIT="${BUILD_LIMIT:-150}"
KERNELS_LIMIT="${KERNELS_LIMIT:-170}"
KERNELS_ARGS="${KERNELS_ARGS:-}"
TEST_LIMIT="${TEST_LIMIT:-90}"
TEST_TIMEOUT="${TEST_TIMEOUT:-60}"
DIST_LIMIT="${DIST_LIMIT:-100}"
DIST_ARGS="${DIST_ARGS:---dtype bf16 --sizes 16384,65536,262144 --call-seconds 10}"
BENCH_LIMIT="${BENCH_LIMIT:-230}"
STEPS="${STEPS:-env build kernels tests dist bench}"
BENCH_ARGS="${BENCH_ARGS:---ops nt_xent,info_nce,clip_loss,moco_loss,sinkhorn,byol_loss --dtype bf16,fp32 \
--sizes 1024,4096,16384,65536 --compile-ops nt_xent,clip_loss}"
# The fused Triton kernels run compiled on the GPU, never through the interpreter.
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PY OUT TEST_TIMEOUT BENCH_ARGS KERNELS_ARGS DIST_ARGS
BENCH_DEVICE="${BENCH_DEVICE:-cuda}" && export BENCH_DEVICE
START=$(date +%s)
for s in $STEPS; do : >"$OUT/$s.log"; done # this run's logs only
SUMMARY=()
FAILED=()

remaining() { echo $((TOTAL_LIMIT - ($(date +%s) - START))); }

# run_step NAME LIMIT LOG COMMAND...: COMMAND under `timeout`, output to the terminal and LOG.
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left
    left=$(remaining)
    ((limit > left)) && limit=$left
    if ((limit < 15)); then
        echo "== $name: not run, the ${TOTAL_LIMIT} s total is spent" | tee -a "$log"
        SUMMARY+=("$name: not run (no time left)")
        FAILED+=("$name")
        return
    fi
    echo "== $name (limit ${limit} s): $*" | tee -a "$log"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    local took=$(($(date +%s) - t0)) what="ok"
    ((rc == 124 || rc == 137)) && what="TIMED OUT"
    ((rc != 0 && rc != 124 && rc != 137)) && what="FAILED"
    echo "== $name: $what (exit $rc, ${took} s)" | tee -a "$log"
    SUMMARY+=("$name: $what (exit $rc, ${took} s)")
    ((rc != 0)) && FAILED+=("$name")
}

env_info() {
    nvidia-smi
    "$PY" - <<'EOF'
import sys, torch, triton
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", f"{p.total_memory / 2**30:.1f} GiB")
else:
    print("torch sees NO CUDA device")
for name in ("pytest", "pytest_timeout", "pytest_benchmark", "matplotlib", "ninja"):
    try:
        __import__(name)
        print(name, "present")
    except ImportError:
        print(name, "MISSING")
EOF
    command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc not on PATH"
}

build() {
    if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .; then
        echo "pip install -e . failed; trying setup.py build_ext --inplace"
        "$PY" setup.py build_ext --inplace || return 1
    fi
    "$PY" -c "import cl_fast, torch; print('cl_fast.backends() on', torch.cuda.get_device_name(0), '->', cl_fast.backends())"
}

kernels() {
    # each kernel timed alone at 2N in {4096, 16384, 65536}, D in {128, 512}, bf16 and fp32; the
    # script stops starting cells 20 s before the step's limit
    # shellcheck disable=SC2086
    "$PY" benchmarks/gpu_kernels.py --device "$BENCH_DEVICE" --time-budget "$(($1 - 20))" $KERNELS_ARGS
}

tests() {
    local timeout_args=()
    "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_args=(--timeout "$TEST_TIMEOUT")
    # one tile config per dtype in the tests (CL_FAST_AUTOTUNE=0): many widths D, each a compile
    CL_FAST_AUTOTUNE=0 "$PY" -m pytest -q -x -rs -p no:cacheprovider "${timeout_args[@]}" tests
}

gpu_count() {
    "$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0
}

dist_bench() {
    # nt_xent / clip_loss with group=WORLD (gather, ring) against OpenCLIP-style gather-with-grad,
    # one rank per GPU over NCCL; a dry run (BENCH_DEVICE=cpu) uses 2 gloo ranks at small sizes
    if [[ $BENCH_DEVICE == cpu ]]; then
        "$PY" benchmarks/dist_bench.py --device cpu --world 2 --sizes 512,2048 \
            --md "$OUT/dist_gpu.md" --csv "$OUT/dist_gpu.csv"
        return
    fi
    # shellcheck disable=SC2086
    "$PY" benchmarks/dist_bench.py --device cuda --world "$(gpu_count)" $DIST_ARGS \
        --md "$OUT/dist_gpu.md" --csv "$OUT/dist_gpu.csv"
}

bench() {
    # stop starting new cells 40 s before the step's limit, so the tables and the plot get written
    # shellcheck disable=SC2086
    "$PY" -m cl_fast bench --device "$BENCH_DEVICE" $BENCH_ARGS --time-budget "$(($1 - 40))" --cell-timeout 90 \
        --csv "$OUT/bench_gpu.csv" --md "$OUT/bench_gpu.md" --plot "$OUT/bench_gpu.png"
}
export -f env_info build kernels tests gpu_count dist_bench bench

for s in $STEPS; do
    case $s in
    env) run_step env 40 "$OUT/env.log" bash -c env_info ;;
    build) run_step build "$BUILD_LIMIT" "$OUT/build.log" bash -c build ;;
    kernels)
        limit=$KERNELS_LIMIT
        left=$(remaining)
        ((limit > left)) && limit=$left
        run_step kernels "$limit" "$OUT/kernels.log" bash -c "kernels $limit"
        ;;
    tests)
        if "$PY" -c "import pytest" 2>/dev/null; then
            run_step tests "$TEST_LIMIT" "$OUT/tests.log" bash -c tests
        else
            echo "== tests: skipped, pytest is not importable with $PY on this machine" | tee -a "$OUT/tests.log"
            SUMMARY+=("tests: skipped (no pytest)")
        fi
        ;;
    dist)
        n_gpus=$(gpu_count)
        if [[ $BENCH_DEVICE == cuda ]] && ((n_gpus < 2)); then
            echo "== dist: skipped, torch sees $n_gpus GPU(s) here; the NCCL benchmark needs 2 or more" | tee -a "$OUT/dist.log"
            SUMMARY+=("dist: skipped ($n_gpus GPU)")
        else
            run_step dist "$DIST_LIMIT" "$OUT/dist.log" bash -c dist_bench
        fi
        ;;
    bench)
        limit=$BENCH_LIMIT
        left=$(remaining)
        ((limit > left)) && limit=$left
        run_step bench "$limit" "$OUT/bench.log" bash -c "bench $limit"
        ;;
    *) echo "unknown step $s (known: env build kernels tests dist bench)" && FAILED+=("$s") ;;
    esac
done

echo
echo "== gpu_check summary ($(($(date +%s) - START)) s; files in $OUT)"
printf '   %s\n' "${SUMMARY[@]}"
if ((${#FAILED[@]})); then
    echo "== FAILED: ${FAILED[*]}"
    exit 1
fi
echo "== all steps passed"
