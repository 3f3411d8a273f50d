"""vit_msn.preprocess against `vit-msn preprocess` and transformers'
references, with the bounds tests/image_parity.rs holds: zero, bit-exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import IMAGE_FIXTURES, run_bin
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
