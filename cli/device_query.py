"""``caffe-compat device-query``: Caffe's ``caffe device_query -gpu ID``."""
from __future__ import annotations

import click

from caffe_compat.cli.main import friendly, main


def device_lines(gpu: int) -> list:
    """Caffe's ``Querying GPUs`` report, from what torch knows of the card."""
    import torch

    from caffe_compat.errors import SchemaError

    if not torch.cuda.is_available():
        raise SchemaError("no CUDA device is available (caffe-compat runs on the CPU here)")
    n = torch.cuda.device_count()
    if not 0 <= gpu < n:
        raise SchemaError(f"--gpu {gpu} does not exist", expected=f"0..{n - 1}")
    p = torch.cuda.get_device_properties(gpu)
    rows = [("Device id", gpu), ("Major revision number", p.major), ("Minor revision number", p.minor),
            ("Name", p.name), ("Total global memory", p.total_memory),
            ("Number of multiprocessors", p.multi_processor_count)]
    for label, attr in [("Warp size", "warp_size"), ("L2 cache size", "L2_cache_size"),
                        ("Maximum threads per multiprocessor", "max_threads_per_multi_processor")]:
        if hasattr(p, attr):
            rows.append((label, getattr(p, attr)))
    rows.append(("torch / CUDA", f"{torch.__version__} / {torch.version.cuda}"))
    return [f"{label + ':':36s}{value}" for label, value in rows]


@main.command("device-query")
@click.option("--gpu", type=int, default=0, show_default=True, help="CUDA device id.")
@friendly
def device_query_command(gpu: int) -> None:
    """Show the properties of CUDA device --gpu (Caffe's `caffe device_query`)."""
    lines = device_lines(gpu)
    click.echo(f"Querying GPUs {gpu}")
    for line in lines:
        click.echo(line)
