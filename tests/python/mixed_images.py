"""A folder of seeded random pictures in every format the runtime reads
(PNG, JPEG, WebP, BMP, GIF, TIFF), in several modes and sizes, plus files
that must fail to decode. Used by the tests and by benches/ray_bench.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Good images in the mixed folder; the issue asks for at least 150.
N_IMAGES = 156
# Files in the folder that must become error rows.
BROKEN = ("broken_random.jpg", "truncated.png", "empty.webp")


def _picture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth random picture with some noise and an edge, so every resize
    filter and JPEG's quantisation have something to do."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.empty((height, width, 3))
    for c in range(3):
        a, b, p = rng.uniform(0.02, 0.3, 3)
        img[:, :, c] = 127 + 100 * np.sin(a * x + p * 7) * np.cos(b * y)
    img[:, : width // 2] += rng.uniform(-60, 60)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_images(folder: Path, n: int = N_IMAGES, seed: int = 0, max_side: int = 300, broken: bool = True) -> list:
    """``n`` images of mixed formats, modes and sizes (seeded), and the broken
    files in BROKEN; returns the good files' absolute paths, sorted."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = [
        ("png", "RGB", {}), ("png", "L", {}), ("png", "RGBA", {}), ("png", "P", {}),
        ("jpg", "RGB", {"quality": 90}), ("jpg", "L", {"quality": 75}),
        ("jpeg", "RGB", {"quality": 60, "subsampling": 0}), ("jpg", "RGB", {"quality": 85, "progressive": True}),
        ("webp", "RGB", {"quality": 80}), ("webp", "RGBA", {"lossless": True}),
        ("bmp", "RGB", {}), ("bmp", "L", {}), ("gif", "P", {}), ("gif", "L", {}),
        ("tiff", "RGB", {}), ("tif", "RGB", {"compression": "tiff_lzw"}), ("tiff", "L", {}),
    ]
    paths = []
    for i in range(n):
        ext, mode, options = kinds[i % len(kinds)]
        # Smaller and larger than the 64x64 the bundles run, some far from square.
        width, height = int(rng.integers(8, max_side)), int(rng.integers(8, max_side))
        if i % 13 == 0:
            width, height = 64, 64
        img = Image.fromarray(_picture(rng, width, height))
        if mode == "RGBA":
            alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
            img = img.convert("RGBA")
            img.putalpha(alpha)
        elif mode == "P":
            img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=int(rng.integers(8, 256)))
        elif mode != "RGB":
            img = img.convert(mode)
        path = folder / f"img_{i:03d}_{mode.lower()}.{ext}"
        img.save(path, **options)
        paths.append(str(path.resolve()))
    if not broken:
        return sorted(paths)
    (folder / BROKEN[0]).write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    good_png = Path(paths[0]).read_bytes()
    (folder / BROKEN[1]).write_bytes(good_png[: len(good_png) // 2])
    (folder / BROKEN[2]).write_bytes(b"")
    # Not an image by its name: the folder walk leaves it out.
    (folder / "notes.txt").write_text("not an image\n")
    return sorted(paths)


