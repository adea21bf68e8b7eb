"""``caffe-compat extract-features``: Caffe's ``extract_features`` tool, same positional form.

``caffe-compat extract-features W.caffemodel net.prototxt fc7,prob feat_fc7,feat_prob 10 lmdb
[CPU|GPU] [DEVICE_ID]``.  See :mod:`caffe_compat.extract_features` for what is stored.
"""
from __future__ import annotations

import os

import click

from caffe_compat.cli.main import friendly, main


@main.command("extract-features")
@click.argument("weights", metavar="PRETRAINED_NET_PARAM", type=click.Path(dir_okay=False))
@click.argument("model", metavar="FEATURE_EXTRACTION_PROTO_FILE", type=click.Path(dir_okay=False))
@click.argument("blobs", metavar="BLOB1[,BLOB2,...]")
@click.argument("datasets", metavar="DATASET1[,DATASET2,...]")
@click.argument("num_mini_batches", metavar="NUM_MINI_BATCHES", type=int)
@click.argument("db_type", metavar="DB_TYPE")
@click.argument("mode", metavar="[CPU|GPU]", required=False, default="CPU")
@click.argument("device_id", metavar="[DEVICE_ID=0]", required=False, default=0, type=int)
@click.option("--allow-missing", is_flag=True,
              help="Layers with parameters the weights file lacks keep their fillers (a note each).")
@click.option("--allow-python-layers", is_flag=True,
              help="Allow importing the modules of the net's Python layers.")
@friendly
def extract_features_command(weights, model, blobs, datasets, num_mini_batches, db_type, mode,
                             device_id, allow_missing, allow_python_layers):
    """Run the net of FEATURE_EXTRACTION_PROTO_FILE (TEST phase, weights from
    PRETRAINED_NET_PARAM) NUM_MINI_BATCHES times and store each item of each named blob as a
    Datum in the LMDB of the same position, keys %010d, as Caffe's extract_features."""
    from caffe_compat.extract_features import (check_blobs, check_request, extract_features,
                                               select_device, split_names)
    from caffe_compat.errors import WeightsError
    from caffe_compat.net import Net

    def log(line: str) -> None:
        click.echo(line, err=True)

    blob_names, dataset_names = split_names(blobs), split_names(datasets)
    check_request(blob_names, dataset_names, num_mini_batches, db_type)
    if not os.path.isfile(weights):  # before the net is built
        raise WeightsError("weights file not found (PRETRAINED_NET_PARAM)", where=weights)
    device = select_device(mode, device_id)
    log("Using CPU" if device.type == "cpu" else f"Using GPU, device {device.index}")
    net = Net(model, phase="test", device=device, allow_python_layers=allow_python_layers or None)
    check_blobs(net, blob_names)  # before the (possibly large) weights are read
    for note in net.load_weights(weights, allow_missing=allow_missing):
        log(f"note: {note}")
    res = extract_features(net, blob_names, dataset_names, num_mini_batches, backend=db_type, log=log)
    for d, b, n, (c, h, w) in zip(res.datasets, res.blobs, res.counts, res.item_shapes):
        click.echo(f"wrote {d}: {n} features of blob {b} ({c}x{h}x{w} CxHxW, {c * h * w} floats each)")
