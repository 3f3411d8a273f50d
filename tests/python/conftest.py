"""Shared fixtures: the vit-msn binary, two tiny bundles compiled from the
seeded fixture models, and a folder of mixed images made here (seeded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mixed_images import BROKEN, N_IMAGES, make_images  # noqa: F401 (BROKEN: for the tests)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "generated"
IMAGE_FIXTURES = ROOT / "tests" / "fixtures" / "generated-images"


def vit_msn_bin() -> str:
    """$VIT_MSN_BIN, else the debug build `make test` makes."""
    path = os.environ.get("VIT_MSN_BIN") or str(ROOT / "target" / "debug" / "vit-msn")
    if not Path(path).is_file():
        pytest.fail(f"{path} not found: run `cargo build` first (or set VIT_MSN_BIN)")
    return path


def run_bin(*args, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([vit_msn_bin(), *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"vit-msn {' '.join(map(str, args))} exited {p.returncode}:\n{p.stderr}")
    return p


def _compile(model: Path, out: Path) -> Path:
    run_bin("--threads", "1", "compile", "--model", model, "--out", out)
    return out


@pytest.fixture(scope="session")
def backbone_bundle(tmp_path_factory) -> Path:
    return _compile(FIXTURES / "e2e_backbone" / "model", tmp_path_factory.mktemp("bundles") / "backbone")


@pytest.fixture(scope="session")
def classifier_bundle(tmp_path_factory) -> Path:
    return _compile(FIXTURES / "e2e_classifier" / "model", tmp_path_factory.mktemp("bundles") / "classifier")


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> tuple:
    """(folder, sorted good paths)."""
    folder = tmp_path_factory.mktemp("images") / "mixed"
    return folder, make_images(folder)


def reference_run(bundle: Path, paths: list, tmp: Path, embeddings: bool) -> dict:
    """``vit-msn run --json`` (with ``--embeddings``) on ``paths``: by path,
    the CLS embedding or the result entry."""
    args = ["--threads", "1", "run", "--bundle", bundle, "--json", "--batch-size", "16"]
    npy = tmp / "ref.npy"
    if embeddings:
        args += ["--embeddings", npy]
    p = run_bin(*args, "--image", *paths)
    results = json.loads(p.stdout)["results"]
    assert [r["image"] for r in results] == list(paths)
    if embeddings:
        emb = np.load(npy)
        assert emb.shape[0] == len(paths)
        return {path: emb[i] for i, path in enumerate(paths)}
    return {r["image"]: r for r in results}


@pytest.fixture(scope="session")
def reference_embeddings(backbone_bundle, images, tmp_path_factory) -> dict:
    return reference_run(backbone_bundle, images[1], tmp_path_factory.mktemp("ref"), embeddings=True)


@pytest.fixture(scope="session")
def reference_classes(classifier_bundle, images, tmp_path_factory) -> dict:
    return reference_run(classifier_bundle, images[1], tmp_path_factory.mktemp("ref"), embeddings=False)


def python_cli(*args, env=None) -> subprocess.CompletedProcess:
    """``python -m vit_msn.ray ARGS``, with this interpreter."""
    return subprocess.run([sys.executable, "-m", "vit_msn.ray", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)
