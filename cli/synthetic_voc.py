"""``caffe-compat synthetic-voc OUT``: write a small VOC-layout data set of rendered shapes."""
from __future__ import annotations

import click

from caffe_compat.cli.main import friendly, main, writes


@main.command("synthetic-voc")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--images", "-n", "num_images", type=click.IntRange(min=1), default=200, show_default=True,
              help="Number of images (trainval and test together).")
@click.option("--classes", "num_classes", type=click.IntRange(1, 20), default=20, show_default=True,
              help="Draw only the first K VOC classes (all 20 names are kept).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same files.")
@click.option("--year", default="2007", show_default=True, help="Writes OUT/VOCdevkit<year>/VOC<year>.")
@click.option("--min-size", type=click.IntRange(min=32), default=200, show_default=True,
              help="Smallest image side in pixels.")
@click.option("--max-size", type=click.IntRange(min=32), default=400, show_default=True,
              help="Largest image side in pixels.")
@click.option("--test-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.25,
              show_default=True, help="Share of the images listed in test.txt.")
@writes("out")
@friendly
def synthetic_voc_command(out, num_images, num_classes, seed, year, min_size, max_size, test_fraction):
    """Write a synthetic PASCAL VOC (shapes per class on textured noise) under OUT."""
    from caffe_compat.frcnn.datasets.synthetic_voc import write_dataset
    from caffe_compat.errors import DataError

    if min_size > max_size:
        raise DataError(f"--min-size ({min_size}) is larger than --max-size ({max_size})")
    s = write_dataset(out, num_images, seed=seed, year=year, image_size=(min_size, max_size),
                      num_classes=num_classes, test_fraction=test_fraction)
    sp = s["splits"]
    click.echo(f"wrote {s['num_images']} images ({sp['trainval']} trainval, {sp['test']} test), "
               f"{s['num_objects']} objects ({s['num_difficult']} difficult) of "
               f"{len(s['classes'])} classes to {s['devkit']}")
    click.echo(f"use it with: --set DATA_DIR {s['data_dir']}  (data sets voc_{year}_trainval, "
               f"voc_{year}_test)")
