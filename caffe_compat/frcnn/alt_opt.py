"""py-faster-rcnn's 4-step alternating optimization (``tools/train_faster_rcnn_alt_opt.py``).

The steps of the NIPS 2015 paper, with the original's settings::

    stage 1 RPN          (TRAIN.HAS_RPN, no Fast R-CNN bbox regression, gt roidb, 1 image)
                         init: the pretrained (ImageNet) model
    rpn_generate         proposals of every image of the imdb with the stage-1 RPN
                         (TEST.RPN_PRE_NMS_TOP_N -1, TEST.RPN_POST_NMS_TOP_N 2000)
    stage 1 Fast R-CNN   on those proposals (TRAIN.PROPOSAL_METHOD 'rpn', 2 images)
                         init: the pretrained model
    stage 2 RPN          init: the stage-1 Fast R-CNN (its conv layers are frozen by the
                         stage-2 prototxts' lr_mult 0)
    rpn_generate         with the stage-2 RPN
    stage 2 Fast R-CNN   init: the stage-2 RPN
    final model          a copy of the last one: <net>_faster_rcnn_final.caffemodel

Stage definitions come from one folder holding ``stage1_rpn_train.pt``,
``stage1_fast_rcnn_train.pt``, ``stage2_rpn_train.pt``, ``stage2_fast_rcnn_train.pt``,
``rpn_test.pt`` and the solvers ``stage{1,2}_{rpn,fast_rcnn}_solver*.pt`` (a stage
without a solver file gets the original's: SGD, lr 0.001, step, momentum 0.9, decay
0.0005).  A solver's ``train_net`` path is taken relative to the current directory as
Caffe does, and else looked up in that folder.

The original ran every stage in a subprocess (pycaffe did not free GPU memory); here each
stage runs in this process with fresh nets, and its config changes are undone when it
ends (as the subprocesses' were).  Each stage seeds its random generators from
``cfg.RNG_SEED`` like the original's ``_init_caffe``.  Intermediate snapshots of a stage
are deleted, only its last model is kept; no ``.solverstate`` files are written (the
original wrote none; a stage cannot be resumed in the middle of the pipeline).
Proposals are written as ``.npz`` (boxes and scores; the original pickled them).
"""
from __future__ import annotations

import glob
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from caffe_compat.errors import DataError
from caffe_compat.frcnn.config import ConfigError, cfg, get_output_dir, temporary_cfg
from caffe_compat.frcnn.train import train_net
from caffe_compat.protos import caffe_pb2
from caffe_compat.trainer import (FORMATS, TrainResult, load_solver_param, resolve_net_paths,
                                  seed_everything)

__all__ = ["STAGES", "DEFAULT_ITERS", "find_stage_dir", "get_solvers", "parse_iters", "get_roidb",
           "train_rpn", "train_fast_rcnn", "rpn_generate", "rpn_generate_tool", "imdb_proposals", "im_proposals",
           "train_alt_opt", "AltOptResult"]

log = logging.getLogger("caffe_compat.train")

#: the four training stages, in order
STAGES: Tuple[str, ...] = ("stage1_rpn", "stage1_fast_rcnn", "stage2_rpn", "stage2_fast_rcnn")
#: the original's iterations per stage
DEFAULT_ITERS: Tuple[int, ...] = (80000, 40000, 80000, 40000)
_SOLVER_NAMES = {"stage1_rpn": "stage1_rpn_solver60k80k.pt",
                 "stage1_fast_rcnn": "stage1_fast_rcnn_solver30k40k.pt",
                 "stage2_rpn": "stage2_rpn_solver60k80k.pt",
                 "stage2_fast_rcnn": "stage2_fast_rcnn_solver30k40k.pt"}
_DEFAULT_SOLVER = {"stage1_rpn": ("zf_rpn", 60000), "stage1_fast_rcnn": ("zf_fast_rcnn", 30000),
                   "stage2_rpn": ("zf_rpn", 60000), "stage2_fast_rcnn": ("zf_fast_rcnn", 30000)}


def _banner(text: str) -> None:
    line = "~" * 58
    log.info("%s", line)
    log.info("%s", text)
    log.info("%s", line)


def find_stage_dir(net_name: str) -> str:
    """The folder of the stage prototxts for ``--net_name``.

    ``net_name`` may be that folder itself, a folder holding ``faster_rcnn_alt_opt/``, or
    a name looked up as py-faster-rcnn did: ``cfg.MODELS_DIR/<name>/faster_rcnn_alt_opt``.
    """
    cands = []
    if os.path.isdir(net_name):
        cands += [net_name, os.path.join(net_name, "faster_rcnn_alt_opt")]
    cands.append(os.path.join(cfg.MODELS_DIR, net_name, "faster_rcnn_alt_opt"))
    for d in cands:
        if os.path.isfile(os.path.join(d, "stage1_rpn_train.pt")) or glob.glob(
                os.path.join(d, "stage1_rpn_solver*.pt")):
            return os.path.abspath(d)
    raise DataError(f"no alternating-optimization stage prototxts (stage1_rpn_train.pt, ...) for "
                    f"'{net_name}'; looked in: {', '.join(cands)} (give the folder itself, e.g. "
                    "models/pascal_voc/ZF/faster_rcnn_alt_opt, or set MODELS_DIR)")


def _net_label(stage_dir: str, net_name: str) -> str:
    """The name in ``<name>_faster_rcnn_final.caffemodel`` (ZF for .../ZF/faster_rcnn_alt_opt)."""
    if not os.path.isdir(net_name):
        return os.path.basename(os.path.normpath(net_name))
    d = os.path.normpath(stage_dir)
    if os.path.basename(d) == "faster_rcnn_alt_opt":
        d = os.path.dirname(d)
    return os.path.basename(d) or "net"


def _stage_solver(stage_dir: str, stage: str) -> "caffe_pb2.SolverParameter":
    named = os.path.join(stage_dir, _SOLVER_NAMES[stage])
    found = [named] if os.path.isfile(named) else sorted(glob.glob(os.path.join(stage_dir, f"{stage}_solver*.pt")))
    if found:
        param = load_solver_param(found[0])
        for note in resolve_net_paths(param, [stage_dir]):
            log.info("%s", note)
        return param
    train = os.path.join(stage_dir, f"{stage}_train.pt")
    if not os.path.isfile(train):
        raise DataError(f"stage '{stage}' has neither a solver ({stage}_solver*.pt) nor a net "
                        f"({stage}_train.pt)", where=stage_dir)
    prefix, step = _DEFAULT_SOLVER[stage]
    p = caffe_pb2.SolverParameter()
    p.train_net = train
    p.base_lr = 0.001
    p.lr_policy = "step"
    p.gamma = 0.1
    p.stepsize = step
    p.display = 20
    p.average_loss = 100
    p.momentum = 0.9
    p.weight_decay = 0.0005
    p.snapshot = 0
    p.snapshot_prefix = prefix
    return p


def get_solvers(stage_dir: str) -> Tuple[List["caffe_pb2.SolverParameter"], str]:
    """The four stages' solver definitions and the RPN test prototxt (``rpn_test.pt``)."""
    solvers = [_stage_solver(stage_dir, s) for s in STAGES]
    rpn_test = os.path.join(stage_dir, "rpn_test.pt")
    if not os.path.isfile(rpn_test):
        raise DataError("the RPN test net rpn_test.pt (for proposal generation) is missing",
                        where=stage_dir)
    return solvers, rpn_test


def parse_iters(iters: Union[None, int, str, Sequence[int]] = None,
                scale: Optional[float] = None) -> List[int]:
    """Iterations per stage: ``None`` (the original's 80k/40k/80k/40k), one number for every
    stage, four numbers (``"100,50,100,50"``), and/or a ``scale`` applied to them
    (rounded, at least 1)."""
    if iters is None:
        out = list(DEFAULT_ITERS)
    elif isinstance(iters, int):
        out = [iters] * 4
    else:
        items = [s for s in str(iters).replace(" ", ",").split(",") if s] if isinstance(iters, str) \
            else list(iters)
        try:
            vals = [int(v) for v in items]
        except ValueError:
            raise ConfigError(f"iterations per stage must be integers, got {iters!r}") from None
        if len(vals) == 1:
            vals = vals * 4
        if len(vals) != 4:
            raise ConfigError(f"give one iteration count or four (stage 1 RPN, stage 1 Fast R-CNN, "
                              f"stage 2 RPN, stage 2 Fast R-CNN), got {len(vals)}: {iters!r}")
        out = vals
    if scale is not None:
        if not scale > 0:
            raise ConfigError(f"the iteration scale must be positive, got {scale}")
        out = [max(1, int(round(v * scale))) for v in out]
    if any(v < 1 for v in out):
        raise ConfigError(f"every stage needs at least 1 iteration, got {out}")
    return out


def get_roidb(imdb_name: str, rpn_file: Optional[str] = None) -> Tuple[List[Dict[str, Any]], Any]:
    """``roidb, imdb`` with ``cfg.TRAIN.PROPOSAL_METHOD`` (and the proposals file, if any)."""
    from caffe_compat.frcnn.datasets.factory import get_imdb
    from caffe_compat.frcnn.roidb import get_training_roidb

    imdb = get_imdb(imdb_name)
    log.info("Loaded dataset `%s` for training", imdb.name)
    imdb.set_proposal_method(cfg.TRAIN.PROPOSAL_METHOD)
    log.info("Set proposal method: %s", cfg.TRAIN.PROPOSAL_METHOD)
    if rpn_file is not None:
        imdb.config["rpn_file"] = rpn_file
    roidb = get_training_roidb(imdb)
    return roidb, imdb


def _remove_snapshot(path: str) -> None:
    stem, _ = os.path.splitext(path)
    for ext in list(FORMATS.values()) + [".solverstate"]:
        try:
            os.remove(stem + ext)
        except FileNotFoundError:
            pass


def _keep_last(result: TrainResult) -> None:
    """The original kept only the final model of each stage."""
    for p in result.model_paths[:-1]:
        _remove_snapshot(p)


def _is_main(dist: Any) -> bool:
    """Rank 0 of a distributed run (or a single process): the one that owns the files."""
    return dist is None or dist.is_main


def _stage_output_dir(imdb: Any, output_dir: Optional[str]) -> str:
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        return os.path.abspath(output_dir)
    return get_output_dir(imdb)


def train_rpn(imdb_name: str, init_model: Optional[str], solver: Any, max_iters: int, *,
              output_dir: Optional[str] = None, randomize: bool = False, **train_kw: Any) -> TrainResult:
    """Train an RPN on ground-truth boxes (one stage; config changes are undone after)."""
    with temporary_cfg():
        cfg.TRAIN.HAS_RPN = True
        cfg.TRAIN.BBOX_REG = False   # applies only to Fast R-CNN bbox regression
        cfg.TRAIN.PROPOSAL_METHOD = "gt"
        cfg.TRAIN.IMS_PER_BATCH = 1
        log.info("Init model: %s", init_model)
        if not randomize:
            seed_everything(cfg.RNG_SEED)
        roidb, imdb = get_roidb(imdb_name)
        log.info("roidb len: %d", len(roidb))
        out = _stage_output_dir(imdb, output_dir)
        log.info("Output will be saved to `%s`", out)
        result = train_net(solver, roidb, out, pretrained_model=init_model, max_iters=max_iters,
                           randomize=randomize, **train_kw)
    if _is_main(train_kw.get("dist")):
        _keep_last(result)
    return result


def train_fast_rcnn(imdb_name: str, init_model: Optional[str], solver: Any, max_iters: int,
                    rpn_file: str, *, output_dir: Optional[str] = None, randomize: bool = False,
                    **train_kw: Any) -> TrainResult:
    """Train a Fast R-CNN on precomputed RPN proposals (one stage)."""
    with temporary_cfg():
        cfg.TRAIN.HAS_RPN = False            # not generating proposals on the fly
        cfg.TRAIN.PROPOSAL_METHOD = "rpn"    # use the precomputed RPN proposals instead
        cfg.TRAIN.IMS_PER_BATCH = 2
        log.info("Init model: %s", init_model)
        log.info("RPN proposals: %s", rpn_file)
        if not randomize:
            seed_everything(cfg.RNG_SEED)
        roidb, imdb = get_roidb(imdb_name, rpn_file=rpn_file)
        out = _stage_output_dir(imdb, output_dir)
        log.info("Output will be saved to `%s`", out)
        result = train_net(solver, roidb, out, pretrained_model=init_model, max_iters=max_iters,
                           randomize=randomize, **train_kw)
    if _is_main(train_kw.get("dist")):
        _keep_last(result)
    return result


def im_proposals(net: Any, im: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """RPN proposals ``(R, 4)`` in image coordinates and their scores ``(R, 1)`` for one
    BGR image: the image at ``TEST.SCALES[0]`` (longest side at most ``TEST.MAX_SIZE``),
    the net's ``rois`` divided by the scale (and clipped to the image)."""
    import torch

    from caffe_compat.frcnn.roidb import im_list_to_blob, prep_im_for_blob

    if len(cfg.TEST.SCALES) != 1:
        raise ConfigError(f"proposal generation uses one scale; TEST.SCALES is {tuple(cfg.TEST.SCALES)}")
    resized, scale = prep_im_for_blob(im, cfg.PIXEL_MEANS, int(cfg.TEST.SCALES[0]), int(cfg.TEST.MAX_SIZE))
    blob = im_list_to_blob([resized])
    im_info = np.array([[blob.shape[2], blob.shape[3], scale]], dtype=np.float32)
    dev, dtype = net.device, net.dtype
    with torch.no_grad():
        net.forward(data=torch.from_numpy(blob).to(device=dev, dtype=dtype),
                    im_info=torch.from_numpy(im_info).to(device=dev, dtype=dtype))
    for name in ("rois", "scores"):
        if name not in net.blobs:
            raise DataError(f"the RPN test net has no '{name}' blob (its proposal layer's tops "
                            "should be 'rois' and 'scores', as in rpn_test.pt)")
    rois = net.blobs["rois"].detach().double().cpu().numpy()
    scores = net.blobs["scores"].detach().double().cpu().numpy()
    boxes = rois[:, 1:5] / float(im_info[0, 2])
    # The net clips to the *resized* image; mapped back, a box may overhang the original
    # by a fraction of a pixel (the resized size is rounded), which a horizontal flip
    # would turn into a negative x.  Clip to the original image.
    h, w = im.shape[:2]
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w - 1)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h - 1)
    return boxes.astype(np.float32), scores.reshape(-1, 1).astype(np.float32)


def imdb_proposals(net: Any, imdb: Any, indices: Optional[Sequence[int]] = None
                   ) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Proposals (and scores) of every image of ``imdb`` (or of ``indices``), in its order."""
    import cv2

    boxes: List[np.ndarray] = []
    scores: List[np.ndarray] = []
    todo = list(range(imdb.num_images) if indices is None else indices)
    n = len(todo)
    t0 = time.perf_counter()
    every = max(1, n // 10)
    for k, i in enumerate(todo):
        path = imdb.image_path_at(i)
        im = cv2.imread(path)
        if im is None:
            raise DataError("cannot read image", where=path)
        b, s = im_proposals(net, im)
        boxes.append(b)
        scores.append(s)
        if (k + 1) % every == 0 or k + 1 == n:
            log.info("im_proposals: %d/%d %.3fs", k + 1, n, (time.perf_counter() - t0) / (k + 1))
    return boxes, scores


def rpn_generate(imdb_name: str, rpn_model_path: str, rpn_test_prototxt: str, *,
                 output_dir: Optional[str] = None, device: Any = None,
                 filename: Optional[str] = None, dist: Any = None) -> str:
    """Write the RPN's proposals for every image of ``imdb_name``; returns the ``.npz`` path
    (``<output dir>/<filename>``, default ``<model name>_proposals.npz``; output dir default:
    ``get_output_dir(imdb)``).  ``dist``: each rank proposes for its share of the images,
    rank 0 gathers and writes them, every rank returns once the file is written."""
    from caffe_compat.frcnn.datasets.factory import get_imdb
    from caffe_compat.frcnn.datasets.imdb import save_proposals
    from caffe_compat.net import Net

    with temporary_cfg():
        cfg.TEST.RPN_PRE_NMS_TOP_N = -1     # no pre-NMS filtering
        cfg.TEST.RPN_POST_NMS_TOP_N = 2000  # limit top boxes after NMS
        log.info("RPN model: %s", rpn_model_path)
        # as the original: proposals of the unflipped images only (training flips them)
        imdb = get_imdb(imdb_name)
        log.info("Loaded dataset `%s` for proposal generation", imdb.name)
        net = Net(rpn_test_prototxt, weights=rpn_model_path, phase="test", allow_missing=False,
                  device=device)
        out = _stage_output_dir(imdb, output_dir)
        log.info("Output will be saved to `%s`", out)
        name = os.path.splitext(os.path.basename(rpn_model_path))[0]
        path = os.path.join(out, filename or name + "_proposals.npz")
        if dist is not None and dist.distributed:
            from caffe_compat.distributed import barrier, gather_objects, shard_range

            parts = gather_objects(imdb_proposals(net, imdb, shard_range(imdb.num_images, dist.rank,
                                                                         dist.world_size)), dist)
            if parts is not None:
                boxes = [b for part in parts for b in part[0]]
                scores = [sc for part in parts for sc in part[1]]
                save_proposals(path, boxes, scores)
            barrier(dist)
        else:
            boxes, scores = imdb_proposals(net, imdb)
            save_proposals(path, boxes, scores)
    log.info("Wrote RPN proposals to %s", path)
    return path


def rpn_generate_tool(imdb_name: str, rpn_model_path: str, rpn_test_prototxt: str, *,
                      output_dir: Optional[str] = None, device: Any = None) -> str:
    """py-faster-rcnn's ``tools/rpn_generate.py``: :func:`rpn_generate` into
    ``<output dir>/<model name>_rpn_proposals.npz``, the output dir defaulting to
    ``ROOT/output/<EXP_DIR>/<imdb>/<model name>``."""
    from caffe_compat.frcnn.datasets.factory import get_imdb

    name = os.path.splitext(os.path.basename(rpn_model_path))[0]
    if output_dir is None:
        output_dir = get_output_dir(get_imdb(imdb_name), SimpleNamespace(name=name))
    return rpn_generate(imdb_name, rpn_model_path, rpn_test_prototxt, output_dir=output_dir,
                        device=device, filename=name + "_rpn_proposals.npz")


@dataclass
class AltOptResult:
    """Outputs of the pipeline (paths); ``interrupted`` names the stage a signal stopped."""

    final_model: Optional[str] = None
    stage_models: Dict[str, str] = field(default_factory=dict)
    proposals: Dict[str, str] = field(default_factory=dict)
    loss_curves: Dict[str, str] = field(default_factory=dict)
    interrupted: Optional[str] = None
    signal: Optional[str] = None
    output_dir: Optional[str] = None


def _copy_atomic(src: str, dst: str) -> None:
    folder = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(folder, "." + os.path.basename(dst) + ".tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def train_alt_opt(net_name: str, imdb_name: str = "voc_2007_trainval", *,
                  pretrained_model: Optional[str] = None,
                  iters: Union[None, int, str, Sequence[int]] = None, iters_scale: Optional[float] = None,
                  output_dir: Optional[str] = None, device: Any = None,
                  formats: Sequence[str] = ("caffemodel",), randomize: bool = False,
                  progress: bool = True, progress_stream: Any = None,
                  handle_signals: bool = True, dist: Any = None) -> AltOptResult:
    """Run the six steps; returns the paths written (see the module doc).  ``dist``: one rank
    of a distributed run (:mod:`caffe_compat.distributed`): every stage trains on all ranks,
    proposals are generated on shares of the images, rank 0 writes the files."""
    stage_dir = find_stage_dir(net_name)
    label = _net_label(stage_dir, net_name)
    max_iters = parse_iters(iters, iters_scale)
    solvers, rpn_test = get_solvers(stage_dir)
    res = AltOptResult()
    kw: Dict[str, Any] = dict(output_dir=output_dir, device=device, formats=formats,
                              randomize=randomize, progress=progress, progress_stream=progress_stream,
                              handle_signals=handle_signals, save_state=False, dist=dist)
    log.info("Stage prototxts: %s; iterations per stage: %s", stage_dir, max_iters)

    def stop(result: TrainResult, stage: str) -> bool:
        if result.loss_curve:
            res.loss_curves[stage] = result.loss_curve
        if result.final_model:
            res.stage_models[stage] = result.final_model
        res.output_dir = result.output_dir
        if result.interrupted:
            res.interrupted, res.signal = stage, result.signal
            log.warning("stopped during %s; its snapshot: %s", stage, result.final_model)
            return True
        return False

    with temporary_cfg():
        _banner("Stage 1 RPN, init from ImageNet model")
        cfg.TRAIN.SNAPSHOT_INFIX = "stage1"
        r = train_rpn(imdb_name, pretrained_model, solvers[0], max_iters[0], **kw)
        if stop(r, STAGES[0]):
            return res
        _banner("Stage 1 RPN, generate proposals")
        res.proposals["stage1"] = rpn_generate(imdb_name, r.final_model, rpn_test,
                                               output_dir=output_dir, device=device, dist=dist)

        _banner("Stage 1 Fast R-CNN using RPN proposals, init from ImageNet model")
        cfg.TRAIN.SNAPSHOT_INFIX = "stage1"
        r = train_fast_rcnn(imdb_name, pretrained_model, solvers[1], max_iters[1],
                            res.proposals["stage1"], **kw)
        if stop(r, STAGES[1]):
            return res

        _banner("Stage 2 RPN, init from stage 1 Fast R-CNN model")
        cfg.TRAIN.SNAPSHOT_INFIX = "stage2"
        r = train_rpn(imdb_name, r.final_model, solvers[2], max_iters[2], **kw)
        if stop(r, STAGES[2]):
            return res
        _banner("Stage 2 RPN, generate proposals")
        res.proposals["stage2"] = rpn_generate(imdb_name, r.final_model, rpn_test,
                                               output_dir=output_dir, device=device, dist=dist)

        _banner("Stage 2 Fast R-CNN, init from stage 2 RPN R-CNN model")
        cfg.TRAIN.SNAPSHOT_INFIX = "stage2"
        r = train_fast_rcnn(imdb_name, r.final_model, solvers[3], max_iters[3],
                            res.proposals["stage2"], **kw)
        if stop(r, STAGES[3]):
            return res

    last = r.final_model
    assert last is not None
    stem, ext = os.path.splitext(last)
    final = os.path.join(os.path.dirname(last), f"{label}_faster_rcnn_final{ext}")
    log.info("cp %s -> %s", last, final)
    if _is_main(dist):
        _copy_atomic(last, final)
        for other in FORMATS.values():   # the other formats of the same snapshot
            if other != ext and os.path.exists(stem + other):
                _copy_atomic(stem + other, os.path.join(os.path.dirname(last),
                                                        f"{label}_faster_rcnn_final{other}"))
    res.final_model = final
    log.info("Final model: %s", final)
    return res

