"""``caffe-compat test``: score a net, as py-faster-rcnn's ``tools/test_net.py`` or ``caffe test``.

* With ``--imdb NAME``: detection testing (:func:`caffe_compat.frcnn.test.test_imdb`):
  detect on every image of the data set, evaluate (per-class AP and mAP), cache the
  detections as ``.npz``.
* Without: Caffe's ``caffe test --model NET --weights W --iterations N``
  (:func:`caffe_compat.score.caffe_test`).

``--imdb ... --gpus 0,1|all|cpu:N`` tests with one process per device
(:mod:`caffe_compat.distributed`): each takes a share of the images, rank 0 gathers the
detections and evaluates once (under torchrun: one rank per worker).
"""
from __future__ import annotations

from typing import Any, Mapping

import click

from caffe_compat.cli.main import friendly, main, writes
from caffe_compat.cli.options import (batch_option, cfg_options, check_file, config_scope, extra_args,
                                      gpu_option, gpus_options, precision_option, python_layers_option,
                                      speed_options, state_options)

__all__ = ["echo_ap"]


def echo_ap(result: Mapping[str, Any]) -> None:
    """Print a detection evaluation: AP per class, mean AP, where the results are."""
    from caffe_compat.frcnn.test import format_ap

    for cls, ap in result["ap"].items():
        click.echo(f"AP for {cls} = {format_ap(ap)}")
    if "mAP" in result:
        click.echo(f"Mean AP = {format_ap(result['mAP'])}")
    click.echo(f"Results in {result['output_dir']}")


@main.command("test", context_settings=extra_args)
@click.option("--model", "--def", "model", required=True, type=click.Path(dir_okay=False),
              help="Net definition (the TEST net).")
@click.option("--weights", "--net", "weights", type=click.Path(dir_okay=False),
              help="Trained weights (.caffemodel, .pt or .safetensors).")
@click.option("--imdb", "imdb_name", default=None,
              help="Data set to detect on (e.g. voc_2007_test): py-faster-rcnn detection testing. "
                   "Without it: Caffe's `caffe test`.")
@cfg_options
@gpu_option()
@click.option("--comp", "comp_mode", is_flag=True, help="Competition mode (keep result files, no salt).")
@click.option("--max-per-image", "--num_dets", "max_per_image", type=int, default=100, show_default=True,
              help="Most detections per image over all classes (<= 0: no limit).")
@click.option("--thresh", type=float, default=0.05, show_default=True,
              help="Per-class score threshold before NMS.")
@click.option("--vis", is_flag=True, help="Also write each image with its detections to OUTPUT/vis.")
@click.option("--output", "output_dir", type=click.Path(file_okay=False),
              help="Where detections and evaluation go (default: output/<EXP_DIR>/<imdb>/<net>).")
@click.option("--proposals", "rpn_file", type=click.Path(dir_okay=False),
              help="Proposal file for TEST.PROPOSAL_METHOD rpn (from `caffe-compat rpn-generate`).")
@click.option("--iterations", "-n", type=int, default=50, show_default=True,
              help="Caffe mode: number of forward passes.")
@batch_option("--imdb mode: images per forward (consecutive images of one resized shape share "
              "one; the same detections as 1).")
@precision_option()
@speed_options
@state_options
@python_layers_option()
@gpus_options
@click.pass_context
@writes("output_dir")
@friendly
def test_command(ctx, model, weights, imdb_name, cfg_file, set_pairs, gpu, comp_mode, max_per_image,
                 thresh, vis, output_dir, rpn_file, iterations, batch, precision, cuda_graphs, compile_backend,
                 stages, level, allow_python_layers, gpus, dist_timeout, sync_batchnorm):
    """Test MODEL with WEIGHTS: detection mAP on --imdb, or Caffe's averaged outputs."""
    import contextlib
    import os
    import sys

    from caffe_compat.device import resolve_device
    from caffe_compat.distributed import launch, resolve_gpus
    from caffe_compat.errors import SchemaError

    check_file(model, "net definition", "--model")
    check_file(weights, "weights file (a trained model is needed to score)", "--weights")
    devices, dist = resolve_gpus(gpus, gpu, os.environ if imdb_name else {}, timeout_s=dist_timeout)
    if devices is not None and not imdb_name:
        raise SchemaError("--gpus shards the images of --imdb; Caffe's `caffe test` runs on one device (--gpu)")
    if dist is None and devices is not None:   # several devices: start one worker per device
        launch(sys.argv[1:], len(devices), timeout_s=dist_timeout)
        return
    main_rank = dist is None or dist.is_main
    say = click.echo if main_rank else (lambda *a, **k: None)
    with (dist.session() if dist is not None else contextlib.nullcontext()), \
            config_scope(cfg_file, set_pairs, ctx.args, gpu, frcnn=bool(imdb_name)):
        device = resolve_device(gpu) if dist is None else dist.device
        if imdb_name:
            from caffe_compat.frcnn.test import test_imdb

            result = test_imdb(model, weights, imdb_name, device=device, comp_mode=comp_mode,
                               max_per_image=max_per_image, thresh=thresh, vis=vis,
                               output_dir=output_dir, rpn_file=rpn_file, stages=stages, level=level,
                               allow_python_layers=allow_python_layers or None, batch=batch,
                               precision=precision, log_fn=say,
                               note_fn=lambda line: say(line, err=True), dist=dist,
                               cuda_graphs=cuda_graphs, compile_backend=compile_backend)
            if main_rank:
                echo_ap(result)
        else:
            from caffe_compat.net import Net
            from caffe_compat.score import caffe_test

            click.echo("Use CPU." if device.type == "cpu" else f"Use GPU with device ID {device.index}")
            net = Net(model, phase="test", stages=stages, level=level, device=device,
                      allow_python_layers=allow_python_layers or None)
            for note in net.load_weights(weights):
                click.echo(f"note: {note}", err=True)
            from caffe_compat.precision import inference_precision
            with inference_precision(net, precision):
                caffe_test(net, iterations, click.echo)
