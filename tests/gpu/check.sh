#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with its own libtorch:
# the parity cases compiled for and run on CUDA, and the runtime tests.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib" VIT_MSN_BIN="$here/vit-msn" VIT_MSN_FIXTURES="$here/fixtures" VIT_MSN_TEST_DEVICE=cuda VIT_MSN_SCRATCH=/tmp/vit-msn-scratch
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$here/vit-msn" --version
"$here/parity" --test-threads 1 --nocapture base sdpa classifier_bin artifact_f16 artifact_bf16 2>&1 | tee "${OUT:-/tmp}/parity.log"
"$here/runtime" --test-threads 1 --skip runtime_does_not_depend_on_the_graph --skip binary_dynamic_section 2>&1 | tee "${OUT:-/tmp}/runtime.log"
