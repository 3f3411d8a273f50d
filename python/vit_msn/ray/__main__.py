"""python -m vit_msn.ray embed|classify --bundle DIR --input DIR_OR_GLOB --output OUT.parquet

Reads the images with Ray Data, maps them through a pool of actors that each
load the bundle once, and writes one Parquet file with a row per image
(``path``, ``embedding`` or ``labels``/``scores``, ``error``), beside the
target first and renamed into place, so OUT is never half written. The
bundle is verified here, before Ray starts: a modified artifact is refused
before any row exists. Exit status: 0 done (rows with an ``error`` included),
1 refused or failed, 2 bad flags.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

from ..errors import VitMsnError
from ..image import IMAGE_EXTENSIONS, is_image_path


class UsageError(Exception):
    """A flag or path the job cannot start with."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m vit_msn.ray",
        description="Embed or classify images with a vit-msn bundle on Ray Data, into one Parquet file.")
    p.add_argument("command", choices=["embed", "classify"],
                   help="embed: CLS embeddings from a backbone bundle; classify: top-k labels from a classifier")
    p.add_argument("--bundle", required=True, help="bundle folder (its manifest and digests are verified)")
    p.add_argument("--input", required=True,
                   help="a folder (walked for jpg/png/webp/bmp/gif/tiff), a file, a glob, or a URI such as s3://bucket/prefix/")
    p.add_argument("--output", required=True, help="the Parquet file to write (replaced atomically)")
    p.add_argument("--actors", type=int, default=2, help="actors, each holding the bundle (default 2)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--top-k", type=int, default=5, help="labels per image for classify (default 5)")
    p.add_argument("--address", default=None,
                   help="an existing cluster: auto or ray://host:10001; default a local Ray on this machine")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default all); not with --address")
    p.add_argument("--cpus-per-actor", type=float, default=None,
                   help="CPUs each actor reserves, and libtorch threads it runs (default: a share leaving one CPU "
                        "for reading, at most 1)")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs per actor (1 with a CUDA bundle)")
    p.add_argument("--device", default=None, help="cpu or cuda; default the bundle's device")
    args = p.parse_args(argv)
    for name in ("actors", "batch_size", "top_k"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_cpus is not None and args.address is not None:
        p.error("--num-cpus sizes a local Ray; a cluster given with --address has its own CPUs")
    return args


def collect_inputs(spec: str, output: Path):
    """The files to read: a URI as given (Ray reads it, keeping image
    extensions), a folder walked in name order, a file, or a glob's matches."""
    if "://" in spec:
        return spec
    path = Path(spec)
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise UsageError(f"{spec}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    elif path.is_file():
        files = [str(path.resolve())]
    else:
        files = sorted(os.path.abspath(f) for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
        if not files:
            raise UsageError(f"{spec}: no such file or folder, and no files match it as a glob")
    if str(output.resolve()) in files:
        raise UsageError(f"{output}: the output is one of the inputs")
    return files


def _walk(root: Path):
    """Image files under ``root``, sorted, following symlinked folders but
    never into one already walked."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        out.extend(os.path.abspath(os.path.join(dirpath, f)) for f in filenames if is_image_path(f))
    return sorted(out)


def check_output(output: Path):
    if output.is_dir():
        raise UsageError(f"{output}: is a folder; --output names the Parquet file to write")
    parent = output.parent
    if not parent.is_dir():
        raise UsageError(f"{output}: the folder {parent} does not exist")


def run(args) -> int:
    import pyarrow.parquet as pq
    import ray

    from .. import verify
    from . import CLASSIFY_SCHEMA, EMBED_SCHEMA, classify, embed

    output = Path(args.output)
    check_output(output)
    manifest = verify(args.bundle)  # refuses a modified bundle before Ray starts
    want = "backbone" if args.command == "embed" else "classification"
    if manifest.task != want:
        raise UsageError(f"{args.bundle}: `{args.command}` needs a {want} bundle; this one is {manifest.task}")
    inputs = collect_inputs(args.input, output)

    if args.address is None:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    else:
        ray.init(address=args.address)
    read = ray.data.read_binary_files(inputs, include_paths=True,
                                      file_extensions=list(IMAGE_EXTENSIONS) if isinstance(inputs, str) else None)
    common = dict(actors=args.actors, batch_size=args.batch_size, num_cpus=args.cpus_per_actor,
                  num_gpus=args.gpus_per_actor, device=args.device)
    if args.command == "embed":
        ds, schema = embed(read, args.bundle, **common), EMBED_SCHEMA
    else:
        ds, schema = classify(read, args.bundle, top_k=args.top_k, **common), CLASSIFY_SCHEMA

    # Written beside the target and renamed: a reader sees no file or a whole one.
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    start = time.perf_counter()
    rows = errors = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                table = table.select(schema.names).cast(schema)
                writer.write_table(table)
                rows += table.num_rows
                errors += table.num_rows - table.column("error").null_count
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    seconds = time.perf_counter() - start
    print(f"wrote {rows} rows ({errors} with an error) to {output} in {seconds:.1f} s "
          f"({rows / seconds:.1f} images/s)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (VitMsnError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failed Ray job: its first line, the cause is in Ray's log above
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: the job failed: {type(e).__name__}: {first}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
