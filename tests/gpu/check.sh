#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with its own libtorch:
# the parity cases compiled for and run on CUDA, the runtime tests, and the
# issue's GPU figures: ViT-B/16 (untrained, classifier with 1000 labels) in
# bf16, throughput at batch 256 and latency at batch 1, with and without CUDA
# graphs; and `vit-msn serve` on the device (serve_check.py). Results land in $OUT.
#
# A dry run here, on the CPU against the torch 2.11 that build.sh installed,
# checks the script itself before it spends device time:
#   CHECK_DEVICE=cpu CHECK_BATCHES=1,2 CHECK_ITERS=2 \
#   TORCH_LIB=$PWD/.scratch/venv-torch211/lib/python3.11/site-packages/torch/lib \
#   OUT=/tmp/gpu-dry bash .scratch/gpu-bundle/check.sh
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-/tmp}
mkdir -p "$out"
device=${CHECK_DEVICE:-cuda}
batches=${CHECK_BATCHES:-1,256}
iters=${CHECK_ITERS:-50}
torch_lib=${TORCH_LIB:-$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')}
export LD_LIBRARY_PATH="$torch_lib" VIT_MSN_BIN="$here/vit-msn" VIT_MSN_FIXTURES="$here/fixtures" VIT_MSN_TEST_DEVICE="$device" VIT_MSN_SCRATCH=/tmp/vit-msn-scratch
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$here/vit-msn" --version
"$here/parity" --test-threads 1 --nocapture base sdpa classifier_bin classifier_regression artifact_f16 artifact_bf16 cuda_graphs 2>&1 | tee "$out/parity.log"
"$here/runtime" --test-threads 1 --skip runtime_does_not_depend_on_the_graph --skip binary_dynamic_section --skip cuda_support_missing_is_a_clear_error 2>&1 | tee "$out/runtime.log"

vitb=/tmp/vit-msn-vitb16
rm -rf "$vitb" && mkdir -p "$vitb"
cat > "$vitb/config.json" <<'JSON'
{"model_type": "vit_msn", "architectures": ["ViTMSNForImageClassification"],
 "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
 "intermediate_size": 3072, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
 "image_size": 224, "patch_size": 16, "num_channels": 3, "qkv_bias": true,
 "num_labels": 1000}
JSON
"$here/vit-msn" init --config "$vitb/config.json" --out "$vitb/model"
for dtype in bf16 f32; do
  "$here/vit-msn" compile --model "$vitb/model" --out "$vitb/bundle-$dtype" --dtype "$dtype" --device "$device"
done
bench() { "$here/vit-msn" bench --device "$device" --batch "$batches" --warmup 10 --json "$@"; }
bench --bundle "$vitb/bundle-bf16" --iters "$iters" | tee "$out/vitb16-bf16.json"
if [ "$device" != cpu ]; then
  bench --bundle "$vitb/bundle-bf16" --iters "$iters" --cuda-graphs | tee "$out/vitb16-bf16-graphs.json"
fi
bench --bundle "$vitb/bundle-f32" --iters 20 | tee "$out/vitb16-f32.json"
# vit-msn serve on the device: a binary request against `vit-msn run`, 16 at once, SIGTERM.
python3 "$here/serve_check.py" --bin "$here/vit-msn" --bundle "$vitb/bundle-f32" --device "$device" 2>&1 | tee "$out/serve.log"
