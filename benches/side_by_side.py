"""Puts the same weights through every stack, in one run on this machine, and
prints a table: median ms at batch 1, median ms per image at batch 8, each
with the fastest pass in brackets, and the ratio of the medians to
transformers f32. The output starts with the CPU model, the CPU flags that
decide which kernels the stacks can use, and the package versions.

    .venv/bin/python benches/side_by_side.py [--threads 2] [--iters 15] [--rounds 5] [--shape small|tiny|base]
        [--task backbone|classifier] [--stacks SUBSTRING,...]
    (make side-by-side installs onnxruntime, onnx and openvino first)

Stacks (--stacks keeps the rows whose name contains one of its comma-separated
substrings, case-insensitive; default all), all on the venv's torch 2.13.0
except ONNX Runtime and OpenVINO:
  transformers 4.46.3 ViTMSNModel (or, with --task classifier,
  ViTMSNForImageClassification with 1000 labels), SDPA, f32 and bf16
  the same model traced in Python, frozen, optimize_for_inference
  ONNX Runtime (CPU EP), the same model exported to ONNX (opset 17, dynamic batch):
    f32, and int8 dynamic: quantize_dynamic(weight_type=QInt8, per_channel=True)
    on that same f32 export, so the weights are per-output-channel int8 like
    ours, with activations quantized on each call (ORT per tensor, uint8);
    ORT also turns the patch-embedding conv into ConvInteger
  OpenVINO (CPU plugin), f32 and bf16 (INFERENCE_PRECISION_HINT; the worker
    prints to stderr what precision it actually ran, since a CPU without bf16
    falls back to f32): converted from the transformers model itself with
    openvino.convert_model(model, example_input=...), not from the ONNX file,
    since the PyTorch frontend keeps SDPA as one op and gives a leaner graph;
    saved as IR without fp16 compression with a dynamic batch dimension, then
    compiled once per batch size with that size fixed (measured against one
    dynamic-batch compiled model: as fast in f32, faster in bf16 at batch 1);
    INFERENCE_NUM_THREADS --threads, PERFORMANCE_HINT LATENCY, synchronous
    InferRequest.infer
  this runtime: vit-msn bench on bundles compiled from the same checkpoint,
    f32, bf16 and int8 (a bundle whose compile fails is skipped with a note);
    each also with glibc's malloc as is and with oneMKL as shipped, and f32
    with its linears on oneDNN (rows that show what src/allocator.rs,
    src/mkl.rs and the choice of GEMM gain)
A stack whose package is missing, or whose worker fails, is skipped with a
note on stderr. Random weights: these are speed figures, not accuracy.
"""
import argparse
import importlib.metadata
import importlib.util
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
VIT_MSN_DTYPES = ("f32", "bf16", "int8")
# The runtime sets glibc's malloc to keep freed memory (src/allocator.rs);
# these rows run the same bundle with malloc left as it is, to show the gain.
SYSTEM_MALLOC = ", glibc malloc as is"
# On an AMD CPU with AVX2 the runtime lets oneMKL take its AVX2/AVX-512 kernels
# (src/mkl.rs); these rows run the same bundle with oneMKL as it ships.
MKL_AS_SHIPPED = ", oneMKL as shipped"
# Where oneMKL runs its AVX2 kernels on an AMD CPU without AVX-512, f32
# linears default to its packed sgemm (src/bundle.rs, CpuLinears); these rows
# run them on oneDNN, the default elsewhere.
ONEDNN_LINEARS = ", oneDNN linears"
# Row suffix -> what that row's process environment adds.
VIT_MSN_VARIANTS = {"": {}, SYSTEM_MALLOC: {"VIT_MSN_SYSTEM_MALLOC": "1"},
                    MKL_AS_SHIPPED: {"VIT_MSN_MKL_AMD_AS_INTEL": "0"},
                    ONEDNN_LINEARS: {"VIT_MSN_CPU_LINEARS": "onednn"}}
# Variants that only an f32 bundle has.
F32_ONLY_VARIANTS = (ONEDNN_LINEARS,)
TORCH_STACKS = ["transformers SDPA f32", "TorchScript trace + freeze + optimize_for_inference",
                "transformers SDPA bf16"]
# Optional stacks: name -> the packages they need.
OPTIONAL_STACKS = {"ONNX Runtime f32": ("onnxruntime", "onnx"), "ONNX Runtime int8 dynamic": ("onnxruntime", "onnx"),
                   "OpenVINO f32": ("openvino",), "OpenVINO bf16": ("openvino",)}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


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


def python_stack(name, model_dir, model_file, batches, iters, threads, task):
    """Times one Python-side stack; runs in a worker process of its own.
    Lines it starts with "note: " on stderr are shown to the user."""
    torch.set_num_threads(threads)
    if name.startswith("ONNX Runtime"):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(model_file, opts, providers=["CPUExecutionProvider"])
        inputs = {b: torch.randn(b, 3, 224, 224).numpy() for b in batches}
        return {b: time_fn(lambda: sess.run(None, {"pixel_values": inputs[b]}), iters) for b in batches}
    if name.startswith("OpenVINO"):
        import openvino as ov
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": name.split()[-1], "INFERENCE_NUM_THREADS": threads,
                  "PERFORMANCE_HINT": "LATENCY"}
        times = {}
        for b in batches:
            # One compiled model per batch size: a static shape was as fast
            # as the dynamic batch in f32 and faster in bf16 at batch 1.
            model = core.read_model(model_file)
            model.reshape([b, 3, 224, 224])
            compiled = core.compile_model(model, "CPU", config)
            if b == batches[0]:
                ran = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
                print(f"note: {name} runs in {ran}", file=sys.stderr)
            request = compiled.create_infer_request()
            x = torch.randn(b, 3, 224, 224).numpy()
            times[b] = time_fn(lambda: request.infer([x]), iters)
        return times
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
    else:
        raise SystemExit(f"unknown stack {name}")
    inputs = {b: torch.randn(b, 3, 224, 224, dtype=dtype) for b in batches}
    with torch.inference_mode():
        return {b: time_fn(lambda: fn(inputs[b]), iters) for b in batches}


def describe_machine():
    """Prints the CPU model, which of CPU_FLAGS it has, and the package
    versions; returns whether src/mkl.rs's override applies (AMD, AVX2)."""
    model_name, vendor, flags = "unknown", "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model_name = value.strip()
                elif key.strip() == "vendor_id":
                    vendor = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    print(f"CPU: {model_name}")
    print("CPU flags: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FLAGS))
    versions = []
    for pkg in ("torch", "transformers", "onnxruntime", "onnx", "openvino"):
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{pkg} not installed")
    print("Packages: " + ", ".join(versions), flush=True)
    return vendor == "AuthenticAMD" and "avx2" in flags


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--task", choices=sorted(MODELS), default="backbone",
                    help="classifier: ViTMSNForImageClassification with 1000 labels in every stack")
    ap.add_argument("--stacks", default="",
                    help="comma-separated substrings (case-insensitive): run only the stacks whose name "
                         "contains one, e.g. 'openvino,int8'; default all")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--model-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [1, 8]
    if args.worker:
        print(json.dumps(python_stack(args.worker, args.model_dir, args.model_file, batches, args.iters,
                                      args.threads, args.task)))
        return
    mkl_override = describe_machine()
    wanted = [s.strip().lower() for s in args.stacks.split(",") if s.strip()]
    all_names = ([f"vit-msn (this runtime) {d}{m}" for d in VIT_MSN_DTYPES for m in VIT_MSN_VARIANTS
                  if d == "f32" or m not in F32_ONLY_VARIANTS]
                 + TORCH_STACKS + list(OPTIONAL_STACKS))
    selected = [n for n in all_names if not wanted or any(w in n.lower() for w in wanted)]
    if not selected:
        raise SystemExit(f"--stacks {args.stacks!r} matches none of: {', '.join(all_names)}")
    if not mkl_override and any(n.endswith(MKL_AS_SHIPPED) for n in selected):
        # Elsewhere oneMKL runs as shipped in every row already.
        print("not an AMD CPU with AVX2: skipping the oneMKL as shipped rows", file=sys.stderr)
        selected = [n for n in selected if not n.endswith(MKL_AS_SHIPPED)]
        if not selected:
            raise SystemExit("nothing left to run")
    for name, pkgs in OPTIONAL_STACKS.items():
        missing = [p for p in pkgs if importlib.util.find_spec(p) is None]
        if name in selected and missing:
            print(f"{', '.join(missing)} not installed: skipping {name} (make side-by-side installs it)",
                  file=sys.stderr)
            selected.remove(name)
    torch.manual_seed(0)
    hidden, heads = SHAPES[args.shape]
    cfg = ViTMSNConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden,
                       num_hidden_layers=12, image_size=224, patch_size=16, attn_implementation="sdpa",
                       **({"num_labels": 1000} if args.task == "classifier" else {}))
    model = MODELS[args.task](cfg).eval()
    # transformers initialises biases to 0 and LayerNorm to weight 1, bias 0;
    # OpenVINO folds such no-op adds and multiplies away, which a trained
    # checkpoint would not allow, so give every stack random ones.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "layernorm" in pname:
                p.copy_(torch.randn_like(p) * 0.02 + (1.0 if "layernorm" in pname and pname.endswith("weight") else 0.0))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        model.save_pretrained(model_dir)
        stacks = {}
        envs = {}  # name -> what its process's environment adds
        for dtype in VIT_MSN_DTYPES:
            name = f"vit-msn (this runtime) {dtype}"
            names = [name + m for m in VIT_MSN_VARIANTS if name + m in selected]
            if not names:
                continue
            bundle = os.path.join(tmp, f"bundle-{dtype}")
            try:
                subprocess.run([BIN, "compile", "--model", model_dir, "--out", bundle, "--dtype", dtype],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            except (OSError, subprocess.CalledProcessError) as e:
                why = (getattr(e, "stderr", None) or str(e)).strip().splitlines() or ["no message"]
                print(f"vit-msn compile --dtype {dtype} failed, skipping: {why[-1]}", file=sys.stderr)
                continue
            for n in names:
                stacks[n] = [
                    BIN, "bench", "--bundle", bundle, "--batch", ",".join(map(str, batches)), "--iters",
                    str(args.iters), "--warmup", "3", "--threads", str(args.threads), "--json"]
                envs[n] = VIT_MSN_VARIANTS[n[len(name):]]
        # The file each Python stack loads, where it loads one; a stack whose
        # export fails is dropped with a note, like a failed bundle compile.
        files = {}
        onnx_path = os.path.join(tmp, "model.onnx")
        int8_path = os.path.join(tmp, "model-int8.onnx")
        ir_path = os.path.join(tmp, "openvino", "model.xml")

        def export_onnx():
            torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), onnx_path, input_names=["pixel_values"],
                              output_names=[OUTPUTS[args.task]], dynamic_axes={"pixel_values": {0: "b"}},
                              opset_version=17, dynamo=False)

        def quantize_onnx():
            from onnxruntime.quantization import QuantType, quantize_dynamic
            quantize_dynamic(onnx_path, int8_path, weight_type=QuantType.QInt8, per_channel=True)

        def convert_openvino():
            import openvino as ov
            with torch.no_grad():
                ov_model = ov.convert_model(model, example_input=torch.randn(1, 3, 224, 224),
                                            input=[-1, 3, 224, 224])
            # save_model would otherwise store the weights as fp16.
            ov.save_model(ov_model, ir_path, compress_to_fp16=False)

        for export, names, path in (
                (export_onnx, ["ONNX Runtime f32", "ONNX Runtime int8 dynamic"], onnx_path),
                (quantize_onnx, ["ONNX Runtime int8 dynamic"], int8_path),
                (convert_openvino, ["OpenVINO f32", "OpenVINO bf16"], ir_path)):
            names = [n for n in names if n in selected]
            if not names:
                continue
            try:
                export()
            except Exception as e:  # any failure here only costs the stacks that need it
                print(f"{export.__name__} failed, skipping {', '.join(names)}: {e!r}"[:300], file=sys.stderr)
                selected = [n for n in selected if n not in names]
                continue
            for n in names:
                files[n] = path  # the quantized file replaces the f32 one for int8
        for name in selected:
            if name.startswith("vit-msn"):
                continue
            stacks[name] = [sys.executable, os.path.abspath(__file__), "--worker", name, "--model-dir",
                            model_dir, "--model-file", files.get(name, ""), "--iters", str(args.iters),
                            "--threads", str(args.threads), "--task", args.task]
        # Each measurement is a fresh process, so no stack's idle thread pool
        # competes with another's; the stacks take turns, round after round,
        # so a slow spell on this shared machine falls on all of them.
        rounds = {name: {b: [] for b in batches} for name in stacks}
        for i in range(args.rounds):
            for name, cmd in list(stacks.items()):
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **envs.get(name, {})})
                if proc.returncode != 0:
                    why = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
                    print(f"{name} failed, skipping it: {why[-1]}", file=sys.stderr)
                    del stacks[name], rounds[name]
                    continue
                if i == 0:
                    for line in proc.stderr.splitlines():
                        if line.startswith("note: "):
                            print(line, file=sys.stderr)
                if name.startswith("vit-msn"):
                    result = {r["batch"]: [r["median_ms"], r["min_ms"]] for r in json.loads(proc.stdout)["results"]}
                else:  # the worker's last line
                    result = {int(b): t for b, t in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
                for b in batches:
                    rounds[name][b].append(result[b])
                # Progress, so a long run shows where it is.
                print(f"round {i + 1}/{args.rounds}: {name}: "
                      f"{result[1][0]:.1f} ms at batch 1, {result[8][0] / 8:.1f} ms per image at batch 8",
                      file=sys.stderr, flush=True)
    if not rounds:
        raise SystemExit("no stack ran")
    med = {name: {b: statistics.median(m for m, _ in v) for b, v in per.items()} for name, per in rounds.items()}
    fastest = {name: {b: min(f for _, f in v) for b, v in per.items()} for name, per in rounds.items()}
    base = med.get("transformers SDPA f32")
    print(f"\nViT-MSN {args.shape} shape, {MODELS[args.task].__name__}, 224, random weights; torch {torch.__version__}, {args.threads} threads; "
          f"{args.rounds} rounds, each stack in a fresh process in turn, median of {args.iters} after 3 warm-up "
          f"passes; the table gives the median over rounds, and (in brackets) the fastest pass of all rounds")
    print("| stack | batch 1 (ms) | batch 8 (ms per image) | ratio to transformers f32 (b1 / b8) |")
    print("|---|---|---|---|")
    for name, per in med.items():
        m1, m8 = per[1], per[8] / 8
        f1, f8 = fastest[name][1], fastest[name][8] / 8
        ratio = f"{m1 / base[1]:.2f} / {m8 / (base[8] / 8):.2f}" if base else "n/a (not run)"
        print(f"| {name} | {m1:.1f} ({f1:.1f}) | {m8:.1f} ({f8:.1f}) | {ratio} |")
    print("\nEach round's medians (batch 1 ms / batch 8 ms per image), to show the spread:")
    for name, per in rounds.items():
        each = ", ".join(f"{a[0]:.1f} / {b[0] / 8:.1f}" for a, b in zip(per[1], per[8]))
        print(f"  {name}: {each}")


if __name__ == "__main__":
    main()
