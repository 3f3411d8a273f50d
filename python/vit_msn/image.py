"""Images to ``pixel_values`` exactly as a bundle's ``ViTImageProcessor``
settings say, written against Pillow and numpy (no transformers import, so
a Ray worker imports only torch, Pillow and numpy).

The arithmetic is transformers 4.46.3's, which ``src/image.rs`` reproduces
bit for bit: decode with Pillow and ``convert("RGB")`` (``"L"`` for a
one-channel model); ``Image.resize`` straight to height x width with the
PIL filter code; rescale in float64 and cast to float32; normalize in
float32; channels first. ``tests/python/test_preprocess.py`` checks the
result against ``vit-msn preprocess`` and transformers' own references with
the bounds ``tests/image_parity.rs`` uses (zero: bit-exact).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ImageError, ManifestError

# What the Rust runtime decodes (src/image.rs); Pillow reads more, but a file
# the runtime would refuse is refused here too. Pillow names a JPEG with
# multi-picture data (most camera files) MPO.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"}
MAX_FILE_BYTES = 1 << 30
MAX_SIDE = 16384  # vit_msn_format::bounds::MAX_SIDE

# `image_processor_type` of the torchvision form (src/image.rs's TORCHVISION).
_TORCHVISION = "torchvision"
_IMAGENET_DEFAULT_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_DEFAULT_STD = [0.229, 0.224, 0.225]
# ViTImageProcessor's own defaults (IMAGENET_STANDARD_MEAN / STD).
_STANDARD_MEAN = [0.5, 0.5, 0.5]
_STANDARD_STD = [0.5, 0.5, 0.5]
_FILTERS = "0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming"


def is_image_path(path) -> bool:
    """True when the name ends in one of IMAGE_EXTENSIONS (any case)."""
    return os.path.splitext(str(path))[1][1:].lower() in IMAGE_EXTENSIONS


def _is_number(v) -> bool:
    # JSON true/false arrive as bool, which Python counts as int.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class Preprocessing:
    """The settings of a ``ViTImageProcessor`` (``preprocessor_config.json``,
    or a manifest's ``preprocessing`` object)."""

    do_resize: bool = True
    height: int = 224
    width: int = 224
    resample: int = 2  # PIL filter code, 0..=5
    do_rescale: bool = True
    rescale_factor: float = 1.0 / 255.0
    do_normalize: bool = True
    image_mean: list = field(default_factory=lambda: list(_STANDARD_MEAN))
    image_std: list = field(default_factory=lambda: list(_STANDARD_STD))
    # torchvision's Resize(shortest_edge) + CenterCrop((height, width)) instead
    # of a resize to height x width: MSN's low-shot evaluation (`vit-msn
    # fewshot fit --protocol msn`), the manifest's "torchvision" form.
    shortest_edge: int | None = None

    @classmethod
    def vit_msn_default(cls, size: int = 224) -> "Preprocessing":
        """What the facebook/vit-msn-* checkpoints save, at ``size``."""
        return cls(height=size, width=size, image_mean=list(_IMAGENET_DEFAULT_MEAN),
                   image_std=list(_IMAGENET_DEFAULT_STD))

    @classmethod
    def from_json(cls, obj, source="preprocessor_config.json") -> "Preprocessing":
        """Reads the settings as ``Preprocessing::from_json`` does: missing keys
        take ViTImageProcessor's defaults; ``size`` may be ``{height, width}``,
        an integer or ``[height, width]``; other processor types are refused."""

        def bad(key, message):
            return ManifestError(source, f"`{key}`: {message}" if key else message)

        if not isinstance(obj, dict):
            raise bad("", "expected a JSON object")
        torchvision = False
        for key in ("image_processor_type", "feature_extractor_type"):
            if key in obj:
                name = obj[key]
                if not isinstance(name, str):
                    raise bad(key, "expected a string")
                if key == "image_processor_type" and name == _TORCHVISION:
                    torchvision = True
                elif not name.startswith("ViT") or "Hybrid" in name:
                    raise bad(key, f"`{name}` is not supported (only ViTImageProcessor / ViTFeatureExtractor)")

        def boolean(key):
            v = obj.get(key, True)
            if not isinstance(v, bool):
                raise bad(key, f"expected true or false, got {_json(v)}")
            return v

        def side(v, key):
            if _is_int(v) and 1 <= v <= MAX_SIDE:
                return v
            raise bad(key, f"expected an integer in 1..={MAX_SIDE}, got {_json(v)}")

        def hw(size, key):
            if isinstance(size, dict):
                for k in ("height", "width"):
                    if k not in size:
                        raise bad(key, "must have `height` and `width` (ViTImageProcessor resizes "
                                  f"to a fixed size), got keys {sorted(size)}")
                return side(size["height"], f"{key}.height"), side(size["width"], f"{key}.width")
            if isinstance(size, list) and len(size) == 2:
                return side(size[0], f"{key}[0]"), side(size[1], f"{key}[1]")
            if _is_number(size):
                return side(size, key), side(size, key)
            raise bad(key, f'expected {{"height": h, "width": w}}, an integer or [h, w], got {_json(size)}')

        edge = None
        if torchvision:
            # The form Preprocessing::to_json writes for shortest_edge.
            if "size" in obj:
                raise bad("size", "the torchvision form takes `resize` and `crop_size`, not `size`")
            if "resize" not in obj:
                raise bad("resize", "is missing (the shorter side's size)")
            edge = side(obj["resize"], "resize")
            if "crop_size" not in obj:
                raise bad("crop_size", "is missing")
            height, width = hw(obj["crop_size"], "crop_size")
        elif obj.get("size") is None:
            height = width = 224
        else:
            height, width = hw(obj["size"], "size")

        resample = obj.get("resample", 2)
        if not _is_int(resample) or resample < 0:
            raise bad("resample", f"expected a PIL filter code 0..=5, got {_json(resample)}")
        if resample > 5:
            raise bad("resample", f"unknown PIL filter code {resample} ({_FILTERS})")

        rescale_factor = obj.get("rescale_factor", 1.0 / 255.0)
        if not _is_number(rescale_factor) or not math.isfinite(rescale_factor):
            raise bad("rescale_factor", f"expected a finite number, got {_json(rescale_factor)}")

        def stats(key, default):
            v = obj.get(key)
            if v is None:
                return list(default)
            if isinstance(v, list):
                if not v:
                    raise bad(key, "is an empty list")
                for i, x in enumerate(v):
                    if not _is_number(x) or not math.isfinite(x):
                        raise bad(key, f"element {i} is not a finite number: {_json(x)}")
                return [float(x) for x in v]
            if _is_number(v) and math.isfinite(v):
                return [float(v)]
            raise bad(key, f"expected a number or a list of numbers, got {_json(v)}")

        pp = cls(
            do_resize=boolean("do_resize"),
            height=height,
            width=width,
            resample=resample,
            do_rescale=boolean("do_rescale"),
            rescale_factor=float(rescale_factor),
            do_normalize=boolean("do_normalize"),
            # The torchvision form's mean and std default to ImageNet's (MSN's).
            image_mean=stats("image_mean", _IMAGENET_DEFAULT_MEAN if torchvision else _STANDARD_MEAN),
            image_std=stats("image_std", _IMAGENET_DEFAULT_STD if torchvision else _STANDARD_STD),
            shortest_edge=edge,
        )
        for i, s in enumerate(pp.image_std):
            if s == 0.0:
                raise bad("image_std", f"element {i} is 0")
        if edge is not None:
            if not pp.do_resize:
                raise bad("do_resize", "must be true with `resize`")
            if height > edge or width > edge:
                raise bad("crop_size", f"{height}x{width} does not fit inside the shorter side resized to {edge}")
        return pp

    def to_json(self) -> dict:
        """The settings as ``save_pretrained`` writes them (the torchvision
        form with ``shortest_edge``)."""
        if self.shortest_edge is not None:
            return {
                "image_processor_type": _TORCHVISION,
                "do_resize": self.do_resize,
                "resize": self.shortest_edge,
                "crop_size": {"height": self.height, "width": self.width},
                "resample": self.resample,
                "do_rescale": self.do_rescale,
                "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize,
                "image_mean": list(self.image_mean),
                "image_std": list(self.image_std),
            }
        return {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": self.do_resize,
            "size": {"height": self.height, "width": self.width},
            "resample": self.resample,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }


def _json(v) -> str:
    import json

    return json.dumps(v)


def _name(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "<image>"


def load_image(source, num_channels: int = 3, name: str | None = None) -> Image.Image:
    """An image in Pillow's mode ``RGB`` (``L`` for ``num_channels`` 1), as
    ``Image.open(path).convert(mode)``. ``source`` is a path, the file's bytes,
    a PIL image, or a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).
    Raises ImageError naming ``name`` (else the path) for anything that does
    not decode."""
    name = name or _name(source)
    if num_channels not in (1, 3):
        raise ImageError(name, f"the model takes {num_channels} channels; images can feed 1 (L) or 3 (RGB)")
    mode = "L" if num_channels == 1 else "RGB"
    if isinstance(source, Image.Image):
        return source.convert(mode)
    if isinstance(source, np.ndarray):
        return _from_array(source, name).convert(mode)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            st = path.stat()
        except OSError as e:
            raise ImageError(name, f"cannot read image: {e.strerror or e}") from None
        if path.is_dir():
            raise ImageError(name, "is a directory, not an image")
        if not path.is_file():
            # A FIFO or a device would block the read, or never end it.
            raise ImageError(name, "not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageError(name, f"file is {st.st_size} bytes; images over {MAX_FILE_BYTES} bytes are refused")
        try:
            source = path.read_bytes()
        except OSError as e:
            raise ImageError(name, f"cannot read image: {e.strerror or e}") from None
    if not isinstance(source, (bytes, bytearray, memoryview)):
        raise ImageError(name, f"expected a path, bytes, a PIL image or a uint8 array, got {type(source).__name__}")
    return _decode(bytes(source), name, mode)


def _decode(data: bytes, name: str, mode: str) -> Image.Image:
    if not data:
        raise ImageError(name, "file is empty, not an image")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"refusing to decode: {e}") from None
    except Exception:  # Pillow raises UnidentifiedImageError, OSError, ValueError...
        raise ImageError(name, "not a recognised image (expected JPEG, PNG, WebP, BMP, GIF or TIFF)") from None
    if img.format not in _FORMATS:
        raise ImageError(name, f"{img.format} images are not supported (JPEG, PNG, WebP, BMP, GIF or TIFF)")
    try:
        return img.convert(mode)
    except Exception as e:
        fmt = "JPEG" if img.format == "MPO" else img.format
        raise ImageError(name, f"cannot decode {fmt} (corrupt or truncated file?): {e}") from None


def _from_array(a: np.ndarray, name: str) -> Image.Image:
    if a.dtype != np.uint8:
        raise ImageError(name, f"expected a uint8 array, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(name, f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(name, f"image is empty ({a.shape[1]}×{a.shape[0]} pixels)")
    return Image.fromarray(np.ascontiguousarray(a))


def _stats(values, channels, what, name):
    if len(values) == 1:
        return np.full(channels, values[0], dtype=np.float32)
    if len(values) == channels:
        return np.asarray(values, dtype=np.float64).astype(np.float32)
    raise ImageError(name, f"{what} has {len(values)} values for a {channels}-channel image "
                     f"(model config num_channels = {channels})")


def _resize_and_crop(img: Image.Image, pp: Preprocessing, name: str) -> Image.Image:
    """torchvision's Resize(shortest_edge) then CenterCrop((height, width)) on
    the PIL image, as src/image.rs computes them: the shorter side becomes
    the edge, the longer int(edge * long / short); the crop's offsets are
    rounded half to even, as Python's round."""
    edge, (w, h) = pp.shortest_edge, img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(edge * long / short)
    if new_long * edge > 2 * Image.MAX_IMAGE_PIXELS:
        raise ImageError(name, f"resizing its shorter side to {edge} makes the longer {new_long} pixels, "
                         f"over the limit of {2 * Image.MAX_IMAGE_PIXELS} pixels")
    size = (edge, new_long) if w <= h else (new_long, edge)
    if img.size != size:
        img = img.resize(size, resample=pp.resample)
    if pp.width > size[0] or pp.height > size[1]:
        raise ImageError(name, f"cannot cut {pp.width}×{pp.height} out of {size[0]}×{size[1]}")
    left, top = round((size[0] - pp.width) / 2.0), round((size[1] - pp.height) / 2.0)
    return img.crop((left, top, left + pp.width, top + pp.height))


def preprocess_image(img: Image.Image, pp: Preprocessing, name: str = "<image>") -> np.ndarray:
    """``pixel_values`` (C, H, W), float32, for one image already in mode RGB
    or L (see load_image)."""
    channels = 1 if img.mode == "L" else 3
    if pp.do_resize and pp.shortest_edge is not None:
        img = _resize_and_crop(img, pp, name)
    elif pp.do_resize and img.size != (pp.width, pp.height):
        img = img.resize((pp.width, pp.height), resample=pp.resample)
    x = np.asarray(img, dtype=np.uint8)
    if x.ndim == 2:
        x = x[:, :, None]
    # transformers: rescale in float64, cast to float32; normalize in float32.
    if pp.do_rescale:
        x = (x.astype(np.float64) * pp.rescale_factor).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if pp.do_normalize:
        mean = _stats(pp.image_mean, channels, "image_mean", name)
        std = _stats(pp.image_std, channels, "image_std", name)
        x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(images, preprocessing: Preprocessing | None = None, num_channels: int = 3):
    """A batch of ``pixel_values`` (B, C, H, W) as a float32 torch tensor.

    ``images`` is a list of paths, bytes, PIL images or uint8 arrays (see
    load_image), or one of them. With ``do_resize`` off, every image must
    have the same size."""
    import torch

    pp = preprocessing or Preprocessing.vit_msn_default()
    if isinstance(images, (str, os.PathLike, bytes, Image.Image, np.ndarray)):
        images = [images]
    arrays = []
    for src in images:
        name = _name(src)
        arrays.append(preprocess_image(load_image(src, num_channels, name), pp, name))
    if not arrays:
        raise ImageError("<images>", "no images given")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ImageError("<images>", f"images of different sizes cannot make one batch ({sorted(shapes)}); "
                         "turn do_resize on or batch them by size")
    return torch.from_numpy(np.stack(arrays))
