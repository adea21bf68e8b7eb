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
    from caffe_compat.cli import convert, inspect_cmd, synthetic_voc  # noqa: F401


_register()
