"""Where the time of one forward pass goes, per operator, in this runtime's
int8 artifact and in ONNX Runtime's int8 model of the same weights, plus the
single-op timings of one layer's f32 linears and attention: the profiles
behind docs/performance.md's "Where the time goes".

    .venv/bin/python benches/op_profile.py [--threads 2] [--batch 8] [--iters 5] [--single-ops]
    (make side-by-side installs onnxruntime and onnx; without them the ONNX Runtime part is skipped)

Builds the vit-msn-small-shaped ViTMSNModel with random weights as
benches/side_by_side.py does, compiles it with `vit-msn compile --dtype int8`,
and prints:
  - the artifact's operators by self time (torch.profiler, through
    torch.jit.load; the int8 linears carry their packed weights, so this is
    the runtime's graph);
  - ONNX Runtime's operators by kernel time (its own profiler) on
    quantize_dynamic(QInt8, per channel) of the same model;
  - single ops at one layer's shapes for --batch images: the f32 linears as
    the runtime runs them (oneDNN, weight prepacked; GELU fused as a post-op
    and, as on CPUs without AVX-512, run after it), as aten::linear and as
    oneMKL's packed sgemm (what the runtime runs on AMD Zen 3), the
    bf16 linears as the runtime runs them (oneDNN, prepacked), the
    int8 linears (fbgemm linear_dynamic; the same op under PyTorch's oneDNN
    quantized engine; oneDNN's qlinear_pointwise after the same dynamic
    activation quantization, or after quantizing it with elementwise ops),
    and attention as SDPA, as matmul + softmax + matmul and per head, and
    bf16's explicit attention on strided views and on contiguous copies.
Run it with the malloc settings the runtime sets for itself
(src/allocator.rs), or the single ops page-fault their outputs in:
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=2147483647
"""
import argparse
import collections
import importlib.util
import json
import os
import statistics
import subprocess
import tempfile
import time

import torch
from transformers import ViTMSNConfig, ViTMSNModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "vit-msn")
HIDDEN, HEADS, LAYERS, TOKENS = 384, 6, 12, 197


def median_ms(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def build_model():
    torch.manual_seed(0)
    cfg = ViTMSNConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
                       num_hidden_layers=LAYERS, image_size=224, patch_size=16, attn_implementation="sdpa")
    model = ViTMSNModel(cfg).eval()
    with torch.no_grad():  # random biases and layer norms, as side_by_side.py gives every stack
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.copy_(torch.randn_like(p) * 0.02 + (1.0 if "layernorm" in name and name.endswith("weight") else 0.0))
    return model


def profile_artifact(path, batch, iters):
    module = torch.jit.load(path).eval()
    args = (torch.randn(batch, 3, 224, 224), torch.zeros(batch, 196, dtype=torch.bool), torch.ones(LAYERS, HEADS))
    with torch.no_grad():
        for _ in range(3):
            module(*args)
        with torch.profiler.profile() as prof:
            for _ in range(iters):
                module(*args)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    print(f"\nvit-msn int8 artifact, batch {batch}: ms per pass by operator (self time), calls per pass")
    for e in rows[:12]:
        print(f"  {e.key[:52]:52s} {e.self_cpu_time_total / iters / 1e3:8.2f} {e.count // iters:5d}")
    print(f"  {'total':52s} {sum(e.self_cpu_time_total for e in rows) / iters / 1e3:8.2f}")


def profile_onnxruntime(model, tmp, batch, iters, threads):
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    f32, int8 = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "model-int8.onnx")
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), f32, input_names=["pixel_values"],
                      output_names=["last_hidden_state"], dynamic_axes={"pixel_values": {0: "b"}},
                      opset_version=17, dynamo=False)
    quantize_dynamic(f32, int8, weight_type=QuantType.QInt8, per_channel=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tmp, "ort-profile")
    session = ort.InferenceSession(int8, opts, providers=["CPUExecutionProvider"])
    x = np.random.randn(batch, 3, 224, 224).astype(np.float32)
    for _ in range(3 + iters):
        session.run(None, {"pixel_values": x})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    per_op = collections.defaultdict(float)
    # Every pass runs the same nodes, so the first 3/(3 + iters) of them are the warm-up passes.
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    for e in kernels[len(kernels) * 3 // (3 + iters):]:
        per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / iters
    print(f"\nONNX Runtime {ort.__version__} int8 dynamic, batch {batch}: ms per pass by operator (kernel time)")
    for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {op:52s} {ms:8.2f}")
    print(f"  {'total':52s} {sum(per_op.values()):8.2f}")


def single_ops(batch, iters):
    rows = batch * TOKENS
    print(f"\nSingle ops at one layer's shapes, {rows} rows (batch {batch}), median ms of {iters}:")
    fbgemm = "fbgemm" in torch.backends.quantized.supported_engines
    for k, n, act in [(HIDDEN, 3 * HIDDEN, "none"), (HIDDEN, HIDDEN, "none"), (HIDDEN, 4 * HIDDEN, "gelu"),
                      (4 * HIDDEN, HIDDEN, "none")]:
        x, w, b = torch.randn(rows, k), torch.randn(n, k) * 0.05, torch.randn(n)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        algorithm = "none" if act == "gelu" else ""  # GELU's "none" is the exact (erf) one
        onednn = median_ms(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, act, [], algorithm), iters)
        gelu = torch.nn.functional.gelu if act == "gelu" else (lambda y: y)
        aten = median_ms(lambda: gelu(torch.nn.functional.linear(x, w, b)), iters)
        line = f"  linear {k}->{n}{' + gelu' if act == 'gelu' else ''}: f32 oneDNN prepacked {onednn:.2f}"
        if act == "gelu":  # what the runtime runs on a CPU without AVX-512
            split = median_ms(lambda: gelu(torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")), iters)
            line += f" fused, {split:.2f} then gelu"
        line += f", aten::linear{' then gelu' if act == 'gelu' else ''} {aten:.2f}"
        if torch.backends.mkl.is_available():
            # What the runtime runs where oneMKL has its AVX2 kernels on an
            # AMD CPU without AVX-512 (src/bundle.rs, CpuLinears::Mkl);
            # preload the override (docs/performance.md) to see that case.
            mkl_w = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
            mkl = median_ms(lambda: gelu(torch.ops.mkl._mkl_linear(x, mkl_w, w, b, rows)), iters)
            line += f", oneMKL packed sgemm{' then gelu' if act == 'gelu' else ''} {mkl:.2f}"
        xb, bb = x.bfloat16(), b.bfloat16()
        try:
            packed_bf16 = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), rows)
        except RuntimeError:  # oneDNN has no bf16 inner product on an AVX2-only CPU
            packed_bf16 = None
        if packed_bf16 is not None:
            bf16 = median_ms(lambda: torch.ops.mkldnn._linear_pointwise(xb, packed_bf16, bb, act, [], algorithm),
                             iters)
            line += f", bf16 oneDNN prepacked {bf16:.2f}"
        if fbgemm:
            scale = w.abs().amax(1) / 127
            qw = torch.quantize_per_channel(w, scale, torch.zeros(n, dtype=torch.long), 0, torch.qint8)
            params = torch.ops.quantized.linear_prepack(qw, b)
            int8 = median_ms(lambda: gelu(torch.ops.quantized.linear_dynamic(x, params, False)), iters)
            line += f", int8 linear_dynamic{' then gelu' if act == 'gelu' else ''} {int8:.2f}"
            if "onednn" in torch.backends.quantized.supported_engines:
                # The same op with its weight packed for PyTorch's oneDNN
                # quantized engine, as an artifact loaded under it would be.
                engine, torch.backends.quantized.engine = torch.backends.quantized.engine, "onednn"
                dnn_params = torch.ops.quantized.linear_prepack(qw, b)
                on_engine = median_ms(lambda: gelu(torch.ops.quantized.linear_dynamic(x, dnn_params, False)), iters)
                diff = (torch.ops.quantized.linear_dynamic(x, dnn_params, False)
                        - torch.ops.quantized.linear_dynamic(x, params, False)).abs().max().item()
                torch.backends.quantized.engine = engine
                line += f" (oneDNN engine {on_engine:.2f}, outputs differ by {diff:.1e})"
            # oneDNN's int8 linear (GELU fused) on the same weights, with the
            # activation quantized as linear_dynamic does: it takes a plain
            # uint8 tensor, hence int_repr. It needs its own packed weight
            # (an unpacked one crashes the process).
            w8 = qw.int_repr()
            dnn_w = torch.ops.onednn.qlinear_prepack(w8, [rows, k])
            zeros = torch.zeros(n, dtype=torch.long)

            def qlinear(qx, s, z):
                return torch.ops.onednn.qlinear_pointwise(qx, s, z, dnn_w, scale, zeros, b, 1.0, 0, torch.float32,
                                                          act, [None], "none" if act == "gelu" else "")

            def dynamic_onednn():
                qx = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)
                return qlinear(qx.int_repr(), qx.q_scale(), qx.q_zero_point())

            def elementwise_onednn():
                # The activation quantized by stock elementwise ops instead,
                # rounded as fbgemm's linear_dynamic rounds (zero point +
                # x / scale in one fused multiply-add, then to nearest even).
                s, z = torch._choose_qparams_per_tensor(x, False)
                u8 = torch.add(torch.scalar_tensor(float(z)), x, alpha=1.0 / s).round_().clamp_(0, 255)
                return qlinear(u8.to(torch.uint8), s, z)

            qx = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)
            u8, s, z = qx.int_repr(), qx.q_scale(), qx.q_zero_point()
            exact = (gelu(torch.ops.quantized.linear_dynamic(x, params, False))
                     - elementwise_onednn()).abs().max().item()
            line += (f", oneDNN int8 {median_ms(dynamic_onednn, iters):.2f}"
                     f" (GEMM alone {median_ms(lambda: qlinear(u8, s, z), iters):.2f};"
                     f" quantized by elementwise ops {median_ms(elementwise_onednn, iters):.2f},"
                     f" {exact:.1e} from linear_dynamic)")
        print(line)
    qkv = torch.randn(batch, TOKENS, 3, HEADS, HIDDEN // HEADS)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    scale = (HIDDEN // HEADS) ** -0.5

    def explicit():
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
        return torch.matmul(torch.matmul(qc * scale, kc.transpose(-1, -2)).softmax(-1), vc)

    def per_head():  # 2-D batched matmuls with k and v as strided views, not copied
        return [torch.bmm(torch.bmm(q[:, h] * scale, k[:, h].transpose(1, 2)).softmax(-1), v[:, h])
                for h in range(HEADS)]

    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    probs = torch.matmul(qc, kc.transpose(-1, -2)).softmax(-1)
    sdpa = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), iters)
    print(f"  attention, {HEADS} heads of {HIDDEN // HEADS}: SDPA {sdpa:.2f}, "
          f"matmul + softmax + matmul (with the copies to contiguous) {median_ms(explicit, iters):.2f}, "
          f"per head on the strided views {median_ms(per_head, iters):.2f}; q·kᵀ alone "
          f"{median_ms(lambda: torch.matmul(qc, kc.transpose(-1, -2)), iters):.2f}, "
          f"p·v alone {median_ms(lambda: torch.matmul(probs, vc), iters):.2f}")
    # bf16 artifacts' explicit attention (graph/src/encoder.rs), on the strided
    # views of the fused projection and as compiled, after copies to contiguous.
    bq, bk, bv = (t.transpose(1, 2) for t in qkv.bfloat16().unbind(2))

    def bf16_attention(contiguous):
        if contiguous:
            qs, kc, vc = bq.contiguous().mul_(scale), bk.contiguous(), bv.contiguous()
        else:
            qs, kc, vc = bq * scale, bk, bv
        return torch.matmul(torch.matmul(qs, kc.transpose(-1, -2)).softmax(-1), vc)

    bf16_scores = torch.matmul(bq.contiguous(), bk.contiguous().transpose(-1, -2))
    print(f"  bf16 matmul + softmax + matmul: on the strided views {median_ms(lambda: bf16_attention(False), iters):.2f}, "
          f"after copies to contiguous (as compiled) {median_ms(lambda: bf16_attention(True), iters):.2f}; "
          f"its softmax alone {median_ms(lambda: bf16_scores.softmax(-1), iters):.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--single-ops", action="store_true", help="only the single-op timings")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.single_ops:
        with torch.no_grad():
            single_ops(args.batch, max(args.iters, 20))
        return
    model = build_model()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        model_dir, bundle = os.path.join(tmp, "model"), os.path.join(tmp, "bundle-int8")
        model.save_pretrained(model_dir)
        subprocess.run([BIN, "compile", "--model", model_dir, "--out", bundle, "--dtype", "int8"], check=True,
                       stdout=subprocess.DEVNULL)
        with open(os.path.join(bundle, "manifest.json")) as f:
            artifact = json.load(f)["artifacts"][0]["file"]
        profile_artifact(os.path.join(bundle, artifact), args.batch, args.iters)
        if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
            profile_onnxruntime(model, tmp, args.batch, args.iters, args.threads)
        else:
            print("\nonnxruntime or onnx not installed: skipping ONNX Runtime (make side-by-side installs them)")
        single_ops(args.batch, max(args.iters, 20))


if __name__ == "__main__":
    main()
