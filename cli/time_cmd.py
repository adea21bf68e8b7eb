"""``caffe-compat time``: Caffe's ``caffe time -model NET -iterations N``."""
from __future__ import annotations

import click

from caffe_compat.cli.main import friendly, main


@main.command("time")
@click.option("--model", "-m", required=True, type=click.Path(dir_okay=False), help="Net definition.")
@click.option("--weights", "-w", type=click.Path(dir_okay=False))
@click.option("--iterations", "-n", default=50, show_default=True, type=click.IntRange(1))
@click.option("--phase", type=click.Choice(["train", "test"], case_sensitive=False), default="train",
              show_default=True, help="Caffe times the TRAIN net by default.")
@click.option("--gpu", type=int, default=None, help="CUDA device id (default: CPU).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...")
@click.option("--no-per-layer", is_flag=True, help="Skip the per-layer table.")
@click.option("--channels-last", is_flag=True, help="Run in NHWC memory layout (often faster).")
@click.option("--fuse-batchnorm", is_flag=True,
              help="Fold BatchNorm (+ Scale) into the preceding convolutions (inference only).")
@click.option("--cuda-graph", is_flag=True,
              help="Replay the forward as one CUDA graph (needs --gpu; forward only, no per-layer table).")
@click.option("--allow-python-layers", is_flag=True, envvar="CAFFE_COMPAT_ALLOW_PYTHON_LAYERS")
@friendly
def time_command(model, weights, iterations, phase, gpu, input_shapes, no_per_layer, channels_last,
                 fuse_batchnorm, cuda_graph, allow_python_layers):
    """Benchmark forward/backward of MODEL, per layer and in total."""
    import torch

    from caffe_compat.errors import SchemaError
    from caffe_compat.net import Net
    from caffe_compat.timing import time_cuda_graph, time_net

    shapes = {}
    for spec in input_shapes:
        name, _, dims = spec.partition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise SchemaError(f"bad --input-shape '{spec}'; expected NAME=D1,D2,...") from None
    device = torch.device("cpu")
    if cuda_graph and gpu is None:
        raise SchemaError("--cuda-graph needs --gpu ID (CUDA graphs run on a GPU)")
    if gpu is not None:
        if not torch.cuda.is_available():
            raise SchemaError("--gpu given but no CUDA device is available")
        device = torch.device(f"cuda:{gpu}")
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
    if cuda_graph:
        report = time_cuda_graph(net, iterations)
    else:
        report = time_net(net, iterations, per_layer=not no_per_layer)
    for line in report.lines():
        click.echo(line)
