"""Puts the same weights through every stack, in one run on this machine, and
prints a table: median ms at batch 1, median ms per image at batch 8, each
with the fastest pass in brackets, and the ratio of the medians to
transformers f32.

    .venv/bin/python benches/side_by_side.py [--threads 2] [--iters 15] [--rounds 5] [--shape small|tiny|base]
        [--task backbone|classifier]
    (make side-by-side installs onnxruntime and onnx first)

Stacks, all on the venv's torch 2.13.0 except ONNX Runtime:
  transformers 4.46.3 ViTMSNModel (or, with --task classifier,
  ViTMSNForImageClassification with 1000 labels), SDPA, f32 and bf16
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
from transformers import ViTMSNConfig, ViTMSNForImageClassification, ViTMSNModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "vit-msn")
SHAPES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
MODELS = {"backbone": ViTMSNModel, "classifier": ViTMSNForImageClassification}
OUTPUTS = {"backbone": "last_hidden_state", "classifier": "logits"}


def time_fn(fn, iters, warmup=3):
    """[median, fastest] ms of `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return [statistics.median(ts) * 1000, min(ts) * 1000]


def python_stack(name, model_dir, onnx_path, batches, iters, threads, task):
    """Times one Python-side stack; runs in a worker process of its own."""
    torch.set_num_threads(threads)
    model = MODELS[task].from_pretrained(model_dir, attn_implementation="sdpa").eval()
    dtype = torch.float32
    if name == "transformers SDPA f32":
        fn = model
    elif name == "transformers SDPA bf16":
        fn, dtype = model.to(torch.bfloat16), torch.bfloat16
    elif name == "TorchScript trace + freeze + optimize_for_inference":
        with torch.inference_mode():
            fn = torch.jit.optimize_for_inference(
                torch.jit.freeze(torch.jit.trace(model, torch.randn(1, 3, 224, 224), strict=False)))
    elif name.startswith("ONNX Runtime"):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        inputs = {b: torch.randn(b, 3, 224, 224).numpy() for b in batches}
        return {b: time_fn(lambda: sess.run(None, {"pixel_values": inputs[b]}), iters) for b in batches}
    else:
        raise SystemExit(f"unknown stack {name}")
    inputs = {b: torch.randn(b, 3, 224, 224, dtype=dtype) for b in batches}
    with torch.inference_mode():
        return {b: time_fn(lambda: fn(inputs[b]), iters) for b in batches}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--task", choices=sorted(MODELS), default="backbone",
                    help="classifier: ViTMSNForImageClassification with 1000 labels in every stack")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [1, 8]
    if args.worker:
        print(json.dumps(python_stack(args.worker, args.model_dir, args.onnx, batches, args.iters,
                                      args.threads, args.task)))
        return
    torch.manual_seed(0)
    hidden, heads = SHAPES[args.shape]
    cfg = ViTMSNConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden,
                       num_hidden_layers=12, image_size=224, patch_size=16, attn_implementation="sdpa",
                       **({"num_labels": 1000} if args.task == "classifier" else {}))
    model = MODELS[args.task](cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        model.save_pretrained(model_dir)
        stacks = {}
        for dtype in ("f32", "bf16"):
            bundle = os.path.join(tmp, f"bundle-{dtype}")
            subprocess.run([BIN, "compile", "--model", model_dir, "--out", bundle, "--dtype", dtype],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stacks[f"vit-msn (this runtime) {dtype}"] = [
                BIN, "bench", "--bundle", bundle, "--batch", ",".join(map(str, batches)), "--iters",
                str(args.iters), "--warmup", "3", "--threads", str(args.threads), "--json"]
        python_names = ["transformers SDPA f32", "TorchScript trace + freeze + optimize_for_inference",
                        "transformers SDPA bf16"]
        onnx_path = os.path.join(tmp, "model.onnx")
        try:
            import onnxruntime
            torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), onnx_path, input_names=["pixel_values"],
                              output_names=[OUTPUTS[args.task]], dynamic_axes={"pixel_values": {0: "b"}},
                              opset_version=17, dynamo=False)
            python_names.append(f"ONNX Runtime {onnxruntime.__version__} f32")
        except ImportError:
            print("onnxruntime is not installed: skipping (make side-by-side installs it)", file=sys.stderr)
        for name in python_names:
            stacks[name] = [sys.executable, os.path.abspath(__file__), "--worker", name, "--model-dir",
                            model_dir, "--onnx", onnx_path, "--iters", str(args.iters), "--threads",
                            str(args.threads), "--task", args.task]
        # Each measurement is a fresh process, so no stack's idle thread pool
        # competes with another's; the stacks take turns, round after round,
        # so a slow spell on this shared machine falls on all of them.
        rounds = {name: {b: [] for b in batches} for name in stacks}
        for _ in range(args.rounds):
            for name, cmd in stacks.items():
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                if name.startswith("vit-msn"):
                    result = {r["batch"]: [r["median_ms"], r["min_ms"]] for r in json.loads(out)["results"]}
                else:  # the worker's last line
                    result = {int(b): t for b, t in json.loads(out.strip().splitlines()[-1]).items()}
                for b in batches:
                    rounds[name][b].append(result[b])
    med = {name: {b: statistics.median(m for m, _ in v) for b, v in per.items()} for name, per in rounds.items()}
    fastest = {name: {b: min(f for _, f in v) for b, v in per.items()} for name, per in rounds.items()}
    base1 = med["transformers SDPA f32"][1]
    base8 = med["transformers SDPA f32"][8] / 8
    print(f"\nViT-MSN {args.shape} shape, {MODELS[args.task].__name__}, 224, random weights; torch {torch.__version__}, {args.threads} threads; "
          f"{args.rounds} rounds, each stack in a fresh process in turn, median of {args.iters} after 3 warm-up "
          f"passes; the table gives the median over rounds, and (in brackets) the fastest pass of all rounds")
    print("| stack | batch 1 (ms) | batch 8 (ms per image) | ratio to transformers f32 (b1 / b8) |")
    print("|---|---|---|---|")
    for name, per in med.items():
        m1, m8 = per[1], per[8] / 8
        f1, f8 = fastest[name][1], fastest[name][8] / 8
        print(f"| {name} | {m1:.1f} ({f1:.1f}) | {m8:.1f} ({f8:.1f}) | {m1 / base1:.2f} / {m8 / base8:.2f} |")
    print("\nEach round's medians (batch 1 ms / batch 8 ms per image), to show the spread:")
    for name, per in rounds.items():
        each = ", ".join(f"{a[0]:.1f} / {b[0] / 8:.1f}" for a, b in zip(per[1], per[8]))
        print(f"  {name}: {each}")


if __name__ == "__main__":
    main()
