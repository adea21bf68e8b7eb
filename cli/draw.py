"""``caffe-compat draw NET OUT``: Caffe's ``python/draw_net.py``.

Draws the net definition NET to OUT in the format OUT's extension names: ``.dot``/``.gv``/
``.raw`` are DOT text (no Graphviz needed), anything else (``.png``, ``.svg``, ``.pdf``...)
is rendered by Graphviz's ``dot``, which must be on PATH.  See :mod:`caffe_compat.pycaffe.draw`.
"""
from __future__ import annotations

import click

from caffe_compat.cli.main import friendly, main, writes
from caffe_compat.cli.options import check_file


@main.command("draw")
@click.argument("net", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--rankdir", type=click.Choice(["LR", "RL", "TB", "BT"], case_sensitive=False), default="LR",
              show_default=True, help="Layout direction (TB: top to bottom...).")
@click.option("--phase", type=click.Choice(["TRAIN", "TEST", "ALL"], case_sensitive=False), default="ALL",
              show_default=True, help="Draw only the layers of the TRAIN or TEST net.")
@click.option("--display-lrm", "--display_lrm", "display_lrm", is_flag=True,
              help="Show the learning-rate multipliers of Convolution/InnerProduct layers.")
@writes("out")
@friendly
def draw_command(net, out, rankdir, phase, display_lrm):
    """Draw the net definition NET to OUT (.dot text, or .png/.svg/.pdf... through Graphviz)."""
    from caffe_compat.io import read_net_text
    from caffe_compat.pycaffe.draw import draw_net_to_file

    check_file(net, "net definition", "NET")
    param = read_net_text(net, upgrade=False)       # V0/V1 nets are upgraded by the drawing
    draw_net_to_file(param, out, rankdir.upper(), phase=None if phase.upper() == "ALL" else phase.lower(),
                     display_lrm=display_lrm)
    click.echo(f"Drew net '{param.name or 'Net'}' to {out}")
