"""``caffe-compat convert IN -o OUT``: weights between .caffemodel, .pt, .safetensors and
Caffe's HDF5 layout (``.h5``, e.g. ``model.caffemodel.h5``); formats by name
(:data:`caffe_compat.weights.FORMATS`)."""
from __future__ import annotations

import os

import click

from caffe_compat.cli.main import friendly, main, writes
from caffe_compat.cli.options import phase_option, python_layers_option


@main.command("convert")
@click.argument("src", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "dst", required=True, type=click.Path(dir_okay=False),
              help="Output file: .safetensors (recommended), .pt, .caffemodel or .caffemodel.h5 "
                   "(Caffe's HDF5).")
@click.option("--model", "-m", type=click.Path(dir_okay=False),
              help="Net definition: needed to read or write .h5 and to write a .caffemodel; checks "
                   "names and shapes otherwise.")
@phase_option()
@click.option("--fold-batchnorm", is_flag=True,
              help="Divide BatchNorm statistics by their scale factor (plain torch BN statistics).")
@click.option("--allow-missing", is_flag=True, help="Let net layers without weights keep their fillers.")
@python_layers_option()
@writes("dst")
@friendly
def convert_command(src, dst, model, phase, fold_batchnorm, allow_missing, allow_python_layers):
    """Convert SRC weights to OUTPUT (format by extension)."""
    from caffe_compat import weights as W
    from caffe_compat.errors import SchemaError, WeightsError

    src_format, dst_format = W.format_of(src), W.format_of(dst)
    if not os.path.exists(src):
        raise WeightsError("file not found", where=src)
    if model:
        from caffe_compat.net import Net

        net = Net(model, phase=phase, allow_python_layers=allow_python_layers or None)
        notes = net.load_weights(src, allow_missing=allow_missing)
        for n in notes:
            click.echo(f"note: {n}", err=True)
        if not fold_batchnorm:
            net.save_weights(dst)
        elif dst_format.net_state is None:
            raise SchemaError("--fold-batchnorm applies to .pt/.safetensors outputs")
        else:
            dst_format.state_writer()(W.fold_batchnorm(dst_format.net_state(net)), dst)
    else:
        write = dst_format.state_writer()
        sd = src_format.state_reader()(src)
        write(W.fold_batchnorm(sd) if fold_batchnorm else sd, dst)
    click.echo(f"wrote {dst}")
