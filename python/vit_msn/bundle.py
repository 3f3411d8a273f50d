"""A compiled bundle loaded with ``torch.jit.load``: verified, and run, as
the Rust runtime does (``src/bundle.rs``)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path

import torch

from .errors import ArtifactError, DeviceError, DigestError, ForwardError, InputError
from .image import preprocess as _preprocess
from .manifest import ArtifactEntry, Manifest

# int8 bundles take and return f32 tensors (their linears are int8 inside).
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}
ARTIFACT_EXTRA_FILE = "vit_msn.json"


def _sha256(f) -> str:
    f.seek(0)
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def _description(f) -> dict | None:
    """The artifact's own ``extra/vit_msn.json``, read from the zip archive a
    TorchScript file is; None when it has none or is no such zip (as
    ``describe::embedded_description``)."""
    try:
        f.seek(0)
        with zipfile.ZipFile(f) as z:
            for name in z.namelist():
                if name.endswith(f"/extra/{ARTIFACT_EXTRA_FILE}"):
                    own = json.loads(z.read(name))
                    return own if isinstance(own, dict) else None
    except (zipfile.BadZipFile, ValueError, OSError, KeyError):
        return None
    return None


def _check_against_description(entry: ArtifactEntry, own: dict) -> str | None:
    """The manifest's shapes against the file's own: the digest proves the file
    is the one compiled, not that a hand-edited manifest still describes it.
    Only tensors both name are compared."""
    for what, listed, key in (("input", entry.inputs, "inputs"), ("output", entry.outputs, "outputs")):
        theirs = {t.get("name"): t.get("shape") for t in own.get(key) or [] if isinstance(t, dict)}
        for spec in listed:
            if spec.name in theirs and theirs[spec.name] != spec.shape:
                return (f"the manifest gives {what} `{spec.name}` shape {spec.shape}, but the artifact was "
                        f"compiled for {theirs[spec.name]} (its {ARTIFACT_EXTRA_FILE})")
    return None


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() == "flags":
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _missing_cpu_features(features) -> list:
    """The manifest's ``cpu_features`` this CPU cannot run (the rule of
    ``src/cpu.rs``, without its ONEDNN_MAX_CPU_ISA cap)."""
    flags = _cpu_flags()
    if {"avx_ne_convert", "avx_vnni_int8"} <= flags:  # AVX2-VNNI-2 runs both
        return []
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    has = {"onednn_bf16": avx512, "onednn_f16": avx512 and {"avx512_fp16", "avx512_bf16"} <= flags}
    return [f for f in features if not has.get(f, False)]


def verify(path) -> Manifest:
    """Reads and checks ``path``'s manifest and verifies every artifact's
    sha256 and description, loading nothing: what a driver checks before it
    starts a job. Raises ManifestError, DigestError or ArtifactError."""
    bundle_dir = Path(path)
    manifest = Manifest.read(bundle_dir)
    for entry in manifest.artifacts:
        with _open_verified(bundle_dir, entry):
            pass
    return manifest


def _open_verified(bundle_dir: Path, entry: ArtifactEntry):
    """The artifact's file, open, after its digest and description checked out."""
    path = bundle_dir / entry.file
    try:
        if not path.is_file():
            raise ArtifactError(path, "is a directory, not a file" if path.is_dir() else "no such file")
        f = open(path, "rb")
    except OSError as e:
        raise ArtifactError(path, e.strerror or str(e)) from None
    try:
        found = _sha256(f)
        if found != entry.sha256:
            raise DigestError(path, entry.sha256, found)
        own = _description(f)
        problem = own and _check_against_description(entry, own)
        if problem:
            raise ArtifactError(path, problem)
    except BaseException:
        f.close()
        raise
    f.seek(0)
    return f


class Bundle:
    """A bundle folder, verified and loaded.

    ``Bundle(dir)`` reads ``manifest.json``, checks it as the runtime does,
    verifies every artifact's sha256 (also those not loaded) and loads each
    wanted artifact with ``torch.jit.load`` from the file that was hashed.

    - ``device``: where to run; default the bundle's own (``cpu``, or the
      current CUDA device for a CUDA bundle).
    - ``resolutions``: load only these (height, width); default all.
    - ``warm_up``: run each artifact twice at load, so the first real batch
      is not TorchScript's slow profiling call.
    """

    def __init__(self, path, device=None, resolutions=None, warm_up: bool = True):
        self.dir = Path(path)
        self.manifest = Manifest.read(self.dir)
        m = self.manifest
        self.dtype = DTYPES[m.dtype]
        self.device = self._device(device)
        if resolutions is not None:
            for h, w in resolutions:
                if not m.has_resolution(h, w):
                    raise InputError("resolutions", m.not_compiled(h, w))
        if self.device.type == "cpu" and m.cpu_features:
            missing = _missing_cpu_features(m.cpu_features)
            if missing:
                raise DeviceError(
                    f"{self.dir}: the artifacts use {', '.join(missing)}, which this CPU lacks; the Rust runtime "
                    "rewrites such linears at load, this loader does not: compile with --dtype f32 or --linear aten")
        wanted = None if resolutions is None else {(int(h), int(w)) for h, w in resolutions}
        # Every digest is checked before anything loads, and each artifact is
        # loaded through the file that was hashed, so what runs is what was
        # checked even if another file is renamed over the path meanwhile.
        files = []
        try:
            for entry in m.artifacts:
                files.append((entry, _open_verified(self.dir, entry)))
            self._modules = {}
            for entry, f in files:
                if wanted is None or (entry.height, entry.width) in wanted:
                    self._modules[(entry.height, entry.width)] = (entry, self._load(entry, f))
        finally:
            for _, f in files:
                f.close()
        if warm_up:
            c = m.model.num_channels
            for (h, w), (entry, _) in self._modules.items():
                for _ in range(2):
                    try:
                        self.forward(torch.zeros(1, c, h, w))
                    except (ForwardError, InputError) as e:
                        raise ArtifactError(self.dir / entry.file, f"warm-up run failed: {e}") from None

    def _load(self, entry: ArtifactEntry, f):
        via = f"/proc/self/fd/{f.fileno()}"
        try:
            with warnings.catch_warnings():
                # torch 2.13 deprecates TorchScript for torch.export; bundles
                # are TorchScript by design (docs/bundle-format.md).
                warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=DeprecationWarning)
                module = torch.jit.load(via if os.path.exists(via) else str(self.dir / entry.file),
                                        map_location=self.device)
        except Exception as e:  # torch raises RuntimeError with a C++ trace
            raise ArtifactError(self.dir / entry.file, str(e).splitlines()[0]) from None
        return module.eval()

    def _device(self, device) -> torch.device:
        m = self.manifest
        wants_cuda = m.device.startswith("cuda")
        if wants_cuda and not torch.cuda.is_available():
            raise DeviceError(f"{self.dir}: the bundle was compiled for {m.device}, and this machine has no CUDA device")
        if device is None:
            # Under Ray, CUDA_VISIBLE_DEVICES names the actor's GPU as cuda:0.
            return torch.device("cuda") if wants_cuda else torch.device("cpu")
        device = torch.device(device)
        if m.dtype == "int8" and device.type != "cpu":
            raise DeviceError(f"{self.dir}: an int8 bundle runs on the CPU only (fbgemm's int8 kernels); "
                              f"it cannot load on {device}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"{device} was asked for, and this machine has no CUDA device")
        return device

    # -- what callers need from the manifest ---------------------------------

    @property
    def labels(self) -> list:
        return list(self.manifest.model.labels)

    @property
    def is_classifier(self) -> bool:
        return self.manifest.is_classifier

    def image_size(self) -> tuple:
        """The (height, width) images are preprocessed to (see
        ``Manifest.image_size``)."""
        return self.manifest.image_size()

    @classmethod
    def for_images(cls, path, **kwargs) -> "Bundle":
        """The bundle with only the artifact images are preprocessed for
        loaded (every digest still verified), as ``vit-msn run --image``."""
        return cls(path, resolutions=[Manifest.read(Path(path)).image_size()], **kwargs)

    def preprocessing(self):
        """The bundle's preprocessing, resized to ``image_size()``."""
        pp = self.manifest.preprocessing()
        pp.height, pp.width = self.image_size()
        return pp

    def preprocess(self, images):
        """``pixel_values`` (B, C, H, W) float32 for images (paths, bytes, PIL
        images, uint8 arrays), exactly as ``vit-msn preprocess --bundle``."""
        return _preprocess(images, self.preprocessing(), self.manifest.model.num_channels)

    # -- the forward pass ----------------------------------------------------

    def forward(self, pixel_values, bool_masked_pos=None, head_mask=None) -> dict:
        """Runs the artifact compiled for the input's H×W; returns its outputs
        by name (``last_hidden_state`` or ``logits``, then any
        ``hidden_states`` / ``attentions``) as float32 on the CPU.

        - ``pixel_values``: (B, C, H, W), any float dtype; cast to the bundle's.
        - ``bool_masked_pos``: (B, N) bool or integer, nonzero = masked; default none.
        - ``head_mask``: (heads,) or (layers, heads), finite and >= 0; default ones.
        """
        entry, module = self._artifact_for(pixel_values)
        batch = pixel_values.shape[0]
        patch = self.manifest.model.patch_size
        mask = self._mask(bool_masked_pos, batch, (entry.height // patch) * (entry.width // patch))
        heads = self._head_mask(head_mask)
        try:
            px = pixel_values.to(self.device, self.dtype)
            with torch.inference_mode():
                result = module(px, mask, heads)
        except RuntimeError as e:
            raise ForwardError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        return self._outputs(entry, batch, result)

    __call__ = forward

    def _artifact_for(self, px):
        name = "pixel_values"
        if not isinstance(px, torch.Tensor):
            raise InputError(name, f"expected a torch.Tensor, found {type(px).__name__}")
        if px.dim() != 4:
            raise InputError(name, f"expected rank 4 (B, C, H, W), found shape {list(px.shape)}")
        if not px.is_floating_point():
            raise InputError(name, f"expected a float tensor, found {px.dtype}")
        if px.shape[0] == 0:
            raise InputError(name, "the batch is empty")
        c = self.manifest.model.num_channels
        if px.shape[1] != c:
            raise InputError(name, f"expected {c} channel(s), found {px.shape[1]}")
        h, w = px.shape[2], px.shape[3]
        if (h, w) not in self._modules:
            if self.manifest.has_resolution(h, w):
                loaded = ", ".join(f"{a}x{b}" for a, b in self._modules)
                raise InputError(name, f"resolution {h}x{w} was compiled but not loaded (loaded: {loaded})")
            raise InputError(name, self.manifest.not_compiled(h, w))
        if not bool(torch.isfinite(px).all()):
            raise InputError(name, "contains NaN or infinite values")
        return self._modules[(h, w)]

    def _mask(self, mask, batch, patches):
        name = "bool_masked_pos"
        if mask is None:
            return torch.zeros(batch, patches, dtype=torch.bool, device=self.device)
        if not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(mask)
        if list(mask.shape) != [batch, patches]:
            raise InputError(name, f"expected shape [{batch}, {patches}] (batch, patches), found {list(mask.shape)}")
        if mask.dtype == torch.bool:
            pass
        elif mask.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            mask = mask != 0
        else:
            raise InputError(name, f"expected bool or integer, found {mask.dtype}")
        return mask.to(self.device)

    def _head_mask(self, hm):
        name = "head_mask"
        layers, heads = self.manifest.model.num_hidden_layers, self.manifest.model.num_attention_heads
        if hm is None:
            return torch.ones(layers, heads, dtype=self.dtype, device=self.device)
        if not isinstance(hm, torch.Tensor):
            hm = torch.as_tensor(hm)
        if not hm.is_floating_point():
            raise InputError(name, f"expected a float tensor, found {hm.dtype}")
        if list(hm.shape) == [heads]:
            hm = hm.unsqueeze(0).expand(layers, heads)
        elif list(hm.shape) != [layers, heads]:
            raise InputError(name, f"expected shape [{heads}] or [{layers}, {heads}], found {list(hm.shape)}")
        if not bool((torch.isfinite(hm) & (hm >= 0)).all()):
            raise InputError(name, "entries must be finite and non-negative")
        return hm.to(self.device, self.dtype).contiguous()

    def _outputs(self, entry: ArtifactEntry, batch: int, result) -> dict:
        # A dict by its keys; a tuple, list or single tensor by the manifest's order.
        if isinstance(result, dict):
            named = dict(result)
        else:
            items = [result] if isinstance(result, torch.Tensor) else list(result)
            named = {spec.name: t for spec, t in zip(entry.outputs, items)}
        out = {}
        for spec in entry.outputs:
            if spec.name not in named:
                raise ForwardError(f"{entry.file}: did not return `{spec.name}`, which the manifest lists")
            t = named[spec.name].to("cpu", torch.float32)
            want = [batch if d < 0 else d for d in spec.shape]
            if list(t.shape) != want:
                raise ForwardError(f"{entry.file}: returned `{spec.name}` of shape {list(t.shape)}; "
                                   f"the manifest says {want}")
            out[spec.name] = t
        return out

    # -- results as `vit-msn run` gives them -------------------------------------

    def embed(self, pixel_values, **kwargs):
        """The CLS embedding after the final layernorm, (B, hidden_size):
        ``last_hidden_state[:, 0]``, what ``vit-msn run --embeddings`` saves."""
        if self.is_classifier:
            raise InputError("bundle", f"{self.dir} is a classifier; embeddings need a backbone bundle")
        return self.forward(pixel_values, **kwargs)["last_hidden_state"][:, 0].contiguous()

    def classify(self, pixel_values, top_k: int = 5, **kwargs):
        """The top ``top_k`` classes per image as (labels, scores): softmax over
        the classes, or a sigmoid per logit for multi-label and single-logit
        heads, as ``vit-msn run`` reports them."""
        if not self.is_classifier:
            raise InputError("bundle", f"{self.dir} is a backbone; classification needs a classifier bundle")
        logits = self.forward(pixel_values, **kwargs)["logits"]
        if self.manifest.multi_label or logits.shape[-1] == 1:
            probs = torch.sigmoid(logits)
        else:
            probs = torch.softmax(logits, dim=-1)
        k = min(top_k, logits.shape[-1])
        scores, index = torch.topk(probs, k, dim=-1, largest=True, sorted=True)
        labels = self.labels
        names = [[labels[i] if i < len(labels) else f"LABEL_{i}" for i in row] for row in index.tolist()]
        return names, scores


__all__ = ["Bundle", "verify", "DTYPES"]
