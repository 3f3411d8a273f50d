"""Cold start and peak memory of one-photo classification: `vit-msn run`
against a Python process that does the same job with transformers 4.46.3
(ViTImageProcessor + ViTMSNForImageClassification, SDPA, f32).

Both classify the same photo with the same weights (the demo's untrained
vit-msn-small-shaped checkpoint), on the same threads, in alternating runs.
Each run is a fresh process; wall time is process start to exit, peak RSS is
the kernel's ru_maxrss for that process. Prints medians and the ratio.

    .venv/bin/python benches/startup.py [--runs 5] [--threads 2]

Needs `cargo build --release` and `vit-msn demo` (or `make demo`) first.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "vit-msn")
MODEL = os.path.join(ROOT, "artifacts", "demo-model")
PHOTO = os.path.join(ROOT, "artifacts", "demo-photos", "chelsea.jpg")

PYTHON_JOB = r"""
import sys
import torch
from PIL import Image
from transformers import ViTImageProcessor, ViTMSNForImageClassification
torch.set_num_threads(int(sys.argv[3]))
model = ViTMSNForImageClassification.from_pretrained(sys.argv[1], attn_implementation="sdpa").eval()
processor = ViTImageProcessor.from_pretrained(sys.argv[1])
with torch.no_grad():
    logits = model(**processor(Image.open(sys.argv[2]), return_tensors="pt")).logits
probs = logits.softmax(-1)[0]
top = probs.topk(min(5, probs.numel()))
print(", ".join(f"{model.config.id2label[i]} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist())))
"""


def measure(cmd):
    """Wall seconds, peak RSS (MB) and stdout of one process run to completion."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"{cmd[0]} failed: {err.read().decode().strip()}")
        return wall, usage.ru_maxrss / 1024, out.read().decode().strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for path in (BIN, MODEL, PHOTO):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run `make demo` first")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = os.path.join(tmp, "bundle")
        subprocess.run([BIN, "compile", "--model", MODEL, "--out", bundle], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(os.path.join(tmp, "job.py"), "w") as f:
            f.write(PYTHON_JOB)
        stacks = {
            "vit-msn run": [BIN, "run", "--bundle", bundle, "--image", PHOTO,
                            "--threads", str(args.threads)],
            "python + transformers": [sys.executable, os.path.join(tmp, "job.py"), MODEL, PHOTO,
                                      str(args.threads)],
        }
        results = {name: [] for name in stacks}
        answers = {}
        for _ in range(args.runs):
            for name, cmd in stacks.items():
                wall, rss, out = measure(cmd)
                results[name].append((wall, rss))
                answers[name] = out
    print(f"one photo, vit-msn-small shape at 224, {args.threads} threads, "
          f"median of {args.runs} alternating runs")
    print(f"{'':24} {'wall s':>8} {'peak RSS MB':>12}")
    med = {}
    for name, runs in results.items():
        med[name] = (statistics.median(w for w, _ in runs), statistics.median(r for _, r in runs))
        print(f"{name:24} {med[name][0]:8.2f} {med[name][1]:12.0f}")
    ours, ref = med["vit-msn run"], med["python + transformers"]
    print(f"ratio (vit-msn / python): wall {ours[0] / ref[0]:.2f}, peak RSS {ours[1] / ref[1]:.2f}")
    for name, out in answers.items():
        print(f"{name}: {out.split(': ', 1)[-1]}")


if __name__ == "__main__":
    main()
