#!/usr/bin/env bash
# The GPU checks of swav-rs, as one script for a GPU machine that has no Rust toolchain: build here,
# carry the binaries, run this there.
#
#   here:   cargo build --release -p xtask && cargo test --release -p swav-sinkhorn --no-run
#           mkdir -p target/gpu && cp target/release/xtask target/gpu/ \
#             && cp $(ls -t target/release/deps/cuda_parity-* | grep -v '\.d$' | head -1) target/gpu/cuda_parity
#   there:  bash scripts/gpu-check.sh target/gpu "$OUT"
#
# Prints the device, runs every CUDA-vs-CPU parity test (failing if no GPU is found), then the
# Sinkhorn benchmark on CUDA and CPU; writes a summary to OUT/gpu-check.txt.
set -uo pipefail
bin="${1:-target/gpu}"
out="${2:-.}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh > "$out/gpu-libs.txt" 2>&1
summary="$out/gpu-check.txt"
{
    echo "== device"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
    echo "== libraries"; cat "$out/gpu-libs.txt"
    echo "== parity: swav-sinkhorn CUDA vs CPU"
    SWAV_REQUIRE_CUDA=1 "$bin/cuda_parity" --nocapture 2>&1 | tail -n 30
    echo "== bench sinkhorn (CUDA and CPU)"
    "$bin/xtask" bench sinkhorn --device all 2>&1 | tail -n 30
} | tee "$summary"
grep -q "test result: ok" "$summary" || { echo "gpu-check: parity tests did not pass" >&2; exit 1; }
