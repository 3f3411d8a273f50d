"""The shapes of the published ViT-MSN checkpoints, with seeded random weights,
through `vit-msn compile` and `vit-msn run --inputs` against transformers 4.46.3
(eager attention, f32). `make shapes` runs it; it is not part of `make test`
(about 2.5 minutes on 2 cores, and up to 4 GB of disk at a time under --work).

    .venv/bin/python tests/sweep/published_shapes.py [--only base-4,large-7]
        [--dtype f32|bf16|f16] [--work DIR] [--bin target/release/vit-msn]

Each shape is saved as transformers saves it (.bin or .safetensors, backbone
or classifier), compiled at its trained resolution and one interpolated,
non-square one, and run at each: at 224 with a mask and a (layers, heads)
head mask, and (for a classifier) labels; at the other resolution plain.
Every output is held to tol * max(1, max|ref|) against the f32 reference
(f32 1e-4; bf16 and f16 artifacts 3e-2 and 4e-3, as in the sweep). A shape's
folder is removed once it passes. Exits 1 when any shape fails.
"""

import argparse
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

TOLERANCE = {"f32": 1e-4, "bf16": 3e-2, "f16": 4e-3}

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


def check_shape(name, dtype, work, binary):
    cfg, task, fmt, other = SHAPES[name]
    cfg = dict(cfg, image_size=224)
    root = os.path.join(work, name)
    shutil.rmtree(root, ignore_errors=True)
    start = time.time()
    model = make_model(cfg, task, seed=sum(map(ord, name)),
                       num_labels=NUM_LABELS if task == "classifier" else None)
    model.save_pretrained(os.path.join(root, "model"), safe_serialization=fmt == "safetensors")
    bundle = os.path.join(root, "bundle")
    res = [(224, 224), other]
    r = subprocess.run([binary, "compile", "--model", os.path.join(root, "model"), "--out", bundle, "--dtype", dtype,
                        "--resolutions", ",".join(f"{h}x{w}" for h, w in res)], capture_output=True, text=True)
    if r.returncode:
        print(f"{name}: compile failed: {r.stderr.strip()}")
        return False
    g = torch.Generator().manual_seed(1)
    ok = True
    for i, (h, w) in enumerate(res):
        inputs = inputs_for(cfg, task, h, w, g, masked=i == 0)
        src, out = os.path.join(root, "in.safetensors"), os.path.join(root, "out.safetensors")
        save_file({k: v.contiguous() for k, v in inputs.items()}, src)
        r = subprocess.run([binary, "run", "--bundle", bundle, "--inputs", src, "--output", out],
                           capture_output=True, text=True)
        if r.returncode:
            print(f"{name} {h}x{w}: run failed: {r.stderr.strip()}")
            ok = False
            continue
        ours = load_file(out)
        for key, ref in run_reference(model, inputs, False, False).items():
            diff = (ours[key] - ref).abs().max().item()
            bound = TOLERANCE[dtype] * max(1.0, ref.abs().max().item())
            ok &= diff <= bound
            print(f"{name} ({task}, .{fmt}, {dtype}) {h}x{w} {key}: max |diff| {diff:.2e}, "
                  f"{diff / bound:.3f} of the bound", flush=True)
    print(f"{name}: {'ok' if ok else 'FAILED'} in {time.time() - start:.0f} s", flush=True)
    if ok:
        shutil.rmtree(root, ignore_errors=True)
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated shape names")
    ap.add_argument("--dtype", default="f32", choices=sorted(TOLERANCE))
    ap.add_argument("--work", default=os.path.join(ROOT, "target", "shapes"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "vit-msn"))
    a = ap.parse_args()
    names = [n for n in a.only.split(",") if n] or list(SHAPES)
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        sys.exit(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    torch.set_num_threads(2)
    failed = [n for n in names if not check_shape(n, a.dtype, a.work, a.bin)]
    print(f"{len(names) - len(failed)} of {len(names)} shapes within the {a.dtype} bound"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
