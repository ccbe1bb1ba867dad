#!/usr/bin/env bash
# The GPU checks of swav-rs, as one script for a GPU machine that has no Rust toolchain: build here with
# scripts/gpu-build.sh, carry target/gpu with the checkout, run this there from the checkout's root.
#
#   bash scripts/gpu-check.sh quick [BIN_DIR] [OUT]   # under 3 minutes: does the CUDA path work?
#   bash scripts/gpu-check.sh full  [BIN_DIR] [OUT]   # + training parity, reference tests, benchmarks
#
# BIN_DIR defaults to target/gpu, OUT to $OUT (or gpu-check-out). Every stage runs under `timeout`,
# writes its whole output to OUT/<stage>.log, and appends its verdict to OUT/summary.txt as soon as it
# ends, so a run cut short still reports what it did. The exit status is the number of failed stages
# (0: all passed). Parity tests run with SWAV_REQUIRE_CUDA=1 (a missing device or library is a
# failure, not a skip) and SWAV_SKIP_EMULATOR=1 (their emulated halves run in CI already).
# SWAV_GPU_CHECK_LIMIT=S caps every stage's time limit at S seconds (the script's own test uses it).
# SWAV_GPU_CHECK_STAGES="NAME ..." runs only the named stages: the full mode takes longer than one
# 10-minute call, so it is run in parts, e.g. "train-parity eval-on-cuda reference-tests", then the
# benchmarks, then "pipeline-on-cuda".
set -u
mode="${1:-quick}"
bin="${2:-target/gpu}"
out="${3:-${OUT:-gpu-check-out}}"
case "$mode" in quick | full) ;; *) echo "usage: $0 quick|full [BIN_DIR] [OUT]" >&2; exit 64 ;; esac
cd "$(dirname "$0")/.."
mkdir -p "$out"
bin="$(cd "$bin" && pwd)"
summary="$out/summary.txt"
: > "$summary"
failed=0
started=$(date +%s)

note() { echo "$*" | tee -a "$summary"; }

# stage NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output to OUT/NAME.log.
stage() {
    local name="$1" limit="$2"
    shift 2
    # SWAV_GPU_CHECK_STAGES="a b": run only those stages (a device call is limited to 10 minutes, so
    # the full mode is run in parts).
    if [ -n "${SWAV_GPU_CHECK_STAGES:-}" ] && [[ " $SWAV_GPU_CHECK_STAGES " != *" $name "* ]]; then
        return 0
    fi
    if [ -n "${SWAV_GPU_CHECK_LIMIT:-}" ] && [ "$SWAV_GPU_CHECK_LIMIT" -lt "$limit" ]; then
        limit="$SWAV_GPU_CHECK_LIMIT"
    fi
    local t0 rc secs verdict
    t0=$(date +%s.%N)
    timeout --kill-after=5 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if [ "$rc" -eq 0 ]; then
        verdict="ok"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        verdict="FAILED: timed out after $limit s"
    else
        verdict="FAILED: exit $rc"
    fi
    printf '%-26s %-34s %7s s\n' "$name" "$verdict" "$secs" | tee -a "$summary"
    if [ "$rc" -ne 0 ]; then
        failed=$((failed + 1))
        tail -n 25 "$out/$name.log" | sed 's/^/    | /' | tee -a "$summary"
    fi
    return 0
}

# The libraries: PyTorch's venv first, every real folder on the loader path (scripts/gpu-env.sh).
# shellcheck source=gpu-env.sh
source scripts/gpu-env.sh > "$out/env.log" 2>&1
note "swav-rs GPU check ($mode), $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -n)"
note "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4)"
python=""
for p in /opt/*/.venv/bin/python python3; do
    if "$p" -c 'import torch, torchvision; assert torch.cuda.is_available()' > /dev/null 2>&1; then
        python="$p"
        break
    fi
done
note "PyTorch baseline: ${python:-none (no python with torch and CUDA)}"
# The test binaries were built elsewhere: their reference cases are read from this checkout.
export SWAV_SOURCE_DIR="$PWD"
export SWAV_REQUIRE_CUDA=1 SWAV_SKIP_EMULATOR=1 RUST_LOG=warn

# Quick: does every part of the CUDA path work?
stage doctor 60 "$bin/xtask" doctor
stage tensors 60 "$bin/device" --nocapture --skip nccl
stage ops-parity 120 "$bin/device_ops" --nocapture
stage step-ops-parity 120 "$bin/step_on_device" --nocapture
stage sync-bn-parity 60 "$bin/sync_batchnorm" --nocapture
stage sinkhorn-parity 120 "$bin/cuda_parity" --nocapture --skip nccl
stage nccl-one-rank 60 "$bin/cuda_parity" nccl --nocapture
stage nccl-gradients-one-rank 60 "$bin/device" nccl --nocapture
stage reference-on-cuda 150 "$bin/xtask" verify-reference --device cuda swav-reference/cases/*.safetensors
bench_py=()
[ -n "$python" ] && bench_py=(--python "$python")
stage bench-rn18-small-bf16 120 "$bin/xtask" bench step --device cuda --preset rn18-small --batch 256 \
    --steps 10 --warmup 3 "${bench_py[@]}"

if [ "$mode" = full ]; then
    stage train-parity 300 "$bin/device_train" --nocapture
    stage eval-on-cuda 300 "$bin/end_to_end" cuda --nocapture
    stage reference-tests 300 "$bin/cases" --nocapture
    # The issue's targets: ResNet-50 2x224+6x96, batch 64 (bf16, fp32), batch 128; ResNet-18 small stem.
    rn50=(--preset rn50 --arch resnet50 --crops 2x224,6x96 --steps 10 --warmup 3)
    stage bench-rn50-b64-bf16 400 "$bin/xtask" bench step --device cuda "${rn50[@]}" --batch 64 "${bench_py[@]}"
    stage bench-rn50-b64-fp32 400 "$bin/xtask" bench step --device cuda "${rn50[@]}" --batch 64 --precision fp32 \
        "${bench_py[@]}"
    stage bench-rn50-b128-bf16 400 "$bin/xtask" bench step --device cuda "${rn50[@]}" --batch 128 "${bench_py[@]}"
    stage profile-rn50-b64-bf16 300 "$bin/xtask" bench step --device cuda "${rn50[@]}" --batch 64 --profile
    # End to end on the embedded Fashion-MNIST split: preprocess, train on the GPU, evaluate, export.
    stage pipeline-on-cuda 500 "$bin/xtask" pipeline --out "$out/pipeline" --device cuda
fi

note "total $(($(date +%s) - started)) s, $failed stage(s) failed; logs in $out"
exit "$failed"
