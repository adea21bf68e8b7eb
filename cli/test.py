"""``caffe-compat test``: score a net, as py-faster-rcnn's ``tools/test_net.py`` or ``caffe test``.

* With ``--imdb NAME``: detection testing (``test_net.py``): detect on every image of the
  data set, evaluate (per-class AP and mAP), cache the detections as ``.npz``.
* Without: Caffe's ``caffe test --model NET --weights W --iterations N``: N forward
  passes of the TEST net (its own data layers provide the data), each output blob's
  elements printed per batch (``Batch k, name = v``) and averaged at the end
  (``name = mean``, with the weighted loss for loss outputs), accumulated in float32 as
  Caffe does.
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import click
import numpy as np

from caffe_compat.cli.main import friendly, main

__all__ = ["config_scope", "select_device", "caffe_test", "check_file"]


# ----------------------------------------------------------------------------- shared helpers
def config_scope(cfg_file: Optional[str], set_pairs: Sequence[Tuple[str, str]], extra: Sequence[str] = (),
                 gpu: Optional[int] = None, *, frcnn: bool = True) -> ContextManager[Any]:
    """py-faster-rcnn's config for one command: ``--cfg FILE``, ``--set KEY VALUE`` (plus
    trailing ``KEY VALUE`` words) and ``--gpu``, in force inside the ``with`` block and
    restored after it (:func:`caffe_compat.frcnn.config.command_cfg`, which yields the
    config).  A plain Caffe command (``frcnn=False``) given none of them gets an empty
    scope and never loads ``caffe_compat.frcnn``."""
    if not (frcnn or cfg_file or set_pairs or extra):
        return contextlib.nullcontext()
    from caffe_compat.frcnn.config import command_cfg

    return command_cfg(cfg_file, set_pairs, extra, gpu_id=gpu)


def select_device(gpu: Optional[int]):
    """``None`` or a negative id: the CPU; else ``cuda:<gpu>``, which must exist."""
    import torch

    from caffe_compat.errors import SchemaError

    if gpu is None or gpu < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SchemaError(f"--gpu {gpu} given but no CUDA device is available (leave --gpu out "
                          "to run on the CPU)")
    if gpu >= torch.cuda.device_count():
        raise SchemaError(f"--gpu {gpu}: there are only {torch.cuda.device_count()} CUDA devices")
    return torch.device(f"cuda:{gpu}")


def check_file(path: Optional[str], what: str, flag: str) -> str:
    """``path`` if it is a file, else a clear error naming the flag."""
    from caffe_compat.errors import DataError, WeightsError

    if not path:
        raise DataError(f"{flag} is required: {what}")
    if not os.path.isfile(path):
        cls = WeightsError if flag == "--weights" else DataError
        raise cls(f"{what} not found ({flag})", where=path)
    return path


def _fmt(v: float) -> str:
    """A float as C++ streams print it by default (6 significant digits)."""
    v = float(v)
    if np.isnan(v):
        return "nan"
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.6g}"


def caffe_test(net: Any, iterations: int, echo: Callable[[str], None] = print) -> Dict[str, Any]:
    """Caffe's ``test`` loop: run ``iterations`` forwards, print and average every output.

    Returns ``{"loss": mean loss, "scores": OrderedDict(name -> float32 array of the
    per-element means), "batches": [per-batch OrderedDict(name -> array)]}``.  Sums are
    float32 (Caffe's ``vector<float>``), so the means match Caffe's to the last bit of
    their inputs.
    """
    import torch

    from caffe_compat.errors import SchemaError

    if iterations < 1:
        raise SchemaError(f"--iterations must be >= 1, got {iterations}")
    weights: Dict[str, float] = {}
    for e in net.entries:                      # the last writer of a blob sets its loss weight
        for t, w in zip(e.tops, e.loss_weights):
            weights[t] = float(w)
    echo(f"Running for {iterations} iterations.")
    sums: "OrderedDict[str, np.ndarray]" = OrderedDict()
    batches: List["OrderedDict[str, np.ndarray]"] = []
    loss = np.float32(0.0)
    with torch.no_grad():
        for i in range(iterations):
            outs = net.forward()
            iter_loss = np.float32(net.loss.item()) if net.loss is not None else np.float32(0.0)
            loss = np.float32(loss + iter_loss)
            batch: "OrderedDict[str, np.ndarray]" = OrderedDict()
            for name, t in outs.items():
                vals = t.detach().to(torch.float32).cpu().numpy().reshape(-1).copy()
                batch[name] = vals
                if i == 0:
                    sums[name] = vals.copy()
                else:
                    sums[name] = (sums[name] + vals).astype(np.float32)
                for v in vals:
                    echo(f"Batch {i}, {name} = {_fmt(v)}")
            batches.append(batch)
    loss = np.float32(loss / np.float32(iterations))
    echo(f"Loss: {_fmt(loss)}")
    means: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for name, s in sums.items():
        mean = (s / np.float32(iterations)).astype(np.float32)
        means[name] = mean
        w = np.float32(weights.get(name, 0.0))
        for v in mean:
            extra = f" (* {_fmt(w)} = {_fmt(np.float32(w * v))} loss)" if w else ""
            echo(f"{name} = {_fmt(v)}{extra}")
    return {"loss": float(loss), "scores": means, "batches": batches}


# ----------------------------------------------------------------------------- command
@main.command("test", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--model", "--def", "model", required=True, type=click.Path(dir_okay=False),
              help="Net definition (the TEST net).")
@click.option("--weights", "--net", "weights", type=click.Path(dir_okay=False),
              help="Trained weights (.caffemodel, .pt or .safetensors).")
@click.option("--imdb", "imdb_name", default=None,
              help="Data set to detect on (e.g. voc_2007_test): py-faster-rcnn detection testing. "
                   "Without it: Caffe's `caffe test`.")
@click.option("--cfg", "cfg_file", type=click.Path(dir_okay=False), help="py-faster-rcnn config YAML.")
@click.option("--set", "set_cfgs", nargs=2, multiple=True, metavar="KEY VALUE",
              help="Override a config key (repeatable; trailing KEY VALUE words also count).")
@click.option("--gpu", type=int, default=None, help="CUDA device id (default: CPU).")
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
@click.option("--stage", "stages", multiple=True, help="Net state stage (repeatable).")
@click.option("--level", type=int, default=None, help="Net state level.")
@click.option("--allow-python-layers", is_flag=True, envvar="CAFFE_COMPAT_ALLOW_PYTHON_LAYERS",
              help="Allow importing the modules of unregistered Python layers.")
@click.pass_context
@friendly
def test_command(ctx, model, weights, imdb_name, cfg_file, set_cfgs, gpu, comp_mode, max_per_image,
                 thresh, vis, output_dir, rpn_file, iterations, stages, level, allow_python_layers):
    """Test MODEL with WEIGHTS: detection mAP on --imdb, or Caffe's averaged outputs."""
    check_file(model, "net definition", "--model")
    check_file(weights, "weights file (a trained model is needed to score)", "--weights")
    with config_scope(cfg_file, set_cfgs, ctx.args, gpu, frcnn=bool(imdb_name)):
        device = select_device(gpu)
        if imdb_name:
            _detection_test(model, weights, imdb_name, device, comp_mode, max_per_image, thresh, vis,
                            output_dir, rpn_file, stages, level, allow_python_layers)
        else:
            _caffe_mode(model, weights, device, iterations, stages, level, allow_python_layers)


def _caffe_mode(model, weights, device, iterations, stages, level, allow_python_layers) -> None:
    from caffe_compat.net import Net

    click.echo("Use CPU." if device.type == "cpu" else f"Use GPU with device ID {device.index}")
    net = Net(model, phase="test", stages=stages, level=level, device=device,
              allow_python_layers=allow_python_layers or None)
    for note in net.load_weights(weights):
        click.echo(f"note: {note}", err=True)
    caffe_test(net, iterations, click.echo)


def _detection_test(model, weights, imdb_name, device, comp_mode, max_per_image, thresh, vis,
                    output_dir, rpn_file, stages, level, allow_python_layers) -> None:
    from caffe_compat.frcnn.config import cfg
    from caffe_compat.frcnn.datasets.factory import get_imdb
    from caffe_compat.frcnn.test import test_net
    from caffe_compat.net import Net

    net = Net(model, phase="test", stages=stages, level=level, device=device,
              allow_python_layers=allow_python_layers or None)
    for note in net.load_weights(weights):
        click.echo(f"note: {note}", err=True)
    net.name = os.path.splitext(os.path.basename(weights))[0]
    inputs = set(net.input_names)
    if "im_info" in inputs and "rois" not in inputs and not cfg.TEST.HAS_RPN:
        click.echo("note: the net takes im_info (an RPN net): using TEST.HAS_RPN True", err=True)
        cfg.TEST.HAS_RPN = True
    elif "rois" in inputs and "im_info" not in inputs and cfg.TEST.HAS_RPN:
        click.echo("note: the net takes rois (precomputed proposals): using TEST.HAS_RPN False", err=True)
        cfg.TEST.HAS_RPN = False

    imdb = get_imdb(imdb_name)
    imdb.competition_mode(comp_mode)
    if not cfg.TEST.HAS_RPN:
        if rpn_file:
            imdb.config["rpn_file"] = rpn_file
        imdb.set_proposal_method(cfg.TEST.PROPOSAL_METHOD)
    click.echo(f"Testing '{net.name}' on {imdb.name} ({imdb.num_images} images, "
               f"{'CPU' if device.type == 'cpu' else f'cuda:{device.index}'})")
    result = test_net(net, imdb, max_per_image=max_per_image, thresh=thresh, vis=vis,
                      output_dir=output_dir, log_fn=click.echo)
    for cls, ap in result["ap"].items():
        click.echo(f"AP for {cls} = {_ap(ap)}")
    if "mAP" in result:
        click.echo(f"Mean AP = {_ap(result['mAP'])}")
    click.echo(f"Results in {result['output_dir']}")


def _ap(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a (no objects of this class)"
    return f"{float(v):.4f}"
