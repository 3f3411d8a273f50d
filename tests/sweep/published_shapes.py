"""The shapes of the published ViT-MSN checkpoints, with seeded random weights,
through `vit-msn compile` and `vit-msn run --inputs` against transformers 4.46.3
(eager attention, f32). `make shapes` runs all five; `make test` runs small and
base in every dtype with every output, here and as on an AVX2-only CPU.

    .venv/bin/python tests/sweep/published_shapes.py [--only base-4,large-7]
        [--dtype f32|bf16|f16] [--all-outputs] [--modes native,native-avx2,avx2]
        [--work DIR] [--bin target/release/vit-msn]

Each shape is saved as transformers saves it (.bin or .safetensors, backbone
or classifier), compiled at its trained resolution and one interpolated,
non-square one, and run at each: at 224 with a mask and a (layers, heads)
head mask, and (for a classifier) labels; at the other resolution plain.
--modes: compiled and run here (native), compiled here and run under
ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 (native-avx2), or compiled and
run under them (avx2). Every output is held to its bound in
tests/bounds.json against the f32 reference; a shape's folder is
removed once it passes. Exits 1 when any shape fails.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
from make_fixtures import make_model, run_reference  # noqa: E402

with open(os.path.join(ROOT, "tests", "bounds.json")) as f:
    BOUNDS = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
# Run under this environment, a machine with AVX-512 computes as an AVX2-only one does.
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

# name: (config, task, weights format, interpolated resolution)
SHAPES = {
    "small": (dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                   patch_size=16), "backbone", "bin", (160, 192)),
    "base": (dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  patch_size=16), "classifier", "safetensors", (256, 192)),
    "large": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                   patch_size=16), "backbone", "safetensors", (192, 240)),
    "base-4": (dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    patch_size=4), "backbone", "bin", (112, 160)),
    "large-7": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     patch_size=7), "classifier", "safetensors", (112, 140)),
}
NUM_LABELS = 10


def inputs_for(cfg, task, h, w, g, masked):
    p = cfg["patch_size"]
    inputs = {"pixel_values": torch.randn(1, 3, h, w, generator=g)}
    if masked:
        inputs["bool_masked_pos"] = torch.rand(1, (h // p) * (w // p), generator=g) < 0.3
        hm = torch.rand(cfg["num_hidden_layers"], cfg["num_attention_heads"], generator=g)
        hm[0, 0] = 0.0
        inputs["head_mask"] = hm
        if task == "classifier":
            inputs["labels"] = torch.randint(0, NUM_LABELS, (1,), generator=g)
    return inputs


# How a bundle is compiled and run: (name, compile environment, run environment).
MODES = {
    "native": ({}, {}),
    "native-avx2": ({}, AVX2_ENV),
    "avx2": (AVX2_ENV, AVX2_ENV),
}


def output_kind(key):
    return key if key in ("hidden_states", "attentions") else "primary"


def check_shape(name, dtype, work, binary, all_outputs, modes):
    cfg, task, fmt, other = SHAPES[name]
    cfg = dict(cfg, image_size=224)
    root = os.path.join(work, name)
    shutil.rmtree(root, ignore_errors=True)
    start = time.time()
    model = make_model(cfg, task, seed=sum(map(ord, name)),
                       num_labels=NUM_LABELS if task == "classifier" else None)
    model.save_pretrained(os.path.join(root, "model"), safe_serialization=fmt == "safetensors")
    res = [(224, 224), other]
    g = torch.Generator().manual_seed(1)
    cases = []
    for i, (h, w) in enumerate(res):
        inputs = inputs_for(cfg, task, h, w, g, masked=i == 0)
        src = os.path.join(root, f"in_{h}x{w}.safetensors")
        save_file({k: v.contiguous() for k, v in inputs.items()}, src)
        cases.append((h, w, src, run_reference(model, inputs, all_outputs, all_outputs)))
    ok = True
    bundles = {}
    for mode in modes:
        compile_env, run_env = MODES[mode]
        key = tuple(sorted(compile_env.items()))
        if key not in bundles:
            bundle = os.path.join(root, f"bundle{len(bundles)}")
            args = [binary, "compile", "--model", os.path.join(root, "model"), "--out", bundle, "--dtype", dtype,
                    "--resolutions", ",".join(f"{h}x{w}" for h, w in res)]
            if all_outputs:
                args += ["--outputs", "hidden_states,attentions"]
            r = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, **compile_env))
            if r.returncode:
                print(f"{name} [{mode}]: compile failed: {r.stderr.strip()}")
                ok = False
                continue
            bundles[key] = bundle
        bundle = bundles[key]
        for h, w, src, ref in cases:
            out = os.path.join(root, "out.safetensors")
            r = subprocess.run([binary, "run", "--bundle", bundle, "--inputs", src, "--output", out],
                               capture_output=True, text=True, env=dict(os.environ, **run_env))
            if r.returncode:
                print(f"{name} [{mode}] {h}x{w}: run failed: {r.stderr.strip()}")
                ok = False
                continue
            ours = load_file(out)
            for key_, want in ref.items():
                if key_ == "loss":
                    continue  # a scalar of the logits, held with them
                scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
                diff = (ours[key_] - want).abs().max().item() if want.numel() else 0.0
                bound = BOUNDS[dtype][output_kind(key_)] * scale
                ok &= diff <= bound
                print(f"{name} ({task}, .{fmt}, {dtype}) [{mode}] {h}x{w} {key_}: max |diff| {diff:.2e}, "
                      f"relative {diff / scale:.2e}, {diff / bound:.3f} of the bound", flush=True)
    print(f"{name}: {'ok' if ok else 'FAILED'} in {time.time() - start:.0f} s", flush=True)
    if ok:
        shutil.rmtree(root, ignore_errors=True)
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated shape names")
    ap.add_argument("--dtype", default="f32", choices=sorted(BOUNDS))
    ap.add_argument("--all-outputs", action="store_true",
                    help="compile with hidden_states and attentions, and hold each to its bound")
    ap.add_argument("--modes", default="native",
                    help="comma-separated: native, native-avx2 (compiled here, run as on an AVX2-only CPU), "
                         "avx2 (compiled and run so)")
    ap.add_argument("--work", default=os.path.join(ROOT, "target", "shapes"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "vit-msn"))
    a = ap.parse_args()
    names = [n for n in a.only.split(",") if n] or list(SHAPES)
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        sys.exit(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    modes = [m for m in a.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        sys.exit(f"--modes: expected some of {', '.join(MODES)}")
    torch.set_num_threads(2)
    failed = [n for n in names if not check_shape(n, a.dtype, a.work, a.bin, a.all_outputs, modes)]
    print(f"{len(names) - len(failed)} of {len(names)} shapes within the {a.dtype} bounds"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
