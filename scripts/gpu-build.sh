#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs, for a GPU machine without a Rust toolchain: the release xtask
# binary and the test binaries with CUDA parity tests, copied under stable names into target/gpu
# (about 40 MB; carry that folder to the GPU machine with the checkout).
#
#   scripts/gpu-build.sh            # then, there: bash scripts/gpu-check.sh quick target/gpu "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu
rm -rf "$out"
mkdir -p "$out"
cargo build --release -p xtask
cp target/release/xtask "$out/xtask"
# The CUDA feature of every crate with a device path; the test binaries' real-device halves need it.
features="swav-tensor/cuda,swav-sinkhorn/cuda,swav-train/cuda"
tests=(device_ops device sync_batchnorm step_on_device cuda_parity device_train end_to_end cases)
args=()
for t in "${tests[@]}"; do args+=(--test "$t"); done
cargo test --release --no-run --message-format=json --features "$features" \
    -p swav-tensor -p swav-sinkhorn -p swav-train -p swav-eval -p swav-reference "${args[@]}" > "$out/build.json"
python3 - "$out" "${tests[@]}" <<'PY'
import json, shutil, sys
out, wanted = sys.argv[1], set(sys.argv[2:])
found = {}
for line in open(f"{out}/build.json"):
    m = json.loads(line)
    name = m.get("target", {}).get("name")
    if m.get("reason") == "compiler-artifact" and m.get("executable") and name in wanted:
        if name in found and found[name] != m["executable"]:
            sys.exit(f"gpu-build: two test binaries named {name}: {found[name]} and {m['executable']}")
        found[name] = m["executable"]
        shutil.copy(m["executable"], f"{out}/{name}")
if wanted - set(found):
    sys.exit(f"gpu-build: test binaries not built: {sorted(wanted - set(found))}")
for n, p in sorted(found.items()):
    print(f"{out}/{n} <- {p}")
PY
rm "$out/build.json"
du -sh "$out"
