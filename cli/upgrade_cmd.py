"""``caffe-compat upgrade-net-text / upgrade-net-binary / upgrade-solver-text IN OUT``.

Caffe's ``upgrade_net_proto_text``, ``upgrade_net_proto_binary`` and
``upgrade_solver_proto_text``: OUT is always written (a copy when IN is already current).
As in Caffe, problems that the upgrade logs but goes past (a V0 parameter a layer type
cannot take, dropped) still write OUT and exit 1; unparsable input exits 2.
"""
from __future__ import annotations

import sys

import click

from caffe_compat.cli.main import friendly, main, writes


def _report(src: str, dst: str, out, kind: str) -> None:
    """Caffe's messages, in words: what was upgraded, or that nothing needed to be."""
    for note in out.notes:
        click.echo(f"note: {note}", err=True)
    for problem in out.problems:
        click.echo(f"warning: {problem}", err=True)
    if out.up_to_date:
        how = "copied as is" if out.copied else "written unchanged"
        click.echo(f"{src}: already up to date (latest {kind} format); {how} to {dst}")
    else:
        click.echo(f"upgraded {src}:")
        for line in out.lines:
            click.echo(f"  {line}")
        click.echo(f"wrote {dst}")
    if not out.success:
        click.echo(f"error: {len(out.problems)} problem(s) while upgrading (see the warnings "
                   f"above); {dst} was written anyway, as Caffe does", err=True)
        sys.exit(1)


def _check_input(path: str, what: str) -> None:
    import os

    from caffe_compat.errors import ParseError

    if not os.path.exists(path):
        raise ParseError(f"{what} not found", where=path)


@main.command("upgrade-net-text")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("dst", metavar="OUT", type=click.Path(dir_okay=False))
@writes("dst")
@friendly
def upgrade_net_text_command(src: str, dst: str) -> None:
    """Upgrade a V0/V1 (or input-field, old BatchNorm) net prototxt IN to the current format."""
    from caffe_compat.upgrade_files import upgrade_net_text_file

    _check_input(src, "net prototxt")
    _report(src, dst, upgrade_net_text_file(src, dst), "NetParameter")


@main.command("upgrade-net-binary")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("dst", metavar="OUT", type=click.Path(dir_okay=False))
@writes("dst")
@friendly
def upgrade_net_binary_command(src: str, dst: str) -> None:
    """Upgrade a binary NetParameter (a .caffemodel) IN; blob payloads are streamed, not parsed."""
    from caffe_compat.upgrade_files import upgrade_net_binary_file

    _check_input(src, "binary NetParameter")
    _report(src, dst, upgrade_net_binary_file(src, dst), "NetParameter")


@main.command("upgrade-solver-text")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("dst", metavar="OUT", type=click.Path(dir_okay=False))
@writes("dst")
@friendly
def upgrade_solver_text_command(src: str, dst: str) -> None:
    """Upgrade a solver prototxt IN (``solver_type: SGD`` -> ``type: "SGD"``)."""
    from caffe_compat.upgrade_files import upgrade_solver_text_file

    _check_input(src, "solver prototxt")
    _report(src, dst, upgrade_solver_text_file(src, dst), "SolverParameter")
