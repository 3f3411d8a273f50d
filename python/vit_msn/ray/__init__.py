"""Bundles on Ray Data: callable classes for ``Dataset.map_batches`` that
embed or classify images, one bundle load per actor.

    import ray, vit_msn.ray as vr
    ds = ray.data.read_binary_files("photos/", include_paths=True)
    out = vr.embed(ds, "artifacts/small", actors=2, batch_size=32)
    out.write_parquet("embeddings/")

Each class takes batches with a ``bytes`` column (``read_binary_files``) or
an ``image`` column of uint8 arrays (``read_images``), and a ``path``
column when there is one. It returns one row per input row: ``path``, then
``embedding`` (list<float32>) or ``labels`` (list<string>) and ``scores``
(list<float32>), and ``error``: null, or why the image could not be read,
in which case the result columns are null. An undecodable file never fails
the job; a bundle that does not verify fails it before any row.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa

from ..bundle import Bundle
from ..errors import ImageError, InputError
from ..image import load_image, preprocess_image

EMBED_SCHEMA = pa.schema([("path", pa.string()), ("embedding", pa.list_(pa.float32())), ("error", pa.string())])
CLASSIFY_SCHEMA = pa.schema([("path", pa.string()), ("labels", pa.list_(pa.string())),
                             ("scores", pa.list_(pa.float32())), ("error", pa.string())])


class _BundleActor:
    """What both classes share: the bundle, loaded once per actor, and a batch
    of encoded or decoded images turned into pixel_values and error rows."""

    task = None  # "backbone" or "classification"

    def __init__(self, bundle, *, device=None, threads=None):
        import torch

        if threads:
            # Ray gives each actor a share of the CPUs; libtorch would
            # otherwise start a thread per core in every actor.
            torch.set_num_threads(int(threads))
        self.bundle = Bundle.for_images(bundle, device=device)
        if self.bundle.manifest.task != self.task:
            raise InputError("bundle", f"{bundle} is a {self.bundle.manifest.task} bundle; "
                             f"{type(self).__name__} needs a {self.task} bundle")
        self.preprocessing = self.bundle.preprocessing()
        self.channels = self.bundle.manifest.model.num_channels
        self.size = self.bundle.image_size()

    def _pixels(self, batch):
        """(paths, pixel_values of the good rows or None, row indices of the
        good rows, error per row)."""
        import torch

        if "bytes" in batch:
            sources = batch["bytes"]
        elif "image" in batch:
            sources = batch["image"]
        else:
            raise InputError("batch", f"expected a `bytes` or an `image` column, found {sorted(batch)}")
        n = len(sources)
        paths = [str(p) for p in batch["path"]] if "path" in batch else [None] * n
        errors = [None] * n
        good, arrays = [], []
        for i, src in enumerate(sources):
            name = paths[i] or f"<row {i}>"
            try:
                x = preprocess_image(load_image(src, self.channels, name), self.preprocessing, name)
                if tuple(x.shape[1:]) != tuple(self.size):
                    raise ImageError(name, f"is {x.shape[1]}x{x.shape[2]} (HxW) and the preprocessing does not "
                                     f"resize; the bundle runs {self.size[0]}x{self.size[1]}")
            except ImageError as e:
                errors[i] = str(e)
                continue
            good.append(i)
            arrays.append(x)
        px = torch.from_numpy(np.stack(arrays)) if arrays else None
        return paths, px, good, errors


def _list_column(rows, n, good, value_type):
    """A list<value_type> column of n rows: rows[j] (2-D array) for the good
    indices, null elsewhere."""
    lengths = np.zeros(n, dtype=np.int32)
    valid = np.zeros(n, dtype=bool)
    valid[good] = True
    if rows is not None and len(good):
        lengths[good] = rows.shape[1]
        values = pa.array(np.ascontiguousarray(rows).reshape(-1), type=value_type)
    else:
        values = pa.array([], type=value_type)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array(~valid))


class Embedder(_BundleActor):
    """``map_batches`` class: the CLS embedding after the final layernorm
    (``last_hidden_state[:, 0]``) of each image, as ``vit-msn run
    --embeddings`` saves it. Constructor: ``bundle`` (a backbone bundle
    folder), ``device``, ``threads`` (libtorch intra-op threads)."""

    task = "backbone"

    def __call__(self, batch) -> pa.Table:
        paths, px, good, errors = self._pixels(batch)
        emb = self.bundle.embed(px).numpy() if px is not None else None
        return pa.table({
            "path": pa.array(paths, pa.string()),
            "embedding": _list_column(emb, len(paths), good, pa.float32()),
            "error": pa.array(errors, pa.string()),
        }, schema=EMBED_SCHEMA)


class Classifier(_BundleActor):
    """``map_batches`` class: the top ``top_k`` labels and their scores
    (softmax, or sigmoid for multi-label heads) per image, as ``vit-msn run``
    reports them. Constructor: ``bundle`` (a classifier bundle folder),
    ``top_k`` (default 5), ``device``, ``threads``."""

    task = "classification"

    def __init__(self, bundle, *, top_k: int = 5, device=None, threads=None):
        super().__init__(bundle, device=device, threads=threads)
        if top_k < 1:
            raise InputError("top_k", f"must be at least 1, got {top_k}")
        self.top_k = top_k

    def __call__(self, batch) -> pa.Table:
        paths, px, good, errors = self._pixels(batch)
        n = len(paths)
        labels = [None] * n
        scores = None
        if px is not None:
            names, scores = self.bundle.classify(px, top_k=self.top_k)
            scores = scores.numpy()
            for j, i in enumerate(good):
                labels[i] = names[j]
        return pa.table({
            "path": pa.array(paths, pa.string()),
            "labels": pa.array(labels, pa.list_(pa.string())),
            "scores": _list_column(scores, n, good, pa.float32()),
            "error": pa.array(errors, pa.string()),
        }, schema=CLASSIFY_SCHEMA)


def default_cpus_per_actor(actors: int) -> float:
    """A share of the cluster's CPUs that leaves one for Ray Data's read
    tasks: on a 2-core machine 2 actors take 0.5 each, and reading goes on
    beside them. At most 1 (pass ``num_cpus`` for more threads per actor)."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.1, min(1.0, (cpus - 1.0) / max(1, actors)))


def map_with(ds, cls, bundle, *, actors: int = 2, batch_size: int = 32, num_cpus: float | None = None,
             num_gpus: float | None = None, device=None, **constructor_kwargs):
    """``ds`` mapped through a pool of ``actors`` instances of ``cls``
    (Embedder, Classifier or a subclass), each loading ``bundle`` once.
    ``num_cpus`` per actor defaults to ``default_cpus_per_actor``; libtorch
    runs one thread per CPU it reserves, a fraction counting as one."""
    import ray

    if actors < 1:
        raise InputError("actors", f"must be at least 1, got {actors}")
    if num_cpus is None:
        num_cpus = default_cpus_per_actor(actors)
    threads = max(1, math.ceil(num_cpus))
    # Workers need not share the driver's working directory; the same
    # absolute path on every node (a shared file system) is the contract.
    bundle = os.path.abspath(bundle) if os.path.exists(bundle) else os.fspath(bundle)
    return ds.map_batches(
        cls,
        fn_constructor_kwargs={"bundle": bundle, "device": device, "threads": threads,
                               **constructor_kwargs},
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )


def embed(ds, bundle, *, actors: int = 2, batch_size: int = 32, num_cpus: float | None = None,
          num_gpus: float | None = None, device=None):
    """``ds`` (a ``bytes`` or ``image`` column, and ``path``) mapped through
    ``actors`` Embedder actors; see ``default_cpus_per_actor`` for the CPUs
    each takes unless ``num_cpus`` says. ``num_gpus=1`` with a CUDA bundle
    gives each actor a GPU."""
    return map_with(ds, Embedder, bundle, actors=actors, batch_size=batch_size, num_cpus=num_cpus,
                    num_gpus=num_gpus, device=device)


def classify(ds, bundle, *, top_k: int = 5, actors: int = 2, batch_size: int = 32,
             num_cpus: float | None = None, num_gpus: float | None = None, device=None):
    """As ``embed``, through Classifier actors."""
    return map_with(ds, Classifier, bundle, actors=actors, batch_size=batch_size, num_cpus=num_cpus,
                    num_gpus=num_gpus, device=device, top_k=top_k)


__all__ = ["Embedder", "Classifier", "embed", "classify", "map_with", "default_cpus_per_actor", "EMBED_SCHEMA",
           "CLASSIFY_SCHEMA"]
