"""``caffe-compat inspect NET``: the layer table of a net definition."""
from __future__ import annotations

import click

from caffe_compat.cli.main import friendly, main


@main.command("inspect")
@click.argument("net", type=click.Path(dir_okay=False))
@click.option("--weights", "-w", type=click.Path(dir_okay=False), help="Load and check these weights.")
@click.option("--phase", type=click.Choice(["train", "test"], case_sensitive=False), default="test",
              show_default=True)
@click.option("--stage", "stages", multiple=True, help="Net state stage (repeatable).")
@click.option("--level", type=int, default=None, help="Net state level.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...",
              help="Override an input's shape, e.g. data=1,3,600,1000.")
@click.option("--allow-python-layers", is_flag=True, envvar="CAFFE_COMPAT_ALLOW_PYTHON_LAYERS",
              help="Allow importing the modules of unregistered Python layers.")
@friendly
def inspect_command(net, weights, phase, stages, level, input_shapes, allow_python_layers):
    """Print NET's layers, types, bottoms, tops with shapes, parameter counts and FLOPs."""
    from caffe_compat.errors import SchemaError
    from caffe_compat.net import Net
    from caffe_compat.summary import format_table

    shapes = {}
    for spec in input_shapes:
        name, _, dims = spec.partition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise SchemaError(f"bad --input-shape '{spec}'; expected NAME=D1,D2,...") from None
    n = Net(net, phase=phase, stages=stages, level=level, input_shapes=shapes,
            allow_python_layers=allow_python_layers or None)
    notes = n.load_weights(weights) if weights else []
    click.echo(f"net '{n.net_name}' ({n.phase})")
    click.echo(format_table(n))
    for note in notes:
        click.echo(f"note: {note}")
