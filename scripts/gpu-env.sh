#!/usr/bin/env bash
# Source this before running swav-rs on a GPU machine: it finds the CUDA driver and the CUDA, cuDNN and
# NCCL libraries (system locations, a CUDA toolkit, or the nvidia-* wheels of a Python environment) and
# puts a folder of unversioned symlinks (libcudnn.so -> libcudnn.so.9, libnccl.so -> libnccl.so.2, ...)
# first on LD_LIBRARY_PATH, because cudarc loads `libX.so` and a few versioned names only.
#
#   source scripts/gpu-env.sh            # prints what it found
#   SWAV_CUDA_LIBS=/extra/dirs source scripts/gpu-env.sh
set -u
links="${SWAV_CUDA_LINKS:-${TMPDIR:-/tmp}/swav-cuda-libs}"
mkdir -p "$links"
candidates=(${SWAV_CUDA_LIBS:-} /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
for py in python3 /opt/*/.venv/bin/python; do
    site=$("$py" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null) || continue
    for s in $site; do
        for d in "$s"/nvidia/*/lib "$s"/nvidia/cu*/lib; do [ -d "$d" ] && candidates+=("$d"); done
    done
done
found=()
for lib in cuda nvrtc cublas cublasLt curand cudnn nccl cudart; do
    for dir in "${candidates[@]}"; do
        [ -d "$dir" ] || continue
        file=$(ls "$dir"/lib"$lib".so* 2>/dev/null | sort -V | tail -n 1)
        if [ -n "$file" ]; then
            ln -sf "$file" "$links/lib$lib.so"
            found+=("lib$lib: $file")
            break
        fi
    done
done
export LD_LIBRARY_PATH="$links:${LD_LIBRARY_PATH:-}"
printf '%s\n' "${found[@]}"
[ ${#found[@]} -gt 0 ] || echo "no CUDA library found: is this a GPU machine? (set SWAV_CUDA_LIBS)" >&2
