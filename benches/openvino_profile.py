"""Where OpenVINO spends its time on a vit-msn-small-shaped model, and what
its CPU plugin fused: the reference point for benches/side_by_side.py's
OpenVINO rows.

    .venv/bin/python benches/openvino_profile.py [--threads 2] [--iters 5] [--precision f32|bf16]
        [--static]

Builds a random-weight ViTMSNModel (hidden 384, 12 layers, 6 heads,
intermediate 1536, 224, patch 16), converts it with openvino.convert_model as
side_by_side.py does (batch dimension dynamic, unless --static: then one
compiled model per batch size), compiles it for the CPU with
"PERF_COUNT": "YES", and prints:
  - the compiled runtime graph's nodes counted by layerType/primitiveType,
    with one example per fusing node type of the source ops folded into it
    (originalLayersNames), to show what was fused;
  - per batch size (1 and 8), from InferRequest.get_profiling_info() averaged
    over --iters passes: time per node_type/exec_type, and the top 15 nodes.
"""
import argparse
import collections
import re
import time

import numpy as np
import openvino as ov
import torch
from transformers import ViTMSNConfig, ViTMSNModel

BATCHES = (1, 8)


def rt(op, key):
    info = op.get_rt_info()
    return info[key].astype(str) if key in info else "?"


def print_runtime_graph(compiled):
    ops = compiled.get_runtime_model().get_ordered_ops()
    counts = collections.Counter((rt(op, "layerType"), rt(op, "primitiveType")) for op in ops)
    print(f"Runtime graph: {len(ops)} nodes, by layerType / primitiveType:")
    for (layer, prim), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {n:4d}  {layer:16s} {prim}")
    # A node whose originalLayersNames lists several source ops is a fusion;
    # group them by the source op types, e.g. FullyConnected <- MatMul + Gelu.
    patterns = collections.Counter()
    for op in ops:
        names = [n for n in rt(op, "originalLayersNames").split(",") if n]
        if len(names) > 1:
            kinds = [re.sub(r"_\d+$", "", n.rsplit("/", 1)[-1]) for n in names]
            patterns[(rt(op, "layerType"), " + ".join(kinds))] += 1
    print("Fused nodes, by the source ops folded into them:")
    for (layer, kinds), n in sorted(patterns.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {n:4d}  {layer} <- {kinds}")


def profile(request, x, iters):
    """Per-node real_time (ms), averaged over `iters` passes after two warm-up ones."""
    for _ in range(2):
        request.infer([x])
    per_node = collections.defaultdict(float)
    kinds = {}
    t = time.perf_counter()
    for _ in range(iters):
        request.infer([x])
        for p in request.get_profiling_info():
            if p.status != ov.ProfilingInfo.Status.EXECUTED:
                continue  # fused into another node or optimized out
            per_node[p.node_name] += p.real_time.total_seconds() * 1000 / iters
            kinds[p.node_name] = (p.node_type, p.exec_type)
    wall = (time.perf_counter() - t) * 1000 / iters
    return per_node, kinds, wall


def print_profile(batch, per_node, kinds, wall):
    total = sum(per_node.values())
    print(f"\nBatch {batch}: {total:.1f} ms in nodes per pass ({wall:.1f} ms wall, with profiling on)")
    by_type = collections.defaultdict(lambda: [0.0, 0])
    for name, ms in per_node.items():
        by_type[kinds[name]][0] += ms
        by_type[kinds[name]][1] += 1
    print(f"  {'node_type':16s} {'exec_type':28s} {'ms':>8s} {'share':>6s} {'count':>5s}")
    for (node_type, exec_type), (ms, n) in sorted(by_type.items(), key=lambda kv: -kv[1][0]):
        print(f"  {node_type:16s} {exec_type:28s} {ms:8.2f} {100 * ms / total:5.1f}% {n:5d}")
    print("  Top 15 nodes:")
    for name, ms in sorted(per_node.items(), key=lambda kv: -kv[1])[:15]:
        node_type, exec_type = kinds[name]
        print(f"    {ms:7.2f} ms  {node_type:14s} {exec_type:24s} {name[:90]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--precision", choices=("f32", "bf16"), default="f32")
    ap.add_argument("--static", action="store_true", help="compile once per batch size instead of dynamic batch")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ViTMSNConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       image_size=224, patch_size=16, attn_implementation="sdpa")
    model = ViTMSNModel(cfg).eval()
    # transformers initialises biases to 0 and LayerNorm to weight 1, bias 0;
    # OpenVINO folds such no-op adds and multiplies away, which a trained
    # checkpoint would not allow, so give them random values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.copy_(torch.randn_like(p) * 0.02 + (1.0 if "layernorm" in name and name.endswith("weight") else 0.0))
    with torch.no_grad():
        ov_model = ov.convert_model(model, example_input=torch.randn(1, 3, 224, 224), input=[-1, 3, 224, 224])
    source = collections.Counter(op.get_type_name() for op in ov_model.get_ordered_ops())
    print(f"OpenVINO {ov.__version__}, {args.threads} threads, {args.precision}, "
          f"{'static' if args.static else 'dynamic'} batch")
    print("Converted (source) graph ops: " + ", ".join(f"{k} {n}" for k, n in source.most_common()))
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": args.precision, "INFERENCE_NUM_THREADS": args.threads,
              "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": "YES"}
    compiled = None
    for batch in BATCHES:
        if args.static or compiled is None:
            m = ov_model.clone()
            if args.static:
                m.reshape([batch, 3, 224, 224])
            compiled = core.compile_model(m, "CPU", config)
            print(f"\nCompiled{f' for batch {batch}' if args.static else ''}: runs in "
                  f"{compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()}")
            print_runtime_graph(compiled)
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
        print_profile(batch, *profile(compiled.create_infer_request(), x, args.iters))


if __name__ == "__main__":
    main()
