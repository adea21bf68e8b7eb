"""``caffe-compat reval OUTPUT_DIR``: py-faster-rcnn's ``tools/reval.py``.

Re-evaluates the detections a ``caffe-compat test --imdb ...`` run saved in OUTPUT_DIR
(``detections.npz``; py-faster-rcnn's ``detections.pkl`` is read safely too) without
running the net again, optionally re-applying NMS at ``TEST.NMS`` (``--nms``).  Prints
per-class AP and the mean AP as ``test`` does.  There is no MATLAB evaluation here.
"""
from __future__ import annotations

import click

from caffe_compat.cli.main import friendly, main, writes
from caffe_compat.cli.options import cfg_options, config_scope, extra_args
from caffe_compat.cli.test import echo_ap


@main.command("reval", context_settings=extra_args)
@click.argument("output_dir", type=click.Path())
@click.option("--imdb", "imdb_name", default="voc_2007_test", show_default=True,
              help="Data set the detections were made on.")
@click.option("--nms", "apply_nms", is_flag=True, help="Apply NMS (at TEST.NMS) to the detections again.")
@click.option("--comp", "comp_mode", is_flag=True, help="Competition mode (keep result files, no salt).")
@click.option("--matlab", "matlab_eval", is_flag=True, hidden=True,
              help="py-faster-rcnn's MATLAB evaluation (not supported: refused with a clear error).")
@cfg_options
@click.pass_context
@writes("output_dir")
@friendly
def reval_command(ctx, output_dir, imdb_name, apply_nms, comp_mode, matlab_eval, cfg_file, set_pairs):
    """Evaluate the detections saved in OUTPUT_DIR by `test` again (no net needed)."""
    from caffe_compat.frcnn.datasets.factory import get_imdb
    from caffe_compat.frcnn.reval import find_detections, reval

    find_detections(output_dir)            # a wrong folder is the likelier mistake: say so first
    with config_scope(cfg_file, set_pairs, ctx.args):
        imdb = get_imdb(imdb_name)
        imdb.competition_mode(comp_mode)
        if matlab_eval:
            imdb.config["matlab_eval"] = True
        result = reval(output_dir, imdb, nms=apply_nms, log_fn=click.echo)
    echo_ap(result)
