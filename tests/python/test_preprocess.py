"""vit_msn.preprocess against `vit-msn preprocess` and transformers'
references, with the bounds tests/image_parity.rs holds: zero, bit-exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FIXTURES, IMAGE_FIXTURES, run_bin
from safetensors.numpy import load_file

import vit_msn
from vit_msn import ImageError, ManifestError, Preprocessing


def max_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.abs(a - b).max())


def test_mixed_images_match_vit_msn_preprocess(backbone_bundle, images, tmp_path):
    _, paths = images
    out = tmp_path / "px.safetensors"
    run_bin("--threads", "1", "preprocess", "--bundle", backbone_bundle, "--image", *paths, "--output", out)
    want = load_file(str(out))["pixel_values"]
    bundle = vit_msn.Bundle(backbone_bundle, warm_up=False)
    got = bundle.preprocess(paths)
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape == (len(paths), 3, 64, 64)
    worst = [(max_diff(got[i], want[i]), p) for i, p in enumerate(paths)]
    assert max(worst)[0] == 0.0, f"pixels differ from vit-msn preprocess: {sorted(worst)[-5:]}"
    # The same pixels whatever the source form: bytes, PIL, uint8 array.
    from PIL import Image

    rgb = Image.open(paths[1]).convert("RGB")
    for src in (open(paths[1], "rb").read(), rgb, np.asarray(rgb)):
        assert max_diff(bundle.preprocess([src])[0], want[1]) == 0.0


def _cases():
    spec = json.loads((IMAGE_FIXTURES / "cases.json").read_text())
    images = {i["name"]: i for i in spec["images"]}
    return [(c, images) for c in spec["cases"]]


@pytest.mark.parametrize("case,images", _cases(), ids=lambda v: v["name"] if "config" in v else "")
def test_fixture_cases_match_transformers(case, images):
    """Every preprocessing case of tests/image_parity.rs (all six filters,
    grey models, no resize, no rescale, scalar means), against the
    transformers 4.46.3 + Pillow references it compares the runtime with."""
    pp = Preprocessing.from_json(case["config"])
    assert pp == Preprocessing.from_json(case["saved"])
    assert Preprocessing.from_json(pp.to_json()) == pp
    reference = load_file(str(IMAGE_FIXTURES / case["file"]))
    checked = 0
    for name in case["images"]:
        got = vit_msn.preprocess(str(IMAGE_FIXTURES / images[name]["file"]), pp, case["num_channels"])[0]
        d = max_diff(got, reference[name])
        assert d == 0.0, f"{case['name']}/{name}: max |diff| {d:e}"
        checked += 1
    assert checked == len(case["images"]) > 0


@pytest.mark.parametrize("config,field", [
    ({"image_processor_type": "CLIPImageProcessor"}, "image_processor_type"),
    ({"size": {"shortest_edge": 224}}, "size"),
    ({"size": 0}, "size"),
    ({"resample": 9}, "resample"),
    ({"resample": 2.0}, "resample"),
    ({"do_resize": "yes"}, "do_resize"),
    ({"image_std": [0.5, 0, 0.5]}, "image_std"),
    ({"image_mean": []}, "image_mean"),
    ({"rescale_factor": None}, "rescale_factor"),
])
def test_bad_configs_are_refused_naming_the_field(config, field):
    with pytest.raises(ManifestError, match=f"`{field}"):
        Preprocessing.from_json(config)


def test_undecodable_images_name_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    ico = tmp_path / "icon.png"
    from PIL import Image

    Image.new("RGB", (16, 16)).save(ico, format="ICO")
    for path, message in [(bad, "not a recognised image"), (empty, "file is empty"),
                          (ico, "ICO images are not supported"), (tmp_path / "missing.png", "cannot read image"),
                          (tmp_path, "is a directory")]:
        with pytest.raises(ImageError, match=message) as e:
            vit_msn.preprocess([str(path)], Preprocessing())
        assert str(path) in str(e.value)


def test_torchvision_form_matches_vit_msn(images, tmp_path):
    """The manifest's torchvision form (Resize(shortest edge) + CenterCrop, what
    `fewshot fit --protocol msn` records): bit-exact against `vit-msn
    preprocess` on a bundle compiled with it, odd sizes and both crop
    roundings included."""
    import shutil

    _, paths = images
    config = {"image_processor_type": "torchvision", "resize": 73, "crop_size": {"height": 64, "width": 64},
              "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    model = tmp_path / "model"
    shutil.copytree(FIXTURES / "e2e_backbone" / "model", model)
    (model / "preprocessor_config.json").write_text(json.dumps(config))
    bundle = tmp_path / "bundle"
    run_bin("--threads", "1", "compile", "--model", model, "--out", bundle)
    recorded = json.loads((bundle / "manifest.json").read_text())["preprocessing"]
    assert recorded["image_processor_type"] == "torchvision" and recorded["resize"] == 73
    picked = paths[:40]
    out = tmp_path / "px.safetensors"
    run_bin("--threads", "1", "preprocess", "--bundle", bundle, "--image", *picked, "--output", out)
    want = load_file(str(out))["pixel_values"]
    got = vit_msn.Bundle(bundle, warm_up=False).preprocess(picked)
    assert tuple(got.shape) == want.shape == (len(picked), 3, 64, 64)
    worst = max((max_diff(got[i], want[i]), p) for i, p in enumerate(picked))
    assert worst[0] == 0.0, f"pixels differ from vit-msn preprocess: {worst}"
    pp = Preprocessing.from_json(recorded)
    assert pp.shortest_edge == 73 and Preprocessing.from_json(pp.to_json()) == pp


@pytest.mark.parametrize("change,field", [
    ({"size": 64}, "size"), ({"resize": None}, "resize"), ({"crop_size": None}, "crop_size"),
    ({"crop_size": 80}, "crop_size"), ({"do_resize": False}, "do_resize"),
])
def test_bad_torchvision_forms_are_refused(change, field):
    config = {"image_processor_type": "torchvision", "resize": 73, "crop_size": 64}
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ManifestError, match=f"`{field}"):
        Preprocessing.from_json(config)
