"""vit_msn.ray on a local Ray bounded to 2 CPUs: the command line against
`vit-msn run` on the same files, an actor killed mid-job, and a modified
bundle refused before any row."""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import python_cli
from mixed_images import BROKEN
from test_bundle import copy_bundle, tamper

import vit_msn.ray as vr

TOLERANCE = 1e-4


def run_cli(command, bundle, folder, output, *extra):
    p = python_cli(command, "--bundle", bundle, "--input", folder, "--output", output,
                   "--actors", 2, "--batch-size", 8, "--num-cpus", 2, *extra)
    assert p.returncode == 0, f"python -m vit_msn.ray {command} exited {p.returncode}:\n{p.stderr[-4000:]}"
    return p


def check_rows(table: pa.Table, paths: list, folder):
    """Every good file exactly once with no error; every broken one exactly
    once with its error; nothing else."""
    rows = table.column("path").to_pylist()
    broken = {str(folder / b) for b in BROKEN}
    assert len(rows) == len(set(rows)), "a file appears more than once"
    assert set(rows) == set(paths) | broken
    errors = dict(zip(rows, table.column("error").to_pylist()))
    assert all(errors[p] is None for p in paths)
    for b in broken:
        assert errors[b] and b in errors[b], f"{b}: error {errors[b]!r} does not name the file"


def test_embed_cli_matches_vit_msn_run(backbone_bundle, images, reference_embeddings, tmp_path):
    folder, paths = images
    out = tmp_path / "emb.parquet"
    p = run_cli("embed", backbone_bundle, folder, out)
    assert f"wrote {len(paths) + len(BROKEN)} rows ({len(BROKEN)} with an error)" in p.stderr
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], "a temporary file was left behind"
    table = pq.read_table(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    check_rows(table, paths, folder)
    worst = 0.0
    for path, emb, err in zip(*(table.column(c).to_pylist() for c in ("path", "embedding", "error"))):
        if err is not None:
            assert emb is None
            continue
        worst = max(worst, float(np.abs(np.asarray(emb, np.float64) - reference_embeddings[path]).max()))
    print(f"embeddings: {len(paths)} images, max |python - vit-msn run| = {worst:.2e}")
    assert worst <= TOLERANCE


def test_classify_cli_matches_vit_msn_run(classifier_bundle, images, reference_classes, tmp_path):
    folder, paths = images
    out = tmp_path / "classes.parquet"
    run_cli("classify", classifier_bundle, folder, out, "--top-k", 3)
    table = pq.read_table(out)
    assert table.schema.field("labels").type == pa.list_(pa.string())
    assert table.schema.field("scores").type == pa.list_(pa.float32())
    check_rows(table, paths, folder)
    worst = 0.0
    for path, labels, scores in zip(*(table.column(c).to_pylist() for c in ("path", "labels", "scores"))):
        if path not in reference_classes:
            assert labels is None and scores is None
            continue
        want = reference_classes[path]["top_k"][:3]
        assert labels == [t["label"] for t in want], path
        worst = max(worst, max(abs(s - t["probability"]) for s, t in zip(scores, want)))
    print(f"classify: {len(paths)} images, max |score - vit-msn run| = {worst:.2e}")
    assert worst <= TOLERANCE


def test_modified_bundle_is_refused_before_any_row(backbone_bundle, images, tmp_path):
    folder, _ = images
    bundle = copy_bundle(backbone_bundle, tmp_path)
    tamper(bundle)
    out = tmp_path / "emb.parquet"
    p = python_cli("embed", "--bundle", bundle, "--input", folder, "--output", out, "--num-cpus", 2)
    assert p.returncode == 1
    assert "refusing to load a modified artifact" in p.stderr
    assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".emb")]


def test_bad_flags_exit_2(backbone_bundle, tmp_path):
    p = python_cli("embed", "--bundle", backbone_bundle, "--input", tmp_path, "--output", tmp_path / "o.parquet",
                   "--actors", 0)
    assert p.returncode == 2 and "--actors must be at least 1" in p.stderr
    p = python_cli("classify", "--bundle", backbone_bundle, "--input", tmp_path, "--output", tmp_path / "o.parquet")
    assert p.returncode == 1 and "needs a classification bundle" in p.stderr


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


class SlowEmbedder(vr.Embedder):
    """An Embedder that takes its time and says which process ran each row,
    so the test can kill an actor while it still has work."""

    def __call__(self, batch):
        time.sleep(0.25)
        table = super().__call__(batch)
        return table.append_column("pid", pa.array([os.getpid()] * table.num_rows, pa.int64()))


def test_an_actor_killed_mid_job_still_yields_every_row_once(local_ray, backbone_bundle, images,
                                                             reference_embeddings):
    _, paths = images
    # The workers cannot import this test module: send the class by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ds = ray.data.read_binary_files(paths, include_paths=True, override_num_blocks=8)
    mapped = vr.map_with(ds, SlowEmbedder, backbone_bundle, actors=2, batch_size=4)
    tables, killed, rows_at_kill = [], None, None
    for table in mapped.iter_batches(batch_format="pyarrow", batch_size=None):
        tables.append(table)
        if killed is None:
            killed = table.column("pid")[0].as_py()
            rows_at_kill = sum(t.num_rows for t in tables)
            os.kill(killed, signal.SIGKILL)
    table = pa.concat_tables(tables)
    assert rows_at_kill < len(paths), "the job ended before the kill"
    rows = table.column("path").to_pylist()
    assert sorted(rows) == sorted(paths), "rows lost or repeated after the actor was killed"
    pids = set(table.column("pid").to_pylist())
    print(f"killed actor {killed} after {rows_at_kill} of {len(paths)} rows; rows came from processes {sorted(pids)}")
    # The survivor and the restarted actor: the retried work went somewhere new.
    assert len(pids - {killed}) >= 2, f"no restarted actor served rows (processes {sorted(pids)})"
    for path, emb in zip(rows, table.column("embedding").to_pylist()):
        assert np.abs(np.asarray(emb) - reference_embeddings[path]).max() <= TOLERANCE


def test_a_bundle_modified_after_the_driver_checked_fails_the_job(local_ray, backbone_bundle, images, tmp_path):
    """The actors verify the bundle too: a job whose bundle changed under it
    fails instead of yielding rows from the modified artifact."""
    _, paths = images
    bundle = copy_bundle(backbone_bundle, tmp_path)
    tamper(bundle)
    ds = ray.data.read_binary_files(paths[:8], include_paths=True)
    with pytest.raises(Exception, match="refusing to load a modified artifact"):
        vr.embed(ds, bundle, actors=1, batch_size=4).take_all()


def test_actors_leave_a_cpu_for_reading(local_ray):
    """On this 2-CPU Ray, actors share one CPU and the read tasks keep one."""
    assert vr.default_cpus_per_actor(2) == 0.5
    assert vr.default_cpus_per_actor(1) == 1.0
    assert vr.default_cpus_per_actor(8) == 0.125
