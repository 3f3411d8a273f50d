#!/usr/bin/env bash
# `make interop`: builds examples/cpp against the venv's libtorch, runs it on a
# Rust-compiled artifact of the fine-tuned fixture with a mask and a head mask,
# and compares its outputs with the Rust runtime's and with transformers'.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
py=.venv/bin/python
work=target/interop-cpp
rm -rf "$work" && mkdir -p "$work"
fx=tests/fixtures/generated/finetuned
./target/debug/vit-msn compile --model "$fx/model" --out "$work/bundle" --resolutions 64,80x96 --outputs attentions
cmake -S examples/cpp -B "$work/build" -DTORCH_ROOT="$($py -c 'import os, torch; print(os.path.dirname(torch.__file__))')" -DCMAKE_BUILD_TYPE=Release > "$work/cmake.log"
cmake --build "$work/build" -j 2 > "$work/build.log"
# torch.jit.script reads the class's source, so it runs from a file.
cat > "$work/make_inputs.py" <<'PY'
import sys, torch
from safetensors.torch import load_file
x = load_file(sys.argv[1])
class Inputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("pixel_values", x["pixel_values"])
        self.register_buffer("bool_masked_pos", x["bool_masked_pos"].bool())
        self.register_buffer("head_mask", x["head_mask"])
    def forward(self):
        return self.pixel_values
torch.jit.save(torch.jit.script(Inputs()), sys.argv[2])
PY
$py "$work/make_inputs.py" "$fx/masked.in.safetensors" "$work/inputs.pt"
"$work/build/run_artifact" "$work/bundle/model_80x96.pt" "$work/inputs.pt" "$work/cpp_out.pt"
# oneMKL as a C++ application has it (src/mkl.rs), so the two compare bit for bit.
VIT_MSN_MKL_AMD_AS_INTEL=0 ./target/debug/vit-msn run --bundle "$work/bundle" --inputs "$fx/masked.in.safetensors" --output "$work/rust_out.safetensors"
$py - "$work/cpp_out.pt" "$work/rust_out.safetensors" "$fx/masked.ref.safetensors" <<'PY'
import sys, torch
from safetensors.torch import load_file
cpp = torch.load(sys.argv[1], weights_only=False)
rust, ref = load_file(sys.argv[2]), load_file(sys.argv[3])
for name in ("logits", "attentions"):
    d = (cpp[name] - rust[name]).abs().max().item()
    print(f"{name}: C++ vs Rust runtime max |diff| {d:.3g}")
    assert d == 0.0, name
r = (cpp["logits"] - ref["logits"]).abs().max().item()
bound = 1e-4 * max(1.0, ref["logits"].abs().max().item())
print(f"logits: C++ vs transformers max |diff| {r:.3g} (bound {bound:.3g})")
assert r <= bound
print("interop: C++ outputs equal the Rust runtime's and match transformers")
PY

# The same fine-tuned model as an int8 artifact (quantized::linear_dynamic with
# packed weights): C++ loads it as plain TorchScript and computes exactly what
# the Rust runtime does, and stays within the int8 bound of transformers' f32.
./target/debug/vit-msn compile --model "$fx/model" --out "$work/bundle-int8" --resolutions 64,80x96 --outputs attentions --dtype int8
"$work/build/run_artifact" "$work/bundle-int8/model_80x96.pt" "$work/inputs.pt" "$work/cpp_int8_out.pt"
VIT_MSN_MKL_AMD_AS_INTEL=0 ./target/debug/vit-msn run --bundle "$work/bundle-int8" --inputs "$fx/masked.in.safetensors" --output "$work/rust_int8_out.safetensors"
$py - "$work/cpp_int8_out.pt" "$work/rust_int8_out.safetensors" "$fx/masked.ref.safetensors" <<'PY'
import sys, torch
from safetensors.torch import load_file
cpp = torch.load(sys.argv[1], weights_only=False)
rust, ref = load_file(sys.argv[2]), load_file(sys.argv[3])
for name in ("logits", "attentions"):
    d = (cpp[name] - rust[name]).abs().max().item()
    print(f"int8 {name}: C++ vs Rust runtime max |diff| {d:.3g}")
    assert d == 0.0, name
r = (cpp["logits"] - ref["logits"]).abs().max().item()
bound = 0.12 * max(1.0, ref["logits"].abs().max().item())  # tests/int8.rs LOGITS_BOUND
print(f"int8 logits: C++ vs transformers f32 max |diff| {r:.3g} (bound {bound:.3g})")
assert r <= bound
print("interop: int8 C++ outputs equal the Rust runtime's and stay within the int8 bound")
PY
