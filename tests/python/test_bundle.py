"""vit_msn.Bundle: the forward pass against `vit-msn run --inputs`, and the
runtime's refusals (each also refused by the Rust binary)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from conftest import run_bin
from safetensors.torch import load_file, save_file

import vit_msn
from vit_msn import ArtifactError, Bundle, DigestError, InputError, ManifestError


def rust_forward(bundle, tmp_path, **inputs) -> dict:
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(src))
    run_bin("--threads", "1", "run", "--bundle", bundle, "--inputs", src, "--output", dst)
    return load_file(str(dst))


@pytest.mark.parametrize("which", ["backbone", "classifier"])
def test_forward_matches_the_runtime_with_masks(which, backbone_bundle, classifier_bundle, tmp_path):
    path = backbone_bundle if which == "backbone" else classifier_bundle
    b = Bundle(path)
    g = torch.Generator().manual_seed(3)
    px = torch.randn(3, 3, 64, 64, generator=g)
    mask = torch.rand(3, 16, generator=g) < 0.3
    heads = torch.ones(2, 4)
    heads[0, 1] = 0.0
    heads[1, 3] = 0.5
    name = "last_hidden_state" if which == "backbone" else "logits"
    for kwargs in ({}, {"bool_masked_pos": mask, "head_mask": heads}):
        got = b.forward(px, **kwargs)
        assert list(got) == [name]
        want = rust_forward(path, tmp_path, pixel_values=px, **kwargs)[name]
        d = (got[name] - want).abs().max().item()
        assert d <= 1e-4, f"{which} {sorted(kwargs)}: max |diff| {d}"
    # An integer mask means the same as a bool one; heads given per layer or once.
    assert torch.equal(b.forward(px, bool_masked_pos=mask.to(torch.uint8))[name],
                       b.forward(px, bool_masked_pos=mask)[name])
    assert torch.equal(b.forward(px, head_mask=torch.ones(4))[name], b.forward(px)[name])


def test_embed_is_the_cls_token(backbone_bundle):
    b = Bundle(backbone_bundle)
    px = torch.randn(2, 3, 64, 64)
    assert torch.equal(b.embed(px), b.forward(px)["last_hidden_state"][:, 0])
    with pytest.raises(InputError, match="backbone"):
        b.classify(px)


@pytest.mark.parametrize("bad,name,message", [
    (torch.randn(1, 3, 32, 32), "pixel_values", "resolution 32x32 was not compiled; this bundle has 64x64"),
    (torch.randn(1, 1, 64, 64), "pixel_values", "expected 3 channel"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.int64), "pixel_values", "expected a float tensor"),
    (torch.full((1, 3, 64, 64), float("nan")), "pixel_values", "NaN"),
])
def test_bad_pixel_values_are_refused(backbone_bundle, bad, name, message):
    with pytest.raises(InputError, match=message) as e:
        Bundle(backbone_bundle, warm_up=False).forward(bad)
    assert e.value.name == name


def test_bad_masks_are_refused(backbone_bundle):
    b = Bundle(backbone_bundle, warm_up=False)
    px = torch.zeros(2, 3, 64, 64)
    with pytest.raises(InputError, match=r"bool_masked_pos.*\[2, 16\]"):
        b.forward(px, bool_masked_pos=torch.zeros(2, 15, dtype=torch.bool))
    with pytest.raises(InputError, match="head_mask.*non-negative"):
        b.forward(px, head_mask=-torch.ones(2, 4))
    with pytest.raises(InputError, match=r"head_mask.*\[4\] or \[2, 4\]"):
        b.forward(px, head_mask=torch.ones(3, 4))


def copy_bundle(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def edit_manifest(bundle, edit):
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def tamper(bundle):
    artifact = bundle / json.loads((bundle / "manifest.json").read_text())["artifacts"][0]["file"]
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))


def _labels(m):
    m["model"]["labels"] = m["model"]["labels"][:3]


def _heads(m):
    # Consistent inside the manifest; only the artifact's own description disagrees.
    m["model"]["num_attention_heads"] = 2
    for a in m["artifacts"]:
        for s in a["inputs"]:
            if s["name"] == "head_mask":
                s["shape"] = [2, 2]


@pytest.mark.parametrize("which,change,error,message", [
    ("backbone", tamper, DigestError, "refusing to load a modified artifact"),
    ("backbone", lambda b: edit_manifest(b, lambda m: m.update(format_version=2)), ManifestError,
     "format version 2 is newer than this program reads"),
    ("backbone", lambda b: edit_manifest(b, lambda m: m.update(task="segmentation")), ManifestError,
     "unknown task `segmentation`"),
    ("backbone", lambda b: edit_manifest(b, lambda m: m["artifacts"][0].update(file="../x.pt")), ManifestError,
     "is not a plain file name"),
    ("backbone", lambda b: edit_manifest(b, lambda m: m["model"].update(hidden_size=0)), ManifestError,
     "`model.hidden_size` must be in 1..=65536"),
    ("backbone", lambda b: edit_manifest(b, lambda m: m.pop("source")), ManifestError, "missing field `source`"),
    ("backbone", lambda b: edit_manifest(b, _heads), ArtifactError, "compiled for"),
    ("classifier", lambda b: edit_manifest(b, _labels), ManifestError, "`model.labels` names 3 classes"),
    ("backbone", lambda b: (b / "manifest.json").write_text("{"), ManifestError, "not valid JSON"),
])
def test_refusals_match_the_runtime(which, change, error, message, backbone_bundle, classifier_bundle, tmp_path):
    bundle = copy_bundle(backbone_bundle if which == "backbone" else classifier_bundle, tmp_path)
    change(bundle)
    with pytest.raises(error, match=message):
        Bundle(bundle)
    with pytest.raises(error, match=message):
        vit_msn.verify(bundle)
    # The Rust runtime refuses to load the same bundle.
    image = tmp_path / "grey.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(image)
    p = run_bin("run", "--bundle", bundle, "--image", image, check=False)
    assert p.returncode != 0, f"vit-msn run accepted a bundle vit_msn refuses ({message})"


def test_only_the_image_resolution_is_loaded(backbone_bundle):
    b = Bundle.for_images(backbone_bundle)
    assert b.image_size() == (64, 64)
    assert b.preprocessing().height == 64
    with pytest.raises(InputError, match="resolutions"):
        Bundle(backbone_bundle, resolutions=[(32, 32)])


def test_int8_bundles_run_on_the_cpu_only(tmp_path):
    """An int8 bundle (f32 in and out) gives the Rust runtime's numbers, and
    is refused on CUDA."""
    from conftest import FIXTURES
    path = tmp_path / "int8"
    run_bin("--threads", "1", "compile", "--model", FIXTURES / "e2e_classifier" / "model", "--out", path,
            "--dtype", "int8")
    b = Bundle(path)
    assert b.dtype == torch.float32
    px = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    got = b.forward(px)["logits"]
    want = rust_forward(path, tmp_path, pixel_values=px)["logits"]
    assert (got - want).abs().max().item() <= 1e-4
    with pytest.raises(vit_msn.DeviceError, match="an int8 bundle runs on the CPU only"):
        Bundle(path, device="cuda")
