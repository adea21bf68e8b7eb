"""``caffe-compat run SCRIPT.py [ARGS...]``: run a legacy pycaffe script unchanged.

The script runs as ``__main__`` with ``sys.argv = [SCRIPT.py, ARGS...]`` and ``import caffe``
(``caffe.proto.caffe_pb2``, ``caffe.io``, ...) resolved to :mod:`caffe_compat.pycaffe`.
If a real Caffe is importable, the run is refused unless ``--shadow`` is given (a real
Caffe is never replaced silently); ``--no-shadow`` runs the script without aliasing.
Options for caffe-compat come before SCRIPT.py; everything after it goes to the script.
"""
from __future__ import annotations

import click

from caffe_compat.cli.main import friendly, main


@main.command("run", context_settings={"ignore_unknown_options": True,
                                       "allow_interspersed_args": False})
@click.option("--shadow/--no-shadow", default=None,
              help="Shadow a real Caffe with caffe-compat's pycaffe for this run (--shadow), or "
                   "do not alias 'caffe' at all (--no-shadow).  Default: alias unless a real "
                   "Caffe is importable, in which case refuse.  Env: CAFFE_COMPAT_SHADOW=1/0.")
@click.argument("script", type=click.Path(dir_okay=False))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@friendly
def run_command(shadow, script, args):
    """Run SCRIPT.py (a pycaffe script) with `import caffe` resolved to caffe-compat."""
    from caffe_compat.pycaffe.runner import run_script

    run_script(script, list(args), shadow=shadow)
