"""``caffe-compat convert-imageset`` and ``compute-image-mean``: Caffe's tools of the same names.

Flags keep Caffe's spellings (``--resize_width``; ``--resize-width`` works too).  See
:mod:`caffe_compat.imageset` for what is stored and where this differs from Caffe.
"""
from __future__ import annotations

import click

from caffe_compat.cli.main import friendly, main, writes

_MAX_WARNINGS = 20


class _Log:
    """Progress and warnings on stderr, as Caffe logs them; skipped-image warnings capped."""

    def __init__(self) -> None:
        self.warnings = 0

    def __call__(self, line: str) -> None:
        if line.startswith("warning:"):
            self.warnings += 1
            if self.warnings > _MAX_WARNINGS:
                if self.warnings == _MAX_WARNINGS + 1:
                    click.echo("warning: more images could not be read (counted below)", err=True)
                return
        click.echo(line, err=True)


@main.command("convert-imageset")
@click.argument("root", metavar="ROOTFOLDER/")
@click.argument("listfile", metavar="LISTFILE", type=click.Path(dir_okay=False))
@click.argument("db", metavar="DB_NAME", type=click.Path())
@click.option("--gray", is_flag=True, help="Read images as grayscale (1 channel).")
@click.option("--shuffle", is_flag=True, help="Shuffle the list (seeded: see --seed).")
@click.option("--seed", type=int, default=0, show_default=True,  # imageset.DEFAULT_SEED
              help="Seed of --shuffle's permutation (Caffe's shuffle was unseeded).")
@click.option("--backend", default="lmdb", show_default=True, help="lmdb (leveldb is not supported).")
@click.option("--resize_width", "--resize-width", "resize_width", type=click.IntRange(min=0), default=0,
              show_default=True, help="Width images are resized to (with --resize_height).")
@click.option("--resize_height", "--resize-height", "resize_height", type=click.IntRange(min=0), default=0,
              show_default=True, help="Height images are resized to (with --resize_width).")
@click.option("--check_size", "--check-size", "check_size", is_flag=True,
              help="Refuse images whose size differs from the first one's.")
@click.option("--encoded", is_flag=True, help="Store the encoded image (the file) in each Datum.")
@click.option("--encode_type", "--encode-type", "encode_type", default="",
              help="Encode as this type (jpg, png...); implies --encoded.")
@writes("db")
@friendly
def convert_imageset_command(root, listfile, db, gray, shuffle, seed, backend, resize_width,
                             resize_height, check_size, encoded, encode_type):
    """Convert the images listed in LISTFILE ("path label" lines, paths relative to
    ROOTFOLDER/) to an LMDB of Datums named DB_NAME, as Caffe's convert_imageset."""
    from caffe_compat.imageset import convert_imageset

    log = _Log()
    res = convert_imageset(root, listfile, db, gray=gray, shuffle=shuffle,
                           seed=seed, backend=backend,
                           resize_width=resize_width, resize_height=resize_height,
                           check_size=check_size, encoded=encoded, encode_type=encode_type, log=log)
    shuffled = f", shuffled with seed {res.order_seed}" if res.order_seed is not None else ""
    skipped = f", {len(res.skipped)} skipped (could not be read)" if res.skipped else ""
    click.echo(f"wrote {db}: {res.written} of {res.total} images{skipped}{shuffled}")


@main.command("compute-image-mean")
@click.argument("db", metavar="INPUT_DB", type=click.Path())
@click.argument("out", metavar="[OUTPUT_FILE]", required=False, type=click.Path(dir_okay=False))
@click.option("--backend", default="lmdb", show_default=True, help="lmdb (leveldb is not supported).")
@writes("out")
@friendly
def compute_image_mean_command(db, out, backend):
    """The mean image of INPUT_DB's Datums, written to OUTPUT_FILE (a .binaryproto BlobProto)
    when given; prints each channel's mean, as Caffe's compute_image_mean."""
    from caffe_compat.imageset import compute_image_mean

    res = compute_image_mean(db, out, backend=backend, log=_Log())
    c, h, w = res.mean.shape
    click.echo(f"{res.count} images of {c}x{h}x{w} (CxHxW)" + (f"; mean written to {out}" if out else ""))
    click.echo(f"Number of channels: {c}")
    for i, v in enumerate(res.channel_means):
        click.echo(f"mean_value channel [{i}]: {v:.6g}")
