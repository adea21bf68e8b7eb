"""The ``caffe-compat`` command line.

Every command turns a ``CaffeCompatError`` into one line on stderr and a non-zero exit
(2 for bad input, 1 for failures at run time); ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import functools
import os
import sys

import click

from caffe_compat.errors import CaffeCompatError


class Context:
    debug = False


def friendly(fn):
    """Wrap a command: CaffeCompatError -> one line and an exit code, unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CaffeCompatError as e:
            if Context.debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="caffe-compat")
def main(debug: bool) -> None:
    """Run legacy Caffe models (prototxt + caffemodel) on PyTorch."""
    Context.debug = debug or os.environ.get("CAFFE_COMPAT_DEBUG", "") not in ("", "0")


def _register() -> None:
    """Import every command module of this package (each attaches itself to ``main``)."""
    import importlib
    import pkgutil

    import caffe_compat.cli as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("main", "__main__"):
            importlib.import_module(f"caffe_compat.cli.{info.name}")


_register()
