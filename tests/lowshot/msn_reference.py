"""The references for tests/lowshot_msn.rs: MSN's low-shot protocol
(facebookresearch/msn logistic_eval.py) computed with torchvision 0.28,
transformers 4.46.3 and scikit-learn.

    python msn_reference.py pixels OUT          torchvision pixels of photos
    python msn_reference.py setup OUT           model, images, subset file
    python msn_reference.py features OUT        hidden_states[-1][:, 0]
    python msn_reference.py compare OUT BUNDLE  sklearn against the fitted bundle

Each writes what it found under OUT (safetensors, JSON).
"""

import json
import os
import random
import sys

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision import transforms as T

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "fixtures"))
from make_fixtures import make_model  # noqa: E402

assert torchvision.__version__.startswith("0.28.")
PHOTOS = os.path.join(HERE, "..", "..", "src", "cli", "demo_photos")
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# A tiny model, and the protocol's 256/224 scaled to its 32-pixel input.
CFG = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
           image_size=32, patch_size=8)
RESIZE, CROP = 40, 32
CLASSES = ["n01440764", "n02102040", "n02979186", "n03000684"]
SOURCES = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
LAMBD = 0.00025


def msn_transform(resize, crop):
    """logistic_eval.py's transform (its ImageFolder loader converts to RGB)."""
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(MEAN, STD)])


def load(path):
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def pixels(out):
    """Photos of several aspect ratios and modes, and torchvision's pixels
    for each at 256/224 and at two small sizes with odd crop offsets."""
    os.makedirs(out, exist_ok=True)
    names = []
    for n in sorted(os.listdir(PHOTOS)):
        if n.endswith((".jpg", ".png")):
            names.append(n)
    src = Image.open(os.path.join(PHOTOS, "chelsea.jpg"))
    rgba = src.convert("RGBA")
    alpha = Image.linear_gradient("L").resize(rgba.size)
    rgba.putalpha(alpha)
    rgba.save(os.path.join(out, "chelsea_rgba.png"))
    Image.open(os.path.join(PHOTOS, "coffee.jpg")).convert("L").save(os.path.join(out, "coffee_gray.jpg"))
    src.resize((301, 199), Image.BILINEAR).save(os.path.join(out, "wide_301x199.png"))
    src.resize((97, 333), Image.BILINEAR).save(os.path.join(out, "tall_97x333.jpg"), quality=90)
    src.convert("P").save(os.path.join(out, "chelsea_palette.png"))
    files = [os.path.join(PHOTOS, n) for n in names] + [
        os.path.join(out, n) for n in
        ["chelsea_rgba.png", "coffee_gray.jpg", "wide_301x199.png", "tall_97x333.jpg", "chelsea_palette.png"]]
    tensors, cases = {}, []
    for i, path in enumerate(files):
        for resize, crop in [(256, 224), (37, 30), (50, 47)]:
            key = f"{i}_{resize}_{crop}"
            tensors[key] = msn_transform(resize, crop)(load(path)).contiguous()
            cases.append({"key": key, "file": path, "resize": resize, "crop": crop})
    save_file(tensors, os.path.join(out, "pixels.safetensors"))
    with open(os.path.join(out, "pixels.json"), "w") as f:
        json.dump(cases, f)


def setup(out):
    """A seeded random backbone, and an ImageNet-style set of images of
    several aspect ratios and formats: train/<wnid>/<wnid>_<n>.<ext> (8 per
    class, 5 of them in the subset file) and test/<wnid>/ (50 per class)."""
    torch.manual_seed(0)
    model = make_model(CFG, "backbone", 1901)
    model.save_pretrained(os.path.join(out, "model"))
    rng = random.Random(19)
    photos = [Image.open(os.path.join(PHOTOS, s)).convert("RGB") for s in SOURCES]
    listed = []
    for split, count in [("train", 8), ("test", 50)]:
        for c, wnid in enumerate(CLASSES):
            folder = os.path.join(out, split, wnid)
            os.makedirs(folder, exist_ok=True)
            for k in range(count):
                img = photos[c]
                w, h = img.size
                aspect = rng.uniform(0.5, 2.0)
                cw = int(min(w, h * aspect) * rng.uniform(0.4, 1.0))
                ch = int(min(h, cw / aspect))
                x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
                side = rng.randint(36, 90)
                size = (side, max(8, int(side / aspect))) if aspect >= 1 else (max(8, int(side * aspect)), side)
                crop = img.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.BILINEAR)
                mode = k % 4
                name = f"{wnid}_{k}"
                if mode == 1:
                    crop = crop.convert("L")
                if mode == 2:
                    crop = crop.convert("RGBA")
                    crop.save(os.path.join(folder, name + ".png"))
                    file = name + ".png"
                else:
                    crop.save(os.path.join(folder, name + ".JPEG"), quality=92)
                    file = name + ".JPEG"
                if split == "train" and k < 5:
                    listed.append(file)
    rng.shuffle(listed)
    with open(os.path.join(out, "5imgs_class.txt"), "w") as f:
        f.write("\n".join(listed) + "\n")


def backbone(out):
    from transformers import ViTMSNModel
    model = ViTMSNModel.from_pretrained(os.path.join(out, "model"), attn_implementation="eager")
    return model.eval()


def features(model, files):
    """hidden_states[-1][:, 0]: the last block's CLS before the final norm."""
    tf = msn_transform(RESIZE, CROP)
    px = torch.stack([tf(load(f)) for f in files])
    with torch.no_grad():
        hs = model(pixel_values=px, output_hidden_states=True).hidden_states
    return px, hs[-1][:, 0]


def centre_normalize(x):
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_features(out):
    """Random pixels and real photos through the model: pre-norm CLS."""
    model = backbone(out)
    g = torch.Generator().manual_seed(7)
    px = torch.randn(5, 3, 32, 32, generator=g)
    with torch.no_grad():
        cls = model(pixel_values=px, output_hidden_states=True).hidden_states[-1][:, 0]
    save_file({"pixel_values": px.contiguous(), "expected": cls.contiguous()},
              os.path.join(out, "features.safetensors"))


def listing(out, split, listed=None):
    files, labels = [], []
    for c, wnid in enumerate(CLASSES):
        folder = os.path.join(out, split, wnid)
        for n in sorted(os.listdir(folder)):
            if listed is None or n in listed:
                files.append(os.path.join(folder, n))
                labels.append(c)
    return files, np.array(labels)


def compare(out, bundle):
    """logistic_eval.py's fit with scikit-learn, against the bundle Rust
    wrote: its coefficients, and its artifact run on torchvision's pixels."""
    from sklearn.linear_model import LogisticRegression
    model = backbone(out)
    with open(os.path.join(out, "5imgs_class.txt")) as f:
        listed = set(f.read().split())
    tr_files, ytr = listing(out, "train", listed)
    te_files, yte = listing(out, "test")
    _, ftr = features(model, tr_files)
    te_px, fte = features(model, te_files)
    xtr, xte = centre_normalize(ftr.double().numpy()), centre_normalize(fte.double().numpy())
    lr = LogisticRegression(fit_intercept=False, C=1.0 / LAMBD, tol=1e-10, max_iter=100000).fit(xtr, ytr)
    sk_pred = lr.predict(xte)
    m = torch.jit.load(os.path.join(bundle, f"model_{CROP}x{CROP}.pt"))
    w = m.weight.double().numpy()
    with torch.no_grad():
        n = te_px.shape[0]
        logits = m(te_px, torch.zeros(n, (CROP // 8) ** 2, dtype=torch.bool), torch.ones(2, 4))["logits"]
    pred = logits.argmax(1).numpy()
    coef = lr.coef_
    report = {
        "coef_max_abs": float(np.abs(coef).max()),
        "coef_max_diff": float(np.abs(coef - w).max()),
        "coef_rel_diff": float(np.linalg.norm(coef - w) / np.linalg.norm(coef)),
        "bias_max_abs": float(m.bias.abs().max()),
        "agreement": float((pred == sk_pred).mean()),
        "sklearn_accuracy": float((sk_pred == yte).mean()),
        "bundle_accuracy_on_torchvision_pixels": float((pred == yte).mean()),
        "test_images": int(len(yte)),
        "train_images": int(len(ytr)),
    }
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report))


if __name__ == "__main__":
    what, out = sys.argv[1], sys.argv[2]
    if what == "pixels":
        pixels(out)
    elif what == "setup":
        setup(out)
    elif what == "features":
        write_features(out)
    elif what == "compare":
        compare(out, sys.argv[3])
    else:
        sys.exit(f"unknown step {what}")
