"""``manifest.json``, read and checked as ``src/manifest.rs`` does: the same
required fields, bounds and cross-checks, refused with the field named."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, ManifestError
from .image import MAX_SIDE, Preprocessing

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
# vit_msn_format::bounds
MAX_HIDDEN_SIZE, MAX_LAYERS, MAX_HEADS, MAX_CHANNELS = 65536, 4096, 4096, 1024
CPU_FEATURES = ("onednn_bf16", "onednn_f16")


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list  # -1 is the batch dimension


@dataclass
class ArtifactEntry:
    height: int
    width: int
    file: str
    sha256: str
    inputs: list
    outputs: list
    attention: str | None = None


@dataclass
class ModelInfo:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    patch_size: int
    image_size: int
    labels: list = field(default_factory=list)
    problem_type: str | None = None


@dataclass
class Manifest:
    format_version: int
    compiler: str
    task: str
    model: ModelInfo
    dtype: str
    device: str
    cpu_features: list
    preprocessing_json: dict | None
    artifacts: list
    config: object
    path: str
    raw: dict

    @classmethod
    def read(cls, bundle_dir) -> "Manifest":
        path = Path(bundle_dir) / MANIFEST_FILE
        try:
            st = path.stat()
        except OSError as e:
            raise ManifestError(path, e.strerror or str(e)) from None
        if not path.is_file():
            raise ManifestError(path, "is a directory, not a file" if path.is_dir() else "not a regular file")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(path, f"{st.st_size} bytes is too large for a manifest")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ManifestError(path, "not UTF-8 text") from None
        except OSError as e:
            raise ManifestError(path, e.strerror or str(e)) from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path="manifest.json") -> "Manifest":
        def bad(message):
            return ManifestError(path, message)

        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise bad(f"not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise bad("invalid manifest: expected a JSON object")
        # The version first, so a newer format gets the right message.
        version = value.get("format_version")
        if not _is_int(version) or version < 0:
            raise bad("no `format_version`")
        if version > FORMAT_VERSION:
            raise bad(f"format version {version} is newer than this program reads ({FORMAT_VERSION}); upgrade vit-msn")
        try:
            m = cls._from_value(value, str(path))
        except _Invalid as e:
            raise bad(f"invalid manifest: {e}") from None
        problem = m._validate()
        if problem:
            raise bad(problem)
        return m

    @classmethod
    def _from_value(cls, v, path):
        model = _obj(v, "model")
        info = ModelInfo(
            **{k: _int(model, k, "model.") for k in (
                "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_channels", "patch_size", "image_size")},
            labels=_list(model, "labels", "model.", str, default=[]),
            problem_type=_opt_str(model, "problem_type", "model."),
        )
        features = _list(v, "cpu_features", "", str, default=[])
        for f in features:
            if f not in CPU_FEATURES:
                raise _Invalid(f"unknown variant `{f}` in `cpu_features`, expected one of {', '.join(CPU_FEATURES)}")
        artifacts = []
        for i, a in enumerate(_list(v, "artifacts", "", dict)):
            where = f"artifacts[{i}]."
            attention = _opt_str(a, "attention", where)
            if attention not in (None, "eager", "sdpa"):
                raise _Invalid(f"`{where}attention`: unknown variant `{attention}`, expected eager or sdpa")
            artifacts.append(ArtifactEntry(
                height=_int(a, "height", where),
                width=_int(a, "width", where),
                file=_str(a, "file", where),
                sha256=_str(a, "sha256", where),
                inputs=_specs(a, "inputs", where),
                outputs=_specs(a, "outputs", where),
                attention=attention,
            ))
        source = _obj(v, "source")
        for j, w in enumerate(_list(source, "weights", "source.", dict)):
            _str(w, "file", f"source.weights[{j}].")
            _str(w, "sha256", f"source.weights[{j}].")
        if "config" not in v:
            raise _Invalid("missing field `config`")
        pp = v.get("preprocessing")
        return cls(
            format_version=v["format_version"],
            compiler=_str(v, "compiler", ""),
            task=_str(v, "task", ""),
            model=info,
            dtype=_str(v, "dtype", ""),
            device=_str(v, "device", ""),
            cpu_features=features,
            preprocessing_json=pp,
            artifacts=artifacts,
            config=v["config"],
            path=path,
            raw=v,
        )

    def _validate(self) -> str | None:
        if self.task not in ("backbone", "classification"):
            return f"unknown task `{self.task}`"
        if self.dtype not in ("f32", "f16", "bf16", "int8"):
            return f"unknown dtype `{self.dtype}`"
        m = self.model
        # Loading allocates from these numbers (warm-up inputs, head masks).
        for name, lo, hi in [
            ("hidden_size", 1, MAX_HIDDEN_SIZE),
            ("num_hidden_layers", 0, MAX_LAYERS),
            ("num_attention_heads", 1, MAX_HEADS),
            ("num_channels", 1, MAX_CHANNELS),
            ("patch_size", 1, MAX_SIDE),
            ("image_size", 1, MAX_SIDE),
        ]:
            v = getattr(m, name)
            if not lo <= v <= hi:
                return f"`model.{name}` must be in {lo}..={hi}, found {v}"
        if not self.artifacts:
            return "no artifacts"
        for a in self.artifacts:
            # Artifact files live in the bundle folder itself.
            if not a.file or "/" in a.file or "\\" in a.file or a.file.startswith("."):
                return f"artifact file name `{a.file}` is not a plain file name"
            for name in ("height", "width"):
                v = getattr(a, name)
                if not m.patch_size <= v <= MAX_SIDE:
                    return f"artifact `{a.file}`: `{name}` must be in {m.patch_size}..={MAX_SIDE}, found {v}"
            problem = self._validate_specs(a)
            if problem:
                return f"artifact `{a.file}`: {problem}"
        return None

    def _validate_specs(self, a: ArtifactEntry) -> str | None:
        """The specs against `model`: inputs are built from the model facts and
        classes named by `labels`, so an edit to one side only is refused."""
        m = self.model
        shapes = {s.name: s.shape for s in a.inputs}
        patches = (a.height // m.patch_size) * (a.width // m.patch_size)
        for name, want in [
            ("pixel_values", [-1, m.num_channels, a.height, a.width]),
            ("bool_masked_pos", [-1, patches]),
            ("head_mask", [m.num_hidden_layers, m.num_attention_heads]),
        ]:
            if name not in shapes:
                return f"the manifest lists no `{name}` input"
            if shapes[name] != want:
                return f"input `{name}` has shape {_fmt(shapes[name])}, but `model` implies {_fmt(want)}"
        if self.is_classifier:
            out = {s.name: s.shape for s in a.outputs}
            if "logits" not in out:
                return "a classifier's artifact must list a `logits` output"
            classes = len(m.labels)
            if classes == 0:
                return "`model.labels` is empty; a classifier names its classes"
            if out["logits"] != [-1, classes]:
                return f"output `logits` has shape {_fmt(out['logits'])}, but `model.labels` names {classes} classes"
        return None

    @property
    def is_classifier(self) -> bool:
        return self.task == "classification"

    @property
    def multi_label(self) -> bool:
        return self.model.problem_type == "multi_label_classification"

    def preprocessing(self) -> Preprocessing:
        """What the bundle was compiled with, else ViT-MSN's default at the
        trained size."""
        if self.preprocessing_json is not None:
            return Preprocessing.from_json(self.preprocessing_json, f"{self.path}: `preprocessing`")
        size = self.model.image_size
        if not 1 <= size <= MAX_SIDE:
            raise ManifestError(self.path, f"`model.image_size` must be in 1..={MAX_SIDE}, found {size}")
        return Preprocessing.vit_msn_default(size)

    def image_size(self) -> tuple:
        """The (height, width) images are preprocessed to: the preprocessing's
        size where that was compiled, else the only compiled resolution (a
        bundle compiled for 448 alone runs at 448), else an error
        (``Bundle::image_size``)."""
        pp = self.preprocessing()
        if self.has_resolution(pp.height, pp.width):
            return pp.height, pp.width
        if len(self.artifacts) == 1:
            return self.artifacts[0].height, self.artifacts[0].width
        raise InputError("image", f"the preprocessing resizes images to {pp.height}x{pp.width}, which this bundle "
                         f"was not compiled for (it has {', '.join(self.resolutions())})")

    def has_resolution(self, height: int, width: int) -> bool:
        return any((a.height, a.width) == (height, width) for a in self.artifacts)

    def resolutions(self) -> list:
        return [f"{a.height}x{a.width}" for a in self.artifacts]

    def not_compiled(self, height: int, width: int) -> str:
        return f"resolution {height}x{width} was not compiled; this bundle has {', '.join(self.resolutions())}"


class _Invalid(Exception):
    """A field of the wrong type or missing (serde's refusal, in Rust)."""


def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get(obj, key, where):
    if key not in obj:
        raise _Invalid(f"missing field `{where}{key}`")
    return obj[key]


def _obj(obj, key, where=""):
    v = _get(obj, key, where)
    if not isinstance(v, dict):
        raise _Invalid(f"`{where}{key}`: expected an object")
    return v


def _int(obj, key, where):
    v = _get(obj, key, where)
    if not _is_int(v):
        raise _Invalid(f"`{where}{key}`: expected an integer, got {json.dumps(v)}")
    return v


def _str(obj, key, where):
    v = _get(obj, key, where)
    if not isinstance(v, str):
        raise _Invalid(f"`{where}{key}`: expected a string, got {json.dumps(v)}")
    return v


def _opt_str(obj, key, where):
    v = obj.get(key)
    if v is not None and not isinstance(v, str):
        raise _Invalid(f"`{where}{key}`: expected a string or null, got {json.dumps(v)}")
    return v


def _list(obj, key, where, kind, default=None):
    if key not in obj and default is not None:
        return default
    v = _get(obj, key, where)
    if not isinstance(v, list) or not all(isinstance(x, kind) for x in v):
        raise _Invalid(f"`{where}{key}`: expected a list of {kind.__name__ if kind is not dict else 'objects'}")
    return v


def _specs(obj, key, where):
    out = []
    for i, s in enumerate(_list(obj, key, where, dict)):
        w = f"{where}{key}[{i}]."
        shape = _get(s, "shape", w)
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise _Invalid(f"`{w}shape`: expected a list of integers")
        out.append(TensorSpec(name=_str(s, "name", w), dtype=_str(s, "dtype", w), shape=shape))
    return out


__all__ = ["Manifest", "ArtifactEntry", "TensorSpec", "ModelInfo", "MANIFEST_FILE"]
