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


def error_line(e: BaseException) -> str:
    """One line for an error: the CaffeCompatError's message, or what a bug looks like."""
    if isinstance(e, CaffeCompatError):
        return "error: " + e.one_line()
    from caffe_compat.layers.python import python_layer_note

    note = python_layer_note(e)
    if note is not None:  # the user's own layer code raised: their error, not ours
        text = " ".join(str(e).split())[:300]
        return f"error: {type(e).__name__}: {text} ({note})"
    if isinstance(e, MemoryError):
        return "error: out of memory (input too large? see caffe_compat.limits)"
    if isinstance(e, OSError):
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return f"error: {where}{e.strerror or e}"
    text = " ".join(str(e).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return (f"internal error: {type(e).__name__}: {text} "
            "(a bug in caffe-compat; rerun with --debug for the traceback and report it)")


def exit_code_for(e: BaseException) -> int:
    """2 for bad input (CaffeCompatError default), 1 for run-time failures (a user Python
    layer's own exception included) and bugs."""
    return e.exit_code if isinstance(e, CaffeCompatError) else 1


def friendly(fn):
    """Wrap a command: errors -> ONE line on stderr and an exit code, unless --debug.

    ``CaffeCompatError`` exits with its ``exit_code`` (2 bad input, 1 failed run); an
    ``OSError`` at run time (disk full, permissions) and any other exception (a bug)
    exit 1.  Click's own usage errors and ``sys.exit`` pass through untouched.
    With ``--debug`` (or ``CAFFE_COMPAT_DEBUG=1``) the exception propagates with its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort,
                SystemExit):
            raise
        except KeyboardInterrupt:
            if Context.debug:
                raise
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:
            if Context.debug:
                raise
            click.echo(error_line(e), err=True)
            sys.exit(exit_code_for(e))

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="caffe-compat")
def main(debug: bool) -> None:
    """Run legacy Caffe models (prototxt + caffemodel) on PyTorch."""
    Context.debug = debug or os.environ.get("CAFFE_COMPAT_DEBUG", "") not in ("", "0")


def writes(*names: str):
    """Mark a command's path parameters that it writes (files or folders); every other
    path parameter is an input it must not write over (:func:`_add_input_protection`)."""
    def deco(fn):
        fn.caffe_compat_writes = tuple(names)
        return fn
    return deco


def _role(p: click.Parameter) -> str:
    if isinstance(p, click.Option):
        return max(p.opts, key=len)
    return (p.metavar or p.name or "argument").upper()


def _add_input_protection(cmd: click.Command) -> None:
    """Every file a command reads -- its path parameters, less those marked with
    :func:`writes` -- is protected for the run (``caffe_compat.atomic.protect_inputs``): an
    output named like an input (the same path, a symlink or a hard link) is refused before
    any work, and every write the command makes is checked again before it starts.  One
    place, so no command can miss it."""
    if cmd.callback is None:
        return
    inner = cmd.callback
    outputs = set(getattr(inner, "caffe_compat_writes", ()))

    @friendly
    @functools.wraps(inner)
    def callback(*args, **kwargs):
        from caffe_compat.atomic import protect_inputs, refuse_overwriting_inputs

        ins, outs = [], []
        for p in cmd.params:
            if not isinstance(p.type, click.Path) or kwargs.get(p.name) is None:
                continue
            value = kwargs[p.name]
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                (outs if p.name in outputs else ins).append((_role(p), os.fspath(v)))
        for role, path in outs:
            refuse_overwriting_inputs(path, ins, what=role)
        with protect_inputs(ins):
            return inner(*args, **kwargs)

    cmd.callback = callback


def _register() -> None:
    """Import every command module of this package (each attaches itself to ``main``)."""
    import importlib
    import pkgutil

    import caffe_compat.cli as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("main", "__main__"):
            importlib.import_module(f"caffe_compat.cli.{info.name}")
    for cmd in main.commands.values():
        _add_schema_option(cmd)
        _add_input_protection(cmd)


def _add_schema_option(cmd: click.Command) -> None:
    """``--schema FORK.proto`` on every command: net definitions it reads may use the fork's
    fields (``caffe_compat.proto_schema``).  One place, so no command can miss it."""
    if any(p.name == "schema" for p in cmd.params) or cmd.callback is None:
        return
    cmd.params.append(click.Option(
        ["--schema"], type=click.Path(dir_okay=False), default=None,
        help="A fork's caffe.proto whose extra messages and fields the definitions use."))
    inner = cmd.callback

    @friendly
    @functools.wraps(inner)
    def callback(*args, schema=None, **kwargs):
        if schema is None:
            return inner(*args, **kwargs)
        from caffe_compat.proto_schema import use_schema

        with use_schema(schema):  # a bad schema file is one clear error, like any input
            return inner(*args, **kwargs)

    cmd.callback = callback


_register()
