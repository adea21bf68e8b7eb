"""``caffe-compat export NET --to onnx|exported|python -o OUT``: leave Caffe behind
(:mod:`caffe_compat.export`)."""
from __future__ import annotations

import click

from caffe_compat.cli.main import friendly, main, writes
from caffe_compat.cli.options import input_shape_option, parse_input_shapes, python_layers_option


@main.command("export")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--weights", "-w", type=click.Path(dir_okay=False), default=None,
              help="Weights (.caffemodel, .safetensors, .pt); without: the fillers' seeded values.")
@click.option("--to", "fmt", required=True, type=click.Choice(["onnx", "exported", "python"]),
              help="onnx: an ONNX model (opset 18); exported: a torch.export program (.pt2); "
                   "python: a readable PyTorch module (+ .safetensors weights beside it).")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="Output file.")
@input_shape_option("Input blob shape to export for (repeatable), e.g. data=1,3,600,800.")
@click.option("--dynamic/--static", "dynamic", default=None,
              help="onnx/exported: image height and width (and a Fast R-CNN net's ROI count) "
                   "vary (--dynamic: an error if the net fixes them) or stay as traced "
                   "(--static). Default: dynamic where the net allows it, checked.")
@python_layers_option()
@writes("output")
@friendly
def export_command(model, weights, fmt, output, input_shapes, dynamic, allow_python_layers):
    """Export the TEST net MODEL (with --weights) to OUTPUT."""
    import os

    from caffe_compat.errors import DataError
    from caffe_compat.net import Net

    if not os.path.isfile(model):
        raise DataError("net definition not found", where=model)
    shapes = parse_input_shapes(input_shapes)
    net = Net(model, weights=weights, phase="test", input_shapes=shapes or None,
              allow_python_layers=allow_python_layers or None, exact_layout=True)
    sizes = ""
    if fmt == "onnx":
        from caffe_compat.export import to_onnx

        sizes = to_onnx(net, output, dynamic=dynamic).describe()
    elif fmt == "exported":
        from caffe_compat.export import to_exported
        from caffe_compat.export.exported import spatial_check

        program = to_exported(net, output, dynamic=dynamic)
        sizes = spatial_check(program, list(net.input_names)).describe()
    else:
        from caffe_compat.export import to_python

        to_python(net, output)
    click.echo(f"wrote {output}" + (f" (input sizes: {sizes})" if sizes else ""))
