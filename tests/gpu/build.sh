#!/usr/bin/env bash
# Builds the GPU check against PyTorch 2.11.0 / tch 0.24 (what the GPU machines
# carry), in a scratch copy of the working tree, and packs what the device
# needs into .scratch/gpu-bundle (small: the binary, the CUDA-graph library,
# two test binaries, and a few fixtures; libtorch is the machine's own).
#
#   bash tests/gpu/build.sh          # here, once: about 5 GB of download and ~10 min of build
#   then, on the GPU machine (carry .scratch/gpu-bundle):
#   bash .scratch/gpu-bundle/check.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
scratch=$root/.scratch
venv=$scratch/venv-torch211
src=$scratch/gpu-src
out=$scratch/gpu-bundle

if [ ! -f "$venv/.done" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --progress-bar on torch==2.11.0
  touch "$venv/.done"
fi
# The CUDA headers' crt/ folder, for the CUDA-graph library (see the Makefile).
if [ ! -f "$venv/.cuda-headers" ]; then
  "$venv/bin/pip" install nvidia-cuda-crt==13.0.88
  touch "$venv/.cuda-headers"
fi
torch_dir=$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')

# A copy of the tracked and untracked-not-ignored files, with tch pinned to 0.24.
rm -rf "$src" && mkdir -p "$src"
(cd "$root" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$src"
sed -i 's/^tch = "0.26"/tch = "0.24"/; s/^torch-sys = "0.26"/torch-sys = "0.24"/' "$src/Cargo.toml" "$src/graph/Cargo.toml"
rm -f "$src/Cargo.lock" "$src/.cargo/config.toml"

export LIBTORCH="$torch_dir" CARGO_TARGET_DIR="$scratch/gpu-target"
(cd "$src" && cargo build --release --bin vit-msn && cargo test --release --no-run --test parity --test runtime 2>&1 | tee "$scratch/gpu-build.log")

rm -rf "$out" && mkdir -p "$out/fixtures"
cp "$CARGO_TARGET_DIR/release/vit-msn" "$out/"
# The runtime looks for the CUDA-graph library beside the running program.
graphs_lib=$(ls -t "$CARGO_TARGET_DIR"/release/build/vit-msn-*/out/libvit_msn_cuda_graphs.so | head -n 1)
cp "$graphs_lib" "$out/"
for t in parity runtime; do
  exe=$(ls -t "$CARGO_TARGET_DIR"/release/deps/$t-* | grep -v '\.d$' | head -n 1)
  cp "$exe" "$out/$t"
done
# Small cases only: what travels to the GPU machine is limited to 64 MiB.
for case in base sdpa no_qkv_bias classifier_bin classifier_regression artifact_f16 artifact_bf16; do
  cp -r "$root/tests/fixtures/generated/$case" "$out/fixtures/"
done
touch "$out/fixtures/COMPLETE"
cp "$root/tests/gpu/check.sh" "$root/tests/gpu/serve_check.py" "$out/"
du -sh "$out"
