#!/usr/bin/env bash
# Source this before running swav-rs on a GPU machine: it finds the CUDA driver and the CUDA, cuDNN and
# NCCL libraries (the nvidia-* wheels of a Python environment first, then a toolkit and the system
# folders) and sets LD_LIBRARY_PATH so that every one of them loads, with its own dependencies:
#
# - a folder of unversioned symlinks first (libcudnn.so -> libcudnn.so.9, libnccl.so -> libnccl.so.2,
#   ...), because cudarc asks the loader for `libX.so` and a few versioned names only;
# - then the real folder of every library found: NVRTC loads libnvrtc-builtins and cuDNN 9 loads its
#   sub-libraries (libcudnn_graph, libcudnn_engines_*, ...) by name at run time, from the loader path,
#   and a symlink's folder is not where they are.
#
# Python environments come first because PyTorch's wheels carry a matched set (CUDA 13 libraries with
# the cuDNN and NCCL built for them), which system folders with older versions must not shadow.
#
#   source scripts/gpu-env.sh            # prints what it found
#   SWAV_CUDA_LIBS="/extra/dir ..." source scripts/gpu-env.sh   # searched before everything else
links="${SWAV_CUDA_LINKS:-${TMPDIR:-/tmp}/swav-cuda-libs-$(id -u)}"
mkdir -p "$links"
candidates=(${SWAV_CUDA_LIBS:-})
shopt -s nullglob
# Virtual environments (PyTorch's, e.g. /opt/torch/.venv), then whatever python3 is on the PATH.
for d in /opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib /opt/*/venv/lib/python3*/site-packages/nvidia/*/lib; do
    candidates+=("$d")
done
if site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); then
    for s in $site; do
        for d in "$s"/nvidia/*/lib; do candidates+=("$d"); done
    done
fi
candidates+=(/usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu)
shopt -u nullglob
found=()
dirs=()
for lib in cuda nvrtc cublas cublasLt curand cudnn nccl cudart; do
    for dir in "${candidates[@]}"; do
        [ -d "$dir" ] || continue
        # The highest version of the library in this folder (not the -builtins or _sub libraries).
        file=$(ls "$dir"/lib"$lib".so* 2>/dev/null | sort -V | tail -n 1)
        if [ -n "$file" ]; then
            ln -sf "$file" "$links/lib$lib.so"
            real=$(readlink -f "$file")
            found+=("lib$lib: $file")
            case " ${dirs[*]:-} " in *" $(dirname "$real") "*) ;; *) dirs+=("$(dirname "$real")") ;; esac
            break
        fi
    done
done
path="$links"
for d in "${dirs[@]:-}"; do [ -n "$d" ] && path="$path:$d"; done
export LD_LIBRARY_PATH="$path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
printf '%s\n' "${found[@]:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
[ ${#found[@]} -gt 0 ] || echo "no CUDA library found: is this a GPU machine? (set SWAV_CUDA_LIBS)" >&2
