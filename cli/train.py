"""``caffe-compat train`` and ``caffe-compat train-alt-opt``: Caffe's and py-faster-rcnn's training.

``train`` is ``caffe train`` (:mod:`caffe_compat.trainer`) for nets that read their own data
layers, and py-faster-rcnn's ``tools/train_net.py`` (:mod:`caffe_compat.frcnn.train`) for
nets with its ``RoIDataLayer``; ``train-alt-opt`` follows
``tools/train_faster_rcnn_alt_opt.py``.  As there, ``--set KEY VALUE ...`` takes config
overrides (``--set EXP_DIR foo TRAIN.SCALES "(400,)"``), in force for the command only.
Exit status: 0 when training finished, 130/143 when SIGINT/SIGTERM stopped it (after
writing a snapshot), 1 or 2 on errors.

``--gpus 0,1|all|cpu:N`` trains with one process per device (Caffe's ``-gpu 0,1`` / ``all``;
:mod:`caffe_compat.distributed`): this process starts the workers (torchrun's launcher) and
waits; each worker runs this same command with torchrun's RANK/WORLD_SIZE/LOCAL_RANK, as
``torchrun --nnodes N --nproc_per_node G -m caffe_compat.cli train ...`` runs it on many
machines.
"""
from __future__ import annotations

import contextlib
import logging
import sys

import click

from caffe_compat.cli.main import friendly, main, writes
from caffe_compat.cli.options import (SET_HELP, cfg_options, compile_option, config_scope, extra_args,
                                      gpu_option, gpus_options, precision_option)
_EXIT_FOR_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


def _uses_roidb(param) -> bool:
    """Whether the solver's train net has py-faster-rcnn's ``RoIDataLayer`` (then py-faster-rcnn
    trains it).  Only a net that names one of py-faster-rcnn's Python layers loads
    ``caffe_compat.frcnn`` to find out; plain nets never do."""
    from caffe_compat.layers.registry import PYTHON_PROVIDERS
    from caffe_compat.trainer import train_net_param

    net = train_net_param(param)
    keys = [f"{lp.python_param.module}.{lp.python_param.layer}" for lp in net.layer
            if lp.type == "Python"] if net is not None else []
    if not any(PYTHON_PROVIDERS.get(k, "").startswith("caffe_compat.frcnn.") for k in keys):
        return False
    from caffe_compat.frcnn.train import net_uses_roidb

    return net_uses_roidb(param)


def _common(fn):
    """Options shared by both commands."""
    opts = [
        click.option("--weights", "pretrained_model", type=click.Path(dir_okay=False),
                     help="Initialize with pretrained model weights (layers it lacks keep their fillers)."),
        cfg_options,
        click.option("--imdb", "imdb_name", default="voc_2007_trainval", show_default=True,
                     help="Data set to train on ('a+b' joins several)."),
        gpu_option(),
        click.option("--rand", "randomize", is_flag=True,
                     help="Randomize (do not seed from cfg.RNG_SEED)."),
        click.option("--output", "output_dir", type=click.Path(file_okay=False),
                     help="Output folder (default: ROOT/output/<EXP_DIR>/<imdb>, py-faster-rcnn's)."),
        click.option("--format", "fmt", default="caffemodel", show_default=True,
                     type=click.Choice(["caffemodel", "safetensors", "both"], case_sensitive=False),
                     help="Snapshot weights format(s)."),
        click.option("--progress/--no-progress", default=True, show_default=True,
                     help="Progress bar with ETA on a terminal (plain progress lines otherwise)."),
        gpus_options,
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _report(result, what: str = "training") -> None:
    if result.loss_curve:
        click.echo(f"loss curve: {result.loss_curve}")
    if result.signal:
        click.echo(f"{what} stopped by {result.signal} at iteration {result.iterations}; snapshot: "
                   f"{result.final_model}")
    elif result.final_model:
        click.echo(f"final model: {result.final_model}")
    else:
        click.echo(f"nothing to train: the solver is already at iteration {result.iterations}")


@main.command("train", context_settings=extra_args,
              epilog=SET_HELP)
@click.option("--solver", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Solver prototxt (its net paths are relative to the current directory, as in Caffe).")
@click.option("--snapshot", "resume", type=click.Path(dir_okay=False, exists=True),
              help="Resume from a .solverstate written by an earlier run.")
@click.option("--iters", "max_iters", type=click.IntRange(min=0), default=None,
              help="Iterations to train (default: the solver's max_iter; py-faster-rcnn: 40000).")
@_common
@precision_option()
@compile_option
@click.pass_context
@writes("output_dir")
@friendly
def train_command(ctx, solver, resume, max_iters, pretrained_model, cfg_file, set_pairs, imdb_name,
                  gpu, randomize, output_dir, fmt, progress, gpus, dist_timeout, sync_batchnorm, precision,
                  compile_backend):
    """Train a net from a solver prototxt (tools/train_net.py; `caffe train` for plain nets)."""
    import os

    from caffe_compat.distributed import launch, resolve_gpus

    if resume and pretrained_model:
        raise click.UsageError("give --snapshot to resume training or --weights to fine-tune, not both "
                               "(as caffe train)")
    devices, dist = resolve_gpus(gpus, gpu, os.environ, timeout_s=dist_timeout,
                                 sync_batchnorm=sync_batchnorm)
    if dist is None and devices is not None:   # --gpus with several devices: start the workers
        launch(sys.argv[1:], len(devices), timeout_s=dist_timeout)
        return
    with (dist.session() if dist is not None else contextlib.nullcontext()):
        _train(ctx, solver, resume, max_iters, pretrained_model, cfg_file, set_pairs, imdb_name, gpu,
               randomize, output_dir, fmt, progress, precision, dist, compile_backend)


def _train(ctx, solver, resume, max_iters, pretrained_model, cfg_file, set_pairs, imdb_name, gpu,
           randomize, output_dir, fmt, progress, precision, dist, compile_backend=None) -> None:
    """The training itself (one process, or one rank of a distributed run: ``dist``)."""
    from caffe_compat.device import resolve_device
    from caffe_compat.distributed import worker_logging
    from caffe_compat.progress import setup_logging
    from caffe_compat.trainer import load_solver_param, parse_formats, train_plain

    setup_logging()
    if dist is not None:
        worker_logging(dist)
    log = logging.getLogger("caffe_compat.train")
    log.info("Called with args: solver=%s weights=%s snapshot=%s iters=%s imdb=%s cfg=%s set=%s "
             "gpu=%s rand=%s output=%s format=%s", solver, pretrained_model, resume, max_iters,
             imdb_name, cfg_file, [v for p in set_pairs for v in p] + list(ctx.args), gpu,
             randomize, output_dir, fmt)
    frcnn = _uses_roidb(load_solver_param(solver))
    with config_scope(cfg_file, set_pairs, ctx.args, gpu, frcnn=frcnn):
        device = resolve_device(gpu) if dist is None else dist.device
        formats = parse_formats(fmt)
        if frcnn:
            from caffe_compat.frcnn.train import train_from_solver

            result = train_from_solver(solver, imdb_name, pretrained_model=pretrained_model,
                                       resume=resume, max_iters=max_iters, device=device,
                                       formats=formats, randomize=randomize, output_dir=output_dir,
                                       progress=progress, precision=precision.lower(), dist=dist,
                                       compile_backend=compile_backend)
        else:
            result = train_plain(solver, weights=pretrained_model, resume=resume, max_iter=max_iters,
                                 device=device, formats=formats, output_dir=output_dir,
                                 progress=progress, precision=precision.lower(), dist=dist,
                                 compile_backend=compile_backend)
    if dist is None or dist.is_main:
        _report(result)
    if result.signal:
        sys.exit(_EXIT_FOR_SIGNAL.get(result.signal, 1))


@main.command("train-alt-opt", context_settings=extra_args,
              epilog=SET_HELP)
@click.option("--net_name", "--net-name", "net_name", required=True,
              help="Network name (ZF -> MODELS_DIR/ZF/faster_rcnn_alt_opt) or the folder of the "
                   "stage prototxts (stage1_rpn_train.pt, ..., rpn_test.pt).")
@click.option("--iters", "iters", default=None,
              help="Iterations per stage: one number or four (e.g. 80000,40000,80000,40000, the default).")
@click.option("--iters-scale", "iters_scale", type=float, default=None,
              help="Multiply the iterations of every stage (e.g. 0.001 for a smoke test).")
@_common
@click.pass_context
@writes("output_dir")
@friendly
def train_alt_opt_command(ctx, net_name, iters, iters_scale, pretrained_model, cfg_file, set_pairs,
                          imdb_name, gpu, randomize, output_dir, fmt, progress, gpus, dist_timeout,
                          sync_batchnorm):
    """Train Faster R-CNN by alternating optimization (tools/train_faster_rcnn_alt_opt.py)."""
    import os
    import pprint

    from caffe_compat.device import resolve_device
    from caffe_compat.distributed import launch, resolve_gpus, worker_logging
    from caffe_compat.frcnn.alt_opt import train_alt_opt
    from caffe_compat.progress import setup_logging
    from caffe_compat.trainer import parse_formats

    devices, dist = resolve_gpus(gpus, gpu, os.environ, timeout_s=dist_timeout,
                                 sync_batchnorm=sync_batchnorm)
    if dist is None and devices is not None:   # --gpus with several devices: start the workers
        launch(sys.argv[1:], len(devices), timeout_s=dist_timeout)
        return
    setup_logging()
    if dist is not None:
        worker_logging(dist)
    log = logging.getLogger("caffe_compat.train")
    with (dist.session() if dist is not None else contextlib.nullcontext()), \
            config_scope(cfg_file, set_pairs, ctx.args, gpu) as cfg:
        device = resolve_device(gpu) if dist is None else dist.device
        log.info("Using config:\n%s", pprint.pformat(dict(cfg)))
        res = train_alt_opt(net_name, imdb_name, pretrained_model=pretrained_model, iters=iters,
                            iters_scale=iters_scale, output_dir=output_dir, device=device,
                            formats=parse_formats(fmt), randomize=randomize, progress=progress,
                            dist=dist)
    if dist is not None and not dist.is_main:
        if res.interrupted:
            sys.exit(_EXIT_FOR_SIGNAL.get(res.signal or "", 1))
        return
    for stage, path in res.stage_models.items():
        click.echo(f"{stage}: {path}")
    for stage, path in res.proposals.items():
        click.echo(f"{stage} proposals: {path}")
    if res.interrupted:
        click.echo(f"stopped by {res.signal} during {res.interrupted}")
        sys.exit(_EXIT_FOR_SIGNAL.get(res.signal or "", 1))
    click.echo(f"final model: {res.final_model}")


@main.command("rpn-generate", context_settings=extra_args,
              epilog=SET_HELP)
@click.option("--def", "prototxt", required=True, type=click.Path(dir_okay=False, exists=True),
              help="RPN test prototxt (e.g. faster_rcnn_alt_opt/rpn_test.pt; tops 'rois' and 'scores').")
@click.option("--net", "caffemodel", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Trained RPN weights.")
@cfg_options
@click.option("--imdb", "imdb_name", default="voc_2007_test", show_default=True,
              help="Data set whose images get proposals.")
@gpu_option()
@click.option("--output", "output_dir", type=click.Path(file_okay=False),
              help="Output folder (default: ROOT/output/<EXP_DIR>/<imdb>/<net name>).")
@click.pass_context
@writes("output_dir")
@friendly
def rpn_generate_command(ctx, prototxt, caffemodel, cfg_file, set_pairs, imdb_name, gpu, output_dir):
    """Write RPN proposals for every image of a data set (tools/rpn_generate.py), as .npz.

    Use them with TRAIN/TEST.PROPOSAL_METHOD rpn (the imdb's rpn_file)."""
    from caffe_compat.device import resolve_device
    from caffe_compat.frcnn.alt_opt import rpn_generate_tool
    from caffe_compat.progress import setup_logging

    setup_logging()
    with config_scope(cfg_file, set_pairs, ctx.args, gpu):
        path = rpn_generate_tool(imdb_name, caffemodel, prototxt, output_dir=output_dir,
                                 device=resolve_device(gpu))
    click.echo(f"wrote RPN proposals to {path}")
