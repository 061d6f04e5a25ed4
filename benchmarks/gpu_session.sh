#!/usr/bin/env bash
# The GPU issue's measurements in one call of the device tool, sized to its 15-minute budget (the
# machine's start, a minute or two, counts too): the CUDA tests under both logit sources, the
# benchmark against the peers with the issue's targets, and an Nsight Compute profile of one step.
# Each stage has a time limit, so the call ends, and its results come back, even when a stage
# hangs; the later stages still run.
#
#   here, before the call: bash benchmarks/gpu_session.sh --prepare
#   on the device:         run(command="bash benchmarks/gpu_session.sh", carry=[".whl"],
#                              timeout_s=600)
#   here, dry run:         bash benchmarks/gpu_session.sh --dry-run   (every stage tiny, on the CPU)
#
# --prepare downloads the peers the device's image lacks (liger-kernel, cut-cross-entropy; pure
# Python) into .whl/, which git ignores (.git/info/exclude) and the call carries, and records the
# checkout's version there (.git does not travel), for the benchmark's rows.
# Results, in $OUT (the tool brings back at most 8 files): session.log (everything printed) and
# results.tar.gz, packed again after every stage: bench/ (the benchmark's CSV, report and plots),
# tests-<source>.log and .xml (JUnit), profile.csv (Nsight Compute). benchmarks/NOTES.md, "A GPU
# session", says how to fold them into benchmarks/results/ and what to read first.
set -uo pipefail
SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SCRIPT")/.."

LIGER_VERSION=0.8.5
CCE_VERSION=25.1.1
# Stage limits in seconds: 30 + 180 + 250 + 75 = 535, inside one 600-second command (each can be
# set in the environment, e.g. to give the benchmark a second call of its own).
SETUP_LIMIT=${SETUP_LIMIT:-30}
TESTS_LIMIT=${TESTS_LIMIT:-180}
BENCH_LIMIT=${BENCH_LIMIT:-250}
PROFILE_LIMIT=${PROFILE_LIMIT:-75}
# pytest is interrupted (SIGINT) this long before the tests stage's limit, so that it still prints
# its summary and writes its JUnit file.
TESTS_SUMMARY_SECONDS=${TESTS_SUMMARY_SECONDS:-25}
TEST_WORKERS=6  # per logit source; the two sources' runs share the GPU and its 16 CPU cores
TEST_TIMEOUT=120  # seconds per test (pytest-timeout): a hung kernel fails its test, not the stage
TEST_FILES=(tests/test_kernels.py tests/test_fused_loss.py tests/test_entropy.py
    tests/test_memory.py tests/test_logit_stats.py)
# The profile: wmss's Triton kernels and cuBLAS's products of one step (not PyTorch's small
# kernels: label checks, fills, the reduction), the first PROFILE_LAUNCHES of them: the forward
# and the first vocabulary blocks of the backward.
PROFILE_KERNELS='regex:^_[a-z_]+_kernel$|gemm|nvjet|cutlass'
PROFILE_LAUNCHES=12
VERSION_FILE=${SESSION_VERSION_FILE:-.whl/VERSION}  # the checkout's version, from --prepare

usage="usage: bash benchmarks/gpu_session.sh [--dry-run | --prepare]"
PYTHON=${PYTHON:-python3}
# The repository's packages, imported from the working tree (nothing is installed on the device);
# output unbuffered, so that what a stopped stage printed is in the log.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

prepare() {
    if ! compgen -G ".whl/liger_kernel-$LIGER_VERSION-*.whl" > /dev/null ||
            ! compgen -G ".whl/cut_cross_entropy-$CCE_VERSION-*.whl" > /dev/null; then
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux2014_x86_64 -d .whl "liger-kernel==$LIGER_VERSION" \
            "cut-cross-entropy==$CCE_VERSION" || return
    fi
    mkdir -p .git/info
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    # benchmarks.run.version_string's form: wmss's version, +g<commit>, .dirty with local changes.
    local version
    version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' wmss/__init__.py)"
    version+="+g$(git rev-parse --short HEAD)" || return
    [ -z "$(git status --porcelain --untracked-files=no)" ] || version+=".dirty"
    echo "$version" > "$VERSION_FILE"
    echo "version $(cat "$VERSION_FILE")"
    ls -l .whl
}

setup() {
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SESSION_SITE" .whl/*.whl || return
    fi
    "$PYTHON" - <<'PY'
import importlib, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__,
      "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("triton", "transformers", "liger_kernel", "cut_cross_entropy"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "(no version)"))
    except ImportError as error:
        print(name, "missing:", error)
PY
    echo "wmss ${WMSS_BENCH_VERSION:-version unknown (run --prepare before the call)}"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
            --format=csv
    fi
}

tests() {  # both logit sources at once, each in its own pytest session
    local extra=() files=("${TEST_FILES[@]}") source pids=() failed=0
    local limit=$((TESTS_LIMIT - TESTS_SUMMARY_SECONDS))
    [ "$limit" -ge 1 ] || limit=1
    if [ "$SESSION_MODE" = device ]; then
        extra=(-n "$TEST_WORKERS" --timeout "$TEST_TIMEOUT")
    else
        files=("tests/test_kernels.py::test_in_place_gradients_of_the_cublas_source_are_repeatable_to_the_bit")
    fi
    for source in triton cublas; do
        WMSS_LOGIT_SOURCE=$source timeout -k 10 -s INT "$limit" \
            "$PYTHON" -m pytest -q -rfE -p no:cacheprovider \
            --basetemp "$SESSION_RESULTS/pytest-$source" \
            --junitxml "$SESSION_RESULTS/tests-$source.xml" "${extra[@]}" "${files[@]}" \
            > "$SESSION_RESULTS/tests-$source.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || failed=1
    done
    for source in triton cublas; do
        echo "-- logit source $source:"
        tail -n 25 "$SESSION_RESULTS/tests-$source.log"
    done
    return $failed
}

bench() {  # token_entropy first (it needs one head: qwen3-4b-1.7b's strong head is qwen3-4b's)
    local out=(--out "$SESSION_RESULTS/bench")
    if [ "$SESSION_MODE" = device ]; then
        "$PYTHON" -m benchmarks --kernels token_entropy --shapes qwen3-4b --dtypes bfloat16 \
            --tokens 4096 8192 16384 --providers naive gemm_floor wmss_triton \
            wmss_triton_cublas "${out[@]}" || return
        "$PYTHON" -m benchmarks --kernels fused_loss --shapes qwen3-4b qwen3-4b-1.7b \
            --dtypes bfloat16 --tokens 4096 8192 16384 --modes forward full \
            --providers naive liger_concat cce_concat gemm_floor wmss_triton \
            wmss_triton_cublas wmss_stats wmss_frozen_weak "${out[@]}"
    else
        "$PYTHON" -m benchmarks --device cpu --kernels fused_loss --shapes tiny-pair \
            --dtypes float32 --tokens 64 --modes full \
            --providers gemm_floor wmss_native wmss_stats wmss_frozen_weak "${out[@]}" --no-plot
    fi
}

profile() {
    local ncu
    if [ "$SESSION_MODE" != device ]; then
        "$PYTHON" -m benchmarks.profile_step --device cpu --shape tiny-pair --tokens 64 \
            --dtype float32
        return
    fi
    ncu=$(command -v ncu || compgen -G "/opt/nvidia/nsight-compute/*/ncu" | tail -n 1)
    if [ -z "$ncu" ]; then
        echo "ncu not found; the profile is skipped"
        return 1
    fi
    # The step runs between cudaProfilerStart and cudaProfilerStop (profile_step.py): the
    # backward's kernels are launched from autograd's device thread, outside a main-thread NVTX
    # range.
    "$ncu" --clock-control none --profile-from-start off --kernel-name "$PROFILE_KERNELS" \
        --launch-count "$PROFILE_LAUNCHES" \
        --section SpeedOfLight --section LaunchStats --section Occupancy \
        --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum \
        --csv --print-units base --log-file "$SESSION_RESULTS/profile.csv" \
        "$PYTHON" -m benchmarks.profile_step --shape qwen3-4b --tokens 4096
}

pack() {  # the results so far, into $OUT (a call stopped later still returns them)
    tar -czf "$OUT/results.tar.gz.tmp" -C "$SESSION_RESULTS" --exclude "./pytest-*" \
        --exclude ./site . && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}

failed_stages=()

stage() {  # stage NAME LIMIT: the function NAME in a fresh shell, stopped after LIMIT seconds
    local name=$1 limit=$2 start status
    echo "== $name (limit $limit s) at $(date -u +%H:%M:%S)"
    start=$SECONDS
    # timeout signals its whole process group: the stage's pytest workers and ncu's child too.
    timeout --kill-after=10 "$limit" bash "$SCRIPT" --stage "$name"
    status=$?
    echo "== $name: exit status $status after $((SECONDS - start)) s" \
        "$([ "$status" -eq 124 ] && echo "(stopped at its limit)")"
    [ "$status" -eq 0 ] || failed_stages+=("$name")
    pack
}

session() {
    stage setup "$SETUP_LIMIT"
    stage tests "$TESTS_LIMIT"
    stage bench "$BENCH_LIMIT"
    stage profile "$PROFILE_LIMIT"
    echo "== results: $OUT/session.log, $OUT/results.tar.gz" \
        "($(du -h "$OUT/results.tar.gz" | cut -f1))"
    if [ "${#failed_stages[@]}" -gt 0 ]; then
        echo "== failed stages: ${failed_stages[*]}"
        return 1
    fi
    echo "== every stage passed"
}

case "${1:-}" in
    "" | --dry-run)
        export SESSION_MODE=device
        [ "${1:-}" = --dry-run ] && SESSION_MODE=dry-run
        OUT=${OUT:-$(mktemp -d)}
        SESSION_RESULTS=$(mktemp -d)
        trap 'rm -rf "$SESSION_RESULTS"' EXIT
        SESSION_SITE=$SESSION_RESULTS/site  # the carried wheels, installed (left out of the tar)
        # The version the benchmark records (benchmarks/run.py reads WMSS_BENCH_VERSION).
        if [ -z "${WMSS_BENCH_VERSION:-}" ] && [ -f "$VERSION_FILE" ]; then
            WMSS_BENCH_VERSION=$(cat "$VERSION_FILE")
        fi
        export SESSION_RESULTS SESSION_SITE PYTHONPATH="$PYTHONPATH:$SESSION_SITE"
        [ -n "${WMSS_BENCH_VERSION:-}" ] && export WMSS_BENCH_VERSION
        mkdir -p "$OUT"
        session 2>&1 | tee "$OUT/session.log"
        ;;
    --prepare) prepare ;;
    --stage)  # one stage, run by stage() above
        case "${2:-}" in
            setup | tests | bench | profile) "$2" ;;
            *) echo "$usage" >&2; exit 2 ;;
        esac
        ;;
    *) echo "$usage" >&2; exit 2 ;;
esac
