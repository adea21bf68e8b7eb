"""Options shared by the commands, defined once (click decorators) with their parsing.

* :func:`gpu_option` -- ``--gpu ID``, resolved by :func:`caffe_compat.device.resolve_device`
  (one rule and one error for every command);
* :func:`cfg_options` and :func:`config_scope` -- py-faster-rcnn's ``--cfg FILE`` and
  ``--set KEY VALUE`` (plus trailing ``KEY VALUE`` words), under the library's one parse
  and restore policy (:func:`caffe_compat.frcnn.config.command_cfg`);
* :func:`input_shape_option` -- ``--input-shape NAME=D1,D2,...`` parsed into a dict;
* :func:`phase_option`, :func:`state_options` -- a net's phase, ``--stage``/``--level``;
* :func:`python_layers_option` -- ``--allow-python-layers``;
* :func:`check_file` -- an input file's existence, named by its flag.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, ContextManager, Dict, Optional, Sequence, Tuple, TypeVar

import click

__all__ = ["gpu_option", "cfg_options", "config_scope", "input_shape_option", "parse_input_shapes",
           "phase_option", "state_options", "python_layers_option", "check_file", "SET_HELP",
           "extra_args", "precision_option", "batch_option", "gpus_options"]

F = TypeVar("F", bound=Callable[..., Any])

SET_HELP = ("Config overrides: --set KEY VALUE [KEY VALUE ...] as py-faster-rcnn's --set (trailing "
            "KEY VALUE words count too); values are Python literals, e.g. TRAIN.SCALES '(400,)'.")

#: context settings of a command that takes trailing ``KEY VALUE`` words after ``--set``
extra_args: Dict[str, bool] = {"ignore_unknown_options": True, "allow_extra_args": True}


def _apply(fn: F, opts: Sequence[Callable[[F], F]]) -> F:
    for o in reversed(opts):
        fn = o(fn)
    return fn


def gpu_option(help: str = "CUDA device id (default: the CPU).") -> Callable[[F], F]:
    """``--gpu ID`` -> the parameter ``gpu`` (an int or None); resolve it with
    :func:`caffe_compat.device.resolve_device`."""
    return click.option("--gpu", "gpu", type=int, default=None, help=help)


def cfg_options(fn: Optional[F] = None, *, trailing: bool = True) -> Any:
    """``--cfg FILE`` and ``--set KEY VALUE`` -> the parameters ``cfg_file`` and ``set_pairs``
    (checked and applied by :func:`config_scope`).  ``trailing``: the command also takes
    ``KEY VALUE`` words after ``--set`` (``context_settings=extra_args``; not for commands
    whose positional arguments are variadic).  Use as ``@cfg_options`` or
    ``@cfg_options(trailing=False)``."""
    if fn is None:
        return lambda f: cfg_options(f, trailing=trailing)
    more = "; trailing KEY VALUE words count too" if trailing else ""
    return _apply(fn, [
        click.option("--cfg", "cfg_file", type=click.Path(dir_okay=False),
                     help="py-faster-rcnn config YAML (e.g. experiments/cfgs/faster_rcnn_end2end.yml)."),
        click.option("--set", "set_pairs", nargs=2, multiple=True, metavar="KEY VALUE",
                     help=f"Override a config key (repeatable{more})."),
    ])


def config_scope(cfg_file: Optional[str], set_pairs: Sequence[Tuple[str, str]], extra: Sequence[str] = (),
                 gpu: Optional[int] = None, *, frcnn: bool = True) -> ContextManager[Any]:
    """py-faster-rcnn's config for one command (:func:`caffe_compat.frcnn.config.command_cfg`:
    ``--cfg``, ``--set`` and ``--gpu``, in force inside the ``with`` block, restored after
    it; it yields the config).  A plain Caffe command (``frcnn=False``) given none of them
    gets an empty scope and never loads ``caffe_compat.frcnn``."""
    if not (frcnn or cfg_file or set_pairs or extra):
        return contextlib.nullcontext()
    from caffe_compat.frcnn.config import command_cfg

    return command_cfg(cfg_file, set_pairs, extra, gpu_id=gpu)


def parse_input_shapes(specs: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """``["data=1,3,224,224", ...]`` -> ``{"data": (1, 3, 224, 224)}``.

    Each spec needs a name, ``=`` and non-negative integer dimensions; a name given twice is
    refused.  Whether the name is an input of the net is checked when the net is built
    (``Net(input_shapes=...)``: an error listing the net's inputs)."""
    from caffe_compat.errors import SchemaError

    shapes: Dict[str, Tuple[int, ...]] = {}
    for spec in specs:
        shown = spec if len(spec) <= 80 else spec[:80] + "..."
        name, eq, dims = spec.partition("=")
        name = name.strip()
        try:
            if not name or not eq:
                raise ValueError
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise SchemaError(f"bad --input-shape '{shown}'; expected NAME=D1,D2,... "
                              "(e.g. data=1,3,224,224)") from None
        if any(d < 0 for d in shape):
            raise SchemaError(f"bad --input-shape '{shown}': dimensions must not be negative")
        if name in shapes:
            raise SchemaError(f"--input-shape gives '{name[:80]}' twice")
        shapes[name] = shape
    return shapes


def input_shape_option(help: str = "Input blob shape (repeatable).") -> Callable[[F], F]:
    """``--input-shape NAME=D1,D2,...`` (repeatable) -> the parameter ``input_shapes``, a
    dict parsed when the command runs (a bad one is the command's one-line error)."""
    return click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...",
                        help=help)


def phase_option(default: str = "test", help: Optional[str] = None) -> Callable[[F], F]:
    """``--phase train|test`` -> the parameter ``phase``."""
    return click.option("--phase", type=click.Choice(["train", "test"], case_sensitive=False),
                        default=default, show_default=True, help=help or "Net phase.")


def state_options(fn: F) -> F:
    """``--stage`` (repeatable) and ``--level`` of the net state -> ``stages``, ``level``."""
    return _apply(fn, [
        click.option("--stage", "stages", multiple=True, help="Net state stage (repeatable)."),
        click.option("--level", type=int, default=None, help="Net state level."),
    ])


def python_layers_option(help: str = "Allow importing the modules of unregistered Python layers."
                         ) -> Callable[[F], F]:
    """``--allow-python-layers`` (or ``CAFFE_COMPAT_ALLOW_PYTHON_LAYERS``)."""
    return click.option("--allow-python-layers", is_flag=True, envvar="CAFFE_COMPAT_ALLOW_PYTHON_LAYERS",
                        help=help)


def precision_option(help: str = "Arithmetic: fp32 (Caffe's numbers), tf32 (TensorFloat-32 on "
                     "Ampere+ GPUs; no change on the CPU), bf16 (autocast; CUDA or CPU), fp16 "
                     "(autocast, loss scaling when training; CUDA only).") -> Callable[[F], F]:
    """``--precision fp32|tf32|bf16|fp16`` -> the parameter ``precision`` (checked against
    the device by :func:`caffe_compat.precision.check_precision`)."""
    return click.option("--precision", "precision", type=click.Choice(["fp32", "tf32", "bf16", "fp16"],
                        case_sensitive=False), default="fp32", show_default=True, help=help)


def batch_option(help: str = "Images per forward: consecutive images of the same resized shape "
                 "share one (the same detections as 1; others run alone).") -> Callable[[F], F]:
    """``--batch N`` (N >= 1) -> the parameter ``batch``."""
    return click.option("--batch", "batch", type=click.IntRange(min=1), default=1, show_default=True,
                        help=help)


def compile_option(fn: F) -> F:
    """``--compile BACKEND`` -> the parameter ``compile_backend`` (None: eager)."""
    return click.option("--compile", "compile_backend", default=None, metavar="BACKEND",
                        help="Run forwards through torch.compile with this backend (e.g. inductor); "
                             "falls back to eager with a warning if compiling fails.")(fn)


def speed_options(fn: F) -> F:
    """``--cuda-graphs/--no-cuda-graphs`` (parameter ``cuda_graphs``) and ``--compile BACKEND``
    (parameter ``compile_backend``): the GPU inference path's switches
    (:func:`caffe_compat.cuda_graph.fast_runner`)."""
    return _apply(fn, [
        click.option("--cuda-graphs/--no-cuda-graphs", "cuda_graphs", default=True, show_default=True,
                     help="On CUDA, replay the layers before the first one needing the host (a "
                          "detector's trunk and RPN) as CUDA graphs, one per image shape."),
        compile_option,
    ])


def check_file(path: Optional[str], what: str, flag: str) -> str:
    """``path`` if it is a file, else a clear error naming the flag."""
    from caffe_compat.errors import DataError, WeightsError

    if not path:
        raise DataError(f"{flag} is required: {what}")
    if not os.path.isfile(path):
        cls = WeightsError if flag == "--weights" else DataError
        raise cls(f"{what} not found ({flag})", where=path)
    return path


def gpus_options(fn: F) -> F:
    """``--gpus 0,1|all|cpu:N`` (one process per device, :mod:`caffe_compat.distributed`),
    ``--dist-timeout S`` and ``--sync-batchnorm`` -> ``gpus``, ``dist_timeout``,
    ``sync_batchnorm`` (resolved by :func:`caffe_compat.distributed.resolve_gpus`)."""
    return _apply(fn, [
        click.option("--gpus", "gpus", default=None, metavar="IDS|all|cpu:N",
                     help="One process per device: CUDA ids (0,1,2,3), all (Caffe's -gpu all), or "
                          "cpu:N (N CPU processes, gloo). Under torchrun: the devices of LOCAL_RANK "
                          "0, 1, ... (default: cuda:LOCAL_RANK, else the CPU)."),
        click.option("--dist-timeout", "dist_timeout", type=float, default=300.0, show_default=True,
                     help="Seconds a process waits for the others before the run fails, naming "
                          "the rank that did not answer."),
        click.option("--sync-batchnorm", "sync_batchnorm", is_flag=True,
                     help="BatchNorm in train mode uses the statistics of all processes' batches "
                          "(default: each process's own, as Caffe)."),
    ])
