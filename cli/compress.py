"""``caffe-compat compress``: Fast R-CNN's ``tools/compress_net.py`` (truncated SVD of fc layers).

Option names are the original's (``--def``, ``--def-svd``, ``--net``, ``--out``).  Without
``--out`` the result goes beside ``--net`` as ``<stem>_svd_<X>_<l>...<ext>``, e.g.
``vgg16_fast_rcnn_iter_40000_svd_fc6_1024_fc7_256.caffemodel``, the original's naming.
"""
from __future__ import annotations

import time

import click

from caffe_compat.cli.main import friendly, main, writes
from caffe_compat.cli.options import phase_option, python_layers_option


@main.command("compress")
@click.option("--def", "definition", required=True, type=click.Path(dir_okay=False),
              help="The uncompressed test definition (e.g. models/VGG16/test.prototxt).")
@click.option("--def-svd", "svd_definition", required=True, type=click.Path(dir_okay=False),
              help="The compressed definition: each compressed layer X replaced by X_L (rank l, "
                   "no bias) and X_U.")
@click.option("--net", "weights", required=True, type=click.Path(dir_okay=False),
              help="Weights of the uncompressed net (.caffemodel, .pt or .safetensors).")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
              help="Output weights (format by extension). Default: beside --net, named "
                   "<stem>_svd_<X>_<l>... as Fast R-CNN's tool did.")
@phase_option()
@python_layers_option()
@writes("out")
@friendly
def compress_command(definition, svd_definition, weights, out, phase, allow_python_layers):
    """Compress fully connected layers with a truncated SVD (Fast R-CNN, section 3.1)."""
    import os

    from caffe_compat.errors import WeightsError
    from caffe_compat.frcnn.compress import compress_files

    if not os.path.exists(weights):
        raise WeightsError("weights file not found", where=weights)
    t0 = time.perf_counter()
    path, ranks, net, _ = compress_files(definition, svd_definition, weights, out, phase=phase,
                                         allow_python_layers=allow_python_layers or None)
    for x, (l, err) in ranks.items():
        m = net.layer(x)
        n, k = m.num_output, m.k
        click.echo(f"{x}: l = {l}, K = {k}, N = {n}: {n * k:,} -> {l * (n + k):,} weights, "
                   f"relative error {err:.4g}")
    click.echo(f"wrote {path} ({time.perf_counter() - t0:.1f} s)")
