"""Images/s of `python -m vit_msn.ray embed` with 1 and 2 actors against a
single `vit-msn run --embeddings`, on the same machine and images, side by
side in one run (the configurations take turns, round after round; medians).

The model is the vit-msn-small shape (12 layers, 384 wide, 224x224) with
untrained weights from `vit-msn init`, compiled f32; the images are seeded
random pictures of mixed formats and sizes (tests/python/mixed_images.py).
Each command is timed end to end, as a user would wait for it (process
start, Ray start, bundle loads, reading, writing); for the Ray runs the
time after Ray has started, which the command line prints, is shown too.

    make ray-bench            # or: .venv/bin/python benches/ray_bench.py --bin target/release/vit-msn
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from mixed_images import make_images  # noqa: E402

SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
             image_size=224, patch_size=16, num_channels=3, architectures=["ViTMSNModel"],
             model_type="vit_msn", hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)


def machine() -> str:
    info = open("/proc/cpuinfo").read()
    model = re.search(r"model name\s*:\s*(.*)", info).group(1).strip()
    flags = re.search(r"^flags\s*:\s*(.*)$", info, re.M).group(1).split()
    wanted = [f for f in ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
                          "amx_bf16", "avx_vnni") if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, flags {' '.join(wanted) or 'none of avx2/avx512'}"


def timed(cmd) -> tuple:
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stderr[-3000:]}")
    job = re.search(r"wrote \d+ rows .* in ([0-9.]+) s", p.stderr)
    return wall, float(job.group(1)) if job else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "vit-msn"))
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    binary = os.path.abspath(a.bin)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "images"
        paths = make_images(folder, n=a.images, seed=1, max_side=640, broken=False)
        (tmp / "config.json").write_text(json.dumps(SMALL))
        model, bundle = tmp / "model", tmp / "bundle"
        subprocess.run([binary, "init", "--config", tmp / "config.json", "--out", model], check=True,
                       capture_output=True)
        subprocess.run([binary, "compile", "--model", model, "--out", bundle], check=True, capture_output=True)
        ray_cmd = [sys.executable, "-m", "vit_msn.ray", "embed", "--bundle", bundle, "--input", folder,
                   "--output", tmp / "out.parquet", "--batch-size", str(a.batch_size)]
        configs = {
            "vit-msn run --embeddings (one process, its default threads)":
                [binary, "run", "--bundle", bundle, "--image", folder, "--embeddings", tmp / "out.npy",
                 "--batch-size", str(a.batch_size)],
            "python -m vit_msn.ray embed --actors 1": ray_cmd + ["--actors", "1"],
            "python -m vit_msn.ray embed --actors 2": ray_cmd + ["--actors", "2"],
        }
        walls = {k: [] for k in configs}
        jobs = {k: [] for k in configs}
        names = list(configs)
        for r in range(a.rounds):
            # Take turns, starting at a different one each round.
            for name in names[r % len(names):] + names[: r % len(names)]:
                wall, job = timed(configs[name])
                walls[name].append(wall)
                if job is not None:
                    jobs[name].append(job)
                print(f"round {r + 1}: {name}: {wall:.1f} s", file=sys.stderr, flush=True)

    n = len(paths)
    print(f"machine: {machine()}")
    print(f"load average at the end (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(other work on the machine shares the CPUs with every configuration alike)")
    print(f"{n} images (PNG, JPEG, WebP, BMP, GIF, TIFF; 8 to 640 px a side), vit-msn-small shape f32 at 224, "
          f"batch {a.batch_size}, medians of {a.rounds} rounds")
    print()
    print("| command | end to end: s, images/s | after Ray started: images/s |")
    print("|---|---|---|")
    for name in names:
        wall = statistics.median(walls[name])
        job = f"{n / statistics.median(jobs[name]):.1f}" if jobs[name] else "-"
        print(f"| {name} | {wall:.1f} s, {n / wall:.1f} | {job} |")


if __name__ == "__main__":
    main()
