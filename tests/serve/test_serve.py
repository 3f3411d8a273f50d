"""`vit-msn serve` driven by a real client (tritonclient[http]) and by raw
HTTP, on 127.0.0.1 only, every loop bounded in count and time.

    python tests/serve/test_serve.py --bin target/debug/vit-msn

It builds seeded random checkpoints with transformers 4.46.3, compiles them,
starts the server on a free port and checks: health and metadata; binary
and JSON tensors, masks, head masks and images against the runtime
(`vit-msn run --inputs`, bitwise) and transformers (within 1e-4); the
classification extension; 8 clients x 25 requests; dynamic batching; hot
swap under load; hostile requests; SIGTERM with requests in flight.
Exits 1 on the first failed check.
"""

import argparse
import atexit
import base64
import gzip
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "fixtures"))
from make_fixtures import make_model, run_reference  # noqa: E402

import tritonclient.http as triton  # noqa: E402

TOL = 1e-4
DEADLINE_S = 600
CFG = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
           image_size=32, patch_size=8)
SIZE = 32
PATCHES = (SIZE // 8) ** 2
CHECKS = 0


def check(cond, message):
    global CHECKS
    if not cond:
        print(f"FAILED: {message}", flush=True)
        sys.exit(1)
    CHECKS += 1
    if os.environ.get("SERVE_TEST_TRACE"):
        print(f"ok: {message}", file=sys.stderr)


def close(a, b, tol=TOL):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and float(np.max(np.abs(a - b), initial=0)) <= tol * max(1.0, float(np.max(np.abs(b), initial=0)))


SERVERS = []


def kill_servers():
    for p in SERVERS:
        if p.poll() is None:
            p.kill()


class Server:
    """The server process; its stderr is collected line by line."""

    def __init__(self, binary, bundles, delay_ms=20):
        args = [binary, "--threads", "2", "serve", "--port", "0", "--max-batch", "8",
                "--max-queue-delay-ms", str(delay_ms), "--max-body-mb", "4", "--body-timeout-ms", "1500"]
        for name, d in bundles.items():
            args += ["--bundle", f"{name}={d}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        SERVERS.append(self.proc)
        self.lines = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.time() + 120
        while not self.ready.is_set():
            if time.time() > deadline or self.proc.poll() is not None:
                check(False, "server did not become ready:\n" + "\n".join(self.lines))
            time.sleep(0.05)
        self.url = re.search(r"http://(127\.0\.0\.1:\d+)", self.log()).group(1)
        self.host, self.port = self.url.split(":")[0], int(self.url.split(":")[1])

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if " ready: " in line:
                self.ready.set()

    def log(self):
        return "\n".join(self.lines)

    def client(self):
        return triton.InferenceServerClient(self.url, connection_timeout=30, network_timeout=30)

    def raw(self, method, path, body=None, headers=None):
        """One request over a fresh connection: (status, headers, body)."""
        c = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            c.close()

    def wait_log(self, pattern, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if re.search(pattern, self.log()):
                return True
            time.sleep(0.1)
        return False

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return None
        return self.proc.returncode


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    check(r.returncode == 0, f"{' '.join(cmd)} failed: {r.stderr}")
    return r


def runtime(binary, bundle, tmp, inputs):
    """What `vit-msn run --inputs` returns for these inputs."""
    src, dst = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in inputs.items()}, src)
    run([binary, "--threads", "2", "run", "--bundle", bundle, "--inputs", src, "--output", dst])
    return load_file(dst)


def reference(model, inputs, hidden=False):
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
    return {k: v.numpy() for k, v in run_reference(model, t, hidden, False).items()}


def infer_input(name, array, datatype, binary=True):
    i = triton.InferInput(name, list(array.shape), datatype)
    i.set_data_from_numpy(array, binary_data=binary)
    return i


def pixels(seed, batch):
    return np.random.RandomState(seed).randn(batch, 3, SIZE, SIZE).astype(np.float32)


def photo(seed, w, h, fmt):
    rng = np.random.RandomState(seed)
    img = Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def setup(binary, tmp):
    models = {
        "cls": make_model(CFG, "classification", 11, num_labels=5),
        "ft": make_model(CFG, "classification", 12, num_labels=5),
        "emb": make_model(CFG, "backbone", 13),
    }
    bundles = {}
    for name, model in models.items():
        d = os.path.join(tmp, name + "_model")
        model.save_pretrained(d)
        bundles[name] = os.path.join(tmp, name)
        extra = ["--outputs", "hidden_states"] if name == "emb" else []
        run([binary, "compile", "--model", d, "--out", bundles[name]] + extra)
    return models, bundles


def test_protocol(s, binary, models, bundles, tmp):
    c = s.client()
    check(c.is_server_live() and c.is_server_ready(), "server live and ready")
    check(c.is_model_ready("cls") and c.is_model_ready("emb"), "models ready")
    check(c.is_model_ready("cls", "1") and not c.is_model_ready("cls", "9"), "version readiness")
    meta = c.get_model_metadata("emb")
    shapes = {o["name"]: o["shape"] for o in meta["outputs"]}
    check(shapes == {"last_hidden_state": [-1, PATCHES + 1, 48], "embedding": [-1, 48],
                     "hidden_states": [3, -1, PATCHES + 1, 48]}, f"emb outputs {shapes}")
    check({i["name"]: i["datatype"] for i in meta["inputs"]} ==
          {"pixel_values": "FP32", "image": "BYTES", "bool_masked_pos": "BOOL", "head_mask": "FP32"},
          f"emb inputs {meta['inputs']}")
    check(meta["versions"] == ["1"] and len(meta["parameters"]["manifest_sha256"]) == 64, "versions, digest")
    check(c.get_server_metadata()["name"] == "vit-msn", "server metadata")

    rng = np.random.RandomState(5)
    x = pixels(1, 3)
    mask = rng.rand(3, PATCHES) < 0.4
    head_mask = (rng.rand(2, 4) > 0.3).astype(np.float32)
    for name, kwargs in [("cls", {}), ("cls", {"bool_masked_pos": mask}), ("emb", {"bool_masked_pos": mask}),
                         ("emb", {"head_mask": head_mask}), ("emb", {"bool_masked_pos": mask, "head_mask": head_mask[1]})]:
        inputs = {"pixel_values": x, **kwargs}
        want = runtime(binary, bundles[name], tmp, inputs)
        ref = reference(models[name], inputs, hidden=name == "emb")
        for binary_data in (True, False):
            ins = [infer_input("pixel_values", x, "FP32", binary_data)]
            if "bool_masked_pos" in kwargs:
                ins.append(infer_input("bool_masked_pos", mask, "BOOL", binary_data))
            if "head_mask" in kwargs:
                ins.append(infer_input("head_mask", kwargs["head_mask"], "FP32", binary_data))
            outs = None if binary_data else [triton.InferRequestedOutput(n, binary_data=False) for n in want]
            r = c.infer(name, ins, outputs=outs, request_id=f"req-{name}")
            check(r.get_response()["id"] == f"req-{name}", "request id echoed")
            check(r.get_response()["model_version"] == "1", "version named")
            for key, value in want.items():
                got = r.as_numpy(key)
                check(got is not None and got.dtype == np.float32 and np.array_equal(got, value),
                      f"{name} {list(kwargs)} {key} (binary={binary_data}) equals the runtime bitwise")
                check(close(got, ref[key]), f"{name} {list(kwargs)} {key} within 1e-4 of transformers")
            if name == "emb" and binary_data:
                emb = r.as_numpy("embedding")
                check(np.array_equal(emb, want["last_hidden_state"][:, 0]), "embedding is the CLS row")

    # Compressed requests and responses, as tritonclient sends and reads them.
    want = runtime(binary, bundles["cls"], tmp, {"pixel_values": x})["logits"]
    for algorithm in ("gzip", "deflate"):
        r = c.infer("cls", [infer_input("pixel_values", x, "FP32")], request_compression_algorithm=algorithm,
                    response_compression_algorithm=algorithm)
        check(np.array_equal(r.as_numpy("logits"), want), f"{algorithm} request and response")

    # Only some outputs, and the classification extension.
    want = runtime(binary, bundles["cls"], tmp, {"pixel_values": x})["logits"]
    r = c.infer("cls", [infer_input("pixel_values", x, "FP32")],
                outputs=[triton.InferRequestedOutput("logits", class_count=3)])
    got = r.as_numpy("logits")
    check(got.shape == (3, 3), f"classification shape {got.shape}")
    for row, logits in zip(got, want):
        top = np.argsort(-logits, kind="stable")[:3]
        parsed = [s.decode().split(":") for s in row]
        check([int(p[1]) for p in parsed] == list(top), f"top 3 indices {parsed} vs {top}")
        check([p[2] for p in parsed] == [f"class_{i}" for i in top], "labels")
        check(all(abs(float(p[0]) - logits[int(p[1])]) < 1e-5 * max(1, abs(logits[int(p[1])])) for p in parsed), "scores")
    r = c.infer("emb", [infer_input("pixel_values", x, "FP32")], outputs=[triton.InferRequestedOutput("embedding")])
    check([o["name"] for o in r.get_response()["outputs"]] == ["embedding"], "outputs selected")

    # Encoded images, preprocessed as `vit-msn run --image` does.
    files = []
    for i, (w, h, fmt) in enumerate([(50, 40, "PNG"), (31, 64, "JPEG"), (80, 80, "WEBP"), (17, 23, "BMP")]):
        path = os.path.join(tmp, f"photo{i}.{fmt.lower()}")
        with open(path, "wb") as f:
            f.write(photo(i, w, h, fmt))
        files.append(path)
    px_file = os.path.join(tmp, "px.safetensors")
    run([binary, "preprocess", "--bundle", bundles["cls"], "--image", *files, "--output", px_file])
    want = runtime(binary, bundles["cls"], tmp, {"pixel_values": load_file(px_file)["pixel_values"]})["logits"]
    blobs = np.array([open(p, "rb").read() for p in files], dtype=object)
    r = c.infer("cls", [infer_input("image", blobs, "BYTES")])
    check(np.array_equal(r.as_numpy("logits"), want), "image input equals preprocess + run, bitwise")
    body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "data": [base64.b64encode(blobs[0]).decode()]}]})
    status, _, out = s.raw("POST", "/v2/models/cls/infer", body, {"Content-Type": "application/json"})
    check(status == 200, f"a base64 image in JSON: {status} {out[:300]}")
    # Batch 1 here, 4 above: equal within the f32 tolerance, not bitwise.
    check(close(np.array(json.loads(out)["outputs"][0]["data"], np.float32), want[0]),
          f"a base64 image in JSON: {json.loads(out)['outputs'][0]['data']} vs {want[0]}")


def test_load(s, binary, bundles, tmp):
    """8 clients x 25 requests of batch 1 to 4: every answer right, none lost;
    then the batch-size histogram shows shared forward passes."""
    pool = []
    for i in range(6):
        x = pixels(100 + i, 1 + i % 4)
        pool.append((x, runtime(binary, bundles["cls"], tmp, {"pixel_values": x})["logits"]))
    answers, errors = [], []

    def client(k):
        c = s.client()
        for j in range(25):
            x, want = pool[(k * 7 + j) % len(pool)]
            try:
                got = c.infer("cls", [infer_input("pixel_values", x, "FP32")]).as_numpy("logits")
                answers.append(close(got, want))
            except Exception as e:  # noqa: BLE001 -- counted as a failure below
                errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    check(not errors, f"concurrent requests failed: {errors[:3]}")
    check(len(answers) == 200 and all(answers), f"{sum(answers)} of 200 answers right")
    _, _, text = s.raw("GET", "/metrics")
    text = text.decode()
    count = float(re.search(r'vit_msn_batch_size_count\{model="cls"\} (\S+)', text).group(1))
    ones = float(re.search(r'vit_msn_batch_size_bucket\{model="cls",le="1"\} (\S+)', text).group(1))
    samples = float(re.search(r'vit_msn_batch_size_sum\{model="cls"\} (\S+)', text).group(1))
    check(count > 0 and samples / count > 1.0, f"batches averaged {samples / max(count, 1):.2f} samples")
    check(ones < count, "some batches held more than one request's samples")
    ok = float(re.search(r'vit_msn_requests_total\{model="cls",outcome="success"\} (\S+)', text).group(1))
    check(ok >= 200, f"success counter {ok}")
    for name in ["vit_msn_request_duration_seconds", "vit_msn_queue_duration_seconds",
                 "vit_msn_compute_duration_seconds"]:
        check(f'{name}_bucket{{model="cls"' in text, f"{name} exported")
    check('vit_msn_model_version{model="cls"} 1' in text, "version gauge")


def test_hot_swap(s, binary, bundles, tmp):
    """4 clients keep asking while the artifact is replaced by a fine-tuned one."""
    x = pixels(7, 2)
    old = runtime(binary, bundles["cls"], tmp, {"pixel_values": x})["logits"]
    new = runtime(binary, bundles["ft"], tmp, {"pixel_values": x})["logits"]
    check(not close(old, new), "the fine-tuned model answers differently")
    seen, errors, stop = [], [], threading.Event()

    def client():
        c = s.client()
        for _ in range(2000):
            if stop.is_set():
                return
            try:
                r = c.infer("cls", [infer_input("pixel_values", x, "FP32")])
                got = r.as_numpy("logits")
                which = "old" if close(got, old) else "new" if close(got, new) else "neither"
                seen.append((time.time(), which, r.get_response()["model_version"]))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(4)]
    [t.start() for t in threads]
    time.sleep(1.0)
    artifact = os.path.join(bundles["ft"], json.load(open(os.path.join(bundles["ft"], "manifest.json")))["artifacts"][0]["file"])
    run([binary, "bundle", "replace", "--bundle", bundles["cls"], "--resolution", str(SIZE), "--artifact", artifact])
    replaced = time.time()
    check(s.wait_log(r"model cls: swapped version 1 for version 2", 15), "swap logged:\n" + s.log())
    time.sleep(1.0)
    stop.set()
    [t.join(timeout=60) for t in threads]
    check(not errors, f"requests failed during the swap: {errors[:3]}")
    check(len(seen) > 20, f"only {len(seen)} answers during the swap")
    check(all(w != "neither" for _, w, _ in seen), "every answer is the old model's or the new one's")
    check(all((w == "old") == (v == "1") for _, w, v in seen), "each answer names the version that computed it")
    late = [w for t, w, _ in seen if t > replaced + 5]
    first_new = min((t for t, w, _ in seen if w == "new"), default=None)
    check(first_new is not None and first_new - replaced < 5, "answers switch within seconds")
    check(all(w == "new" for w in late), "no old answers after the switch")
    check(s.client().get_model_metadata("cls")["versions"] == ["2"], "metadata names version 2")

    # A replacement that fails verification changes nothing.
    manifest_path = os.path.join(bundles["cls"], "manifest.json")
    good = open(manifest_path).read()
    bad = json.loads(good)
    bad["artifacts"][0]["sha256"] = "0" * 64
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(bad, f)
    os.replace(manifest_path + ".tmp", manifest_path)
    check(s.wait_log(r"model cls: refused the bundle", 15), "refusal logged")
    r = s.client().infer("cls", [infer_input("pixel_values", x, "FP32")])
    check(close(r.as_numpy("logits"), new) and r.get_response()["model_version"] == "2", "the refused bundle changed nothing")
    with open(manifest_path + ".tmp", "w") as f:
        f.write(good)
    os.replace(manifest_path + ".tmp", manifest_path)
    check(s.wait_log(r"swapped version 2 for version 3", 15), "the restored bundle is loaded again")
    # `vit-msn compile` into the served folder replaces the bundle whole.
    run([binary, "compile", "--model", os.path.join(tmp, "cls_model"), "--out", bundles["cls"]])
    check(s.wait_log(r"swapped version 3 for version 4", 15), "a recompiled bundle is swapped in")
    r = s.client().infer("cls", [infer_input("pixel_values", x, "FP32")])
    check(close(r.as_numpy("logits"), old) and r.get_response()["model_version"] == "4", "version 4 is the recompiled model")
    # Triton's model repository extension: an explicit load and an index.
    status, _, _ = s.raw("POST", "/v2/repository/models/cls/load", b"{}")
    check(status == 200, "explicit load")
    status, _, body = s.raw("POST", "/v2/repository/index", b"{}")
    check(status == 200 and {m["name"]: m["state"] for m in json.loads(body)} == {"cls": "READY", "emb": "READY"}, f"index {body}")


def binary_request(inputs, outputs=None):
    """(body, headers) for a binary request: [(name, datatype, shape, raw bytes)]."""
    header = {"inputs": [{"name": n, "datatype": d, "shape": sh, "parameters": {"binary_data_size": len(raw)}}
                         for n, d, sh, raw in inputs]}
    if outputs:
        header["outputs"] = outputs
    head = json.dumps(header).encode()
    return head + b"".join(raw for *_, raw in inputs), {"Inference-Header-Content-Length": str(len(head))}


def test_hostile(s):
    x = pixels(3, 1)
    good_json = {"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, SIZE, SIZE],
                             "data": x.flatten().tolist()}]}

    def js(**change):
        body = json.loads(json.dumps(good_json))
        body["inputs"][0].update(change)
        return json.dumps(body)

    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    cases = [
        ("malformed JSON", "/v2/models/cls/infer", b'{"inputs": [', {}, 400),
        ("JSON not an object", "/v2/models/cls/infer", b"[1, 2]", {}, 400),
        ("JSON string", "/v2/models/cls/infer", b'"x"', {}, 400),
        ("unknown model", "/v2/models/nope/infer", js(), {}, 404),
        ("unknown version", "/v2/models/cls/versions/99/infer", js(), {}, 404),
        ("unknown input", "/v2/models/cls/infer", js(name="pixels"), {}, 400),
        ("unknown output", "/v2/models/cls/infer",
         json.dumps({**good_json, "outputs": [{"name": "nope"}]}), {}, 400),
        ("wrong datatype", "/v2/models/cls/infer", js(datatype="INT32"), {}, 400),
        ("BOOL pixels", "/v2/models/cls/infer", js(datatype="BOOL", data=[True] * x.size), {}, 400),
        ("data shorter than the shape", "/v2/models/cls/infer", js(data=x.flatten().tolist()[:-1]), {}, 400),
        ("data longer than the shape", "/v2/models/cls/infer", js(data=x.flatten().tolist() + [0.0]), {}, 400),
        ("wrong rank", "/v2/models/cls/infer", js(shape=[3, SIZE, SIZE]), {}, 400),
        ("negative dimension", "/v2/models/cls/infer", js(shape=[-1, 3, SIZE, SIZE]), {}, 400),
        ("enormous dimensions", "/v2/models/cls/infer", js(shape=[1 << 40, 1 << 40, 3, 3]), {}, 400),
        ("uncompiled HxW", "/v2/models/cls/infer",
         json.dumps({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 16, 16],
                                 "data": [0.0] * 768}]}), {}, 400),
        ("NaN pixels", "/v2/models/cls/infer", *binary_request([("pixel_values", "FP32", list(x.shape), nan.tobytes())]), 400),
        ("binary_data_size past the body", "/v2/models/cls/infer",
         *binary_request([("pixel_values", "FP32", list(x.shape), x.tobytes()[:-4])]), 400),
        ("Inference-Header-Content-Length past the body", "/v2/models/cls/infer", js(),
         {"Inference-Header-Content-Length": "9999999"}, 400),
        ("Inference-Header-Content-Length not a number", "/v2/models/cls/infer", js(),
         {"Inference-Header-Content-Length": "ten"}, 400),
        ("bad mask shape", "/v2/models/cls/infer", *binary_request(
            [("pixel_values", "FP32", list(x.shape), x.tobytes()), ("bool_masked_pos", "BOOL", [1, 3], b"\x01\x00\x01")]), 400),
        ("bad head-mask shape", "/v2/models/cls/infer", *binary_request(
            [("pixel_values", "FP32", list(x.shape), x.tobytes()),
             ("head_mask", "FP32", [3], np.ones(3, np.float32).tobytes())]), 400),
        ("negative head mask", "/v2/models/cls/infer", *binary_request(
            [("pixel_values", "FP32", list(x.shape), x.tobytes()),
             ("head_mask", "FP32", [4], (-np.ones(4, np.float32)).tobytes())]), 400),
        ("corrupt image bytes", "/v2/models/cls/infer", *binary_request(
            [("image", "BYTES", [1], len(b"\x89PNG\r\n\x1a\nnot").to_bytes(4, "little") + b"\x89PNG\r\n\x1a\nnot")]), 400),
        ("BYTES element past its end", "/v2/models/cls/infer", *binary_request(
            [("image", "BYTES", [1], (1000).to_bytes(4, "little") + b"abc")]), 400),
        ("both pixel_values and image", "/v2/models/cls/infer", *binary_request(
            [("pixel_values", "FP32", list(x.shape), x.tobytes()), ("image", "BYTES", [1], b"\x01\x00\x00\x00a")]), 400),
        ("classification of a non-2D output", "/v2/models/emb/infer",
         json.dumps({**good_json, "outputs": [{"name": "hidden_states", "parameters": {"classification": 2}}]}), {}, 400),
        ("batch over --max-batch", "/v2/models/cls/infer", *binary_request(
            [("pixel_values", "FP32", [9, 3, SIZE, SIZE], pixels(1, 9).tobytes())]), 400),
        ("GET on infer", None, None, None, 405),
        ("a gzip bomb past --max-body-mb", "/v2/models/cls/infer", gzip.compress(b" " * (6 << 20)),
         {"Content-Encoding": "gzip"}, 413),
        ("an unknown Content-Encoding", "/v2/models/cls/infer", js(), {"Content-Encoding": "br"}, 415),
        ("unknown path", "/v3/nope", b"", {}, 404),
    ]
    c = s.client()
    for name, path, body, headers, status in cases:
        if name == "GET on infer":
            got, h, out = s.raw("GET", "/v2/models/cls/infer")
        else:
            got, h, out = s.raw("POST", path, body, headers)
        check(got == status, f"{name}: status {got}, wanted {status}: {out[:300]}")
        try:
            message = json.loads(out)["error"]
        except Exception:  # noqa: BLE001
            message = None
        check(isinstance(message, str) and message, f"{name}: a JSON error, got {out[:200]}")
        # Still serving after each.
        check(c.is_server_ready() and c.infer("cls", [infer_input("pixel_values", x, "FP32")]).as_numpy("logits") is not None,
              f"still serving after: {name}")

    # Bodies past --max-body-mb (4 MiB here): refused on the Content-Length,
    # or when a chunked stream passes the limit. The server answers before
    # the body is all sent, so the client may see its socket closed early.
    for name, head, chunks in [
        ("oversized body", b"Content-Length: 5242880\r\n", [b"x" * (1 << 20)] * 5),
        ("chunked oversized body", b"Transfer-Encoding: chunked\r\n",
         [b"100000\r\n" + b"y" * (1 << 20) + b"\r\n"] * 6 + [b"0\r\n\r\n"]),
    ]:
        sock = socket.create_connection((s.host, s.port), timeout=30)
        sock.sendall(b"POST /v2/models/cls/infer HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = b""
        try:
            while True:
                part = sock.recv(65536)
                if not part:
                    break
                reply += part
                if b"}" in reply:
                    break
        except (socket.timeout, ConnectionResetError):
            pass
        sock.close()
        check(reply.startswith(b"HTTP/1.1 413") and b'"error"' in reply, f"{name}: {reply[:200]!r}")
        check(c.is_server_ready(), f"still serving after: {name}")

    # A client that stalls mid-body is dropped; others are served meanwhile.
    stalled = socket.create_connection((s.host, s.port), timeout=30)
    stalled.sendall(b"POST /v2/models/cls/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{\"inp")
    started = time.time()
    check(c.infer("cls", [infer_input("pixel_values", x, "FP32")]).as_numpy("logits") is not None, "served beside a stalled body")
    stalled.settimeout(20)
    reply = b""
    try:
        while b"\r\n\r\n" not in reply:
            chunk = stalled.recv(4096)
            if not chunk:
                break
            reply += chunk
    except socket.timeout:
        pass
    stalled.close()
    check(reply.startswith(b"HTTP/1.1 408") and time.time() - started < 10, f"stalled body: {reply[:100]!r}")


def test_refused_start(binary, bundles, tmp):
    """A bundle that cannot load, or a bad flag: one line, a non-zero exit."""
    for args, code, words in [
        (["--bundle", "m=" + os.path.join(tmp, "missing")], 1, "model m:"),
        (["--bundle", "nodir"], 2, "expected NAME=DIR"),
        (["--bundle", f"a={bundles['cls']}", "--bundle", f"a={bundles['emb']}"], 2, "given twice"),
        (["--bundle", f"a={bundles['cls']}", "--host", "no such host"], 2, "--host"),
    ]:
        r = subprocess.run([binary, "serve", "--port", "0"] + args, capture_output=True, text=True, timeout=120)
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        check(r.returncode == code and last.startswith("error: ") and words in last,
              f"serve {args}: exit {r.returncode}, stderr {r.stderr!r}")


def test_sigterm(binary, bundles, tmp):
    """SIGTERM while requests are in flight (their bodies half sent): each is
    still answered, correctly, and the server exits 0."""
    s = Server(binary, {"cls": bundles["cls"]})
    x = pixels(9, 2)
    want = runtime(binary, bundles["cls"], tmp, {"pixel_values": x})["logits"]
    body, headers = binary_request([("pixel_values", "FP32", list(x.shape), x.tobytes())],
                                   [{"name": "logits", "parameters": {"binary_data": False}}])
    socks = []
    for _ in range(3):
        sock = socket.create_connection((s.host, s.port), timeout=30)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"POST /v2/models/cls/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode()
                     + body[:len(body) // 2])
        socks.append(sock)
    time.sleep(0.3)
    s.proc.send_signal(signal.SIGTERM)
    check(s.wait_log("draining: finishing 3 request", 10), "drain logged:\n" + s.log())
    for sock in socks:
        sock.sendall(body[len(body) // 2:])
    for sock in socks:
        reply = b""
        while True:
            part = sock.recv(65536)
            if not part:
                break
            reply += part
        sock.close()
        head, _, payload = reply.partition(b"\r\n\r\n")
        check(head.startswith(b"HTTP/1.1 200"), f"a request in flight at SIGTERM: {reply[:300]!r}")
        got = np.array(json.loads(payload)["outputs"][0]["data"], np.float32).reshape(want.shape)
        check(close(got, want), "its answer is right")
    code = s.proc.wait(timeout=60)
    check(code == 0, f"exit code {code} after SIGTERM:\n{s.log()}")
    check(s.wait_log("stopped", 5), "stop logged")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/vit-msn")
    ap.add_argument("--verbose", action="store_true", help="print the first server's log")
    a = ap.parse_args()
    binary = os.path.abspath(a.bin)
    atexit.register(kill_servers)
    timer = threading.Timer(DEADLINE_S, lambda: (print("FAILED: over the time limit", flush=True), kill_servers(), os._exit(1)))
    timer.daemon = True
    timer.start()
    torch.set_num_threads(2)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        models, bundles = setup(binary, tmp)
        s = Server(binary, {"cls": bundles["cls"], "emb": bundles["emb"]})
        try:
            test_protocol(s, binary, models, bundles, tmp)
            test_load(s, binary, bundles, tmp)
            test_hostile(s)
            test_hot_swap(s, binary, bundles, tmp)
            code = s.stop()
            check(code == 0, f"exit code {code}")
        finally:
            if s.proc.poll() is None:
                s.proc.kill()
        test_refused_start(binary, bundles, tmp)
        test_sigterm(binary, bundles, tmp)
    if a.verbose:
        print(s.log())
    print(f"serve: {CHECKS} checks passed in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
