#!/usr/bin/env bash
# f32, f16, bf16 and int8 side by side on this CPU as it is and as an
# AVX2-only CPU (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
# FBGEMM_ENABLE_INSTRUCTIONS=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2), vit-msn-small shape at
# 224, untrained weights, `vit-msn bench` at batch 1 and 8. Rounds alternate
# the bundles, so drift hits every one alike. Figures: docs/performance.md.
#
#   bash benches/cpu_kinds.sh [rounds (3)] [iters (15)]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
iters=${2:-15}
bin=target/release/vit-msn
work=target/cpu-kinds
[ -x "$bin" ] || cargo build --release
rm -rf "$work"; mkdir -p "$work"
cat > "$work/config.json" <<'JSON'
{"architectures": ["ViTMSNModel"], "model_type": "vit_msn", "hidden_size": 384,
 "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536,
 "image_size": 224, "patch_size": 16}
JSON
"$bin" init --config "$work/config.json" --out "$work/model" >/dev/null
grep -m1 'model name' /proc/cpuinfo
echo "flags: $(grep -o -w -E 'avx2|avx512f|avx512_bf16|avx512_fp16|amx_bf16|amx_fp16|avx_ne_convert' /proc/cpuinfo | sort -u | tr '\n' ' ')"
# Compiled on this CPU (bf16 takes oneDNN's kernel where it has it), and as on AVX2.
avx2=(ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2)
for d in f32 f16 bf16 int8; do
  "$bin" compile --model "$work/model" --out "$work/$d" --dtype "$d" 2>/dev/null
  env "${avx2[@]}" "$bin" compile --model "$work/model" --out "$work/$d-avx2" --dtype "$d" 2>/dev/null
done
for r in $(seq "$rounds"); do
  for d in f32 f16 bf16 int8; do
    for mode in native avx2; do
      if [ "$mode" = native ]; then env=(); b="$work/$d"; else env=("${avx2[@]}"); b="$work/$d-avx2"; fi
      env "${env[@]}" "$bin" bench --bundle "$b" --batch 1,8 --iters "$iters" --json 2>/dev/null \
        | python3 -c "import json,sys; r=json.load(sys.stdin); print('round $r $mode $d', ' '.join(f\"b{x['batch']} median {x['median_ms']:.1f} min {x['min_ms']:.1f}\" for x in r['results']))"
    done
  done
done
