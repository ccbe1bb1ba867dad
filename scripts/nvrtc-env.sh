#!/usr/bin/env bash
# Source this to make NVRTC loadable without a GPU or a CUDA toolkit, for the kernels' compile check
# (`cargo test`, tests named nvrtc_*): it finds libnvrtc in the nvidia-cuda-nvrtc wheel of a Python
# environment (CUDA 13: site-packages/nvidia/cu13/lib; CUDA 12: nvidia/cuda_nvrtc/lib) or in a CUDA
# toolkit, makes a folder with an unversioned symlink (cudarc loads `libnvrtc.so` first, then a few
# versioned names), and puts that folder and the library's own folder (where libnvrtc finds
# libnvrtc-builtins) first on LD_LIBRARY_PATH.
#
#   python3 -m pip install nvidia-cuda-nvrtc     # once
#   source scripts/nvrtc-env.sh                  # prints what it found
#
# Safe under `set -euo pipefail` (CI sources it). Works when executed too (`eval "$(scripts/nvrtc-env.sh)"`): it then prints the export line.
links="${SWAV_CUDA_LINKS:-${TMPDIR:-/tmp}/swav-cuda-libs}"
mkdir -p "$links"
dirs=(${SWAV_CUDA_LIBS:-})
for py in python3 /opt/*/.venv/bin/python; do
    site=$("$py" -c 'import site; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null) || continue
    for s in $site; do
        for d in "$s"/nvidia/cu*/lib "$s"/nvidia/cuda_nvrtc/lib; do [ -d "$d" ] && dirs+=("$d"); done
    done
done
dirs+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu)
nvrtc=""
for d in "${dirs[@]}"; do
    f=$(ls "$d"/libnvrtc.so* 2>/dev/null | grep -v builtins | sort -V | tail -n 1 || true)
    if [ -n "$f" ]; then nvrtc="$f"; break; fi
done
if [ -z "$nvrtc" ]; then
    echo "nvrtc-env: no libnvrtc found (python3 -m pip install nvidia-cuda-nvrtc, or set SWAV_CUDA_LIBS)" >&2
else
    ln -sf "$nvrtc" "$links/libnvrtc.so"
    export LD_LIBRARY_PATH="$links:$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "nvrtc-env: libnvrtc: $nvrtc" >&2
fi
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "export LD_LIBRARY_PATH=\"${LD_LIBRARY_PATH:-}\""
fi
