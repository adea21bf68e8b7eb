"""``caffe-compat inspect NET``: the layer table of a net definition."""
from __future__ import annotations

import click

from caffe_compat.cli.main import friendly, main
from caffe_compat.cli.options import (input_shape_option, parse_input_shapes, phase_option,
                                      python_layers_option, state_options)


@main.command("inspect")
@click.argument("net", type=click.Path(dir_okay=False))
@click.option("--weights", "-w", type=click.Path(dir_okay=False), help="Load and check these weights.")
@phase_option()
@state_options
@input_shape_option("Override an input's shape, e.g. data=1,3,600,1000.")
@python_layers_option()
@friendly
def inspect_command(net, weights, phase, stages, level, input_shapes, allow_python_layers):
    """Print NET's layers, types, bottoms, tops with shapes, parameter counts and FLOPs."""
    from caffe_compat.net import Net
    from caffe_compat.summary import format_table

    n = Net(net, phase=phase, stages=stages, level=level, input_shapes=parse_input_shapes(input_shapes),
            allow_python_layers=allow_python_layers or None)
    notes = n.load_weights(weights) if weights else []
    click.echo(f"net '{n.net_name}' ({n.phase})")
    click.echo(format_table(n))
    for note in notes:
        click.echo(f"note: {note}")
