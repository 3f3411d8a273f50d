"""Puts the same weights through every stack, in one run on this machine, and
prints a table: median ms at batch 1, median ms per image at batch 8, and the
ratio to transformers f32.

    .venv/bin/python benches/side_by_side.py [--threads 2] [--iters 15] [--shape small|tiny|base]
    (make side-by-side installs onnxruntime and onnx first)

Stacks, all on the venv's torch 2.13.0 except ONNX Runtime:
  transformers 4.46.3 ViTMSNModel, SDPA, f32 and bf16
  the same model traced in Python, frozen, optimize_for_inference
  ONNX Runtime (CPU EP), the same model exported to ONNX
  this runtime: vit-msn bench on bundles compiled from the same checkpoint, f32 and bf16
Random weights: these are speed figures, not accuracy.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import ViTMSNConfig, ViTMSNModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "vit-msn")
SHAPES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


def time_fn(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000, min(ts) * 1000


def torch_rows(model, batches, iters):
    rows = {}
    with torch.inference_mode():
        for b in batches:
            px = torch.randn(b, 3, 224, 224)
            rows[("transformers SDPA f32", b)] = time_fn(lambda: model(px), iters)
        traced = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, torch.randn(1, 3, 224, 224), strict=False)))
        for b in batches:
            px = torch.randn(b, 3, 224, 224)
            rows[("TorchScript trace + freeze + optimize_for_inference", b)] = time_fn(lambda: traced(px), iters)
        bf16 = ViTMSNModel(model.config).eval()
        bf16.load_state_dict(model.state_dict())
        bf16 = bf16.to(torch.bfloat16)
        for b in batches:
            px = torch.randn(b, 3, 224, 224, dtype=torch.bfloat16)
            rows[("transformers SDPA bf16", b)] = time_fn(lambda: bf16(px), iters)
    return rows


def ort_rows(model, batches, iters, threads, tmp):
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime is not installed: skipping (make side-by-side installs it)", file=sys.stderr)
        return {}
    path = os.path.join(tmp, "model.onnx")
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), path, input_names=["pixel_values"],
                      output_names=["last_hidden_state"], dynamic_axes={"pixel_values": {0: "b"}},
                      opset_version=17, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    rows = {}
    for b in batches:
        px = torch.randn(b, 3, 224, 224).numpy()
        rows[(f"ONNX Runtime {ort.__version__} f32", b)] = time_fn(lambda: sess.run(None, {"pixel_values": px}), iters)
    return rows


def runtime_rows(model_dir, batches, iters, threads, tmp):
    rows = {}
    for dtype in ("f32", "bf16"):
        bundle = os.path.join(tmp, f"bundle-{dtype}")
        subprocess.run([BIN, "compile", "--model", model_dir, "--out", bundle, "--dtype", dtype], check=True,
                       stderr=subprocess.DEVNULL)
        out = subprocess.run([BIN, "bench", "--bundle", bundle, "--batch", ",".join(map(str, batches)),
                              "--iters", str(iters), "--warmup", "3", "--threads", str(threads), "--json"],
                             check=True, capture_output=True, text=True).stdout
        for r in json.loads(out)["results"]:
            rows[(f"vit-msn (this runtime) {dtype}", r["batch"])] = (r["median_ms"], float("nan"))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden, heads = SHAPES[args.shape]
    cfg = ViTMSNConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden,
                       num_hidden_layers=12, image_size=224, patch_size=16, attn_implementation="sdpa")
    model = ViTMSNModel(cfg).eval()
    batches = [1, 8]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        model.save_pretrained(model_dir)
        rows = {}
        rows.update(runtime_rows(model_dir, batches, args.iters, args.threads, tmp))
        rows.update(torch_rows(model, batches, args.iters))
        rows.update(ort_rows(model, batches, args.iters, args.threads, tmp))
    names = []
    for name, _ in rows:
        if name not in names:
            names.append(name)
    base1 = rows[("transformers SDPA f32", 1)][0]
    base8 = rows[("transformers SDPA f32", 8)][0] / 8
    print(f"\nViT-MSN {args.shape} shape, 224, random weights; torch {torch.__version__}, {args.threads} threads, "
          f"median of {args.iters} after 3 warm-up passes")
    print(f"| stack | batch 1 (ms) | batch 8 (ms per image) | ratio to transformers f32 (b1 / b8) |")
    print("|---|---|---|---|")
    for name in names:
        m1 = rows[(name, 1)][0]
        m8 = rows[(name, 8)][0] / 8
        print(f"| {name} | {m1:.1f} | {m8:.1f} | {m1 / base1:.2f} / {m8 / base8:.2f} |")


if __name__ == "__main__":
    main()
