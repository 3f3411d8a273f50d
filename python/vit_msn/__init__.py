"""ViT-MSN bundles from Python: verified and run as the Rust runtime does.

    from vit_msn import Bundle
    b = Bundle("artifacts/small")          # manifest checked, every sha256 verified
    px = b.preprocess(["cat.jpg", "dog.png"])
    cls = b.embed(px)                      # (2, hidden_size), last_hidden_state[:, 0]
    out = b.forward(px, bool_masked_pos=None, head_mask=None)

``vit_msn.ray`` runs bundles over Ray Data (``python -m vit_msn.ray``).
"""

from .bundle import DTYPES, Bundle, verify
from .errors import (ArtifactError, DeviceError, DigestError, ForwardError, ImageError, InputError,
                     ManifestError, VitMsnError)
from .image import IMAGE_EXTENSIONS, Preprocessing, is_image_path, load_image, preprocess, preprocess_image
from .manifest import Manifest

__version__ = "0.1.0"

__all__ = [
    "Bundle", "verify", "DTYPES", "Manifest", "Preprocessing", "preprocess", "preprocess_image",
    "load_image", "is_image_path", "IMAGE_EXTENSIONS", "VitMsnError", "ManifestError", "DigestError",
    "ArtifactError", "DeviceError", "InputError", "ImageError", "ForwardError",
]
