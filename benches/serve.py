"""Throughput and latency of `vit-msn serve`, with dynamic batching on and
off, against FastAPI + uvicorn + torch.jit.load of the same artifact
(benches/serve_fastapi.py), side by side in one run on this machine, at
concurrency 1, 4 and 16; plus the bare forward pass (`vit-msn bench`) that
the server's overhead at concurrency 1 is measured against.

    .venv/bin/python benches/serve.py --bin target/release/vit-msn [--threads 2] [--requests 24]
    (make serve-bench installs fastapi and uvicorn first)

The model is the vit-msn-small shape (ViTMSNForImageClassification, 1000
labels) at 224 with untrained weights from `vit-msn init`; clients send
pixel_values [1, 3, 224, 224] as binary tensors with tritonclient and ask
for the logits. Clients run on the same machine as the servers.
"""
import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
import tritonclient.http as triton

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
             image_size=224, patch_size=16, num_channels=3, num_labels=1000,
             architectures=["ViTMSNForImageClassification"], model_type="vit_msn",
             hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            if triton.InferenceServerClient(f"127.0.0.1:{port}").is_server_ready():
                return
        except Exception:  # noqa: BLE001 -- not listening yet
            pass
        time.sleep(0.2)
    sys.exit("server did not become ready")


def load(port, concurrency, requests, x, on_start=None):
    """Each of `concurrency` clients sends `requests` requests one after
    another: (requests/s, p50 ms, p99 ms)."""
    latencies, errors = [], []

    def client():
        c = triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=300)
        i = triton.InferInput("pixel_values", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        out = [triton.InferRequestedOutput("logits")]
        c.infer("m", [i], outputs=out)  # connection and first-call warm-up
        barrier.wait()
        for _ in range(requests):
            t = time.perf_counter()
            try:
                c.infer("m", [i], outputs=out).as_numpy("logits")
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
            latencies.append(time.perf_counter() - t)

    barrier = threading.Barrier(concurrency + 1)
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    [t.start() for t in threads]
    barrier.wait()
    started = on_start() if on_start else None
    t0 = time.perf_counter()
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    if errors:
        sys.exit(f"{len(errors)} requests failed: {errors[:2]}")
    ms = sorted(v * 1000 for v in latencies)
    return (len(ms) / wall, statistics.median(ms), ms[min(len(ms) - 1, int(0.99 * len(ms)))]), started


def server_sums(port):
    """(sum s, count) of the server's request-duration (body read to
    response) and forward-pass histograms."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()

    def get(name):
        total = re.search(rf'{name}_sum{{model="m"}} (\S+)', text)
        count = re.search(rf'{name}_count{{model="m"}} (\S+)', text)
        return (float(total.group(1)), float(count.group(1))) if total else (0.0, 0.0)

    return get("vit_msn_request_duration_seconds"), get("vit_msn_compute_duration_seconds")


def mean_ms(before, after):
    return 1000 * (after[0] - before[0]) / max(1.0, after[1] - before[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/vit-msn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=24, help="per client at concurrency 1; fewer per client above")
    ap.add_argument("--concurrency", default="1,4,16")
    a = ap.parse_args()
    binary = os.path.abspath(a.bin)
    levels = [int(c) for c in a.concurrency.split(",")]
    x = np.random.RandomState(0).randn(1, 3, 224, 224).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "config.json")
        with open(cfg, "w") as f:
            json.dump(SMALL, f)
        model, bundle = os.path.join(tmp, "model"), os.path.join(tmp, "bundle")
        subprocess.run([binary, "init", "--config", cfg, "--out", model], check=True, capture_output=True)
        subprocess.run([binary, "compile", "--model", model, "--out", bundle], check=True, capture_output=True)
        artifact = os.path.join(bundle, json.load(open(os.path.join(bundle, "manifest.json")))["artifacts"][0]["file"])
        bench = subprocess.run([binary, "--threads", str(a.threads), "bench", "--bundle", bundle, "--batch", "1",
                                "--iters", "40", "--json"], check=True, capture_output=True, text=True)
        report = json.loads(bench.stdout)
        bare = next(r for r in report["results"] if r["batch"] == 1)["median_ms"]

        servers = {
            "vit-msn serve, batching on (--max-batch 32, 5 ms)": ["--max-batch", "32", "--max-queue-delay-ms", "5"],
            "vit-msn serve, batching off (--max-batch 1)": ["--max-batch", "1"],
            "FastAPI + uvicorn + torch.jit.load": None,
        }
        rows, server_side = {}, {}
        for name, flags in servers.items():
            port = free_port()
            if flags is None:
                cmd = [sys.executable, os.path.join(HERE, "serve_fastapi.py"), "--artifact", artifact,
                       "--port", str(port), "--threads", str(a.threads), "--layers", "12", "--heads", "6",
                       "--patches", "196"]
            else:
                cmd = [binary, "--threads", str(a.threads), "serve", "--bundle", f"m={bundle}",
                       "--port", str(port)] + flags
            proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
            try:
                wait_ready(port, proc)
                rows[name] = []
                for c in levels:
                    # The server's own histograms over the timed requests only:
                    # `load` warms up each client's connection first.
                    snapshot = (lambda: server_sums(port)) if flags is not None else None
                    result, before = load(port, c, max(4, a.requests // max(1, c // 2)), x, snapshot)
                    rows[name].append(result)
                    print(f"{name}, c={c}: {result}", file=sys.stderr, flush=True)
                    if before is not None and c == 1:
                        after = server_sums(port)
                        server_side[name] = (mean_ms(before[0], after[0]), mean_ms(before[1], after[1]))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)

    cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read()).group(1)
    flags = sorted(set(re.findall(r"\b(avx512_bf16|avx512f|avx2|amx_bf16)\b", open("/proc/cpuinfo").read())))
    print(f"machine: {cpu}, {os.cpu_count()} cores, flags {' '.join(flags)}; --threads {a.threads}")
    print(f"bare Bundle::forward (vit-msn bench, batch 1, median of 40): {bare:.1f} ms")
    print()
    print("| server | " + " | ".join(f"c={c}: req/s, p50, p99 (ms)" for c in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for name, results in rows.items():
        print(f"| {name} | " + " | ".join(f"{r:.1f}, {p50:.1f}, {p99:.1f}" for r, p50, p99 in results) + " |")
    ours = rows["vit-msn serve, batching on (--max-batch 32, 5 ms)"][0][1]
    ours_off = rows["vit-msn serve, batching off (--max-batch 1)"][0][1]
    print()
    print(f"overhead at c=1 over the bare forward: batching on {100 * (ours / bare - 1):+.1f}%, "
          f"off {100 * (ours_off / bare - 1):+.1f}% (p50 {ours:.1f} / {ours_off:.1f} ms vs {bare:.1f} ms)")
    for name, (request, compute) in server_side.items():
        print(f"{name}, c=1, server side: mean request {request:.1f} ms, of which the forward pass "
              f"{compute:.1f} ms; {100 * (request / bare - 1):+.1f}% over the bare forward")
    fast = rows["FastAPI + uvicorn + torch.jit.load"]
    best = [max(rows[n][i][0] for n in rows if n.startswith("vit-msn")) for i in range(len(levels))]
    print("throughput vs FastAPI: " + ", ".join(f"c={c} {b / f[0]:.2f}x" for c, b, f in zip(levels, best, fast)))


if __name__ == "__main__":
    main()
