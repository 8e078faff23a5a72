#!/usr/bin/env bash
# Build the GPU test and bench binaries here (where Rust is) into gpu-bin/ (git-ignored), so that a GPU
# machine without a Rust toolchain can run them with scripts/gpu-check.sh gpu-bin.
# Set SFT_COLLATE_NVRTC (libnvrtc.so.12) first so that the kernels are prebuilt as PTX. The binaries are
# stripped of debug info to keep the folder small enough to carry to a remote machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu-bin
rm -rf "$out" && mkdir -p "$out"
cargo build --release --all-features --bin sft-collate
cp target/release/sft-collate "$out/"
copy_executables() {
    python3 -c '
import json, shutil, sys
for line in sys.stdin:
    msg = json.loads(line)
    exe = msg.get("executable")
    if msg.get("reason") == "compiler-artifact" and exe and msg["target"]["kind"][0] in ("test", "bench"):
        shutil.copy(exe, sys.argv[1] + "/" + msg["target"]["name"])
        print("  " + msg["target"]["name"])
' "$out"
}
cargo test --release --all-features --no-run --message-format=json --test backends --test cuda --test cs336 --test vocab_parallel --test linear_ce | copy_executables
cargo bench --all-features --no-run --message-format=json --bench collate --bench masked_ce --bench tokenize | copy_executables
strip --strip-debug "$out"/*
# The Python package as a wheel (abi3: any CPython 3.9+), for the GPU tests of bindings/python/tests.
if python3 -m maturin --version >/dev/null 2>&1 || [ -x target/py-venv/bin/maturin ]; then
    maturin=$( [ -x target/py-venv/bin/maturin ] && echo target/py-venv/bin/maturin || echo "python3 -m maturin" )
    $maturin build --release --strip --manifest-path bindings/python/Cargo.toml --out "$out/wheel" >/dev/null
    cp -r bindings/python/tests "$out/python-tests"
fi
ls -la "$out" "$out/wheel" 2>/dev/null
