"""Times the reference, transformers 4.46.3 ViTMSNModel (SDPA, f32, random
weights), at the vit-msn-small shape and 224, the same way `make bench`
times the runtime: median wall time per forward pass after warm-up.

    .venv/bin/python benches/reference.py [--threads 2] [--iters 15]
"""
import argparse
import statistics
import time

import torch
from transformers import ViTMSNConfig, ViTMSNModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name, hidden, heads in [("vit_tiny_224", 192, 3), ("vit_msn_small_224", 384, 6)]:
        cfg = ViTMSNConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden,
                           num_hidden_layers=12, image_size=224, patch_size=16)
        cfg._attn_implementation = "sdpa"
        model = ViTMSNModel(cfg).eval()
        for batch in (1, 8):
            px = torch.randn(batch, 3, 224, 224)
            times = []
            with torch.inference_mode():
                for _ in range(3):
                    model(px)
                for _ in range(args.iters):
                    t = time.perf_counter()
                    model(px)
                    times.append(time.perf_counter() - t)
            print(f"reference {name} batch{batch}: median {statistics.median(times) * 1000:.1f} ms "
                  f"(min {min(times) * 1000:.1f}) over {args.iters}, torch {torch.__version__}, {args.threads} threads")


if __name__ == "__main__":
    main()
