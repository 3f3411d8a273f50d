"""Exports a transformers ViT-MSN folder (fine-tuned or not, backbone or
classifier) to a vit-msn bundle with torch.jit.trace: the same inputs,
outputs, manifest and layout as `vit-msn compile` writes, so the Rust runtime,
`vit-msn run` and C++ programs use either interchangeably. The traced files
carry their own description; `vit-msn bundle pack` writes the bundle, with the
one writer and manifest the compiler uses.

    python graph/python/export.py --model HF_DIR --out BUNDLE_DIR
        [--resolutions 224,384,160x192] [--outputs hidden_states,attentions]
        [--dtype f32|f16|bf16] [--task backbone|classification] [--bin target/release/vit-msn]

Each artifact: forward(pixel_values, bool_masked_pos, head_mask) -> Dict[str, Tensor]
with `last_hidden_state` or `logits`, then any requested outputs.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from transformers import ViTMSNConfig, ViTMSNForImageClassification, ViTMSNModel

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


class Artifact(torch.nn.Module):
    """The model behind the bundle's fixed signature."""

    def __init__(self, model, classifier, interpolate, hidden, attentions):
        super().__init__()
        self.model = model
        self.classifier = classifier
        self.interpolate = interpolate
        self.hidden = hidden
        self.attentions = attentions

    def forward(self, pixel_values, bool_masked_pos, head_mask):
        vit = self.model.vit if self.classifier else self.model
        out = vit(pixel_values, bool_masked_pos=bool_masked_pos, head_mask=head_mask,
                  interpolate_pos_encoding=self.interpolate, output_hidden_states=self.hidden,
                  output_attentions=self.attentions, return_dict=True)
        result = {}
        if self.classifier:
            result["logits"] = self.model.classifier(out.last_hidden_state[:, 0, :])
        else:
            result["last_hidden_state"] = out.last_hidden_state
        if self.hidden:
            result["hidden_states"] = torch.stack(out.hidden_states)
        if self.attentions:
            result["attentions"] = stack_attentions(out, self.model.config.num_attention_heads)
        return result


def stack_attentions(out, heads):
    """(layers, B, heads, T, T); a model without layers returns none, which
    is an empty stack of that shape."""
    if out.attentions:
        return torch.stack(out.attentions)
    b, t, _ = out.last_hidden_state.shape
    return out.last_hidden_state.new_zeros((0, b, heads, t, t))


def parse_resolution(s):
    h, _, w = s.strip().lower().partition("x")
    h, w = int(h), int(w or h)
    if h <= 0 or w <= 0:
        raise ValueError(f"resolution `{s}` is not N or HxW")
    return h, w


def side(config, name):
    """image_size / patch_size as one integer; transformers also takes a
    [height, width] list, which must be square here as in `vit-msn compile`."""
    size = getattr(config, name)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            sys.exit(f"error: `{name}` {list(size)} is not square; only square sizes are supported")
        size = size[0]
    return int(size)


def export(model_dir, out, resolutions, outputs, dtype_name, task, binary):
    with open(os.path.join(model_dir, "config.json")) as f:
        raw_config = json.load(f)
    config = ViTMSNConfig.from_pretrained(model_dir)
    image_size, patch_size = side(config, "image_size"), side(config, "patch_size")
    if task is None:
        archs = raw_config.get("architectures") or []
        task = "classification" if "ViTMSNForImageClassification" in archs else "backbone"
    classifier = task == "classification"
    cls = ViTMSNForImageClassification if classifier else ViTMSNModel
    kwargs = {} if classifier else {"use_mask_token": True}
    model = cls.from_pretrained(model_dir, attn_implementation="eager", **kwargs).eval()
    vit = model.vit if classifier else model
    # transformers' position interpolation divides by this, which fails on a list.
    vit.embeddings.patch_size = patch_size
    if vit.embeddings.mask_token is None:
        # As `vit-msn compile` does for a checkpoint without one.
        vit.embeddings.mask_token = torch.nn.Parameter(torch.zeros(1, 1, config.hidden_size))
    dtype = DTYPES[dtype_name]
    model = model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    hidden, attentions = "hidden_states" in outputs, "attentions" in outputs
    resolutions = resolutions or [(image_size, image_size)]
    layers, heads, d = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    # The traced files go to a scratch folder; `vit-msn bundle pack` writes
    # the bundle (manifest, digests, staging and rename) as compile does.
    staged = tempfile.mkdtemp(prefix="vit-msn-export-")
    try:
        for h, w in resolutions:
            patches = (h // patch_size) * (w // patch_size)
            tokens = patches + 1
            interpolate = (h, w) != (image_size, image_size)
            name = dtype_name
            inputs = [
                {"name": "pixel_values", "dtype": name, "shape": [-1, config.num_channels, h, w]},
                {"name": "bool_masked_pos", "dtype": "bool", "shape": [-1, patches]},
                {"name": "head_mask", "dtype": name, "shape": [layers, heads]},
            ]
            outs = [{"name": "logits", "dtype": name, "shape": [-1, config.num_labels]} if classifier else
                    {"name": "last_hidden_state", "dtype": name, "shape": [-1, tokens, d]}]
            if hidden:
                outs.append({"name": "hidden_states", "dtype": name, "shape": [layers + 1, -1, tokens, d]})
            if attentions:
                outs.append({"name": "attentions", "dtype": name, "shape": [layers, -1, heads, tokens, tokens]})
            example = (torch.randn(2, config.num_channels, h, w, dtype=dtype),
                       torch.zeros(2, patches, dtype=torch.bool),
                       torch.ones(layers, heads, dtype=dtype))
            wrapper = Artifact(model, classifier, interpolate, hidden, attentions).eval()
            with torch.no_grad():
                traced = torch.jit.trace(wrapper, example, strict=False, check_trace=False)
            # The model is loaded with attn_implementation="eager": every layer holds its scores.
            description = {"producer": "vit-msn export.py", "task": task, "dtype": name, "device": "cpu",
                           "height": h, "width": w, "inputs": inputs, "outputs": outs, "attention": "eager"}
            torch.jit.save(traced, os.path.join(staged, f"model_{h}x{w}.pt"),
                           _extra_files={"vit_msn.json": json.dumps(description)})
        r = subprocess.run([binary, "bundle", "pack", "--model", model_dir, "--artifacts", staged, "--out", out,
                            "--producer", f"vit-msn export.py (torch {torch.__version__})"],
                           capture_output=True, text=True)
        if r.returncode:
            raise ValueError(r.stderr.strip().removeprefix("error: ") or f"{binary} bundle pack failed")
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def default_binary():
    """VIT_MSN_BIN, else the release build of this checkout, else `vit-msn` on PATH."""
    if os.environ.get("VIT_MSN_BIN"):
        return os.environ["VIT_MSN_BIN"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    built = os.path.join(root, "target", "release", "vit-msn")
    return built if os.path.exists(built) else (shutil.which("vit-msn") or built)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resolutions", default="")
    ap.add_argument("--outputs", default="")
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    ap.add_argument("--task", choices=["backbone", "classification"])
    ap.add_argument("--bin", default=None, help="the vit-msn binary that packs the bundle (default: "
                    "$VIT_MSN_BIN, else target/release/vit-msn, else vit-msn on PATH)")
    a = ap.parse_args()
    try:
        resolutions = [parse_resolution(r) for r in a.resolutions.split(",") if r.strip()]
        outputs = {o.strip() for o in a.outputs.split(",") if o.strip()}
        unknown = outputs - {"hidden_states", "attentions"}
        if unknown:
            raise ValueError(f"unknown output(s) {sorted(unknown)}")
        export(a.model, a.out, resolutions, outputs, a.dtype, a.task, a.bin or default_binary())
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
