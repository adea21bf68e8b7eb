"""``caffe-compat time``: Caffe's ``caffe time -model NET -iterations N``."""
from __future__ import annotations

import click

from caffe_compat.cli.main import friendly, main
from caffe_compat.cli.options import (gpu_option, input_shape_option, parse_input_shapes, phase_option,
                                      precision_option, python_layers_option)


@main.command("time")
@click.option("--model", "-m", required=True, type=click.Path(dir_okay=False), help="Net definition.")
@click.option("--weights", "-w", type=click.Path(dir_okay=False))
@click.option("--iterations", "-n", default=50, show_default=True, type=click.IntRange(1))
@phase_option("train", "Caffe times the TRAIN net by default.")
@gpu_option()
@input_shape_option()
@click.option("--no-per-layer", is_flag=True, help="Skip the per-layer table.")
@click.option("--channels-last", is_flag=True, help="Run in NHWC memory layout (often faster).")
@click.option("--fuse-batchnorm", is_flag=True,
              help="Fold BatchNorm (+ Scale) into the preceding convolutions (inference only).")
@click.option("--cuda-graph", is_flag=True,
              help="Replay the forward as one CUDA graph (needs --gpu; forward only, no per-layer table).")
@precision_option()
@python_layers_option()
@friendly
def time_command(model, weights, iterations, phase, gpu, input_shapes, no_per_layer, channels_last,
                 fuse_batchnorm, cuda_graph, precision, allow_python_layers):
    """Benchmark forward/backward of MODEL, per layer and in total."""
    import torch

    from caffe_compat.device import resolve_device
    from caffe_compat.errors import SchemaError
    from caffe_compat.net import Net
    from caffe_compat.timing import time_cuda_graph, time_net

    shapes = parse_input_shapes(input_shapes)
    if cuda_graph and (gpu is None or gpu < 0):
        raise SchemaError("--cuda-graph needs --gpu ID (CUDA graphs run on a GPU)")
    device = resolve_device(gpu)
    from caffe_compat.precision import check_precision, inference_precision
    check_precision(precision, device)
    net = Net(model, weights=weights, phase=phase, input_shapes=shapes, device=device,
              allow_python_layers=allow_python_layers or None)
    if fuse_batchnorm:
        folded = net.fuse_batchnorm()
        click.echo(f"Folded {len(folded)} BatchNorm/Scale layer(s) into convolutions"
                   + ("" if folded else " (BatchNorm folds only with global stats, e.g. --phase test)"))
    if channels_last:
        net.channels_last()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    click.echo(f"Timing '{net.net_name}' ({net.phase}) on {card}, {iterations} iterations")
    with inference_precision(net, precision):
        if cuda_graph:
            report = time_cuda_graph(net, iterations)
        else:
            report = time_net(net, iterations, per_layer=not no_per_layer)
    for line in report.lines():
        click.echo(line)
