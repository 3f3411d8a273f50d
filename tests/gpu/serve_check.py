"""`vit-msn serve --device DEVICE` on a CUDA bundle, checked against
`vit-msn run --inputs` on the same device: a binary KServe v2 request, its
logits within 1e-4, a batch of concurrent requests, and SIGTERM exiting 0.
Python standard library only (the GPU machine has no tritonclient, numpy or
safetensors package).

    python3 tests/gpu/serve_check.py --bin vit-msn --bundle B --device cuda
"""
import argparse
import array
import http.client
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time


def write_safetensors(path, name, shape, values):
    raw = array.array("f", values).tobytes()
    header = json.dumps({name: {"dtype": "F32", "shape": shape, "data_offsets": [0, len(raw)]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + raw)


def read_safetensors(path, name):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8:8 + n])[name]
    start, end = meta["data_offsets"]
    values = array.array("f")
    values.frombytes(data[8 + n + start:8 + n + end])
    return meta["shape"], list(values)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    manifest = json.load(open(os.path.join(a.bundle, "manifest.json")))
    entry = manifest["artifacts"][0]
    shape = [2, manifest["model"]["num_channels"], entry["height"], entry["width"]]
    rng = random.Random(0)
    pixels = [rng.gauss(0, 1) for _ in range(shape[0] * shape[1] * shape[2] * shape[3])]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
        write_safetensors(src, "pixel_values", shape, pixels)
        subprocess.run([a.bin, "run", "--bundle", a.bundle, "--device", a.device, "--inputs", src, "--output", dst],
                       check=True, timeout=600)
        want_shape, want = read_safetensors(dst, "logits")

    proc = subprocess.Popen([a.bin, "serve", "--bundle", f"m={a.bundle}", "--device", a.device, "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    lines = []
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            print(line, end="", file=sys.stderr)
            if " ready: " in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(600):
        proc.kill()
        sys.exit("FAILED: the server did not become ready")
    port = int(re.search(r"127\.0\.0\.1:(\d+)", "".join(lines)).group(1))
    raw = array.array("f", pixels).tobytes()
    header = json.dumps({"inputs": [{"name": "pixel_values", "shape": shape, "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}).encode()

    def infer():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        c.request("POST", "/v2/models/m/infer", body=header + raw,
                  headers={"Inference-Header-Content-Length": str(len(header))})
        r = c.getresponse()
        body = r.read()
        c.close()
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {body[:300]!r}")
        out = json.loads(body)["outputs"][0]
        return out["shape"], out["data"]

    failures = []
    try:
        got_shape, got = infer()
        worst = max(abs(x - y) for x, y in zip(got, want))
        bound = 1e-4 * max(1.0, max(abs(y) for y in want))
        print(f"serve on {a.device}: logits {got_shape}, max |served - run| = {worst:.3g} (bound {bound:.3g})")
        if got_shape != want_shape or worst > bound:
            failures.append("served logits differ from vit-msn run")
        results = []
        threads = [threading.Thread(target=lambda: results.append(infer())) for _ in range(16)]
        t0 = time.time()
        [t.start() for t in threads]
        [t.join(600) for t in threads]
        print(f"16 concurrent requests answered: {len(results)} in {time.time() - t0:.2f} s")
        if len(results) != 16 or any(max(abs(x - y) for x, y in zip(r[1], want)) > bound for r in results):
            failures.append("concurrent answers")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    if code != 0:
        failures.append(f"exit code {code} after SIGTERM")
    if failures:
        sys.exit("FAILED: " + "; ".join(failures))
    print("serve check passed")


if __name__ == "__main__":
    main()
