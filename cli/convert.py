"""``caffe-compat convert IN -o OUT``: weights between .caffemodel, .pt, .safetensors and
Caffe's HDF5 layout (``.h5``, e.g. ``model.caffemodel.h5``)."""
from __future__ import annotations

import os

import click

from caffe_compat.cli.main import friendly, main


def _kind(path: str) -> str:
    if path.endswith(".safetensors"):
        return "safetensors"
    if path.endswith((".pt", ".pth")):
        return "pt"
    if path.endswith(".h5"):
        return "h5"
    return "caffemodel"


@main.command("convert")
@click.argument("src", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "dst", required=True, type=click.Path(dir_okay=False),
              help="Output file: .safetensors (recommended), .pt, .caffemodel or .caffemodel.h5 "
                   "(Caffe's HDF5).")
@click.option("--model", "-m", type=click.Path(dir_okay=False),
              help="Net definition: needed to read or write .h5 and to write a .caffemodel; checks "
                   "names and shapes otherwise.")
@click.option("--phase", type=click.Choice(["train", "test"], case_sensitive=False), default="test",
              show_default=True)
@click.option("--fold-batchnorm", is_flag=True,
              help="Divide BatchNorm statistics by their scale factor (plain torch BN statistics).")
@click.option("--allow-missing", is_flag=True, help="Let net layers without weights keep their fillers.")
@click.option("--allow-python-layers", is_flag=True, envvar="CAFFE_COMPAT_ALLOW_PYTHON_LAYERS")
@friendly
def convert_command(src, dst, model, phase, fold_batchnorm, allow_missing, allow_python_layers):
    """Convert SRC weights to OUTPUT (format by extension)."""
    from caffe_compat import weights as W
    from caffe_compat.errors import SchemaError, WeightsError

    sk, dk = _kind(src), _kind(dst)
    if not os.path.exists(src):
        raise WeightsError("file not found", where=src)
    if model:
        from caffe_compat.net import Net

        net = Net(model, phase=phase, allow_python_layers=allow_python_layers or None)
        notes = net.load_weights(src, allow_missing=allow_missing)
        for n in notes:
            click.echo(f"note: {n}", err=True)
        if dk in ("caffemodel", "h5"):
            if fold_batchnorm:
                raise SchemaError("--fold-batchnorm applies to .pt/.safetensors outputs")
            net.save_weights(dst)
        else:
            sd = W.net_state_dict(net, dedupe_shared=(dk == "safetensors"))
            _write_state(sd, dst, dk, fold_batchnorm)
    else:
        if dk in ("caffemodel", "h5"):
            what = "a .caffemodel" if dk == "caffemodel" else "an HDF5 (.h5) weights file"
            raise SchemaError(f"writing {what} needs the net definition: add --model NET.prototxt")
        if sk == "h5":
            raise SchemaError("reading HDF5 (.h5) weights needs the net definition (they hold no layer "
                              "types to name the blobs by): add --model NET.prototxt")
        sd = W.caffemodel_state_dict(src) if sk == "caffemodel" else W.read_state_file(src)
        _write_state(sd, dst, dk, fold_batchnorm)
    click.echo(f"wrote {dst}")


def _write_state(sd, dst, kind, fold):
    import torch

    from caffe_compat import weights as W
    from caffe_compat.atomic import atomic_open

    if fold:
        sd = W.fold_batchnorm(sd)
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    if kind == "safetensors":
        W.save_safetensors(sd, dst)
    else:
        with atomic_open(dst) as f:
            torch.save(sd, f)
