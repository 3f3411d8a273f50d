"""Batch 8 through one artifact as one call on 2 intra-op threads, against two
halves of 4 run at once on two threads of one intra-op thread each: the
experiment behind docs/performance.md's "Evaluated and not kept" entry on
splitting a batch across threads.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=2147483647 \\
    .venv/bin/python benches/batch_split.py [--rounds 5] [--iters 12] [--dtypes f32,bf16]

Builds the vit-msn-small-shaped model as benches/op_profile.py does, compiles
one bundle per dtype with `vit-msn compile`, then for each round runs each
dtype's two modes in turn, each in a fresh process (through torch.jit.load),
and prints each round's medians and the median of the paired ratios
(split / whole). The GLIBC_TUNABLES above are the malloc settings the runtime
sets for itself (src/allocator.rs); without them the split gains mostly from
smaller allocations.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "vit-msn")
LAYERS, HEADS = 12, 6


def worker(path, mode, iters):
    """Median ms of `iters` batch-8 passes in this process."""
    kind = torch.bfloat16 if "bf16" in path else torch.float32
    module = torch.jit.load(path).eval()
    x = torch.randn(8, 3, 224, 224).to(kind)

    def inputs(images):
        n = images.shape[0]
        return images.contiguous(), torch.zeros(n, 196, dtype=torch.bool), torch.ones(LAYERS, HEADS, dtype=kind)

    if mode == "whole":
        torch.set_num_threads(2)
        whole = inputs(x)

        def run():
            module(*whole)
    else:
        halves = [inputs(x[:4]), inputs(x[4:])]
        start = [threading.Event(), threading.Event()]
        done = [threading.Event(), threading.Event()]

        def loop(i):
            torch.set_num_threads(1)  # this thread's OpenMP team: itself
            with torch.no_grad():
                while True:
                    start[i].wait()
                    start[i].clear()
                    module(*halves[i])
                    done[i].set()

        for i in range(2):
            threading.Thread(target=loop, args=(i,), daemon=True).start()

        def run():
            for i in range(2):
                done[i].clear()
                start[i].set()
            for i in range(2):
                done[i].wait()

    times = []
    with torch.no_grad():
        for i in range(3 + iters):
            begin = time.perf_counter()
            run()
            if i >= 3:
                times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.iters)))
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from op_profile import build_model

    model = build_model()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        model.save_pretrained(model_dir)
        files = {}
        for dtype in args.dtypes.split(","):
            bundle = os.path.join(tmp, f"bundle-{dtype}")
            subprocess.run([BIN, "compile", "--model", model_dir, "--out", bundle, "--dtype", dtype], check=True,
                           stdout=subprocess.DEVNULL)
            with open(os.path.join(bundle, "manifest.json")) as f:
                files[dtype] = os.path.join(bundle, json.load(f)["artifacts"][0]["file"])
        ms = {(d, m): [] for d in files for m in ("whole", "split")}
        for r in range(args.rounds):
            for (dtype, mode), row in ms.items():
                out = subprocess.run([sys.executable, __file__, "--iters", str(args.iters), "--worker", files[dtype],
                                      mode], check=True, capture_output=True, text=True).stdout
                row.append(json.loads(out.strip().splitlines()[-1]))
        print(f"batch 8, ms per batch, {args.rounds} rounds (median of {args.iters} passes each), torch {torch.__version__}")
        for dtype in files:
            whole, split = ms[(dtype, "whole")], ms[(dtype, "split")]
            ratios = [s / w for w, s in zip(whole, split)]
            print(f"  {dtype}: whole {', '.join(f'{t:.1f}' for t in whole)}; split {', '.join(f'{t:.1f}' for t in split)}; "
                  f"split / whole median {statistics.median(ratios):.3f} ({min(ratios):.3f} to {max(ratios):.3f})")


if __name__ == "__main__":
    main()
